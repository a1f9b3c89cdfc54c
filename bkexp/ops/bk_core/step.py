"""Single-step causal BK-Core: one new position per row, given the state the previous positions left.

Causal mode only (``docs/bk_core.md``): ``y_t = 1 / L_t`` with the left Schur pivots ``L_0 = a_0`` and
``L_t = a_t - k_{t-1} / L_{t-1}``, ``a_t = v_t - z``. A decoder therefore keeps **one complex number per
row**: the last pivot. It is carried as its reciprocal ``y_t = 1 / L_t``, which is also the last output, so

- after a parallel ``bk_core(..., causal=True)`` over a prompt, the state is simply the last output
  (``bk_core_state(re, im)``), with no division that would round it once more;
- a step is ``y_{t+1} = 1 / (a_{t+1} - k_t * y_t)``, the recurrence the torch and CPU kernels run.

Bidirectional outputs depend on every later position and have no incremental form.

Shapes: ``v`` real ``(...)`` (one potential per row at the new position); ``k`` real, broadcastable to
``v.shape`` (the coupling of the previous and the new position, ``k >= 0``); ``z`` complex, a number or a
tensor broadcastable to ``v.shape`` with ``Im(z) > 0``; ``state`` complex ``v.shape`` or None (the new
position is the first). Computation is float32 complex (complex128 for float64 ``v``), like ``bk_core``.
"""

from __future__ import annotations

from numbers import Number

import torch
from torch import Tensor


def _complex_dtype(v: Tensor) -> torch.dtype:
    return torch.complex128 if v.dtype == torch.float64 else torch.complex64


def bk_core_state(re: Tensor, im: Tensor) -> Tensor:
    """The decoding state after a parallel causal ``bk_core`` output ``(re, im)`` of shape ``(..., N)``.

    It is the last position's ``y_{N-1} = 1/L_{N-1}`` as a complex tensor ``(...)``.
    """
    if re.shape != im.shape or re.dim() < 1 or re.shape[-1] < 1:
        raise ValueError(f"re and im must share a shape (..., N) with N >= 1, got {tuple(re.shape)} and "
                         f"{tuple(im.shape)}")
    compute = torch.float64 if re.dtype == torch.float64 else torch.float32
    return torch.complex(re[..., -1].to(compute), im[..., -1].to(compute))


def bk_core_step(v: Tensor, k: float | Tensor | None, z: complex | Tensor, state: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(Re y_t, Im y_t, new_state)`` for the new position; ``state`` None means it is position 0.

    Outputs have ``v``'s dtype (like ``bk_core``); the new state is complex (``bk_core_state``'s dtype).
    """
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"v must be a real floating tensor, got {getattr(v, 'dtype', type(v).__name__)}")
    cdtype = _complex_dtype(v)
    if isinstance(z, Tensor):
        if not z.is_complex():
            raise TypeError(f"z must be complex (E + i*eps with eps > 0), got a real tensor of dtype {z.dtype}")
        eps = z.detach().imag
        if eps.numel() and not float(eps.min()) > 0:
            raise ValueError(f"bk_core_step needs eps = Im(z) > 0 for every row, got min Im(z) = {float(eps.min())}")
        z = z.to(cdtype)
    elif isinstance(z, Number):
        if not complex(z).imag > 0:
            raise ValueError(f"bk_core_step needs eps = Im(z) > 0, got z = {complex(z)}")
    else:
        raise TypeError(f"z must be a complex number or a complex tensor, got {type(z).__name__}")
    a = v.to(cdtype) - z
    if state is None:
        pivot = a
    else:
        if not isinstance(state, Tensor) or not state.is_complex():
            raise TypeError("state must be the complex tensor returned by bk_core_state or bk_core_step, got "
                            f"{getattr(state, 'dtype', type(state).__name__)}")
        if k is None:
            raise ValueError("k (the coupling of the previous and the new position) is required after position 0")
        k_t = k if isinstance(k, Tensor) else torch.tensor(float(k), device=v.device)
        if k_t.is_complex():
            raise TypeError(f"k must be real, got dtype {k_t.dtype}")
        pivot = a - k_t.to(a.real.dtype) * state.to(cdtype)
    if pivot.shape != v.shape:
        raise ValueError(f"k, z or state do not broadcast to v's shape {tuple(v.shape)} (got {tuple(pivot.shape)})")
    y = pivot.reciprocal()
    return y.real.to(v.dtype), y.imag.to(v.dtype), y


__all__ = ["bk_core_state", "bk_core_step"]
