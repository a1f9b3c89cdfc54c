"""Test-only mixers that break causality on purpose, to prove that the causality check catches them."""

from __future__ import annotations

import torch
from torch import Tensor

from bkexp.models.mixers.base import Mixer


class LeakyMixer(Mixer):
    """Adds a projection of the NEXT token's hidden state to every position: reads one token ahead."""

    def __init__(self, d_model: int) -> None:
        super().__init__(d_model)
        self.proj = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        future = torch.roll(x, shifts=-1, dims=1)
        future[:, -1] = 0
        return self.proj(future)

    def state_size(self, seq_len: int) -> int:
        return 0


class SubtleLeakMixer(Mixer):
    """Causal except that position 0 sees the mean of the whole sequence: a leak a spot check could miss."""

    def __init__(self, d_model: int) -> None:
        super().__init__(d_model)
        self.proj = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.proj(x)
        leak = torch.zeros_like(out)
        leak[:, 0] = 1e-6 * x.mean(dim=1)
        return out + leak

    def state_size(self, seq_len: int) -> int:
        return 0
