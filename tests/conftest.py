"""Test-wide fixtures: every test runs offline, with outputs under tmp_path and W&B offline."""

from __future__ import annotations

import sys
from pathlib import Path

import bkexp  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)
import pytest
import torch

from runhelpers import load_train_entry
from testpaths import REPO_ROOT, SHARED_DATA, WIKITEXT2_DIR  # noqa: F401  (re-exported for tests)


@pytest.fixture(autouse=True)
def offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reaches the network; W&B and HF caches write under tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run ``python train.py [overrides]`` in-process; returns the run (or sweep) directory."""
    entry = load_train_entry()

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
