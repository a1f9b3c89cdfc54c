"""``grad_checkpoint``: activation checkpointing per block (recompute in backward, less memory).

Implemented by the staged model (``bkexp.models.staged.StagedLanguageModel``, selected as ``model._target_``): the
settings become its keyword arguments; the measured effect is its ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bkexp.techniques.base import StagedTechnique


@dataclass
class Settings:
    grad_checkpoint: bool = False


class GradCheckpoint(StagedTechnique):
    name = "grad_checkpoint"
    settings = Settings
    summary = "activation checkpointing per block (recompute in backward, less memory)"

    def model_kwargs(self) -> dict[str, Any]:
        return {"grad_checkpoint": True}
