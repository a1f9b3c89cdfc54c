"""How runs end: real signals to real subprocesses, divergence, exit codes, and what `bkexp report` makes of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runhelpers import MQAR_TINY, TINY, read_summary
from testpaths import REPO_ROOT

# 24 training examples in batches of 4: an epoch is 6 steps, so step 5 is mid-epoch.
SHORT = [*TINY, "dataset.num_train=24", "dataset.num_val=16", "dataset.num_test=16", "logger=csv"]


def train_subprocess(root: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py`` in a fresh interpreter (outputs under ``root``); tests/ is importable for helpers."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), f"paths.root_dir={root}", *overrides],
                          cwd=REPO_ROOT, env=env_with_tests(), capture_output=True, text=True, timeout=timeout)


def signal_at(step: int, signum: int) -> list[str]:
    return ["+callbacks.signal._target_=signals.SignalAt", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.signum={int(signum)}"]


def env_with_tests() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}


def only_run(root: Path) -> Path:
    (run_dir,) = list((root / "outputs").iterdir())
    return run_dir


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_gives_interrupted_status_and_non_zero_exit(tmp_path, signum):
    result = train_subprocess(tmp_path, *SHORT, "trainer.max_steps=40", *signal_at(3, signum))
    assert result.returncode == 128 + signum, result.stderr[-3000:]
    run_dir = only_run(tmp_path)
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["signal"] == signum.name
    assert summary["step"] == 3 and summary["exit_code"] == 128 + signum
    assert summary["error"] == f"interrupted by {signum.name}"
    # What was trained is kept: last.ckpt holds the interrupted step, ready for resuming.
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 3
    assert f"run interrupted; results in {run_dir}" in result.stdout


def test_sigkill_leaves_a_run_the_report_shows_as_interrupted_at_its_last_checkpoint(tmp_path):
    from bkexp.report.collect import collect_runs

    result = train_subprocess(tmp_path, *SHORT, "trainer.max_steps=40", "+callbacks.model_checkpoint.every_n_train_steps=2",
                              *signal_at(5, signal.SIGKILL))
    assert result.returncode == -signal.SIGKILL
    run_dir = only_run(tmp_path)
    assert read_summary(run_dir)["status"] == "running"  # nothing can be written after SIGKILL
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 4
    (row,) = collect_runs([run_dir]).frame.to_dict("records")
    assert row["status"] == "interrupted"
    assert "step 4" in row["error"] and "SIGKILL" in row["error"]


def test_lr_10_on_the_default_task_diverges(train, tmp_path):
    from bkexp.train.lifecycle import Diverged

    with pytest.raises(Diverged):
        train(*TINY, *MQAR_TINY, "trainer.max_steps=200", "trainer.val_check_interval=10", "optimizer.lr=10",
              "divergence.after_steps=5", "divergence.patience=3")
    run_dir = only_run(tmp_path)
    summary = read_summary(run_dir)
    assert summary["status"] == "diverged" and summary["exit_code"] == 1
    assert 5 <= summary["step"] < 200 and summary["error"].startswith("Diverged: ")
    value = summary["divergence"]["value"]
    assert value in ("nan", "inf") or value > summary["divergence"]["limit"]
    # No checkpoint of the diverged state: every checkpoint kept is older and has a finite best score.
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt") if (run_dir / "checkpoints").exists() else []:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] <= summary["step"]
        scores = [c["best_model_score"] for k, c in state["callbacks"].items() if "ModelCheckpoint" in k]
        assert all(s is None or bool(torch.isfinite(s)) for s in scores)


@pytest.mark.slow
def test_sigterm_from_outside_during_training(tmp_path):
    """What `timeout`, `kill` and SLURM do: SIGTERM from another process at an arbitrary step."""
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), f"paths.root_dir={tmp_path}", *SHORT,
                             "trainer.max_steps=100000"], cwd=REPO_ROOT, env=env_with_tests(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob("outputs/*/csv/metrics.csv")):  # training has logged its first steps
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    run_dir = only_run(tmp_path)
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["step"] > 0
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == summary["step"]
