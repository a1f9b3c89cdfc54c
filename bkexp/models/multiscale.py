"""Causal half-resolution path for the middle layers (the ``multi_scale`` flag): pair-wise down- and shifted up-sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def middle_layers(n_layers: int) -> tuple[int, int]:
    """The block range ``[lo, hi)`` that runs at half resolution: ``[n//4, 3n//4)``, at least one block.

    n=1 -> [0, 1), n=2 -> [0, 1), n=4 -> [1, 3), n=8 -> [2, 6).
    """
    if n_layers < 1:
        raise ValueError(f"multi_scale needs n_layers >= 1, got {n_layers}")
    lo = n_layers // 4
    return lo, max(3 * n_layers // 4, lo + 1)


class CausalResampler(nn.Module):
    """Fine (B, N, D) -> coarse (B, ceil(N/2), D) and back, so that fine position t only sees positions <= t.

    Down: coarse token ``i = W [x_{2i}; x_{2i+1}]`` reads exactly the fine pair ``(2i, 2i+1)`` (an odd last
    token is paired with zeros). ``W`` starts as the pair average ``[I/2, I/2]``.

    Up: the coarse blocks' contribution ``delta_i = c_out_i - c_in_i`` (what they added to the coarse residual
    stream) reaches fine position ``t`` as ``delta_{floor((t-1)/2)}`` for ``t >= 1`` and nothing for ``t = 0``:
    coarse token ``i`` depends on fine positions ``<= 2i+1``, and the first fine position reading it is
    ``t = 2i+1``. The fine residual stream passes through unchanged: ``x_out = x + up(delta)``. Everything is
    per-position gathers and a position-wise linear map, so the check is bit-exact.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.down = nn.Linear(2 * d_model, d_model, bias=False)
        with torch.no_grad():
            eye = torch.eye(d_model)
            self.down.weight.copy_(torch.cat([eye, eye], dim=1) / 2)
        self.down.weight._no_reinit = True  # type: ignore[attr-defined]  # starts as average pooling

    def downsample(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        if n % 2:
            x = F.pad(x, (0, 0, 0, 1))  # the padded pair is only read by fine positions >= n
        # in x's dtype: under autocast the projection returns bf16, and the coarse blocks would add their outputs to
        # a bf16 residual stream, where the fine blocks' stream stays float32
        return self.down(x.reshape(b, (n + 1) // 2, 2 * d)).to(x.dtype)

    @staticmethod
    def upsample(delta: Tensor, n: int) -> Tensor:
        """Fine (B, n, D) tensor whose position t holds ``delta[(t-1)//2]`` (zeros at t = 0)."""
        repeated = delta.repeat_interleave(2, dim=1)[:, : n - 1]  # position s holds delta[s // 2]
        return F.pad(repeated, (0, 0, 1, 0))  # shift right by one fine position

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}"
