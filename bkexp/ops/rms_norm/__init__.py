"""RMSNorm, ``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, as ``torch.nn.RMSNorm`` computes it.

``rms_norm(x, weight=None, eps=None, backend="auto")`` on ``x`` (..., d) and ``weight`` (d,) or None returns a
tensor of ``x``'s shape and dtype; ``eps=None`` is ``torch.finfo(x.dtype).eps``, as in ``nn.RMSNorm``.

Every block of all three models normalises with it (before the mixer and the feed-forward, and once at the
end), and on CPU PyTorch composes it from five elementwise ops forward and a dozen backward: at size=small
(8192 x 240 float32) 8.6-10 ms forward+backward, against 1.9 ms for ``nn.LayerNorm``'s fused kernel and
1.9 ms for the ``cpu`` backend here -- ~50 ms of a ~1.1 s training step for the seven norms of a small model.

Backends (``BACKENDS``):

- ``cpu``: numba kernels (``cpu.py``), forward and backward each one pass over the rows; float32 and float64
  CPU tensors outside autocast, dispatch modes (FLOP counting) and ``torch.compile``, which take ``ref``.
- ``ref``: ``torch.nn.functional.rms_norm``, any device and dtype (autograd differentiates).

``auto`` picks cpu for CPU tensors when numba is installed and ref otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bkexp.ops.backends import compiled_cpu_path_applies, numba_cpu_backends

_BACKENDS = numba_cpu_backends("rms_norm")
BACKENDS: tuple[str, ...] = _BACKENDS.names
available_backends = _BACKENDS.available  # backends that can run on a device here
resolve_backend = _BACKENDS.resolve  # the backend rms_norm(..., backend=...) runs on a device; raises if not


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float | None) -> Tensor:
    """The ``ref`` backend: PyTorch's ``F.rms_norm`` over the last dimension."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float | None = None, backend: str = "auto") -> Tensor:
    """See the module docstring."""
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a real floating tensor (..., d), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if weight is not None and (not isinstance(weight, Tensor) or tuple(weight.shape) != (x.shape[-1],)):
        raise ValueError(f"weight must be None or a ({x.shape[-1]},) tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if eps is not None and not eps >= 0:
        raise ValueError(f"eps must be None or >= 0, got {eps!r}")
    if resolve_backend(backend, x.device) == "ref" or x.numel() == 0 or not compiled_cpu_path_applies(x, weight):
        return rms_norm_reference(x, weight, eps)
    from .cpu import rms_norm_cpu

    return rms_norm_cpu(x, weight, torch.finfo(x.dtype).eps if eps is None else float(eps))


__all__ = ["BACKENDS", "available_backends", "resolve_backend", "rms_norm", "rms_norm_reference"]
