"""How runs end: real signals to real subprocesses, divergence, exit codes, and what `bkexp report` makes of it."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runhelpers import (ENV_DATA, MQAR_TINY, RELATIVE_DATA, TINY, compose_train, data_overrides,
                        launch_and_decoy, read_summary)
from testpaths import REPO_ROOT

# 24 training examples in batches of 4: an epoch is 6 steps, so step 5 is mid-epoch.
SHORT = [*TINY, "dataset.num_train=24", "dataset.num_val=16", "dataset.num_test=16", "logger=csv"]


def train_subprocess(root: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py`` in a fresh interpreter (outputs under ``root``); tests/ is importable for helpers."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), f"paths.root_dir={root}", *overrides],
                          cwd=REPO_ROOT, env=env_with_tests(), capture_output=True, text=True, timeout=timeout)


def signal_at(step: int, signum: int, rank: int | None = None, name: str = "signal") -> list[str]:
    """Overrides adding a ``signals.SignalAt`` callback ``name`` (under DDP: on rank ``rank`` only)."""
    only_rank = [f"+callbacks.{name}.rank={rank}"] if rank is not None else []
    return [f"+callbacks.{name}._target_=signals.SignalAt", f"+callbacks.{name}.step={step}",
            f"+callbacks.{name}.signum={int(signum)}", *only_rank]


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
    # full checkpoints are asked for, not left to Lightning's default (which it logs on every save)
    assert "`weights_only` was not set" not in result.stdout + result.stderr


# Results that must not change when a run is killed and resumed (everything measured, not timed).
EXACT_KEYS = ("val/loss", "val/ppl", "test/loss", "test/ppl", "best/val_loss", "best/val_ppl")


def loss_rows(run_dir: Path) -> dict[tuple[str, str], str]:
    """(step, metric) -> value of every loss/accuracy entry of csv/metrics.csv."""
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return {(row["step"], key): row[key] for row in rows for key in row
            if row[key] and key.split("/")[-1] in ("loss", "acc", "ppl")}


def kill_and_resume(train, tmp_path: Path, overrides: list[str], kill_at: int) -> tuple[Path, Path, Path]:
    """The uninterrupted run, and the same run SIGKILLed after step ``kill_at`` then resumed from last.ckpt."""
    full = train(*overrides)
    killed_root = tmp_path / "killed"
    result = train_subprocess(killed_root, *overrides, *signal_at(kill_at, signal.SIGKILL))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    killed = only_run(killed_root)
    resumed = train(*overrides, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}")
    return full, resumed, killed


def test_sigkill_mid_epoch_then_resume_in_place_is_bit_identical(train, tmp_path):
    """Killed after step 5 of 6 in the first epoch (last.ckpt at step 4), resumed in place across the epoch
    boundary with ``resume=<run dir>``. Dropout is on, so the RNG states must come back too.
    """
    overrides = [*SHORT, "trainer.max_steps=10", "trainer.val_check_interval=4", "checkpoint_every_n_steps=2",
                 "model.dropout=0.1"]
    full_dir = train(*overrides)
    result = train_subprocess(tmp_path, *overrides, *signal_at(5, signal.SIGKILL))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    (killed,) = [d for d in (tmp_path / "outputs").iterdir() if d != full_dir]
    saved_overrides = (killed / ".hydra" / "overrides.yaml").read_text()

    # Before resuming, the report shows the killed run as interrupted at its last checkpoint.
    from bkexp.report.collect import collect_runs

    assert read_summary(killed)["status"] == "running"  # nothing can be written after SIGKILL
    assert checkpoint_step(killed / "checkpoints" / "last.ckpt") == 4
    (row,) = collect_runs([killed]).frame.to_dict("records")
    assert row["status"] == "interrupted" and "step 4" in row["error"] and "SIGKILL" in row["error"]

    # The killed run's own overrides include the signal callback; the resume must not kill it again.
    assert train(f"resume={killed}", "~callbacks.signal") == killed
    full, resumed = read_summary(full_dir), read_summary(killed)
    assert full["status"] == resumed["status"] == "ok" and full["steps"] == resumed["steps"] == 10
    for key in EXACT_KEYS:
        assert resumed["metrics"][key] == full["metrics"][key], key  # bit-identical, not approximately
    assert resumed["tokens"]["train"] == full["tokens"]["train"] == 10 * 4 * 32
    assert [r["from_step"] for r in resumed["resumes"]] == [4]
    # In place: every metrics row of the uninterrupted run, once; one last.ckpt; save_top_k=1 best; .hydra kept.
    rows = list(csv.DictReader((killed / "csv" / "metrics.csv").open()))
    train_steps = [r["step"] for r in rows if r.get("train/loss")]
    assert train_steps == sorted(set(train_steps), key=int)  # no step twice
    assert loss_rows(killed) == loss_rows(full_dir)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == \
        sorted(p.name for p in (full_dir / "checkpoints").iterdir())
    assert len(list((killed / "checkpoints").glob("best-*.ckpt"))) == 1
    assert (killed / ".hydra" / "overrides.yaml").read_text() == saved_overrides


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


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_on_wikitext2(train, tmp_path, wikitext_slice):
    """The same on real text (word-level WikiText-2 slice from local files), killed mid-epoch after step 7."""
    overrides = [*TINY, "logger=csv", "trainer.max_steps=12", "trainer.val_check_interval=6",
                 "checkpoint_every_n_steps=3", "model.dropout=0.1", "dataset.eval_batch_size=64",
                 "dataset=text", *data_overrides("text", wikitext_slice)]
    full_dir, resumed_dir, killed = kill_and_resume(train, tmp_path, overrides, kill_at=7)
    full, resumed = read_summary(full_dir), read_summary(resumed_dir)
    assert checkpoint_step(killed / "checkpoints" / "last.ckpt") == 6
    assert full["dataset"] == "text" and full["status"] == resumed["status"] == "ok"
    for key in EXACT_KEYS:
        assert resumed["metrics"][key] == full["metrics"][key], key
    assert resumed["tokens"]["train"] == full["tokens"]["train"]


@pytest.mark.slow
def test_sweep_resumes_in_place_skipping_finished_jobs(train, tmp_path):
    """A sweep killed in its second job: `resume=<sweep dir>` skips the finished job and resumes the other."""
    marker = tmp_path / "killed-once"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "-m", f"paths.root_dir={tmp_path}", *SHORT,
         "trainer.max_steps=4,10", "checkpoint_every_n_steps=2", *signal_at(5, signal.SIGKILL),
         f"+callbacks.signal.marker={marker}"], cwd=REPO_ROOT, env=env_with_tests(), capture_output=True, text=True,
        timeout=600)
    assert result.returncode == -signal.SIGKILL and marker.exists(), result.stderr[-3000:]
    (sweep,) = list((tmp_path / "multirun").iterdir())
    done, killed = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    finished_summary = (done / "summary.json").read_text()
    assert read_summary(killed)["status"] == "running"

    assert train(f"resume={sweep}", multirun=True) == sweep  # exits 0: every job ends ok
    assert (done / "summary.json").read_text() == finished_summary  # skipped, untouched
    summary = read_summary(killed)
    assert summary["status"] == "ok" and summary["steps"] == 10
    assert [r["from_step"] for r in summary["resumes"]] == [4]
    assert summary["sweep"]["dir"] == str(sweep.resolve())
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith("best-") and names[1] == "last.ckpt"  # save_top_k=1, one last
    assert (sweep / "summary.csv").is_file()


@pytest.mark.slow
def test_slurm_requeue_signal_path(tmp_path):
    """SLURM preemption on CPU: Lightning's SLURMEnvironment handles SIGUSR1 (HPC checkpoint, `scontrol requeue`),
    then SLURM's SIGTERM ends the run as interrupted. A fake `scontrol` on PATH records the requeue call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    env = {**env_with_tests(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NTASKS": "1",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), f"paths.root_dir={tmp_path}", *SHORT, "trainer.max_steps=40",
         *signal_at(3, signal.SIGUSR1), *signal_at(4, signal.SIGTERM, name="term")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    run_dir = only_run(tmp_path)
    (hpc,) = run_dir.glob("hpc_ckpt_*.ckpt")  # what the requeued job resumes from (Lightning finds it there)
    assert checkpoint_step(hpc) == 3
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM" and summary["step"] == 4


