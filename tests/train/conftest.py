"""Helpers for tests that run the real entry point (train.py through Hydra) in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from testpaths import REPO_ROOT, WIKITEXT2_DIR

def _load_entry():
    spec = importlib.util.spec_from_file_location("bkexp_train_entry", REPO_ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run ``python train.py [overrides]`` in-process; returns the run (or sweep) directory."""
    entry = _load_entry()

    def _train(*overrides: str, multirun: bool = False) -> Path:
        argv = ["train.py", *(["-m"] if multirun else []), f"paths.root_dir={tmp_path}", *overrides]
        monkeypatch.setattr(sys, "argv", argv)
        entry.main()
        base = tmp_path / ("multirun" if multirun else "outputs")
        runs = sorted(p for p in base.iterdir() if p.is_dir())
        return runs[-1]

    return _train


@pytest.fixture(scope="session")
def wikitext_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train/valid/test files cut from the shared WikiText-2 valid/test splits (a few thousand words each)."""
    out = tmp_path_factory.mktemp("wikitext_slice")
    valid = (WIKITEXT2_DIR / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    test = (WIKITEXT2_DIR / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "train.txt").write_text("".join(valid[:400]), encoding="utf-8")
    (out / "valid.txt").write_text("".join(valid[400:500]), encoding="utf-8")
    (out / "test.txt").write_text("".join(test[:100]), encoding="utf-8")
    return out
