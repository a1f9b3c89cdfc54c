"""Loading a trained model for generation: a run directory, a model folder of ``bkexp export`` or a hub repository.

Through :mod:`bkexp.rundir`, the one definition of both (config, tokenizer saved with the run, checkpoint loaded
with ``torch.load(weights_only=True)`` only, or safetensors weights loaded strictly); either way the model
comes back with its quantized layers switched on, as the run's test evaluated it. This module pairs the model
with the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class RunLoadError(ValueError):
    """A run directory or checkpoint generation cannot use; the message names the path and what is expected."""


def load_run(run_dir: str | Path, checkpoint: str | None = None, device: str | torch.device = "cpu",
             revision: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a run directory (its ``checkpoint``: best by default), a model folder written by
    ``bkexp export``, or a hub repository id (at ``revision``): the model in eval mode on ``device``."""
    from bkexp.rundir import ModelFolder, RunDir, RunDirError, find_model

    try:
        found = find_model(run_dir, revision)
        if isinstance(found, ModelFolder):
            found.refuse_checkpoint(checkpoint)
            return found.build_model(device), found.tokenizer()
        run = RunDir(found)
        cfg = run.config()
        model = run.build_model(checkpoint or "best", device=device, cfg=cfg)
        tokenizer = run.tokenizer()
    except RunDirError as err:
        raise RunLoadError(str(err)) from None
    return model.eval(), tokenizer
