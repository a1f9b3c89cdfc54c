"""Dashboards of a real 2x2 sweep: TensorBoard served over HTTP, W&B offline run files, names and summaries.

One sweep (``model=transformer,bk seq_len=32,64``, ``logger=many``) is trained once for the module; the tests
read what a user would see: TensorBoard's HTTP API (HParams experiment, session groups, scalar tags, runs)
from a real server on 127.0.0.1, and the W&B runs' offline protobuf records.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import wandb_files
from runhelpers import MQAR_TINY, TINY, load_train_entry, read_summary
from bkexp.dashboards import SEPARATOR, run_name, run_numbers, sweep_group, swept_keys

SWEEP = ["model=transformer,bk", "seq_len=32,64"]
NAMES = {f"{m}{SEPARATOR}seq_len={n}" for m in ("transformer", "bk") for n in (32, 64)}
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "HYDRA_FULL_ERROR": "1"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    overrides = [o for o in TINY if not o.startswith(("seq_len=", "compute_flops="))]
    argv = ["train.py", "-m", f"paths.root_dir={root}", *overrides, *MQAR_TINY, *SWEEP, "logger=many"]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**ENV, "WANDB_DIR": str(root), "WANDB_CONFIG_DIR": str(root / "wandb_config"),
                           "WANDB_CACHE_DIR": str(root / "wandb_cache")}.items():
            mp.setenv(key, value)
        mp.setattr(sys, "argv", argv)
        load_train_entry().main()
    (sweep_dir,) = [p for p in (root / "multirun").iterdir() if p.is_dir()]
    return sweep_dir


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/summary.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard(sweep: Path):
    """A real TensorBoard server on 127.0.0.1 reading the sweep directory; yields its base URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host", "127.0.0.1",
                             "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **ENV})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
                groups = _get(f"{base}/data/plugin/hparams/session_groups",
                              {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_FAILURE"],
                               "colParams": [], "startIndex": 0, "sliceSize": 100})
                if experiment.get("hparamInfos") and len(groups.get("sessionGroups", [])) == 4:
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"TensorBoard did not serve the sweep: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_hparams_view_shows_swept_settings_and_perplexity_first(sweep: Path, tensorboard: str) -> None:
    experiment = _get(f"{tensorboard}/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = experiment["hparamInfos"]
    differs = [h["name"] for h in hparams if h.get("differs")]
    assert differs == ["model", "seq_len"]  # the swept settings, first: TensorBoard ticks the first five
    assert [h["name"] for h in hparams[:2]] == ["model", "seq_len"]
    assert {h["name"] for h in hparams} >= {"model", "seq_len", "dataset", "bits", "seed"}
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    # Primary metrics first (TensorBoard shows five and colours parallel coordinates by the first).
    assert metrics[:4] == ["val/ppl", "test/ppl", "val/acc", "test/acc"]
    assert metrics[4] == "summary/best/val_ppl"
    assert "train/aux_loss" in metrics  # bk's metric, though the transformer runs have none
    assert "summary/throughput.train_tokens_per_sec" in metrics and "summary/memory.peak_mb" in metrics
    assert not any(m.startswith("hparams/") or m == "epoch" for m in metrics)

    # Each session's metric values are the run's own numbers in summary.json.
    groups = _get(f"{tensorboard}/data/plugin/hparams/session_groups",
                  {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "colParams": [], "startIndex": 0,
                   "sliceSize": 100})["sessionGroups"]
    by_name = {g["name"]: g for g in groups}
    runs = {read_summary(job)["dashboards"]["tensorboard"]["dir"]: read_summary(job) for job in _jobs(sweep)}
    for run_dir, summary in runs.items():
        name = Path(run_dir).relative_to(sweep).as_posix()
        group = by_name[name]
        assert group["hparams"]["model"] == summary["model"] and group["hparams"]["seq_len"] == summary["seq_len"]
        values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert values["val/ppl"] == pytest.approx(summary["metrics"]["val/ppl"], rel=1e-5)
        assert values["summary/best/val_ppl"] == pytest.approx(summary["metrics"]["best/val_ppl"], rel=1e-5)
        assert values["summary/throughput.train_tokens_per_sec"] == pytest.approx(
            summary["throughput"]["train_tokens_per_sec"], rel=1e-5)
        assert values["summary/memory.peak_mb"] == pytest.approx(summary["memory"]["peak_mb"], rel=1e-5)


def test_tensorboard_run_names_and_scalars(sweep: Path, tensorboard: str) -> None:
    runs = _get(f"{tensorboard}/data/runs")
    assert {r for r in runs if r != "tensorboard"} == {f"tensorboard/{n}" for n in NAMES}
    tags = _get(f"{tensorboard}/data/plugin/scalars/tags")
    bk = tags[f"tensorboard/bk{SEPARATOR}seq_len=64"]
    assert {"train/loss", "val/loss", "val/ppl", "train/aux_loss"} <= set(bk)
    all_tags = {t for run in tags.values() for t in run}
    assert "epoch" not in all_tags and not any(t.startswith("hparams/") for t in all_tags)
    # Run-level numbers form one scalar category, not one chart category each.
    assert {t.split("/")[0] for t in all_tags if "." in t.split("/")[-1]} <= {"summary"}
    # Custom Scalars: training and validation first, train and val loss on one chart.
    layout = _get(f"{tensorboard}/data/plugin/custom_scalars/layout")
    first = layout["category"][0]
    assert first["title"] == "train / val"
    assert first["chart"][0]["multiline"]["tag"] == ["^train/loss$", "^val/loss$"]
    assert any(c["multiline"]["tag"] == ["^train/aux_loss$"] for c in first["chart"])


def test_wandb_runs_hold_names_group_job_type_and_summary_json_numbers(sweep: Path) -> None:
    group = sweep_group(sweep)
    names = set()
    for job in _jobs(sweep):
        summary = read_summary(job)
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        info = wandb_files.run_info(run_file)
        names.add(info["name"])
        assert info["group"] == group and info["job_type"] == "train"
        assert {summary["model"], "mqar"} <= set(info["tags"])
        assert info["config"]["overrides"] == summary["overrides"]  # the full list stays in the config
        assert summary["dashboards"]["wandb"]["group"] == group and summary["dashboards"]["name"] == info["name"]
        flat = wandb_files.flat_summary(info["summary"])
        numbers = run_numbers(summary)
        assert {"throughput.train_tokens_per_sec", "memory.peak_mb", "flops.forward_per_token",
                "params.non_embedding", "state_size"} <= set(numbers)
        for key, value in numbers.items():
            assert flat[key] == pytest.approx(value, rel=1e-9), key
        assert flat["status"] == summary["status"] == "ok"
        # define_metric's minimum is kept, and best/val_ppl is that minimum (over the validations).
        history = [h["val/ppl"] for h in info["history"] if "val/ppl" in h]
        assert flat["val/ppl.min"] == pytest.approx(min(history))
        assert summary["metrics"]["best/val_ppl"] == pytest.approx(min(history), rel=1e-5)
    assert names == NAMES
    (report_file,) = sweep.glob("wandb/offline-run-*/run-*.wandb")
    report = wandb_files.run_info(report_file)
    assert report["group"] == group and report["job_type"] == "report"


def test_names_come_from_the_overrides_that_differ(tmp_path: Path) -> None:
    assert swept_keys(["model=bk,mamba", "seq_len=32", "logger=many", "seed=range(0,3)", "bits=8,8",
                       "paths.root_dir=a,b", "lr=interval(0,1)"]) == ["model", "seed", "lr"]
    job = ["model=bk", "seq_len=32", "logger=many", "seed=2", "trainer.max_steps=5"]
    assert run_name("bk", job, ["model", "seed"]) == f"bk{SEPARATOR}seed=2"
    assert run_name("bk", job, None) == f"bk{SEPARATOR}seq_len=32{SEPARATOR}seed=2{SEPARATOR}trainer.max_steps=5"
    # Two sweeps whose folders share a name are two groups.
    assert sweep_group(tmp_path / "a" / "sweep") != sweep_group(tmp_path / "b" / "sweep")
    assert sweep_group(tmp_path / "a" / "sweep").startswith("sweep-")


def test_run_numbers_use_the_report_names() -> None:
    summary = {"throughput": {"train_tokens_per_sec": 10.0, "eval_tokens_per_sec": None},
               "memory": {"peak_mb": 5.0}, "flops": {"forward_per_token": 3.0, "forward_by_op": {"mm": 1},
                                                      "batch_shape": [2, 3], "method": "x"},
               "params": {"total": 7, "non_embedding": 4}, "state_size": 9, "wall_time_s": math.inf,
               "metrics": {"best/val_ppl": 2.0, "val/ppl": 3.0}}
    assert run_numbers(summary) == {"throughput.train_tokens_per_sec": 10.0, "memory.peak_mb": 5.0,
                                    "flops.forward_per_token": 3.0, "params.total": 7, "params.non_embedding": 4,
                                    "state_size": 9, "best/val_ppl": 2.0}
