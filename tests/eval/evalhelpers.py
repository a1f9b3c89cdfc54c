"""Train a tiny run with the real entry point (train.py), outside the function-scoped fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from testpaths import REPO_ROOT

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HYDRA_FULL_ERROR": "1"}


def train_run(root: Path, *overrides: str) -> Path:
    spec = importlib.util.spec_from_file_location("bkexp_train_entry_eval", REPO_ROOT / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        mp.setattr(sys, "argv", ["train.py", f"paths.root_dir={root}", *overrides])
        entry.main()
    return sorted(p for p in (root / "outputs").iterdir() if p.is_dir())[-1]
