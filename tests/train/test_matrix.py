"""Every model x dataset pair runs end to end under fast_dev_run, and distributed CPU training finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runhelpers import STREAMING_DATASETS, TEXT_DATASETS, data_overrides, options, read_summary

from bkexp.cli import main as bkexp_main
from testpaths import REPO_ROOT

FAST = ["debug=fast_dev_run", "seq_len=32", "model.d_model=32", "model.n_layers=1", "dataset.batch_size=2",
        "dataset.eval_batch_size=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SYNTHETIC_SMALL = ["dataset.num_train=8", "dataset.num_val=4", "dataset.num_test=4"]


# the streaming path does not depend on the model: c4 and pile run once, with the transformer
PAIRS = [(m, d) for d in options("dataset") for m in options("model")
         if d not in STREAMING_DATASETS or m == "transformer"]


@pytest.mark.parametrize("model,dataset", PAIRS)
def test_model_dataset_fast_dev_run(model, dataset, train, wikitext_slice):
    extra = data_overrides(dataset, wikitext_slice) if dataset in TEXT_DATASETS else SYNTHETIC_SMALL
    if dataset in STREAMING_DATASETS:
        extra.append("tokenizer=byte")  # streaming needs a fixed vocabulary
    run_dir = train(f"model={model}", f"dataset={dataset}", *FAST, *extra)
    summary = read_summary(run_dir)
    assert summary["status"] == "ok", summary["error"]
    assert summary["causality_checked"] is True
    assert summary["metrics"]["val/loss"] > 0 and summary["metrics"]["test/loss"] > 0


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "hardware=ddp_cpu", f"paths.root_dir={tmp_path}",
           "trainer.max_steps=4", "trainer.val_check_interval=2", "seq_len=32", "model.d_model=32",
           "model.n_layers=1", "dataset.batch_size=4", *SYNTHETIC_SMALL, "dataset.num_train=64",
           "trainer.enable_progress_bar=false", "compute_flops=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    summary = read_summary(run_dir)
    assert summary["status"] == "ok"
    assert summary["config"]["trainer"]["devices"] == 2
    # Two processes each saw its own shard: the token count covers both ranks.
    assert summary["tokens"]["train"] == 4 * 4 * 32 * 2


@pytest.mark.slow
def test_ddp_cpu_test_perplexity_scores_every_test_chunk_once(tmp_path, wikitext_slice):
    # seq_len 40 cuts the slice's test split into an odd number of chunks: Lightning's DistributedSampler would
    # score chunk 0 twice on two processes, and the synced test loss would not be the split's.
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "hardware=ddp_cpu", f"paths.root_dir={tmp_path}",
           "dataset=text", *data_overrides("text", wikitext_slice), "seq_len=40", "model.d_model=32",
           "model.n_layers=1", "dataset.batch_size=4", "dataset.eval_batch_size=8", "trainer.max_steps=4",
           "trainer.val_check_interval=4", "trainer.enable_progress_bar=false", "compute_flops=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # bkexp's metrics are synced by torchmetrics: Lightning's advice to resync them, and to evaluate on one
    # device, does not apply and is not printed
    assert "sync_dist=True" not in proc.stderr and "Using `DistributedSampler`" not in proc.stderr
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    summary = read_summary(run_dir)
    assert summary["status"] == "ok"
    assert summary["data"]["splits"]["test"]["examples"] % 2 == 1
    # One process, the same checkpoint, every chunk once: the loss two DDP processes recorded.
    assert bkexp_main(["eval", str(run_dir)]) == 0
    (own,) = json.loads((run_dir / "eval" / "perplexity.json").read_text())["datasets"]
    assert own["loss"] == pytest.approx(summary["metrics"]["test/loss"], rel=1e-6)
