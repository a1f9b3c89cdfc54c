"""``bkexp bench run RUN_DIR``: a trained run under several execution modes, files and perplexities."""

from __future__ import annotations

import csv
import json

import pytest

from bkexp.cli import main as bkexp_main
from runhelpers import MQAR_TINY, TINY, compose_train, read_summary


# slow: 20 s on a 2-core AMD EPYC (the default suite stays under 10 minutes there); .ci/run runs it
@pytest.mark.slow
def test_bench_run_times_modes_and_evaluates_the_same_slice(train, capsys) -> None:
    run_dir = train(*TINY, *MQAR_TINY, "model=bk")
    argv = ["bench", "run", str(run_dir), "--modes", "eager,bf16,int8,backend=torch", "--checkpoint", "last",
            "--repeat", "1", "--warmup", "0", "--eval-batches", "4"]
    assert bkexp_main(argv) == 0
    out = run_dir / "benchmarks"
    for name in ("eager_output.json", "bf16_output.json", "int8_output.json", "backend_torch_output.json",
                 "comparison_results.json", "comparison_summary.csv", "comparison_bar_plot.png",
                 "speedup_comparison.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {r["mode"]: r for r in csv.DictReader((out / "comparison_summary.csv").open())}
    assert list(rows) == ["eager", "bf16", "int8", "backend=torch"]
    assert all(r["status"] == "ok" for r in rows.values()), rows
    modes = {m["mode"]: m for m in json.loads((out / "comparison_results.json").read_text())["modes"]}
    # The evaluation slice covers the whole (tiny) validation split: eager = the run's last validation.
    val_ppl = read_summary(run_dir)["metrics"]["val/ppl"]
    assert modes["eager"]["eval"]["ppl"] == pytest.approx(val_ppl, rel=1e-4)
    assert modes["backend=torch"]["eval"]["ppl"] == pytest.approx(val_ppl, rel=1e-4)  # same op, other kernel
    assert modes["backend=torch"]["backends"] == {"bk_core": "torch"}
    assert modes["bf16"]["eval"]["ppl"] == pytest.approx(val_ppl, rel=0.05)
    assert modes["int8"]["eval"]["ppl"] == pytest.approx(val_ppl, rel=0.1)
    assert modes["int8"]["train_step"] is None and modes["eager"]["train_step"]["ms"] > 0
    assert float(rows["eager"]["infer_speedup"]) == 1.0

    capsys.readouterr()
    assert bkexp_main(["bench", "run", str(run_dir), "--modes", "eager,fp8"]) == 2
    err = capsys.readouterr().err
    assert "fp8" in err and "backend=torch" in err  # the valid modes are listed



def test_bench_run_names_a_bad_run_override_or_checkpoint_in_one_line(tmp_path, capsys) -> None:
    from omegaconf import OmegaConf

    run = tmp_path / "run"  # a run killed before its first checkpoint: config only
    (run / ".hydra").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    OmegaConf.save(compose_train([*TINY, *MQAR_TINY, "model=bk"], run), run / ".hydra" / "config.yaml")
    for argv, message in (([str(tmp_path / "missing")], "missing: no such file or directory, and not a hub "
                                                        "repository id (owner/name)"),
                          ([str(tmp_path / "empty")], "is neither a run directory"),
                          ([str(run), "--override", "dataset.nokey=1"], "the run's config has no key 'dataset.nokey'"),
                          ([str(run)], "no best checkpoint (expected checkpoints/best-*.ckpt or checkpoints/last.ckpt")):
        capsys.readouterr()
        assert bkexp_main(["bench", "run", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (run / "benchmarks").exists()
