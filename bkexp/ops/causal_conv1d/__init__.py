"""Causal depthwise conv1d with an optional SiLU, the op of the ``causal-conv1d`` package Mamba uses.

``causal_conv1d(x, weight, bias=None, activation=None, backend="auto")`` on ``x`` (batch, d, l), ``weight``
(d, w), ``bias`` (d,) returns (batch, d, l)::

    out[:, c, t] = act(bias[c] + sum_j weight[c, j] * x[:, c, t - (w - 1) + j])     (x = 0 before t = 0)

with ``act`` the identity or ``silu`` (``"silu"``/``"swish"``). It is ``Conv1d(d, d, w, groups=d,
padding=w - 1)`` cut to the first ``l`` outputs. Like the selective scan, it computes position-major:
``x`` is best a ``(b, d, l)`` view of a ``(b, l, d)`` tensor (what the Mamba mixer passes), the output is
such a view, and a ``(b, d, l)``-contiguous input is copied once.

Backends (``BACKENDS``):

- ``cpu``: numba kernels, forward and backward, each one pass (the SiLU and its derivative fused; the
  backward recomputes the pre-activation instead of storing it); ``cpu.py``.
- ``ref``: PyTorch, ``w`` shifted multiply-adds differentiated by autograd, any device.

``auto`` picks cpu for CPU tensors when numba is installed and ref otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bkexp.ops.backends import numba_cpu_backends

ACTIVATIONS = (None, "silu", "swish")
_BACKENDS = numba_cpu_backends("causal_conv1d")
BACKENDS: tuple[str, ...] = _BACKENDS.names
available_backends = _BACKENDS.available  # backends that can run on a device here
resolve_backend = _BACKENDS.resolve  # the backend causal_conv1d(..., backend=...) runs on a device; raises if not


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, silu: bool = False) -> Tensor:
    """The ``ref`` backend: ``w`` shifted multiply-adds on the position-major view (autograd differentiates)."""
    x_t = x.transpose(1, 2)  # (b, l, d)
    seqlen, width = x_t.shape[1], weight.shape[1]
    padded = F.pad(x_t, (0, 0, width - 1, 0))
    out = padded[:, width - 1:, :] * weight[:, -1]  # tap j multiplies x[t - (w - 1) + j]
    for tap in range(width - 1):
        out = out + padded[:, tap:tap + seqlen, :] * weight[:, tap]
    if bias is not None:
        out = out + bias
    return (F.silu(out) if silu else out).transpose(1, 2)


# A torch.compile'd model runs the op eagerly: dynamo cannot trace its numba kernel (it failed inside numba's
# dispatcher).
@torch.compiler.disable
def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                  backend: str = "auto") -> Tensor:
    """(batch, d, l) in ``x``'s dtype; see the module docstring."""
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a real floating tensor (batch, d, l), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be (d, width) = ({x.shape[1]}, width), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (x.shape[1],)):
        raise ValueError(f"bias must be None or a ({x.shape[1]},) tensor, got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: None, silu, swish")
    silu = activation is not None
    if resolve_backend(backend, x.device) == "ref":
        return causal_conv1d_reference(x, weight, bias, silu)
    from .cpu import causal_conv1d_cpu

    with torch.autocast(device_type=x.device.type, enabled=False):
        return causal_conv1d_cpu(x, weight, bias, silu)


__all__ = ["ACTIVATIONS", "BACKENDS", "available_backends", "causal_conv1d", "causal_conv1d_reference",
           "resolve_backend"]
