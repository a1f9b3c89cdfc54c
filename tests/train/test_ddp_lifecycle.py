"""How a two-process DDP run ends: a signal that reaches one rank, or reaches the ranks at different steps, and
a loss that diverges on one rank only. Every rank must stop after the same step (else the others wait forever in
the next collective), save last.ckpt together and report the right status. Real gloo processes and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runhelpers import read_summary
from test_lifecycle import env_with_tests, only_run, signal_at
from testpaths import REPO_ROOT

# 2 processes, 160 training examples in batches of 4 per process: 20 steps an epoch, no epoch end nearby.
DDP = ["hardware=ddp_cpu", "~recipe", "seq_len=16", "model.d_model=32", "model.n_layers=1", "dataset.batch_size=4",
       "dataset.num_train=160", "dataset.num_val=16", "dataset.num_test=16", "trainer.max_steps=40",
       "trainer.val_check_interval=10", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
       "compute_flops=false", "logger=csv"]


def ddp_run(root: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python train.py`` with two DDP processes; a hang is this test's failure: both are killed after ``timeout``."""
    args = [sys.executable, str(REPO_ROOT / "train.py"), f"paths.root_dir={root}", *DDP, *overrides]
    with subprocess.Popen(args, cwd=REPO_ROOT, env=env_with_tests(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1 too: Lightning starts it in the same session
            stdout, stderr = proc.communicate()
            pytest.fail(f"the DDP run hung (killed after {timeout:.0f} s): {stdout[-2000:]}{stderr[-2000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def saved_steps(run_dir: Path) -> list[int]:
    """The step at which each rank saved last.ckpt on the interrupt, from the two ranks' logs."""
    steps = []
    for log in (run_dir / "train.log", run_dir / "train_ddp_process_1.log"):
        lines = [line for line in log.read_text().splitlines() if "last.ckpt at step" in line]
        steps.append(int(lines[-1].rsplit(" ", 1)[-1]) if lines else None)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("signals", [
    pytest.param([(1, 5, signal.SIGTERM)], id="SIGTERM-rank1-only"),
    pytest.param([(0, 5, signal.SIGTERM), (1, 7, signal.SIGTERM)], id="SIGTERM-both-ranks-two-steps-apart"),
    pytest.param([(0, 6, signal.SIGINT), (1, 6, signal.SIGINT)], id="SIGINT-both-ranks"),
])
def test_a_signal_on_any_rank_stops_every_rank_after_the_same_step(tmp_path, signals):
    overrides = [arg for i, (rank, step, signum) in enumerate(signals)
                 for arg in signal_at(step, signum, rank, name=f"s{i}")]
    result = ddp_run(tmp_path, *overrides)
    signum = signals[0][2]
    assert result.returncode == 128 + signum, result.stdout[-2000:] + result.stderr[-3000:]
    run_dir = only_run(tmp_path)
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["signal"] == signum.name
    # the first signal, whichever rank got it, is agreed on at the next step and stops both after it
    first = min(step for _, step, _ in signals)
    assert saved_steps(run_dir) == [first + 1, first + 1]
    assert summary["step"] == first + 1
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == first + 1


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_a_signal_while_the_trained_run_evaluates_ends_it_interrupted(tmp_path, stage):
    # validation at steps 15 and 30 of 40: the run validates the final weights after fit, then tests
    result = ddp_run(tmp_path, "trainer.val_check_interval=15", f"test_after_fit={stage == 'test'}",
                     "+callbacks.s._target_=signals.SignalWhile", f"+callbacks.s.stage={stage}",
                     f"+callbacks.s.signum={int(signal.SIGTERM)}", "+callbacks.s.rank=1")
    assert result.returncode == 128 + signal.SIGTERM, result.stdout[-2000:] + result.stderr[-3000:]
    summary = read_summary(only_run(tmp_path))
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["step"] == 40


@pytest.mark.slow
def test_a_loss_that_diverges_on_one_rank_stops_every_rank(tmp_path):
    result = ddp_run(tmp_path, "+callbacks.nan._target_=signals.NanWeightAt", "+callbacks.nan.step=6",
                     "+callbacks.nan.rank=1")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    summary = read_summary(only_run(tmp_path))
    assert summary["status"] == "diverged", summary["error"]
    assert summary["divergence"]["metric"] == "train/loss" and summary["step"] == 6
    assert str(summary["divergence"]["value"]) == "nan"  # the mean over the ranks
