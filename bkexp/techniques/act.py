"""``act``: adaptive computation time over layers per token (Graves 2016), ponder cost ``ponder_weight``.

Implemented by the staged model (``bkexp.models.staged.StagedLanguageModel``, selected as ``model._target_``): the
settings become its keyword arguments; the measured effect is its ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bkexp.techniques.base import StagedTechnique, check_fraction, check_weight


@dataclass
class Settings:
    act: bool = False
    act_threshold: float = 0.99
    ponder_weight: float = 0.01


class Act(StagedTechnique):
    name = "act"
    settings = Settings
    summary = "adaptive computation time over layers per token (Graves 2016)"

    def validate(self) -> None:
        check_fraction("act_threshold", self.flags.act_threshold)
        check_weight("ponder_weight", self.flags.ponder_weight)

    def model_kwargs(self) -> dict[str, Any]:
        return {"act": True, "act_threshold": self.flags.act_threshold, "ponder_weight": self.flags.ponder_weight}
