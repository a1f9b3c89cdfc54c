"""``physics_informed``: energy conservation of the BK layers' Hamiltonians across layers, weight ``physics_weight``.

Implemented by the staged model (``bkexp.models.staged.StagedLanguageModel``, selected as ``model._target_``): the
settings become its keyword arguments; the measured effect is its ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from bkexp.techniques.base import FlagError, StagedTechnique, check_weight, needs_mixer_capability


@dataclass
class Settings:
    physics_informed: bool = False
    physics_weight: float = 0.01


class PhysicsInformed(StagedTechnique):
    name = "physics_informed"
    settings = Settings
    summary = "energy-conservation regulariser across BK layers"

    def validate(self) -> None:
        check_weight("physics_weight", self.flags.physics_weight)
        if self.enabled and not self.flags.physics_weight > 0:
            raise FlagError("flags.physics_informed=true needs flags.physics_weight > 0 (the regulariser's weight)")

    def not_applicable(self, cfg: DictConfig) -> str | None:
        return needs_mixer_capability("has_energy", self.name, cfg)

    def model_kwargs(self) -> dict[str, Any]:
        return {"physics_weight": float(self.flags.physics_weight)}
