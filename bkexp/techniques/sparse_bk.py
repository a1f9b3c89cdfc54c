"""``sparse_bk``: a learned gate keeps only the top ``sparse_fraction`` of BK heads per layer.

Implemented by the model (``bkexp.models``): the settings become model keyword arguments; the measured
effect is the model's ``flag_stats()`` (``flags.effects.model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from bkexp.techniques.base import ModelTechnique, check_fraction, needs_mixer_capability


@dataclass
class Settings:
    sparse_bk: bool = False
    sparse_fraction: float = 0.5


class SparseBK(ModelTechnique):
    name = "sparse_bk"
    settings = Settings
    summary = "a learned gate keeps only the top fraction of BK heads"

    def validate(self) -> None:
        check_fraction("sparse_fraction", self.flags.sparse_fraction)

    def not_applicable(self, cfg: DictConfig) -> str | None:
        return needs_mixer_capability("has_sparse_heads", self.name, cfg)

    def model_kwargs(self) -> dict[str, Any]:
        return {"mixer.sparse_heads": float(self.flags.sparse_fraction)}