def test_a_run_composed_before_the_recipe_group_resumes_without_it(tmp_path):
    """Resuming recomposes from the saved overrides with today's tree: a run recorded before conf/recipe/ must not
    get the default MQAR recipe (another model than its checkpoint's); one recorded with it keeps it."""
    import yaml

    from bkexp.train.resume import expand_argv

    run = tmp_path / "old"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=bk"]))
    choices = {"model": "bk", "size": "tiny", "dataset": "mqar"}

    def resumed(target: Path, record: Path, **extra) -> list[str]:
        """``resume=target`` with Hydra's ``record`` (hydra.yaml or multirun.yaml) holding these choices."""
        record.write_text(yaml.safe_dump({"hydra": {"overrides": {"hydra": [], "task": ["model=bk"]},
                                                    "runtime": {"choices": {**choices, **extra}}}}))
        return expand_argv(["train.py", f"resume={target}"])

    argv = resumed(run, run / ".hydra" / "hydra.yaml")
    assert argv.count("~recipe") == 1
    cfg = compose_train([a for a in argv[1:] if not a.startswith(("hydra.", "resume="))], tmp_path)
    plain = compose_train(["~recipe", "model=bk"], tmp_path)
    assert (cfg.seq_len, cfg.model.d_model) == (plain.seq_len, plain.model.d_model) == (128, 128)  # not 16, 64
    assert "~recipe" not in resumed(run, run / ".hydra" / "hydra.yaml", recipe="mqar_tiny_bk")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    assert resumed(sweep, sweep / "multirun.yaml").count("~recipe") == 1
    assert "~recipe" not in resumed(sweep, sweep / "multirun.yaml", recipe="mqar_tiny_bk")


