"""Test-only callbacks that upset a run at a chosen training step: a real signal to its own process, or a NaN weight.

Used through the real entry point (``+callbacks.signal._target_=signals.SignalAt``) so that a subprocess is
stopped (SIGTERM, SIGINT) or killed (SIGKILL) at an exact step, after that step's checkpoint hooks ran. Under DDP
each rank runs its own copy of the callbacks; ``rank`` picks the one that acts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class SignalAt(pl.Callback):
    """``os.kill(os.getpid(), signum)`` at the end of training step ``step`` (after the checkpoint callbacks)."""

    def __init__(self, step: int, signum: int, marker: str | None = None, rank: int | None = None) -> None:
        self.step = step
        self.signum = signum
        self.marker = Path(marker) if marker else None  # signal only once: not when this file exists
        self.rank = rank  # under DDP: only this rank signals itself (None: every rank)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step and not (self.marker and self.marker.exists()):
            if self.marker:
                self.marker.touch()
            os.kill(os.getpid(), self.signum)


class SignalWhile(pl.Callback):
    """``os.kill(os.getpid(), signum)`` once, at the first batch of a ``trainer.validate`` or ``trainer.test``
    (``stage``) on rank ``rank``: a signal that arrives after training, while the run evaluates."""

    def __init__(self, stage: str, signum: int, rank: int = 0) -> None:
        self.stage = stage
        self.signum = signum
        self.rank = rank
        self.sent = False

    def _maybe_signal(self, trainer: pl.Trainer) -> None:
        if not self.sent and trainer.global_rank == self.rank and trainer.state.fn == self.stage:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe_signal(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._maybe_signal(trainer)


class NanWeightAt(pl.Callback):
    """Sets one weight of rank ``rank``'s model copy to NaN before training step ``step``: that rank's loss, and
    no other rank's, is NaN at that step (DDP syncs gradients, not weights)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")
