"""``curriculum``: sequence-length warmup, from ``curriculum_start * seq_len`` to ``seq_len`` over training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl

from bkexp.techniques.base import RunContext, Technique, check_fraction, check_positive_int


@dataclass
class Settings:
    curriculum: bool = False
    curriculum_start: float = 0.125
    curriculum_fraction: float = 0.5
    curriculum_multiple: int = 8


class SequenceLengthCurriculum(pl.Callback):
    """Sequence-length warmup: the first training batches are cut to ``start * seq_len`` tokens, growing
    linearly to ``seq_len`` over ``fraction`` of the training steps.

    The batch is truncated in place in ``on_train_batch_start`` (``input_ids[:, :L]`` and ``labels[:, :L]``,
    which keeps the next-token alignment), so the training step, the token count and the throughput monitor
    all see the shorter batch. Lengths are rounded down to a multiple of ``multiple`` (fewer distinct shapes
    for compiled kernels), never below the start length.
    """

    def __init__(self, seq_len: int, start: float = 0.125, fraction: float = 0.5, multiple: int = 8) -> None:
        self.seq_len = seq_len
        self.start_len = max(2, min(seq_len, math.ceil(start * seq_len)))
        self.fraction = fraction
        self.multiple = multiple
        self.total_steps = 1
        self.lengths: list[int] = []  # the length of every training batch, in order

    def length_at(self, step: int) -> int:
        ramp = self.fraction * self.total_steps
        if step >= ramp:
            return self.seq_len
        raw = self.start_len + (self.seq_len - self.start_len) * step / ramp
        rounded = int(raw) // self.multiple * self.multiple
        return max(self.start_len, min(self.seq_len, rounded))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total_steps = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else \
            int(trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        length = self.length_at(trainer.global_step)
        if length < batch["input_ids"].shape[1]:
            batch["input_ids"] = batch["input_ids"][:, :length]
            batch["labels"] = batch["labels"][:, :length]
        self.lengths.append(int(batch["input_ids"].shape[1]))
        pl_module.log("curriculum/seq_len", float(self.lengths[-1]))

    def describe(self) -> dict[str, Any]:
        ramp_steps = math.ceil(self.fraction * self.total_steps)
        return {"start_len": self.start_len, "seq_len": self.seq_len, "ramp_steps": ramp_steps,
                "first_batch_lengths": self.lengths[:5],
                "mean_train_len": sum(self.lengths) / len(self.lengths) if self.lengths else None,
                "token_fraction": (sum(self.lengths) / (self.seq_len * len(self.lengths))) if self.lengths else None}


class Curriculum(Technique):
    name = "curriculum"
    settings = Settings
    summary = "sequence-length warmup: truncated training sequences that grow to seq_len"

    def __init__(self, flags: Any) -> None:
        super().__init__(flags)
        self.callback: SequenceLengthCurriculum | None = None

    def validate(self) -> None:
        check_fraction("curriculum_start", self.flags.curriculum_start)
        check_fraction("curriculum_fraction", self.flags.curriculum_fraction)
        check_positive_int("curriculum_multiple", self.flags.curriculum_multiple)

    def data_not_applicable(self, datamodule: Any, dataset: str) -> str | None:
        if not getattr(datamodule, "autoregressive", True):
            return f"flags.curriculum applies to autoregressive language modelling; {dataset!r} is not"
        if getattr(datamodule, "has_answer_mask", False):
            return (f"flags.curriculum truncates training sequences, but dataset {dataset!r} labels only answer "
                    "positions near the end of each example (truncation would cut them off); use it on text "
                    "datasets, e.g. dataset=wikitext2 or experiment=wikitext2_local")
        return None

    def setup(self, ctx: RunContext) -> list[pl.Callback]:
        self.callback = SequenceLengthCurriculum(int(ctx.cfg.seq_len), self.flags.curriculum_start,
                                                 self.flags.curriculum_fraction, self.flags.curriculum_multiple)
        return [self.callback]

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        return {"curriculum": self.callback.describe()}
