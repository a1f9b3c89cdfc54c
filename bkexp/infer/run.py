"""Loading a trained run for generation: its model (checkpoint weights, quantization as evaluated) and tokenizer.

Through :class:`bkexp.rundir.RunDir`, the one definition of a run directory (config, tokenizer saved with the
run, checkpoint loaded with ``torch.load(weights_only=True)`` only); ``RunDir.build_model`` already
switches the run's quantized layers on, as they were evaluated; this module pairs the model with the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class RunLoadError(ValueError):
    """A run directory or checkpoint generation cannot use; the message names the path and what is expected."""


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)``: the run's model in eval mode on ``device``, with its quantized layers switched on
    when it trained quantized (as it was evaluated), and the run's tokenizer."""
    from bkexp.rundir import RunDir, RunDirError

    try:
        run = RunDir(run_dir)
        cfg = run.config()
        model = run.build_model(checkpoint, device=device, cfg=cfg)
        tokenizer = run.tokenizer()
    except RunDirError as err:
        raise RunLoadError(str(err)) from None
    return model.eval(), tokenizer

