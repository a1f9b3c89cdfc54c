"""Train a tiny run with the real entry point (train.py), outside the function-scoped fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from runhelpers import load_train_entry

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HYDRA_FULL_ERROR": "1"}


def train_run(root: Path, *overrides: str) -> Path:
    entry = load_train_entry()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        mp.setattr(sys, "argv", ["train.py", f"paths.root_dir={root}", *overrides])
        entry.main()
    return sorted(p for p in (root / "outputs").iterdir() if p.is_dir())[-1]
