"""``multi_scale``: the middle layers run at half the sequence resolution (causal down/up-sampling).

Implemented by the staged model (``bkexp.models.staged.StagedLanguageModel``, selected as ``model._target_``): the
settings become its keyword arguments; the measured effect is its ``flag_stats()`` (``flags.effects.model``),
including the wall-clock speedup that :func:`measure_speedup` times here after training (timing stays out of the
nn.Module).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from bkexp.techniques.base import RunContext, StagedTechnique


@dataclass
class Settings:
    multi_scale: bool = False


def measure_speedup(model: Any, input_ids: torch.Tensor, repeats: int = 3) -> float:
    """Forward time with the middle layers at full resolution / at half resolution (eval, no grad).

    ``model`` is a multi-scale ``StagedLanguageModel``. Same parameters and batch; the best of ``repeats`` timed
    runs after one warm-up each. Stored as ``model.multi_scale_speedup`` (reported by its ``flag_stats()``).
    """
    if getattr(model, "resampler", None) is None:
        raise ValueError(f"measure_speedup needs a model built with multi_scale=True (model "
                         f"{getattr(model, 'name', type(model).__name__)!r})")
    was_training = model.training
    model.eval()

    def best_time() -> float:
        times = []
        with torch.no_grad():
            for i in range(repeats + 1):
                if input_ids.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(input_ids)
                if input_ids.is_cuda:
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
        return min(times)

    try:
        with model.full_resolution():
            full = best_time()
        half = best_time()
    finally:
        model.train(was_training)
    model.multi_scale_speedup = full / half
    return model.multi_scale_speedup


class MultiScale(StagedTechnique):
    name = "multi_scale"
    settings = Settings
    summary = "the middle layers run at half the sequence resolution"

    def model_kwargs(self) -> dict[str, Any]:
        return {"multi_scale": True}

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        # Timed after training (the model's flag_stats then report it); the sample is the first training batch.
        measure_speedup(ctx.model, ctx.sample.to(ctx.task.device))
        return {}
