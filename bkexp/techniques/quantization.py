"""``quantization``: quantization-aware training at the top-level ``bits`` (``quant=qat``, docs/quantization.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from bkexp.techniques.base import FlagError, RunContext, Technique


@dataclass
class Settings:
    quantization: bool = False


class Quantization(Technique):
    name = "quantization"
    settings = Settings
    summary = "quantization-aware training at the top-level bits (quant=qat)"

    def not_applicable(self, cfg: DictConfig) -> str | None:
        if cfg.get("bits") == 32:
            return ("flags.quantization trains with QAT at the top-level bits, but bits=32 means no quantization; "
                    "set bits=8 (or 16, 4, 2), or use flags=quantization (bits=8)")
        return None

    def config_changes(self, cfg: DictConfig) -> dict[str, Any]:
        method = str(cfg.quant.get("method", "auto"))
        if method not in ("auto", "qat"):
            raise FlagError(f"flags.quantization is quantization-aware training (quant=qat), but quant={method} was "
                            "chosen; drop one of them")
        return {"quant.method": "qat"}

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        return {"quantization": {"method": ctx.quant.resolved_method, "bits": ctx.quant.bits}}
