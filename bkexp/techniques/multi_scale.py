"""``multi_scale``: the middle layers run at half the sequence resolution (causal down/up-sampling).

Implemented by the model (``bkexp.models``): the settings become model keyword arguments; the measured
effect is the model's ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bkexp.techniques.base import ModelTechnique, RunContext


@dataclass
class Settings:
    multi_scale: bool = False


class MultiScale(ModelTechnique):
    name = "multi_scale"
    settings = Settings
    summary = "the middle layers run at half the sequence resolution"

    def model_kwargs(self) -> dict[str, Any]:
        return {"multi_scale": True}

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        # Timed after training (the model's flag_stats then report it); the sample is the first training batch.
        ctx.model.measure_multi_scale_speedup(ctx.sample.to(ctx.task.device))
        return {}
