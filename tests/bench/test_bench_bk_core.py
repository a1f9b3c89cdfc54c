"""``bkexp bench bk-core`` at a toy size: its tables, plots and roofline arithmetic (a smoke test, not timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bkexp.bench.bk_core import LAYOUTS, MIN_BYTES_PER_ELEMENT, peak_bandwidth_gbs, roofline_row
from bkexp.cli import main as bkexp_main


# slow: 26 s on a 2-core AMD EPYC (the default suite stays under 10 minutes there); .ci/run runs it
@pytest.mark.slow
def test_bench_bk_core_writes_tables_plots_and_roofline(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "bk-core", "--n", "32,64", "--channels", "128", "--batch", "2", "--backends", "cpu,torch,sdpa",
            "--repeat", "1", "--roofline", "--roofline-rows", "16", "--roofline-batch", "2", "--roofline-n", "64",
            "--peak-gbs", "100", "--accuracy", "--accuracy-n", "2,40", "--out", str(out)]
    assert bkexp_main(argv) == 0
    result = json.loads((out / "bk_core.json").read_text())
    layouts = {"sdpa": ["-"], "cpu": ["planes/planes", "rows/rows"], "torch": ["planes/planes", "rows/rows"]}
    assert sorted((r["backend"], r["layout"], r["n"]) for r in result["rows"]) == sorted(
        (b, lay, n) for b in ("cpu", "torch", "sdpa") for lay in layouts[b] for n in (32, 64))
    copy_gbs = result["meta"]["copy_gbs"]
    assert copy_gbs > 0
    for row in result["rows"]:
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["channels"] == 128
        if row["backend"] != "sdpa":  # 28 bytes per element of 128 rows x N, per fwd+bwd, against the copy
            assert row["gbs"] == pytest.approx(28 * 128 * row["n"] / (row["fwd_bwd_ms"] * 1e6))
            assert row["copy_fraction"] == pytest.approx(row["gbs"] / copy_gbs)
            assert row["vs_best_layout"] >= 1.0
        assert row["fwd_bwd_us_per_token"] == pytest.approx(row["fwd_bwd_ms"] * 1e3 / row["n"])
        if row["backend"] == "torch":
            assert row["speedup_vs_torch_fwd_bwd"] == pytest.approx(1.0)
    assert result["meta"]["threads"] == torch.get_num_threads() and result["meta"]["heads"] == 64
    assert result["meta"]["environment"]["torch"] == torch.__version__
    for name in ("bk_core.csv", "bk_core.md", "time_per_token.png", "speedup_vs_torch.png"):
        assert (out / name).stat().st_size > 0
    roof = json.loads((out / "roofline.json").read_text())["rows"]
    # the python-loop backends and SDPA are not roofline cases; the compiled one runs in every layout
    assert [(r["backend"], r["layout"]) for r in roof] == [("cpu", lay) for lay in LAYOUTS]
    assert roof[0]["min_bytes"] == MIN_BYTES_PER_ELEMENT * 16 * 64 and roof[0]["peak_gbs"] == 100
    assert min(r["vs_best_layout"] for r in roof) == 1.0
    for r in roof:
        assert r["copy_gbs"] > 0 and r["copy_fraction"] == pytest.approx(r["achieved_gbs"] / r["copy_gbs"])
    accuracy = json.loads((out / "accuracy.json").read_text())["rows"]
    assert {(r["backend"], r["mode"], r["n"]) for r in accuracy} == {
        (b, m, n) for b in ("cpu", "torch") for m in ("causal", "bidirectional") for n in (2, 40)}
    for row in accuracy:  # float32 against float64: a few ulps, and not exactly zero (it was computed)
        assert all(0 < row[c] < 1e-5 for c in ("y", "grad_v", "grad_k", "grad_z")), row


def test_roofline_arithmetic() -> None:
    # The case: 8 x 256 rows at N = 8192 move at least 28 B/element: 0.47 GB, ~0.1 ms at 4.8 TB/s.
    row = roofline_row("triton", 8 * 256, 8192, 0.2e-3, 4800.0)
    assert row["min_bytes"] == 28 * 2048 * 8192
    assert row["floor_ms"] == pytest.approx(0.0979, abs=1e-4)
    assert row["achieved_gbs"] == pytest.approx(row["min_bytes"] / 0.2e-3 / 1e9)
    assert row["bandwidth_fraction"] == pytest.approx(row["achieved_gbs"] / 4800.0)
    assert row["times_floor"] == pytest.approx(0.2 / row["floor_ms"])
    unknown = roofline_row("cpu", 4, 8, 1e-3, None)
    assert unknown["bandwidth_fraction"] is None and unknown["floor_ms"] is None


def test_peak_bandwidth_is_only_claimed_where_known() -> None:
    assert peak_bandwidth_gbs(torch.device("cpu")) is None
    assert peak_bandwidth_gbs(torch.device("cpu"), 51.2) == 51.2


def test_bad_arguments_name_the_value(capsys) -> None:
    with pytest.raises(SystemExit):
        bkexp_main(["bench", "bk-core", "--channels", "100", "--batch", "3"])
    assert "--channels 100 must be divisible by --batch 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bkexp_main(["bench", "bk-core", "--layouts", "rows/diagonal"])
    assert "rows/diagonal" in capsys.readouterr().err


# slow: with the other bench test (its kernels compile for these shapes only; 11 s on a 2-core AMD EPYC)
@pytest.mark.slow
def test_without_the_torch_backend_no_empty_speedup_plot_is_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bk"
    argv = ["bench", "bk-core", "--n", "32", "--channels", "64", "--batch", "1", "--backends", "cpu",
            "--repeat", "1", "--out", str(out)]
    assert bkexp_main(argv) == 0
    assert (out / "time_per_token.png").stat().st_size > 0 and not (out / "speedup_vs_torch.png").exists()
    assert "speedup_vs_torch.png" not in capsys.readouterr().out
