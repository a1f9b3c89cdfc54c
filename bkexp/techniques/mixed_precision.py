"""``mixed_precision``: Lightning autocast, ``bf16-mixed`` (CPU or GPU) or ``16-mixed`` (GPU only).

The BK-Core casts its inputs to float32 and computes in float32 whatever the autocast dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from bkexp.techniques.base import FlagError, RunContext, Technique, accelerator_is_cpu

PRECISIONS = {"bf16": "bf16-mixed", "fp16": "16-mixed"}


@dataclass
class Settings:
    mixed_precision: bool = False
    mixed_precision_dtype: str = "bf16"


class MixedPrecision(Technique):
    name = "mixed_precision"
    settings = Settings
    summary = "Lightning mixed precision (bf16-mixed, or 16-mixed on a GPU)"
    always_describe = True  # every run records the Trainer's precision

    def validate(self) -> None:
        if self.flags.mixed_precision_dtype not in PRECISIONS:
            raise FlagError(f"flags.mixed_precision_dtype={self.flags.mixed_precision_dtype!r}; valid: "
                            f"{', '.join(PRECISIONS)}")

    def not_applicable(self, cfg: DictConfig) -> str | None:
        if self.flags.mixed_precision_dtype == "fp16" and accelerator_is_cpu(cfg):
            return "flags.mixed_precision_dtype=fp16 (16-mixed) needs a GPU; on CPU use flags.mixed_precision_dtype=bf16"
        return None

    def config_changes(self, cfg: DictConfig) -> dict[str, Any]:
        wanted = PRECISIONS[self.flags.mixed_precision_dtype]
        current = str(cfg.trainer.get("precision", "32-true"))
        if current not in ("32-true", "32", wanted):
            raise FlagError(f"flags.mixed_precision asks for precision {wanted}, but the hardware config sets "
                            f"trainer.precision={current}; use hardware=cpu|gpu (32-true) with the flag, or drop "
                            "the flag")
        return {"trainer.precision": wanted}

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        return {"precision": str(ctx.trainer.precision)}
