"""Row and plane layouts of the BK-Core kernels: rows (B, H, N) at the API, position-major planes inside.

The compiled kernels step all rows of a batch at once per position, so they index (B, N, H) planes. A mixer
produces exactly that (``proj(x)`` for x of shape (B, N, D)) and hands the op its transpose (B, H, N); the
kernels' autograd Functions take and return rows and convert here, inside ``forward``/``backward``, where a
transpose is free and creates no autograd node. (The causal cpu kernels read any layout in place and need no
conversion; the bidirectional cpu and the triton kernels use ``to_planes``.)
"""

from __future__ import annotations

from torch import Tensor


def to_planes(rows: Tensor) -> Tensor:
    """(B, H, L) rows -> contiguous (B, L, H) planes; no copy when ``rows`` is the transpose of such planes."""
    return rows.transpose(1, 2).contiguous()


def is_plane_view(rows: Tensor) -> bool:
    """Whether ``rows`` (B, H, L) is the transpose of contiguous planes, so ``to_planes`` copies nothing."""
    return rows.dim() == 3 and rows.transpose(1, 2).is_contiguous()
