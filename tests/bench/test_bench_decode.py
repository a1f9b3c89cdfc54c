"""``bkexp bench decode`` end to end at a toy size (the command and its files, not a timing test)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bkexp.bench.decode import crossings
from bkexp.cli import main as bkexp_main


# slow: 37 s on a 2-core AMD EPYC (the default suite stays under 10 minutes there); .ci/run runs it
@pytest.mark.slow
def test_bench_decode_writes_table_plot_and_state_sizes(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "decode", "--size", "tiny", "--context", "16,48", "--batch", "1,2", "--steps", "2",
            "--vocab", "64", "--device", "cpu", "--prefill-max-tokens", "64", "--out", str(out)]
    assert bkexp_main(argv) == 0
    result = json.loads((out / "decode.json").read_text())
    rows = {(r["model"], r["batch"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(m, b, c) for m in ("transformer", "bk", "mamba") for b in (1, 2) for c in (16, 48)}
    for key, row in rows.items():
        assert row["decode_tok_s"] > 0 and row["state_bytes"] > 0
        # 2 x 48 prompt tokens exceed --prefill-max-tokens: one row prefilled, its state repeated, no prefill rate
        assert (row["prefill_tok_s"] is None) == (key[1:] == (2, 48)) and (row["prefill_tok_s"] or 1) > 0
        assert row["state_bytes"] == row["batch"] * row["state_bytes_per_row"]
    # tiny preset: transformer d_model 128 x 2 layers; bk 4 heads x 2 layers; mamba d_inner 240 x 4 layers
    # the cache holds the context plus the warm-up and timed steps (capacity = context + steps + 2), float32
    assert rows[("transformer", 1, 48)]["state_bytes"] == 2 * 2 * 128 * (48 + 2 + 2) * 4
    assert rows[("bk", 2, 48)]["state_bytes"] == rows[("bk", 2, 16)]["state_bytes"] == 2 * 2 * 4 * 8  # complex64
    assert rows[("mamba", 1, 48)]["state_bytes"] == rows[("mamba", 1, 16)]["state_bytes"] == 4 * 240 * (16 + 3) * 4
    assert result["meta"]["non_embedding_params"].keys() == {"transformer", "bk", "mamba"}
    # the steps are timed as bkexp generate runs them: "auto", and these states are small, so one thread
    assert result["meta"]["decode_threads"] == "auto" and {r["decode_threads"] for r in rows.values()} == {1}
    assert result["meta"]["environment"]["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")  # bkexp's or yours
    assert result["meta"]["crossings"]["state_bytes"]["batch 1"]["bk"].startswith("attention above bk from 16")
    assert (out / "decode.csv").read_text().startswith("model,batch,context,")
    assert (out / "decode.md").is_file() and (out / "decode.png").stat().st_size > 0


def test_crossings_name_the_first_length_from_which_attention_stays_above() -> None:
    rows = [{"model": m, "batch": 1, "context": c, "t": t}
            for m, pts in (("transformer", [(1, 1.0), (2, 3.0), (4, 2.0), (8, 9.0)]),
                           ("bk", [(1, 2.0), (2, 2.0), (4, 2.0), (8, 2.0)]),
                           ("mamba", [(1, 0.5), (2, 0.5), (4, 0.5), (8, 99.0)]))
            for c, t in pts]
    assert crossings(rows, "t") == {"batch 1": {"bk": 8, "mamba": "attention not above mamba at the largest "
                                                                   "measured context 8"}}


def test_bench_decode_rejects_unknown_model(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bkexp_main(["bench", "decode", "--models", "bk,rwkv", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --models: unknown model(s) ['rwkv']; valid: transformer, bk, mamba" in capsys.readouterr().err
