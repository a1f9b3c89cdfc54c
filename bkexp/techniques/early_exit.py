"""``early_exit``: per-layer exit heads trained jointly; at evaluation a token exits once confident.

Implemented by the staged model (``bkexp.models.staged.StagedLanguageModel``, selected as ``model._target_``): the
settings become its keyword arguments; the measured effect is its ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bkexp.techniques.base import StagedTechnique, check_fraction, check_weight


@dataclass
class Settings:
    early_exit: bool = False
    exit_threshold: float = 0.9
    exit_loss_weight: float = 1.0


class EarlyExit(StagedTechnique):
    name = "early_exit"
    settings = Settings
    summary = "per-layer exit heads; at evaluation a token exits once confident"
    conflicts = {"act": "flags.act and flags.early_exit both choose a per-token depth; turn one of them off"}

    def validate(self) -> None:
        check_fraction("exit_threshold", self.flags.exit_threshold)
        check_weight("exit_loss_weight", self.flags.exit_loss_weight)

    def model_kwargs(self) -> dict[str, Any]:
        return {"early_exit": True, "exit_threshold": self.flags.exit_threshold,
                "exit_loss_weight": self.flags.exit_loss_weight}
