"""``active_learning``: online batch selection (Selective-Backprop, Jiang et al. 2019).

A gradient-free forward scores each sequence of the batch by its mean token loss; only the
``ceil(active_fraction * batch)`` highest-loss sequences are forwarded again and back-propagated
(``LMTask(active_fraction=...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bkexp.techniques.base import RunContext, Technique, check_fraction


@dataclass
class Settings:
    active_learning: bool = False
    active_fraction: float = 0.5


def highest_loss_rows(row_losses: Tensor, has_label: Tensor, fraction: float) -> Tensor:
    """Indices of the ``ceil(fraction * rows)`` rows with the highest loss among rows that carry a label."""
    rows = int(has_label.sum())
    if rows == 0:
        raise ValueError("a training batch has no labelled positions (all labels are -100)")
    keep = min(rows, max(1, math.ceil(fraction * row_losses.shape[0] - 1e-9)))
    scores = torch.where(has_label, row_losses, torch.full_like(row_losses, -math.inf))
    return scores.topk(keep).indices.sort().values


class ActiveLearning(Technique):
    name = "active_learning"
    settings = Settings
    summary = "online batch selection: only the highest-loss sequences are back-propagated"

    def validate(self) -> None:
        check_fraction("active_fraction", self.flags.active_fraction)

    def task_kwargs(self) -> dict[str, Any]:
        return {"active_fraction": self.flags.active_fraction}

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        return {"active_learning": ctx.task.active_learning_stats()}
