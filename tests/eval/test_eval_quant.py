"""``bkexp eval-quant`` on real run directories made by the real entry point (train.py, tiny MQAR runs)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from runhelpers import MQAR_TINY, TINY, read_summary

from bkexp.cli import main as bkexp_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_eval_quant_writes_table_and_plot_into_the_run(train, capsys: pytest.CaptureFixture[str]) -> None:
    run = train(*TINY, *MQAR_TINY)
    summary = read_summary(run)
    assert bkexp_main(["eval-quant", str(run), "--bits", "16,8,4,3,2"]) == 0
    rows = read_rows(run / "quant_eval.csv")
    assert [int(r["bits"]) for r in rows] == [32, 16, 8, 4, 3, 2]
    assert {r["model"] for r in rows} == {"transformer"}
    assert [r["method"] for r in rows] == ["none"] + ["ptq"] * 5
    # The 32-bit row re-evaluates the checkpoint training tested: same perplexity, independently computed.
    full = rows[0]
    assert float(full["test_ppl"]) == pytest.approx(summary["metrics"]["test/ppl"], rel=1e-4)
    assert full["checkpoint"] == summary["metrics"]["test/checkpoint"]
    assert int(full["quantized_params"]) == 0
    sizes = [int(r["effective_size_bytes"]) for r in rows]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert all(int(r["quantized_params"]) > 0 for r in rows[1:])
    assert all(float(r["val_ppl"]) > 1 and float(r["test_ppl"]) > 1 for r in rows)
    assert "val_acc" in full  # MQAR answers: accuracy as in training
    md = (run / "quant_eval.md").read_text()
    assert md.count("| transformer ") == 6 and "trained none@32" in md
    assert_png(run / "quant_eval.png")
    assert "| transformer " in capsys.readouterr().out
    assert not list(run.glob(".quant_eval*"))  # no temporary files left behind


def test_eval_quant_several_runs_need_out_and_share_one_plot(train, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    transformer = train(*TINY, *MQAR_TINY)
    bk = train(*TINY, *MQAR_TINY, "model=bk")
    assert bkexp_main(["eval-quant", str(transformer), str(bk), "--bits", "8,2"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    out = tmp_path / "combined"
    assert bkexp_main(["eval-quant", str(transformer), str(bk), "--bits", "8,2", "--out", str(out)]) == 0
    rows = read_rows(out / "quant_eval.csv")
    assert [(r["model"], int(r["bits"])) for r in rows] == [
        ("transformer", 32), ("transformer", 8), ("transformer", 2), ("bk", 32), ("bk", 8), ("bk", 2)]
    assert float(rows[3]["test_ppl"]) == pytest.approx(read_summary(bk)["metrics"]["test/ppl"], rel=1e-4)
    assert_png(out / "quant_eval.png")
    for run in (transformer, bk):  # each run also gets its own table
        assert len(read_rows(run / "quant_eval.csv")) == 3


def test_eval_quant_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bkexp_main(["eval-quant", str(tmp_path), "--bits", "8,5"]) == 2
    assert "--bits: 5 is not supported; valid widths: 32, 16, 8, 4, 3, 2" in capsys.readouterr().err
    assert bkexp_main(["eval-quant", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
