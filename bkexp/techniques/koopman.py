"""``koopman``: a Koopman operator advancing lifted hidden states across layers, with a prediction loss.

Implemented by the model (``bkexp.models``): the settings become model keyword arguments; the measured
effect is the model's ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bkexp.techniques.base import ModelTechnique, check_positive_int, check_weight


@dataclass
class Settings:
    koopman: bool = False
    koopman_dim: int = 64
    koopman_weight: float = 0.1


class Koopman(ModelTechnique):
    name = "koopman"
    settings = Settings
    summary = "Koopman operator layer advancing lifted hidden states across layers"

    def validate(self) -> None:
        check_positive_int("koopman_dim", self.flags.koopman_dim)
        check_weight("koopman_weight", self.flags.koopman_weight)

    def model_kwargs(self) -> dict[str, Any]:
        return {"koopman": True, "koopman_dim": self.flags.koopman_dim, "koopman_weight": self.flags.koopman_weight}
