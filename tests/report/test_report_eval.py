"""bkexp report: eval/ results as columns and tables, and --best-over picking each model's best learning rate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bkexp.report.cli import main as report_main
from bkexp.report.cli import write_report
from runhelpers import record_run

# val loss by (model, lr): the best rate differs per model, so one shared rate would favour one of them
VAL_LOSS = {("bk", 1e-3): 5.0, ("bk", 3e-3): 4.5, ("bk", 1e-2): 4.8,
            ("transformer", 1e-3): 4.4, ("transformer", 3e-3): 4.6, ("transformer", 1e-2): 6.0}


def write_run(run_dir: Path, model: str, lr: float, seq_len: int = 128, seed: int = 0, failed: bool = False) -> None:
    overrides = [f"model={model}", f"optimizer.lr={lr}", f"seq_len={seq_len}", f"seed={seed}"]
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    loss = VAL_LOSS[(model, lr)] + 0.01 * seed + (0.1 if seq_len > 128 else 0)
    summary = {"status": "failed" if failed else "ok", "error": "RuntimeError: boom" if failed else None,
               "model": model, "dataset": "wikitext2", "seq_len": seq_len, "bits": 32, "seed": seed,
               "overrides": overrides, "config": {"optimizer": {"lr": lr}, "seq_len": seq_len},
               "metrics": {} if failed else {"best/val_loss": loss, "val/loss": loss + 0.05, "val/ppl": 2.0 ** loss,
                                             "test/ppl": 2.0 ** loss},
               "throughput": {} if failed else {"train_tokens_per_sec": 1000.0}, "memory": {"peak_mb": 10.0}}
    record_run(run_dir, **summary)


def lr_sweep(root: Path, seq_lens=(128,), seeds=(0,)) -> Path:
    job = 0
    for (model, lr) in VAL_LOSS:
        for seq_len in seq_lens:
            for seed in seeds:
                write_run(root / f"{job}_{model}_{lr}_{seq_len}_{seed}", model, lr, seq_len, seed)
                job += 1
    return root


def test_best_over_keeps_each_models_best_rate_per_cell(tmp_path: Path):
    sweep = lr_sweep(tmp_path / "sweep", seq_lens=(128, 256), seeds=(0, 1))
    report = write_report([sweep], best_over="optimizer.lr", plots=False)
    choices = report.comparison["best_over"]
    best = {(c["model"], c["seq_len"]): c["best"] for c in choices}
    assert best == {("bk", 128): 3e-3, ("bk", 256): 3e-3, ("transformer", 128): 1e-3, ("transformer", 256): 1e-3}
    bk128 = next(c for c in choices if c["model"] == "bk" and c["seq_len"] == 128)
    assert bk128["best_score"] == pytest.approx(4.505) and bk128["n_seeds"] == 2  # mean over seeds 0 and 1
    assert bk128["scores"] == {"0.001": pytest.approx(5.005), "0.003": pytest.approx(4.505),
                               "0.01": pytest.approx(4.805)}
    md = report.summary_md.read_text()
    assert "## Best optimizer.lr per cell" in md
    assert "| bk | 128 | 0.003 | 4.505 | 0.001: 5.005, 0.003: 4.505, 0.01: 4.805 |" in md
    # the perplexity table holds only the winners: bk at 3e-3 -> 2**4.505, transformer at 1e-3 -> 2**4.405
    assert f"| bk | {2 ** 4.505:.4g} ± " in md and f"| transformer | {2 ** 4.405:.4g} ± " in md
    with report.summary_csv.open() as f:
        assert len(list(csv.DictReader(f))) == 24  # summary.csv keeps every run


def test_best_over_a_key_that_was_not_swept_is_refused(tmp_path: Path, capsys):
    sweep = lr_sweep(tmp_path / "sweep")
    assert report_main([str(sweep), "--best-over", "optimizer.betas", "--no-plots"]) == 2
    assert "--best-over 'optimizer.betas' is not a swept key of these runs; swept: optimizer.lr" in capsys.readouterr().err


def test_a_cell_where_every_rate_failed_says_so(tmp_path: Path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", "bk", 1e-3, failed=True)
    write_run(sweep / "1", "bk", 3e-3, failed=True)
    write_run(sweep / "2", "transformer", 1e-3)
    write_run(sweep / "3", "transformer", 3e-3)
    report = write_report([sweep], best_over="optimizer.lr", plots=False)
    bk = next(c for c in report.comparison["best_over"] if c["model"] == "bk")
    assert bk["best"] is None and bk["scores"] == {"0.001": None, "0.003": None}
    assert "| bk | all failed | - | 0.001: failed, 0.003: failed |" in report.summary_md.read_text()


def test_eval_results_become_columns_and_tables(tmp_path: Path):
    sweep = tmp_path / "sweep"
    for job, model in enumerate(("bk", "transformer")):
        run = sweep / str(job)
        write_run(run, model, 1e-3)
        scale = 1 + job
        (run / "eval").mkdir()
        (run / "eval" / "perplexity.json").write_text(json.dumps({
            "datasets": [{"dataset": "run", "ppl": 100.0 * scale, "bits_per_byte": 2.0, "unk_share": 0.03},
                         {"dataset": "text:/x/lic.txt", "ppl": 300.0 * scale, "bits_per_byte": 3.0}],
            "mean": {"ppl": 200.0 * scale}, "std": {"ppl": 141.4 * scale}}))
        (run / "eval" / "length.json").write_text(json.dumps({"lengths": [
            {"length": 128, "status": "ok", "ppl": 90.0 * scale, "tokens_per_sec": 5000.0, "peak_mb": 700.0},
            {"length": 4096, "status": "oom" if model == "transformer" else "ok", "ppl": 80.0,
             "tokens_per_sec": 4000.0, "peak_mb": 900.0}]}))
        (run / "eval" / "lm_eval.json").write_text(json.dumps({"metrics": [
            {"task": "copa", "metric": "acc", "value": 0.55 + 0.01 * job, "stderr": 0.05}]}))
    report = write_report([sweep], plots=False)
    with report.summary_csv.open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert float(rows["transformer"]["eval.ppl.run"]) == 200.0
    assert float(rows["bk"]["eval.ppl.text:/x/lic.txt"]) == 300.0
    assert float(rows["bk"]["eval.length_ppl.4096"]) == 80.0 and rows["transformer"]["eval.length_ppl.4096"] == ""
    assert float(rows["bk"]["eval.lm_eval.copa.acc_stderr"]) == 0.05
    md = report.summary_md.read_text()
    assert "### Perplexity on other corpora (bkexp eval --datasets)" in md
    assert "| model | run | text:/x/lic.txt | mean | std |" in md and "| bk | 100 | 300 | 200 | 141.4 |" in md
    assert "| transformer | 180 | n/a |" in md.split("### Perplexity vs context length")[1]  # OOM: no value
    assert "| bk | 0.55 ± 0.05 |" in md
