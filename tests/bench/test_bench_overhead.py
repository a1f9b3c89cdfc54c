"""``bkexp bench overhead``: bkexp's Lightning step and a raw PyTorch loop train to the same losses."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bkexp.cli import main as bkexp_main


@pytest.mark.slow
def test_bkexp_and_raw_loop_give_equal_losses_and_write_tables(tmp_path: Path) -> None:
    out = tmp_path / "oh"
    argv = ["bench", "overhead", "--models", "transformer,bk,mamba", "--size", "tiny", "--seq-len", "32",
            "--steps", "6", "--skip", "1", "--rounds", "2", "--override", "dataset.num_train=256", "--out", str(out)]
    assert bkexp_main(argv) == 0
    rows = {r["model"]: r for r in json.loads((out / "overhead.json").read_text())["rows"]}
    assert set(rows) == {"transformer", "bk", "mamba"}
    for row in rows.values():
        assert row["losses_equal"] is True and row["max_loss_diff"] < 0.5e-5
        assert row["steps"] == 2 * (6 - 1)  # two rounds of 6 steps, the first (`skip`) left out of the timing
        assert row["raw_step_ms"] > 0 and row["bkexp_step_ms"] > 0 and row["raw_peak_mb"] > 0
        assert row["log_every_n_steps"] == 10 and row["logging_ms_se"] > 0  # the config's cadence, measured
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert len(steps) == 3 * 2 * 6
    # 256 examples at the default recipe's batch of 128: steps 3-6 are in later epochs, which both loops
    # must shuffle alike (a raw loop that rebuilt its loader every epoch repeated the first epoch's order).
    assert rows["transformer"]["batch"] == 128
    assert (rows["transformer"]["d_model"], rows["transformer"]["n_layers"]) == (64, 2)  # the recipe, as shown
    # The losses really move (training happened) and both loops saw the same ones, step by step.
    bk = [r for r in steps if r["model"] == "bk" and r["round"] == "0"]
    assert float(bk[0]["raw_loss"]) != float(bk[-1]["raw_loss"])
    assert all(abs(float(r["raw_loss"]) - float(r["bkexp_loss"])) < 0.5e-5 for r in steps)
    # The quiet loop (nothing logged) was timed step by step beside the others; logging_ms is its mean gap.
    for model, row in rows.items():
        timed = [r for r in steps if r["model"] == model and int(r["step"]) >= 1]
        gaps = [float(r["bkexp_ms"]) - float(r["quiet_ms"]) for r in timed]
        assert row["logging_ms"] == pytest.approx(sum(gaps) / len(gaps), rel=1e-6)
    assert (out / "overhead.png").stat().st_size > 0 and (out / "overhead.md").read_text().count("\n") >= 4


def test_bad_arguments_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        bkexp_main(["bench", "overhead", "--models", "rnn"])
    assert "rnn" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bkexp_main(["bench", "overhead", "--steps", "3", "--skip", "3"])
    assert "--skip" in capsys.readouterr().err
