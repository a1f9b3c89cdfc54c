"""Rotary position embeddings on a joint query/key/value projection, split into heads.

``qkv_heads(qkv, n_heads, offset=0, base=10000.0, backend="auto")`` takes the output of the attention's joint
projection, ``qkv`` (batch, n, 3 * d_model), and returns ``q``, ``k``, ``v`` (batch, heads, n, head_dim), with
``q`` and ``k`` rotated at positions ``offset, offset + 1, ...`` (``rotary_embedding``: the first ``2 * (hd // 2)``
features as ``hd // 2`` pairs ``(x_i, x_{i + hd/2})`` turned by ``position * base^(-i / (hd/2))``; an odd last
feature is left as it is).

PyTorch composes the rotation of two strided views from six elementwise ops and two ``cat``s, and its backward
from as many again: at size=small (8192 tokens, 4 heads of 64) 27-31 ms forward+backward per layer, ~7% of a
Transformer training step. Backends (``BACKENDS``):

- ``cpu``: numba kernels (``cpu.py``): one pass that reads the projection once and writes ``q``, ``k``, ``v``
  contiguous in the heads layout, and one backward pass that writes the projection's gradient; float32 and
  float64 CPU tensors outside autocast, dispatch modes and ``torch.compile`` (which take ``ref``).
- ``ref``: the PyTorch ops (``rotary_embedding`` on the permuted views), any device and dtype.

``auto`` picks cpu for CPU tensors when numba is installed and ref otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bkexp.ops.backends import compiled_cpu_path_applies, numba_cpu_backends

_BACKENDS = numba_cpu_backends("rotary")
BACKENDS: tuple[str, ...] = _BACKENDS.names
available_backends = _BACKENDS.available  # backends that can run on a device here
resolve_backend = _BACKENDS.resolve  # the backend qkv_heads(..., backend=...) runs on a device; raises if not


def rotation_tables(n: int, head_dim: int, offset: int, base: float, device: torch.device, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of the rotation angles, (n, head_dim // 2) in ``dtype`` (computed in float32)."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(0, half, device=device, dtype=torch.float32) / half)
    angles = torch.arange(offset, offset + n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_embedding(x: Tensor, base: float = 10000.0, offset: int = 0) -> Tensor:
    """Apply rotary position embeddings to ``x`` of shape (batch, heads, seq, head_dim) at positions
    ``offset, offset + 1, ...`` (a decoding step passes the position of its token)."""
    _, _, n, hd = x.shape
    half = hd // 2
    cos, sin = rotation_tables(n, hd, offset, base, x.device, x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated if 2 * half == hd else torch.cat([rotated, x[..., 2 * half :]], dim=-1)


def qkv_heads_reference(qkv: Tensor, n_heads: int, offset: int = 0, base: float = 10000.0
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The ``ref`` backend: (batch, heads, n, head_dim) views of ``qkv``, queries and keys rotated."""
    b, n, width = qkv.shape
    q, k, v = qkv.view(b, n, 3, n_heads, width // (3 * n_heads)).permute(2, 0, 3, 1, 4)
    return rotary_embedding(q, base, offset), rotary_embedding(k, base, offset), v


def qkv_heads(qkv: Tensor, n_heads: int, offset: int = 0, base: float = 10000.0, backend: str = "auto"
              ) -> tuple[Tensor, Tensor, Tensor]:
    """See the module docstring."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 3 or not qkv.is_floating_point():
        raise ValueError(f"qkv must be a real floating tensor (batch, n, 3 * d_model), got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    if not isinstance(n_heads, int) or n_heads < 1 or qkv.shape[-1] % (3 * n_heads) != 0:
        raise ValueError(f"qkv's last dimension {qkv.shape[-1]} must be 3 * n_heads * head_dim (n_heads={n_heads!r})")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an integer >= 0, got {offset!r}")
    if resolve_backend(backend, qkv.device) == "ref" or qkv.numel() == 0 or not compiled_cpu_path_applies(qkv):
        return qkv_heads_reference(qkv, n_heads, offset, base)
    from .cpu import qkv_heads_cpu

    head_dim = qkv.shape[-1] // (3 * n_heads)
    cos, sin = rotation_tables(qkv.shape[1], head_dim, offset, base, qkv.device, qkv.dtype)
    return qkv_heads_cpu(qkv, n_heads, cos, sin)


__all__ = ["BACKENDS", "available_backends", "qkv_heads", "qkv_heads_reference", "resolve_backend",
           "rotary_embedding", "rotation_tables"]
