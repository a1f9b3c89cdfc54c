"""Test-only callback that sends a real signal to its own process at a chosen training step.

Used through the real entry point (``+callbacks.signal._target_=signals.SignalAt``) so that a subprocess is
stopped (SIGTERM, SIGINT) or killed (SIGKILL) at an exact step, after that step's checkpoint hooks ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    """``os.kill(os.getpid(), signum)`` at the end of training step ``step`` (after the checkpoint callbacks)."""

    def __init__(self, step: int, signum: int, marker: str | None = None) -> None:
        self.step = step
        self.signum = signum
        self.marker = Path(marker) if marker else None  # signal only once: not when this file exists

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step and not (self.marker and self.marker.exists()):
            if self.marker:
                self.marker.touch()
            os.kill(os.getpid(), self.signum)
