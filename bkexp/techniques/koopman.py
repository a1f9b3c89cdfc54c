"""``koopman``: a Koopman operator advancing lifted hidden states across layers, with a prediction loss.

Implemented by the staged model (``bkexp.models.staged.StagedLanguageModel``, selected as ``model._target_``): the
settings become its keyword arguments; the measured effect is its ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bkexp.techniques.base import StagedTechnique, check_positive_int, check_weight


@dataclass
class Settings:
    koopman: bool = False
    koopman_dim: int = 64
    koopman_weight: float = 0.1


class Koopman(StagedTechnique):
    name = "koopman"
    settings = Settings
    summary = "Koopman operator layer advancing lifted hidden states across layers"

    def validate(self) -> None:
        check_positive_int("koopman_dim", self.flags.koopman_dim)
        check_weight("koopman_weight", self.flags.koopman_weight)

    def model_kwargs(self) -> dict[str, Any]:
        return {"koopman": True, "koopman_dim": self.flags.koopman_dim, "koopman_weight": self.flags.koopman_weight}
