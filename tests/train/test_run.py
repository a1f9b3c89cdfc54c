"""End-to-end runs through the real entry point: run directory, summary.json, loggers, failures, errors."""

from __future__ import annotations

import csv
import logging
import math
import shlex

import lightning.pytorch as pl
import pytest
import torch
from hydra.errors import ConfigCompositionException
from lightning.pytorch.demos.boring_classes import BoringModel

from bkexp.export import export_run
from bkexp.report.cli import write_report
from bkexp.train.callbacks import StepBudgetProgressBar
from bkexp.train.causality import CausalityError
from bkexp.train.config import ConfigError
import wandb_files
from runhelpers import MQAR_TINY, TINY, read_summary

REQUIRED_KEYS = ["status", "error", "model", "dataset", "seq_len", "bits", "seed", "params", "metrics",
                 "throughput", "memory", "wall_time_s", "backends", "config", "env", "state_size"]


def test_default_run_writes_a_complete_run_directory(train):
    run_dir = train(*TINY, *MQAR_TINY, "logger=many")
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "csv/metrics.csv",
                 "checkpoints/last.ckpt", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = read_summary(run_dir)
    for key in REQUIRED_KEYS:
        assert key in summary, key
    assert summary["status"] == "ok" and summary["error"] is None
    assert (summary["model"], summary["dataset"], summary["seq_len"], summary["bits"]) == ("transformer", "mqar", 32, 32)
    assert 0 < summary["params"]["non_embedding"] < summary["params"]["total"]
    metrics = summary["metrics"]
    for key in ("val/loss", "val/ppl", "test/loss", "test/ppl", "train/loss", "val/acc"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert summary["throughput"]["train_tokens_per_sec"] > 0 and summary["throughput"]["eval_tokens_per_sec"] > 0
    assert summary["memory"]["peak_mb"] > 0 and summary["wall_time_s"] > 0
    assert summary["backends"] == {"attention": "sdpa"}
    assert summary["steps"] == 4 and summary["tokens"]["train"] == 4 * 4 * 32
    assert summary["config"]["model"]["d_model"] == 32
    for key in ("python", "torch", "lightning", "hydra", "device", "git_commit"):
        assert key in summary["env"], key

    rows = list(csv.DictReader((run_dir / "csv/metrics.csv").open()))
    assert any(row.get("val/ppl") for row in rows) and any(row.get("train/loss") for row in rows)

    # TensorBoard: real event files holding val/ppl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "val/ppl" in tags
    # HParams view: a session with the run's hyperparameters and its final metrics.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for event_file in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(event_file)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    sessions.append(data.session_start_info.hparams)
    assert len(sessions) == 1 and sessions[0]["model"].string_value == "transformer"
    assert sessions[0]["seq_len"].number_value == 32
    # Run-level numbers under the report's names, in one "summary" category; no Lightning epoch chart.
    assert tags >= {"summary/best/val_ppl", "summary/throughput.train_tokens_per_sec", "summary/memory.peak_mb"}
    assert "epoch" not in tags and not any(t.startswith("hparams/") for t in tags)

    # W&B offline run: config and summary on disk.
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    (run_file,) = offline[0].glob("run-*.wandb")
    info = wandb_files.run_info(run_file)
    assert info["config"]["model.name"] == "transformer" and info["config"]["seq_len"] == 32
    assert "paths.root_dir" not in info["name"] and info["name"].startswith("transformer · ")
    assert "model.d_model=32" in info["name"] and info["job_type"] == "train" and info["group"] == ""
    assert info["summary"]["test/ppl"] == pytest.approx(metrics["test/ppl"], rel=1e-4)
    assert info["summary"]["throughput"]["train_tokens_per_sec"] == summary["throughput"]["train_tokens_per_sec"]
    assert info["summary"]["status"] == "ok"


def test_failed_run_still_writes_summary(train, tmp_path):
    with pytest.raises(Exception, match="bogus"):
        train(*TINY, *MQAR_TINY, "trainer.precision=bogus")
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and summary["exit_code"] == 1
    assert "bogus" in summary["error"]
    assert summary["params"]["total"] > 0 and summary["wall_time_s"] > 0
    assert not list(run_dir.glob(".summary.json.*"))  # no temporary file left behind


def test_refuses_to_train_a_leaky_model(train, tmp_path):
    with pytest.raises(CausalityError, match="not causal"):
        train(*TINY, *MQAR_TINY, "model.mixer._target_=leaky.LeakyMixer", "~model.mixer.n_heads",
              "~model.mixer.causal", "~model.mixer.rotary", "~model.mixer.dropout", "~model.mixer.bias")
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    assert read_summary(run_dir)["status"] == "failed"
    assert not (run_dir / "checkpoints").exists()  # refused before any training


def test_threads_sets_the_runs_cpu_threads_and_the_process_gets_its_own_back(train):
    """A multirun's jobs share the process: a job's ``threads`` holds for that job, recorded, then restored."""
    before = torch.get_num_threads()
    run_dir = train(*TINY, *MQAR_TINY, "threads=1")
    summary = read_summary(run_dir)
    assert summary["status"] == "ok" and summary["env"]["threads"] == 1 and summary["config"]["threads"] == 1
    assert torch.get_num_threads() == before


def test_bad_bits_lists_valid_values(train):
    with pytest.raises(ConfigError, match=r"bits=5 is not supported; valid: 32, 16, 8, 4, 2"):
        train(*TINY, *MQAR_TINY, "bits=5")


def test_unknown_group_option_is_an_error(train):
    with pytest.raises(ConfigCompositionException, match="model"):
        train("model=gpt5")


def test_mistyped_key_is_an_error(train):
    with pytest.raises(ConfigCompositionException, match="d_modle"):
        train("model.d_modle=64")
    with pytest.raises(ConfigError, match=r"model.d_modle is not a parameter of .*LanguageModel; valid keys: .*d_model"):
        train(*TINY, *MQAR_TINY, "+model.d_modle=64")


def test_wikitext2_offline_without_data_dir_fails_fast_with_instructions(train):
    with pytest.raises(Exception, match="data_dir"):
        train(*TINY, "dataset=wikitext2")


def test_multirun_sweep_reports_survives_a_failing_job_and_exits_non_zero(train, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:  # after every job ran and the report was written
        train(*TINY, *MQAR_TINY, "model.n_layers=1,2", "optimizer.lr=3e-3,1e30",
              "trainer.gradient_clip_val=null", "scheduler=constant", multirun=True)
    assert exited.value.code == 1
    assert "2 of 4 jobs did not end ok (2 diverged); exit status 1" in capsys.readouterr().out
    (sweep_dir,) = list((tmp_path / "multirun").iterdir())
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1", "2", "3"]
    assert jobs[0].name.startswith("0_compute_flops=False,") and len(jobs[0].name) <= 122  # cut + hashed
    statuses = {p.name: read_summary(p)["status"] for p in jobs}
    assert sorted(statuses.values()) == ["diverged", "diverged", "ok", "ok"]
    for job in jobs:
        summary = read_summary(job)
        assert summary["sweep"]["dir"] == str(sweep_dir.resolve())
        if "optimizer.lr=1e+30" in summary["overrides"] or "optimizer.lr=1e30" in summary["overrides"]:
            assert summary["error"].startswith("Diverged: ") and summary["exit_code"] == 1
        for name in (".hydra/config.yaml", "train.log", "summary.json"):
            assert (job / name).is_file()
    # The Hydra callback wrote the report at the end of the sweep.
    import pandas as pd

    table = pd.read_csv(sweep_dir / "summary.csv")
    assert len(table) == 4 and sorted(table["status"]) == ["diverged", "diverged", "ok", "ok"]
    markdown = (sweep_dir / "summary.md").read_text()
    assert "failed" in markdown and "transformer" in markdown
    assert (sweep_dir / "comparison.json").is_file()
    assert list((sweep_dir / "plots").glob("*.png"))


def test_the_console_headline_states_the_test_numbers_with_chance(train, capsys) -> None:
    from bkexp.train.summary import headline

    run = train(*TINY, *MQAR_TINY)
    summary = read_summary(run)
    printed = capsys.readouterr().out
    line = headline(summary)
    assert line in printed and line.startswith("[bkexp] transformer on mqar (seq_len 32, 32-bit)")
    assert f"test answer accuracy {summary['metrics']['test/acc']:.3f} (chance 0.031)" in line  # 1/32 values
    assert f"test loss {summary['metrics']['test/loss']:.4g}" in line


@pytest.mark.parametrize("count", [True, False])
def test_the_layer_table_shows_bkexps_flop_count_not_lightnings_zeros(train, count: bool) -> None:
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

    class Keep(logging.Handler):  # Lightning's loggers do not propagate to the root logger that caplog watches
        def emit(self, record: logging.LogRecord) -> None:
            tables.append(record.getMessage())

    tables: list[str] = []
    summary_log, keep = logging.getLogger("lightning.pytorch.callbacks.model_summary"), Keep()
    summary_log.addHandler(keep)
    overrides = [o for o in TINY if o not in ("trainer.enable_model_summary=false", "compute_flops=false")]
    try:
        run = train(*overrides, *MQAR_TINY, f"compute_flops={str(count).lower()}")
    finally:
        summary_log.removeHandler(keep)
    (table,) = tables
    assert "| Name " in table and "| Params " in table and "Total params" in table  # Lightning's table otherwise
    header = next(line for line in table.splitlines() if "| Name " in line)
    assert "FLOPs" not in header and "Total Flops" not in table  # the column and the total Lightning never counted
    flops = read_summary(run).get("flops")
    if count:
        expected = (f"{get_human_readable_count(int(flops['train_step_per_token'])):<10}Training FLOPs per token "
                    f"(forward {get_human_readable_count(int(flops['forward_per_token']))};")
        assert table.splitlines()[-1].startswith(expected) and flops["train_step_per_token"] > 0
    else:
        assert flops is None and "FLOPs" not in table


def test_early_stopping_stops_after_patience_validations_and_records_why(train, capsys, tmp_path) -> None:
    """callbacks=early_stopping: with a min_delta no validation can meet, the run stops at the validation after
    `patience` more, mid-epoch, well before max_steps; summary.json and the headline say when and why."""
    tiny = [o for o in TINY if not o.startswith("trainer.max_steps=")]
    run = train(*tiny, *MQAR_TINY, "trainer.max_steps=40", "callbacks=early_stopping",
                "callbacks.early_stopping.patience=2", "callbacks.early_stopping.min_delta=100", "logger=wandb")
    summary = read_summary(run)
    validations = [(int(r["step"]) + 1, float(r["val/loss"]))  # the CSV logs step s after optimizer step s + 1
                   for r in csv.DictReader((run / "csv/metrics.csv").open()) if r.get("val/loss")]
    assert [step for step, _ in validations] == [2, 4, 6]  # one improvement (from inf), then two without
    assert summary["status"] == "ok" and summary["steps"] == 6 and summary["tokens"]["train"] == 6 * 4 * 32
    stopped = summary["stopped_early"]
    assert stopped["step"] == 6 and stopped["reason"] == "patience_exhausted" and stopped["monitor"] == "val/loss"
    assert stopped["best"] == pytest.approx(validations[0][1], rel=1e-6)
    assert "did not improve in the last 2 records" in stopped["message"]
    best_step = min(validations, key=lambda v: v[1])[0]  # the checkpoint keeps the lowest loss, min_delta or not
    assert summary["metrics"]["test/checkpoint"] == f"best-{best_step}.ckpt"
    assert "| stopped early at step 6 (val/loss: patience exhausted)" in capsys.readouterr().out
    (run_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    wandb_run = wandb_files.run_info(run_file)
    assert "stopped-early" in wandb_run["tags"]
    assert wandb_files.flat_summary(wandb_run["summary"])["stopped_early.step"] == 6
    report = write_report([run], plots=False)
    (row,) = csv.DictReader(open(report.summary_csv))
    assert (row["stopped_early.step"], row["stopped_early.reason"]) == ("6", "patience_exhausted")
    assert "**Stopped early** (1 of 1 runs): transformer at step 6." in report.summary_md.read_text()
    card = (export_run(run, tmp_path / "export") / "README.md").read_text()
    assert "| stopped early | at step 6 of 40: Monitored metric val/loss did not improve in the last 2 records." in card
    assert "stopped_early" not in read_summary(train(*TINY, *MQAR_TINY))  # the default callbacks do not stop


def test_resuming_a_finished_run_skips_it_and_prints_how_to_train_it_further(train, capsys) -> None:
    finished = train(*TINY, *MQAR_TINY)
    before = (finished / "summary.json").read_text()
    capsys.readouterr()
    train(f"resume={finished}", "trainer.max_steps=8")
    printed = capsys.readouterr().out
    assert (finished / "summary.json").read_text() == before  # skipped: its results stay
    assert f"run {finished} already finished (status ok); skipped. It stopped at step 4" in printed
    (command,) = [line.strip() for line in printed.splitlines() if line.strip().startswith("python train.py")]
    args = shlex.split(command.replace("trainer.max_steps=N", "trainer.max_steps=8"))
    assert args[:2] == ["python", "train.py"] and f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}" in args
    further = read_summary(train(*args[2:]))  # the printed command, as a user would paste it
    assert further["status"] == "ok" and further["steps"] == 8
    assert further["resumes"] == [{"from_step": 4, "checkpoint": str(finished / "checkpoints" / "last.ckpt")}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_run_on_a_machine_without_one_fails_before_building_anything(train, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"no CUDA device is available .*valid on this machine: hardware=cpu"):
        train(*TINY, *MQAR_TINY, "hardware=gpu")
    (run,) = list((tmp_path / "outputs").iterdir())
    summary = read_summary(run)
    assert summary["status"] == "failed" and summary["error"].startswith("ConfigError: trainer.accelerator='gpu'")
    assert "data" not in summary and not (run / "checkpoints").exists()  # no data, model or Trainer was built


def test_a_run_without_validation_records_no_best_validation_loss(train) -> None:
    """limit_val_batches=0: nothing was validated, so there is no best loss (it was recorded as inf) and the test
    runs on the final weights."""
    summary = read_summary(train(*TINY, *MQAR_TINY, "trainer.limit_val_batches=0"))
    metrics = summary["metrics"]
    assert summary["status"] == "ok" and metrics["test/checkpoint"] == "final weights"
    assert not any(key.startswith(("best/", "val/")) for key in metrics)
    assert math.isfinite(metrics["test/loss"])


def test_the_progress_bar_shows_no_negative_epoch_total_under_a_step_budget(train, capsys) -> None:
    """Lightning 2.6's rich bar printed "Epoch 0/-2" on every run bounded by max_steps (max_epochs is -1 then)."""
    tiny = [o for o in TINY if o != "trainer.enable_progress_bar=false"]
    train(*tiny, *MQAR_TINY, "trainer.enable_progress_bar=true")
    out = capsys.readouterr().out
    assert "Epoch 0" in out and "Epoch 0/-2" not in out


def test_the_progress_bar_keeps_the_epoch_total_of_an_epoch_budget() -> None:
    for limits, expected in (({"max_steps": 2}, "Epoch 0"), ({"max_epochs": 3, "limit_train_batches": 1}, "Epoch 0/2")):
        bar = StepBudgetProgressBar()
        trainer = pl.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False,
                             limit_val_batches=0, accelerator="cpu", **limits)
        trainer.fit(BoringModel())
        assert bar._get_train_description(0).strip() == expected
