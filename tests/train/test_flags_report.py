"""The report's per-flag table for a flags ablation sweep: changes against flags=none, n/a for inapplicable flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from bkexp.report.cli import write_report
from bkexp.report.collect import collect_runs
from bkexp.report.tables import flag_deltas
from runhelpers import record_run

# (model, flags) -> test ppl, train tokens/s, peak MB; None = the job failed with that error.
RUNS = {
    ("bk", "none"): (40.0, 1000.0, 200.0),
    ("bk", "pruning"): (44.0, 900.0, 210.0),
    ("bk", "sparse_bk"): (42.0, 1500.0, 180.0),
    ("mamba", "none"): (50.0, 2000.0, 300.0),
    ("mamba", "pruning"): (45.0, 2100.0, 300.0),
    ("mamba", "sparse_bk"): "FlagNotApplicableError: flags.sparse_bk applies to BK mixers; model 'mamba' has none",
    ("mamba", "compile"): "RuntimeError: inductor crashed",
    ("bk", "compile"): (40.0, 1200.0, 220.0),
    ("bk", "quantization"): (41.0, 950.0, 200.0),  # flags=quantization trains at bits=8
}
BITS = {("bk", "quantization"): 8}


def write_job(sweep: Path, job: int, model: str, flags: str, result, bits: int = 32,
              extra: tuple[str, ...] = ()) -> None:
    overrides = [f"model={model}", f"flags={flags}", *extra]
    run_dir = sweep / f"{job}_{','.join(overrides)}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    failed = isinstance(result, str)
    summary = {"status": "failed" if failed else "ok", "error": result if failed else None, "model": model,
               "dataset": "wikitext2", "seq_len": 256, "bits": bits, "seed": 0, "overrides": overrides,
               "sweep": {"dir": str(sweep), "job_num": job, "override_dirname": ",".join(overrides)},
               "metrics": {}, "throughput": {}, "memory": {}, "config": {"model": {"name": model}}}
    if not failed:
        ppl, tps, mb = result
        summary.update(metrics={"test/ppl": ppl, "val/ppl": ppl + 1}, throughput={"train_tokens_per_sec": tps},
                       memory={"peak_mb": mb})
    record_run(run_dir, flags={} if flags == "none" else {flags: True}, **summary)


@pytest.fixture
def ablation(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / "2026-01-01_00-00-00-000000"
    for job, ((model, flags), result) in enumerate(RUNS.items()):
        write_job(sweep, job, model, flags, result, BITS.get((model, flags), 32))
    return sweep


def test_flag_deltas_against_none_per_model(ablation: Path) -> None:
    deltas = {(d["model"], d["flags"]): d for d in flag_deltas(collect_runs([ablation]))}
    assert set(deltas) == {k for k in RUNS if k[1] != "none"}
    pruning = deltas[("bk", "pruning")]
    assert pruning["status"] == "ok" and pruning["ppl_column"] == "metrics.test/ppl"
    assert pruning["ppl_change"] == pytest.approx(44 / 40 - 1)
    assert pruning["train_tokens_per_sec_change"] == pytest.approx(900 / 1000 - 1)
    assert pruning["peak_mb_change"] == pytest.approx(210 / 200 - 1)
    assert deltas[("mamba", "pruning")]["ppl_change"] == pytest.approx(45 / 50 - 1)
    assert deltas[("mamba", "sparse_bk")]["status"] == "n/a"
    assert deltas[("mamba", "compile")]["status"] == "failed"
    # bits changes only with the flag, so it is part of flags=quantization, not a separate comparison cell
    assert deltas[("bk", "quantization")]["status"] == "ok"
    assert deltas[("bk", "quantization")]["ppl_change"] == pytest.approx(41 / 40 - 1)


def test_a_key_swept_within_every_flag_still_splits_the_cells(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "2026-01-01_00-00-00-000000"
    runs = {("none", 8): (40.0, 1000.0, 200.0), ("none", 32): (30.0, 1000.0, 200.0),
            ("pruning", 8): (44.0, 900.0, 200.0), ("pruning", 32): (36.0, 900.0, 200.0)}
    for job, ((flags, bits), result) in enumerate(runs.items()):
        write_job(sweep, job, "bk", flags, result, bits, extra=(f"bits={bits}",))
    deltas = {d["bits"]: d for d in flag_deltas(collect_runs([sweep]))}
    assert deltas[8]["ppl_change"] == pytest.approx(44 / 40 - 1)
    assert deltas[32]["ppl_change"] == pytest.approx(36 / 30 - 1)


def test_summary_md_has_the_flag_tables(ablation: Path) -> None:
    report = write_report([ablation], plots=False)
    text = report.summary_md.read_text()
    section = text.split("## Flags against flags=none")[1].split("\n## ")[0]
    assert "### perplexity change" in section and "### train tokens/s change" in section
    assert "### peak memory change" in section
    assert "| sparse_bk | +5.0% | n/a |" in section  # bk ppl 42 vs 40; mamba: not applicable
    assert "| compile | +0.0% | failed |" in section
    assert "| pruning | -10.0% | +5.0% |" in section.split("### train tokens/s change")[1]
