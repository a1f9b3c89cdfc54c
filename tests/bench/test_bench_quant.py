"""``bkexp bench quant`` runs end to end at a toy size (a smoke test of the command, not a timing test)."""

from __future__ import annotations

import json
from pathlib import Path

from bkexp.bench.quant import torchao_status
from bkexp.cli import main as bkexp_main
from bkexp.environment import describe_machine


def test_bench_quant_writes_its_table(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "quant", "--d-model", "64", "--n-layers", "1", "--vocab", "128", "--decode-shape", "1x1",
            "--prefill-shape", "2x16", "--repeat", "1", "--device", "cpu", "--out", str(out)]
    assert bkexp_main(argv) == 0
    result = json.loads((out / "quant.json").read_text())
    variants = {row["variant"] for row in result["rows"]}
    assert {"float32", "bfloat16", "fake-int8 (bkexp)"} <= variants
    available, info = torchao_status()
    assert ("torchao int8 weight-only" in variants) == available
    assert (result["meta"]["torchao"] == info) == available
    # the table names the machine it was measured on, as every bench table does
    machine = describe_machine(result["meta"]["environment"])
    assert machine.startswith("cpu (") and "torch " in machine
    assert (out / "quant.md").read_text().rstrip().endswith(f"Measured on {machine}.")
    for row in result["rows"]:
        assert row["forward_ms"] > 0 and row["weights_mb"] > 0
        if row["variant"] != "float32":
            assert 0 < row["rel_err_vs_fp32"] < 0.1  # bfloat16 / int8 logits stay close to float32
    sizes = {row["variant"]: row["weights_mb"] for row in result["rows"]}
    assert sizes["bfloat16"] < sizes["float32"]
    if available:
        assert sizes["torchao int8 weight-only"] < sizes["bfloat16"]  # real int8 storage
