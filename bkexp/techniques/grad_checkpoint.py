"""``grad_checkpoint``: activation checkpointing per block (recompute in backward, less memory).

Implemented by the model (``bkexp.models``): the settings become model keyword arguments; the measured
effect is the model's ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bkexp.techniques.base import ModelTechnique


@dataclass
class Settings:
    grad_checkpoint: bool = False


class GradCheckpoint(ModelTechnique):
    name = "grad_checkpoint"
    settings = Settings
    summary = "activation checkpointing per block (recompute in backward, less memory)"

    def model_kwargs(self) -> dict[str, Any]:
        return {"grad_checkpoint": True}
