"""bkexp report on synthetic run directories written exactly as the training code writes them (summary schema)."""

from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bkexp.report.cli import main as report_main
from bkexp.report.cli import write_report
from bkexp.report.hydra_callback import ReportCallback
from bkexp.rundir import RunDirError
from bkexp.dashboards import sweep_group
import wandb_files
from runhelpers import record_run

MODELS = ("bk", "transformer")
SEQ_LENS = (128, 256)
SEEDS = (0, 1)
FAILED = {"model": "bk", "seq_len": 512, "seed": 0, "error": "OutOfMemoryError: CPU ran out of memory at seq_len=512"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def measured(model: str, seq_len: int, seed: int) -> dict[str, float]:
    """Distinct, seed-dependent numbers per run, so means/stds/ratios are checkable."""
    quadratic = model == "transformer"
    return {
        "val_ppl": (30.0 if quadratic else 33.0) - seq_len / 128 + 0.5 * seed,
        "test_ppl": (31.0 if quadratic else 34.5) - seq_len / 128 + 0.25 * seed,
        "tps": (8e5 / (seq_len / 128) ** (2 if quadratic else 1)) * (1 + 0.05 * seed),
        "peak_mb": (100.0 * (seq_len / 128) ** (2 if quadratic else 1)) + 3 * seed,
        "flops_fwd": 2.0e6 * (seq_len if quadratic else 128),
    }


def write_run(run_dir: Path, sweep_dir: Path | None, job_num: int, model: str, seq_len: int, seed: int,
              error: str | None = None, bits: int | None = None) -> None:
    """A run directory as DESIGN.md / CONTEXT.md specify: .hydra/, csv/metrics.csv, summary.json."""
    overrides = [f"model={model}", f"seq_len={seq_len}", f"seed={seed}"] + ([f"bits={bits}"] if bits else [])
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    config = {
        "seed": seed, "seq_len": seq_len, "bits": bits or 32,
        "model": {"_target_": "bkexp.models.LanguageModel", "d_model": 32, "n_layers": 2,
                  "mixer": {"_target_": f"bkexp.models.mixers.{model}", "_partial_": True}},
        "dataset": {"name": "wikitext2", "path": "../shared/data/wikitext-2"},
        "trainer": {"max_steps": 4},
        "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95]},
        "paths": {"output_dir": str(run_dir)},
        "logger": {"csv": {"save_dir": str(run_dir / "csv")}},
    }
    summary = {
        "status": "failed" if error else "ok", "error": error, "traceback": "Traceback ...\n" if error else None,
        "model": model, "dataset": "wikitext2", "seq_len": seq_len, "bits": bits or 32,
        "seed": seed, "quant": {"method": "none"}, "overrides": overrides,
        "recipe": "mqar_tiny_transformer" if model == "transformer" else None,
        "sweep": ({"dir": str(sweep_dir), "job_num": job_num, "override_dirname": ",".join(overrides)}
                  if sweep_dir else None),
        "params": {"total": 1000, "non_embedding": 600, "embedding": 400}, "state_size": 64,
        "metrics": {}, "throughput": {}, "tokens": {}, "memory": {}, "flops": {},
        "config": config, "env": {"python": "3.11", "torch": "2.13.0", "device": "cpu", "git_commit": "abc"},
    }
    steps = [1, 2, 3, 4]
    if not error:
        m = measured(model, seq_len, seed)
        summary.update({
            "metrics": {"train/loss": 3.3, "val/loss": 3.4, "val/ppl": m["val_ppl"], "test/loss": 3.43,
                        "test/ppl": m["test_ppl"], "best/val_loss": 3.39, "best/val_ppl": m["val_ppl"] - 0.1},
            "throughput": {"train_tokens_per_sec": m["tps"], "eval_tokens_per_sec": 2 * m["tps"]},
            "tokens": {"train": 4 * 2 * seq_len}, "steps": 4, "memory": {"peak_mb": m["peak_mb"]},
            "flops": {"forward_per_token": m["flops_fwd"], "train_step_per_token": 3 * m["flops_fwd"]},
            "wall_time_s": 1.5, "backends": {"bk_core": "cpu"} if model == "bk" else {},
        })
    else:
        steps = [1, 2]  # it died early: a partial curve
    # Lightning CSVLogger: sparse rows, train rows carry train/tokens, val rows only step/epoch/val metrics.
    header = ["step", "epoch", "train/loss", "train/tokens", "lr", "grad_norm", "val/loss", "val/ppl",
              "throughput/tokens_per_sec", "time/step_ms", "mem/peak_mb", "test/loss", "test/ppl"]
    lines = [",".join(header)]
    for step in steps:
        lines.append(f"{step},0,{4.0 - 0.1 * step - 0.01 * seed},{step * 2 * seq_len},1e-3,0.5,,,1000,5,100,,")
        if step % 2 == 0:
            lines.append(f"{step},0,,,,,{4.1 - 0.1 * step},{2.718 ** (4.1 - 0.1 * step)},,,,,")
    (run_dir / "csv").mkdir()
    (run_dir / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    record_run(run_dir, **summary)


def write_sweep(root: Path, stamp: str = "2026-01-02_03-04-05-123456", failed: bool = True,
                seq_lens: tuple[int, ...] = SEQ_LENS) -> Path:
    sweep_dir = root / "multirun" / stamp
    job = 0
    for model in MODELS:
        for seq_len in seq_lens:
            for seed in SEEDS:
                name = f"{job}_model={model},seq_len={seq_len},seed={seed}"
                write_run(sweep_dir / name, sweep_dir, job, model, seq_len, seed)
                job += 1
    if failed:
        name = f"{job}_model={FAILED['model']},seq_len={FAILED['seq_len']},seed={FAILED['seed']}"
        write_run(sweep_dir / name, sweep_dir, job, FAILED["model"], FAILED["seq_len"], FAILED["seed"],
                  error=FAILED["error"])
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    return sweep_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_table(markdown: str, heading: str) -> list[list[str]]:
    """The pipe table under a '## heading', as rows of cells (header first, separator dropped)."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows if not set(row) <= set("|- ")]


def assert_valid_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, (path, len(data))  # a real plot, not an empty canvas
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return write_sweep(tmp_path)


def test_summary_csv_has_one_row_per_run_with_keys_and_metrics(sweep: Path) -> None:
    report = write_report([sweep], plots=False)
    rows = read_csv(report.summary_csv)
    assert len(rows) == len(MODELS) * len(SEQ_LENS) * len(SEEDS) + 1
    columns = set(rows[0])
    assert {"run_dir", "status", "error", "model", "seq_len", "seed", "metrics.val/ppl", "metrics.test/ppl",
            "throughput.train_tokens_per_sec", "memory.peak_mb", "flops.forward_per_token"} <= columns
    # varying config keys are there (the mixer differs per model); per-run paths and constants are not
    assert "config.model.mixer._target_" in columns
    assert not [c for c in columns if c in {"metrics", "throughput", "memory", "flops", "config.seq_len"}]
    assert "config.paths.output_dir" not in columns and "config.logger.csv.save_dir" not in columns
    assert "config.model.d_model" not in columns and "config.optimizer.betas" not in columns
    by_key = {(r["model"], int(r["seq_len"]), int(r["seed"])): r for r in rows}
    assert len(by_key) == len(rows)
    failed = by_key[(FAILED["model"], FAILED["seq_len"], FAILED["seed"])]
    assert failed["status"] == "failed" and failed["error"] == FAILED["error"]
    assert failed["metrics.val/ppl"] == ""
    ok = by_key[("transformer", 256, 1)]
    assert ok["status"] == "ok"
    assert list(rows[0])[:4] == ["run_dir", "status", "error", "recipe"]  # what a reader needs before the numbers
    assert ok["recipe"] == "mqar_tiny_transformer" and by_key[("bk", 256, 1)]["recipe"] == ""  # none applied
    assert float(ok["throughput.train_tokens_per_sec"]) == pytest.approx(measured("transformer", 256, 1)["tps"])


def test_summary_md_pivots_are_models_by_seq_len_with_mean_std_and_failed(sweep: Path) -> None:
    report = write_report([sweep], plots=False)
    markdown = report.summary_md.read_text()
    for heading in ("val perplexity (final)", "test perplexity", "train tokens/s", "peak memory (MB)",
                    "forward FLOPs per token"):
        table = md_table(markdown, heading)
        header, body = table[0], table[1:]
        assert header == ["model \\ seq_len", "128", "256", "512"], heading
        assert [row[0] for row in body] == ["bk", "transformer"], heading
        assert all(len(row) == 4 for row in body)
        assert body[0][3] == "failed" and body[1][3] == ""  # bk failed at 512, transformer never ran there
    val = md_table(markdown, "val perplexity (final)")
    values = [measured("bk", 128, s)["val_ppl"] for s in SEEDS]
    expected = f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g} (2)"
    assert val[1][1] == expected
    failed_section = md_table(markdown, "Failed runs")
    assert len(failed_section) == 2 and FAILED["error"] in failed_section[1][-1]


def test_comparison_ratios_match_independent_means(sweep: Path) -> None:
    report = write_report([sweep], baseline="transformer", plots=False)
    result = json.loads(report.comparison_json.read_text())
    assert result["baseline"] == "transformer" and result["point_keys"] == ["seq_len"]
    points = {p["point"]["seq_len"]: p for p in result["points"]}
    assert set(points) == {128, 256, 512}
    assert "skipped" in points[512]  # only the failed bk run there: nothing to compare against
    for seq_len in SEQ_LENS:
        def mean(model: str, key: str) -> float:
            return statistics.mean(measured(model, seq_len, s)[key] for s in SEEDS)

        bk = points[seq_len]["models"]["bk"]
        assert bk["speedup"] == pytest.approx(mean("bk", "tps") / mean("transformer", "tps"), rel=1e-12)
        assert bk["memory_ratio"] == pytest.approx(mean("bk", "peak_mb") / mean("transformer", "peak_mb"), rel=1e-12)
        assert bk["val_ppl_ratio"] == pytest.approx(mean("bk", "val_ppl") / mean("transformer", "val_ppl"), rel=1e-12)
        assert bk["ppl_ratio"] == pytest.approx(mean("bk", "test_ppl") / mean("transformer", "test_ppl"), rel=1e-12)
        assert bk["n_ok"] == 2
        assert points[seq_len]["models"]["transformer"]["speedup"] == pytest.approx(1.0)


def test_several_swept_keys_make_combined_columns(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun" / "bits_x_seq_len"
    job = 0
    for model in MODELS:
        for bits in (8, 32):
            for seq_len in SEQ_LENS:
                write_run(sweep_dir / f"{job}", sweep_dir, job, model, seq_len, 0, bits=bits)
                job += 1
    report = write_report([sweep_dir], plots=False)
    table = md_table(report.summary_md.read_text(), "val perplexity (final)")
    assert table[0] == ["model \\ seq_len, bits", "seq_len=128, bits=8", "seq_len=128, bits=32",
                        "seq_len=256, bits=8", "seq_len=256, bits=32"]
    assert [len(row) for row in table[1:]] == [5, 5]
    assert table[1][1] == f"{measured('bk', 128, 0)['val_ppl']:.4g}"  # one seed: the value, no ± (n)
    points = json.loads(report.comparison_json.read_text())["points"]
    assert [p["point"] for p in points] == [{"seq_len": n, "bits": b} for n in SEQ_LENS for b in (8, 32)]


def test_missing_baseline_is_skipped_with_a_reason(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main([str(sweep), "--baseline", "mamba", "--no-plots"]) == 0
    result = json.loads((sweep / "comparison.json").read_text())
    assert "mamba" in result["skipped"] and "bk, transformer" in result["skipped"]
    assert "comparison skipped" in capsys.readouterr().out


def test_plots_are_valid_pngs(sweep: Path) -> None:
    report = write_report([sweep], metrics=["val_ppl", "train_tokens_per_sec", "peak_mb"])
    names = {p.name for p in report.plots}
    assert {"metric_val_ppl_vs_seq_len.png", "metric_train_tokens_per_sec_vs_seq_len.png",
            "metric_peak_mb_vs_seq_len.png", "speedup_vs_transformer.png",
            "curves_seq_len=128.png", "curves_seq_len=512.png"} <= names
    for path in report.plots:
        assert path.parent == sweep / "plots"
        assert_valid_png(path)
    # no temporary files left beside the results
    assert not [p for p in sweep.rglob(".*.tmp")]


def test_single_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "2026-01-02_03-04-05-123456"
    write_run(run_dir, None, 0, "bk", 128, 0)
    assert report_main([str(run_dir), "--metric", "val_ppl", "--metric", "peak_mb"]) == 0
    rows = read_csv(run_dir / "summary.csv")
    assert len(rows) == 1 and rows[0]["model"] == "bk"
    table = md_table((run_dir / "summary.md").read_text(), "val perplexity (final)")
    assert table == [["model", "all"], ["bk", f"{measured('bk', 128, 0)['val_ppl']:.4g}"]]
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert plots == ["curves.png", "metric_peak_mb.png", "metric_val_ppl.png"]  # one point: bars per model
    for name in plots:
        assert_valid_png(run_dir / "plots" / name)


def test_two_sweeps_given_together(tmp_path: Path) -> None:
    first = write_sweep(tmp_path, "2026-01-02_03-04-05-000001", failed=False, seq_lens=(128,))
    second = write_sweep(tmp_path, "2026-01-02_03-04-05-000002", failed=True, seq_lens=(256,))
    out = tmp_path / "combined"
    assert report_main([str(first), str(second), "--out", str(out), "--no-plots"]) == 0
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 2 * 2 * 2 + 1
    header = md_table((out / "summary.md").read_text(), "test perplexity")[0]
    assert header == ["model \\ seq_len", "128", "256", "512"]
    assert not (first / "summary.csv").exists()  # the report went to --out only


def test_runs_from_two_machines_are_named_and_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Speed and memory depend on the machine as much as on the model: a report that mixes machines says so, in
    summary.md, on the console and per run in summary.csv; a report from one machine says nothing."""
    first = write_sweep(tmp_path, "2026-01-02_03-04-05-000001", failed=False, seq_lens=(128,))
    second = write_sweep(tmp_path, "2026-01-02_03-04-05-000002", failed=True, seq_lens=(256,))
    amd = {"device": "cpu", "cpu": "AMD EPYC", "cpu_count": 2}
    for summary_path in second.glob("*/summary.json"):
        summary = json.loads(summary_path.read_text())
        summary["env"] = {**summary["env"], **amd}
        summary_path.write_text(json.dumps(summary))
    alone = tmp_path / "alone"
    assert report_main([str(first), "--out", str(alone), "--no-plots"]) == 0
    assert "Measured on" not in (alone / "summary.md").read_text() and "measured on" not in capsys.readouterr().out
    assert {row["machine"] for row in read_csv(alone / "summary.csv")} == {"cpu"}

    out = tmp_path / "combined"
    assert report_main([str(first), str(second), "--out", str(out), "--no-plots"]) == 0
    # the failed run of the second sweep is not counted: it measured nothing
    assert ("**Measured on 2 machines**: `cpu` (4 runs), `cpu (AMD EPYC, 2 cores)` (4 runs)."
            in (out / "summary.md").read_text())
    assert "measured on 2 machines (cpu: 4 runs; cpu (AMD EPYC, 2 cores): 4 runs)" in capsys.readouterr().out
    machines = {row["run_dir"]: row["machine"] for row in read_csv(out / "summary.csv")}
    assert {m for d, m in machines.items() if d.startswith(str(second))} == {"cpu (AMD EPYC, 2 cores)"}
    assert {m for d, m in machines.items() if d.startswith(str(first))} == {"cpu"}


def test_the_report_stack_does_not_import_torch() -> None:
    """``bkexp report`` reads records (machines included) without paying for torch and the kernels."""
    import subprocess
    import sys

    code = ("import sys, bkexp.report.cli, bkexp.report.collect, bkexp.report.tables; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False", done.stderr


def test_several_dirs_need_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = write_sweep(tmp_path, "a", failed=False)
    second = write_sweep(tmp_path, "b", failed=False)
    assert report_main([str(first), str(second)]) == 2
    assert "--out" in capsys.readouterr().err


def test_empty_directory_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "multirun" / "nothing_here"
    empty.mkdir(parents=True)
    assert report_main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"no summary.json found under {empty}" in err
    assert "Traceback" not in err
    assert not list(empty.iterdir())


def test_unknown_metric_lists_valid_ones(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main([str(sweep), "--metric", "val_pp"]) == 2
    err = capsys.readouterr().err
    assert "'val_pp'" in err and "val_ppl" in err and "train_tokens_per_sec" in err


def test_killed_job_without_summary_is_reported_failed(sweep: Path) -> None:
    killed = sweep / "9_model=transformer,seq_len=512,seed=0"
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra" / "overrides.yaml").write_text("- model=transformer\n- seq_len=512\n- seed=0\n")
    report = write_report([sweep], metrics=["val_ppl"], plots=False)
    table = md_table(report.summary_md.read_text(), "val perplexity (final)")
    assert table[2] == ["transformer", table[2][1], table[2][2], "failed"]
    assert "MissingSummary" in report.summary_md.read_text()


def test_hydra_callback_writes_report_and_offline_wandb_table(sweep: Path, tmp_path: Path) -> None:
    import wandb

    # An in-process multirun can leave the last job's W&B run open; the report must get its own run anyway.
    job_run = wandb.init(mode="offline", dir=str(tmp_path / "job"), project="bkexp", name="job")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"}},
                               "seq_len": 128})
    callback = ReportCallback(baseline="transformer", metrics=["val_ppl"], log_to_wandb=True)
    callback.on_multirun_end(config)
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 9
    assert (sweep / "plots" / "speedup_vs_transformer.png").is_file()
    [run_dir] = list((sweep / "wandb").glob("offline-run-*"))
    tables = list((run_dir / "files").rglob("*.table.json"))
    summary_table = [t for t in tables if "summary" in t.name]
    assert summary_table, [str(t) for t in tables]
    logged = json.loads(summary_table[0].read_text())
    assert len(logged["data"]) == 9 and "model" in logged["columns"] and "metrics.val/ppl" in logged["columns"]
    assert list((run_dir / "files").rglob("*.png"))
    assert wandb.run is None and job_run.settings.run_id not in run_dir.name
    # Each reported metric: a long table (one row per successful run) and a line plot of it per model.
    (metric_table,) = [t for t in tables if t.parent.name == "table" and t.name.startswith("val_ppl_")]
    logged = json.loads(metric_table.read_text())
    assert logged["columns"] == ["model", "seq_len", "seed", "val_ppl"] and len(logged["data"]) == 8
    expected = {(m, n, s): measured(m, n, s)["val_ppl"] for m in MODELS for n in SEQ_LENS for s in SEEDS}
    assert {(m, n, s): v for m, n, s, v in logged["data"]} == pytest.approx(expected)
    info = wandb_files.run_info(next(run_dir.glob("run-*.wandb")))
    assert info["job_type"] == "report" and info["group"] == sweep_group(sweep)
    # wandb.plot.line: a custom chart over its table (offline: the table under report/plot/<metric>_table).
    assert any(k.startswith("report/plot/val_ppl_table/") for k in info["summary"]), sorted(info["summary"])
    assert info["config"]["_wandb/visualize/report/plot/val_ppl"]["panel_config"]["fieldSettings"] == {
        "x": "seq_len", "y": "val_ppl", "stroke": "model"}


def test_wandb_workspace_view_is_built_offline() -> None:
    pytest.importorskip("wandb_workspaces")
    from bkexp.report.wandb_view import build_workspace

    workspace = build_workspace("team", "bkexp", "2026-01-02_03-04-05-123456-abcd1234")
    results, curves = workspace.sections
    assert [p.title for p in results.panels] == ["val perplexity (best) vs seq_len", "test perplexity vs seq_len",
                                                  "train tokens/s vs seq_len", "peak memory (MB) vs seq_len"]
    assert all(p.x.name == "seq_len" for p in results.panels)
    assert [p.y.name for p in results.panels] == ["best/val_ppl", "test/ppl", "throughput.train_tokens_per_sec",
                                                  "memory.peak_mb"]
    assert curves.panels[0].y == ["train/loss", "val/loss"] and curves.panels[0].groupby.name == "model.name"
    settings = workspace.runset_settings
    assert [g.name for g in settings.groupby] == ["model.name"]
    model = workspace._to_model()  # the spec W&B would receive, built without a server
    text = model.model_dump_json()
    assert "2026-01-02_03-04-05-123456-abcd1234" in text and "seq_len" in text


def test_wandb_workspace_needs_one_group(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("wandb_workspaces")
    assert report_main([str(sweep), "--no-plots", "--wandb-workspace", "--wandb-entity", "team"]) == 2
    assert "one W&B group" in capsys.readouterr().err


def test_hydra_callback_logs_a_failing_report_instead_of_raising(tmp_path: Path, caplog) -> None:
    empty = tmp_path / "multirun" / "empty"
    empty.mkdir(parents=True)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(empty)}}})
    with caplog.at_level(logging.INFO, logger="bkexp.report.hydra_callback"):
        ReportCallback(log_to_wandb=True).on_multirun_end(config)  # returns: a report failure never fails a sweep
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "bkexp report failed for the sweep; run `bkexp report <sweep dir>` to retry"]
    reason = errors[0].exc_info[1]  # the log carries why: the sweep directory holds no run
    assert isinstance(reason, RunDirError) and str(empty) in str(reason)
    assert not any("W&B" in r.getMessage() for r in caplog.records)  # it stops before logging to W&B
    assert sorted(p.name for p in empty.iterdir()) == []  # and writes nothing