def test_a_resumed_sweep_sets_the_environment_variables_its_jobs_read(tmp_path, monkeypatch, capsys):
    """A sweep's jobs ran from one launch: the first job that recorded them gives the variables back."""
    import json

    import yaml

    from bkexp.train.resume import expand_argv

    sweep = tmp_path / "sweep"
    for job, recorded in (("0_model=bk", None), ("1_model=mamba", {"BKEXP_T_DATA": "/data/a", "BKEXP_T_UNSET": None})):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "summary.json").write_text(json.dumps({"status": "interrupted"} if recorded is None else
                                                             {"status": "ok", "config_env": recorded}))
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"hydra": [], "task": ["model=bk"]},
                                                                   "runtime": {"choices": {"recipe": "none"}}}}))
    monkeypatch.setenv("BKEXP_T_DATA", "/data/b")
    monkeypatch.setenv("BKEXP_T_UNSET", "set here")
    expand_argv(["train.py", f"resume={sweep}"])
    assert os.environ["BKEXP_T_DATA"] == "/data/a" and "BKEXP_T_UNSET" not in os.environ
    assert "BKEXP_T_DATA=/data/a (here: /data/b), BKEXP_T_UNSET=unset (here: set here)" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_that_needs_unpickling_code(train, tmp_path):
    """``ckpt_path=`` goes through Lightning's loader with ``weights_only=True``: a last.ckpt that carries a
    pickled callable (here ``Path.touch`` on a marker file) is refused, and the callable never runs."""
    run_dir = train(*SHORT, "trainer.max_steps=2", "checkpoint_every_n_steps=2", "test_after_fit=false")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    marker = tmp_path / "code_ran"
    ckpt["extra"] = _TouchOnLoad(marker)
    tampered = tmp_path / "tampered.ckpt"
    torch.save(ckpt, tampered)
    with pytest.raises(Exception, match="[Ww]eights.only"):
        train(*SHORT, "trainer.max_steps=4", f"ckpt_path={tampered}", "test_after_fit=false")
    assert not marker.exists()
    (failed,) = [d for d in (tmp_path / "outputs").iterdir() if d != run_dir]
    assert read_summary(failed)["status"] == "failed"


