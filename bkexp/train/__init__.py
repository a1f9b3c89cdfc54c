"""Training: the LightningModule, callbacks, the causality check, summary writing and the run() function."""

from bkexp.train.run import run

__all__ = ["run"]
