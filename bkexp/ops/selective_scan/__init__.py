"""Mamba's selective scan behind one function, with the semantics of ``mamba_ssm``'s ``selective_scan_fn``.

``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto")``
returns ``out`` of shape (batch, d, l) in ``u``'s dtype::

    delta' = softplus(delta + delta_bias)      (bias and softplus optional)
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t u_t B_t,   h_{-1} = 0      state (batch, d, n)
    y_t    = <h_t, C_t> + D * u_t,   out = y * silu(z)   (D and z optional)

Shapes: ``u``, ``delta``, ``z``: (batch, d, l); ``A``: (d, n), real; ``B``, ``C``: input-dependent
(batch, n, l) as in Mamba, grouped (batch, g, n, l) with ``d % g == 0`` (channel ``c`` reads group
``c // (d // g)``), or time-invariant (d, n); ``D``, ``delta_bias``: (d,). The scan is causal: ``out[..., t]``
depends on positions ``<= t`` only. Computation is float32 (float64 for float64 ``u``). Gradients flow to
every tensor input.

Backends (``BACKENDS``):

- ``cuda``: the official ``mamba_ssm`` CUDA kernels (``pip install mamba-ssm``), CUDA tensors only.
- ``cpu``: numba kernels, forward and exact adjoint backward with checkpointed states (O(b·d·l) memory).
- ``ref``: the sequential PyTorch loop (``reference.py``), any device; the test oracle, slow.

Decoding: ``return_last_state=True`` also returns the state a parallel scan over a prompt ends in, and
``selective_state_update`` (``step.py``, mamba_ssm's function of that name) advances it one position.

``backend="auto"`` picks cuda for CUDA tensors and cpu for CPU tensors, and falls back to ref (logging a
warning once) when that fast path cannot run; ``resolve_backend`` says which one would run. A backend
requested by name that cannot run raises an error saying how to install it.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from bkexp.ops.backends import OpBackends, module_available, numba_cpu_unavailable

from .step import selective_state_update

BACKENDS: tuple[str, ...] = ("cuda", "cpu", "ref")
_INSTALL_HINT = {
    "cuda": "the cuda backend needs mamba_ssm on a CUDA build of torch: pip install mamba-ssm "
            "(or pip install -e '.[gpu]')",
}


@functools.cache
def _mamba_ssm_error() -> str | None:
    """Why ``mamba_ssm``'s selective scan does not import (None when it does)."""
    if not module_available("mamba_ssm"):
        return "mamba_ssm is not installed"
    try:
        importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception as exc:  # noqa: BLE001 - a broken CUDA extension raises ImportError, OSError, RuntimeError, ...
        return f"mamba_ssm does not import ({type(exc).__name__}: {exc})"
    return None


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "cuda":
        if device.type != "cuda":
            return f"{_INSTALL_HINT['cuda']}; it runs on CUDA tensors, got device {device}"
        error = _mamba_ssm_error()
        if error is not None:
            return f"{_INSTALL_HINT['cuda']} ({error})"
    if backend == "cpu":
        return numba_cpu_unavailable(device)
    return None


_BACKENDS = OpBackends("selective_scan", BACKENDS, {"cuda": "cuda", "cpu": "cpu"}, "ref", _unavailable_reason)
available_backends = _BACKENDS.available  # backends that can run on a device here
resolve_backend = _BACKENDS.resolve  # the backend selective_scan(..., backend=...) runs on a device; raises if not


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  z: Tensor | None, delta_bias: Tensor | None) -> None:
    """Raise a ValueError/TypeError naming the first argument whose shape, dtype or device is wrong."""
    if not isinstance(u, Tensor) or not u.is_floating_point() or u.dim() != 3:
        raise ValueError(f"u must be a real floating tensor (batch, d, l), got "
                         f"{tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__}"
                         f"{' of dtype ' + str(u.dtype) if isinstance(u, Tensor) else ''}")
    batch, dim, length = u.shape
    if not isinstance(delta, Tensor) or delta.shape != u.shape or not delta.is_floating_point():
        raise ValueError(f"delta must be a real floating tensor shaped like u {tuple(u.shape)}, got "
                         f"{tuple(delta.shape) if isinstance(delta, Tensor) else type(delta).__name__}")
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (d, n) = ({dim}, n), got "
                         f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}")
    if A.is_complex():
        raise TypeError("complex A (S4D-Lin) is not supported; use a real A (Mamba's S4D-real), got "
                        f"dtype {A.dtype}")
    n = A.shape[1]
    for name, param in (("B", B), ("C", C)):
        if not isinstance(param, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(param).__name__}")
        if param.is_complex():
            raise TypeError(f"{name} must be real (A is real), got dtype {param.dtype}")
        valid = f"(d, n) = ({dim}, {n}), (batch, n, l) = ({batch}, {n}, {length}) or (batch, g, n, l) with d % g == 0"
        shape = tuple(param.shape)
        if param.dim() == 2:
            ok = shape == (dim, n)
        elif param.dim() == 3:
            ok = shape == (batch, n, length)
        elif param.dim() == 4:
            ok = (shape[0] == batch and shape[2:] == (n, length) and shape[1] >= 1 and dim % shape[1] == 0)
        else:
            ok = False
        if not ok:
            raise ValueError(f"{name} of shape {shape} is invalid; valid: {valid}")
    for name, param in (("D", D), ("delta_bias", delta_bias)):
        if param is not None and (not isinstance(param, Tensor) or tuple(param.shape) != (dim,)):
            raise ValueError(f"{name} must be None or a ({dim},) tensor, got "
                             f"{tuple(param.shape) if isinstance(param, Tensor) else type(param).__name__}")
    if z is not None and (not isinstance(z, Tensor) or z.shape != u.shape):
        raise ValueError(f"z must be None or shaped like u {tuple(u.shape)}, got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    for name, param in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                        ("delta_bias", delta_bias)):
        if param is not None and param.device != u.device:
            raise ValueError(f"{name} is on {param.device} but u is on {u.device}; all inputs must share a device")


# A torch.compile'd model runs the op eagerly: dynamo cannot trace its numba and CUDA-extension kernels (it
# failed inside numba's dispatcher) and would unroll the reference's recurrence position by position.
@torch.compiler.disable
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """``out`` (batch, d, l) in ``u``'s dtype; see the module docstring for semantics, shapes and backends.

    ``return_last_state=True`` (mamba_ssm's option) returns ``(out, last_state)``: the state after the last
    position, (batch, d, n), from which ``selective_state_update`` continues (not differentiable).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    if name == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "cpu":
        from .cpu import selective_scan_cpu as implementation
    else:
        from .reference import selective_scan_reference as implementation
    with torch.autocast(device_type=u.device.type, enabled=False):
        return implementation(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state))


__all__ = ["BACKENDS", "available_backends", "resolve_backend", "selective_scan", "selective_state_update"]
