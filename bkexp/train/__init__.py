"""Training: the LightningModule, callbacks, the causality check, summary writing and the run() function."""

from bkexp import resolvers  # noqa: F401  (registers ${bkexp.dirname:...} for the Hydra config)
from bkexp.train.run import run

__all__ = ["run"]
