"""Base class for modules that add an auxiliary loss to training (MoE balancing, ponder cost, ...)."""

from __future__ import annotations

from torch import Tensor, nn


class AuxLossModule(nn.Module):
    """May set ``self.aux_loss`` (a scalar tensor) in forward; ``LanguageModel.aux_losses`` sums them.

    The last forward's loss is a graph node, which deepcopy/pickle refuse (e.g. a causality check or FLOP
    count on a model that has trained); it is transient, so copies start without it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aux_loss: Tensor | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["aux_loss"] = None
        return state
