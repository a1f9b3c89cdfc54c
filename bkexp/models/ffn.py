"""Feed-forward sublayers of the shared backbone: a dense MLP (mixture of experts lives beside it)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Position-wise two-layer MLP with GELU: ``d_model -> expansion*d_model -> d_model``."""

    def __init__(self, d_model: int, expansion: float = 4.0, bias: bool = False) -> None:
        super().__init__()
        hidden = int(round(expansion * d_model))
        self.fc1 = nn.Linear(d_model, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