class _TouchOnLoad:
    """Unpickling this object calls ``Path.touch(path)``: what a malicious checkpoint could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_resume_reads_the_runs_relative_paths_from_where_it_was_launched(train, tmp_path, wikitext_slice,
                                                                          monkeypatch, capsys):
    """`resume=` typed in another directory: the run's `dataset.data_dir=data` still names the folder it trained
    on, not the one that the same relative path names from there."""
    import json

    launch, elsewhere = launch_and_decoy(tmp_path, wikitext_slice)
    monkeypatch.chdir(launch)
    run_dir = train(*TINY, *RELATIVE_DATA, "trainer.max_steps=4")
    first = read_summary(run_dir)
    summary = run_dir / "summary.json"
    summary.write_text(json.dumps({**first, "status": "interrupted"}))  # as if stopped at its last checkpoint

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert train(f"resume={run_dir}", "trainer.max_steps=6") == run_dir
    assert f"working in {launch}, where the run was launched" in capsys.readouterr().err
    resumed = read_summary(run_dir)
    assert resumed["status"] == "ok" and resumed["steps"] == 6
    assert [r["from_step"] for r in resumed["resumes"]] == [4]
    assert resumed["data"]["source"]["data_dir"] == str((launch / "data").resolve())
    assert resumed["data"]["vocab_size"] == first["data"]["vocab_size"]


def test_resume_reads_the_environment_variables_of_the_run(train, tmp_path, wikitext_slice, monkeypatch, capsys):
    """`dataset.data_dir=${oc.env:VAR}/data`: resumed where VAR names another folder of other text, the run goes on
    reading its own folder (its vocabulary, data position and record stay those of one dataset), and says so."""
    import json

    launch, elsewhere = launch_and_decoy(tmp_path, wikitext_slice)
    monkeypatch.setenv("BKEXP_TEST_RUN_DATA", str(launch))
    run_dir = train(*TINY, *ENV_DATA, "trainer.max_steps=4")
    first = read_summary(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({**first, "status": "interrupted"}))

    monkeypatch.setenv("BKEXP_TEST_RUN_DATA", str(elsewhere))
    capsys.readouterr()
    assert train(f"resume={run_dir}", "trainer.max_steps=6") == run_dir
    err = capsys.readouterr().err
    assert f"set as the run had them: BKEXP_TEST_RUN_DATA={launch} (here: {elsewhere})" in err
    resumed = read_summary(run_dir)
    assert resumed["status"] == "ok" and [r["from_step"] for r in resumed["resumes"]] == [4]
    assert resumed["data"]["source"]["data_dir"] == f"{launch}/data"
    assert resumed["config_env"] == {"BKEXP_TEST_RUN_DATA": str(launch)}


def test_a_resume_records_what_differs_from_the_environment_that_wrote_its_checkpoint(train):
    """A checkpoint carries the environment of the session that wrote it; a run continued under another commit or
    torch says so in its record (it is not bit-identical to an uninterrupted run)."""
    import json

    run_dir = train(*SHORT, "trainer.max_steps=4", "checkpoint_every_n_steps=2")
    first = read_summary(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("Lifecycle")]
    assert state["environment"]["torch"] == first["env"]["torch"]  # what the checkpoint's session ran
    state["environment"] = {**state["environment"], "git_commit": "0" * 40, "torch": "2.0.0", "load_average_1m": 9.9}
    torch.save(ckpt, last)
    (run_dir / "summary.json").write_text(json.dumps({**first, "status": "interrupted"}))

    assert train(f"resume={run_dir}", "trainer.max_steps=6") == run_dir
    (resume,) = read_summary(run_dir)["resumes"]
    assert resume["from_step"] == 4
    assert resume["environment_changed"] == {"git_commit": ["0" * 40, first["env"]["git_commit"]],
                                             "torch": ["2.0.0", first["env"]["torch"]]}  # not the load average


def test_resume_refuses_a_budget_below_its_checkpoint_and_records_a_resume_with_nothing_left_to_train(train):
    import json

    run_dir = train(*SHORT, "trainer.max_steps=4", "checkpoint_every_n_steps=2")
    summary = run_dir / "summary.json"
    interrupted = json.dumps({**read_summary(run_dir), "status": "interrupted"})  # as if killed during the test
    summary.write_text(interrupted)
    with pytest.raises(SystemExit, match=r"last.ckpt holds step 4, beyond trainer.max_steps=2: .*nothing was changed"):
        train(f"resume={run_dir}", "trainer.max_steps=2")
    assert summary.read_text() == interrupted
    last = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=f"ckpt_path={last} holds step 4, beyond trainer.max_steps=3"):
        train(*SHORT, f"ckpt_path={last}", "trainer.max_steps=3")  # a new run from it: fails, saying why
    new_run = max(run_dir.parent.iterdir())
    assert new_run != run_dir and read_summary(new_run)["status"] == "failed"
    # the run's own budget: no step left to train, the test runs, and the resume is on record
    train(f"resume={run_dir}")
    resumed = read_summary(run_dir)
    assert resumed["status"] == "ok" and resumed["steps"] == 4
    assert [r["from_step"] for r in resumed["resumes"]] == [4]


@pytest.mark.slow  # a sweep of two jobs, then its resume
def test_a_sweep_resumed_with_a_new_budget_continues_its_jobs_in_their_own_directories(train, tmp_path):
    """Job directories are named by their overrides: `resume=<sweep> trainer.max_steps=9` must still find them (it
    started new jobs from scratch beside them), and a finished job's `.hydra/` stays the record of its launch."""
    import json

    sweep = train(*SHORT, "model=bk,transformer", "trainer.max_steps=6", "checkpoint_every_n_steps=3", multirun=True)
    first, second = jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    (first / "summary.json").write_text(json.dumps({**read_summary(first), "status": "interrupted"}))
    launch_record = {p: p.read_bytes() for job in jobs for p in (job / ".hydra").iterdir()}

    assert train(f"resume={sweep}", "trainer.max_steps=9", multirun=True) == sweep
    assert sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir()) == jobs  # no new job directory
    resumed = read_summary(first)
    assert resumed["status"] == "ok" and resumed["steps"] == 9 and [r["from_step"] for r in resumed["resumes"]] == [6]
    assert read_summary(second)["steps"] == 6  # finished: skipped
    assert {p: p.read_bytes() for job in jobs for p in (job / ".hydra").iterdir()} == launch_record
