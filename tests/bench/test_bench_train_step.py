"""``bkexp bench train-step`` at a toy size: tables, plot, interleaved rows and the component references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bkexp.cli import main as bkexp_main


# slow: 31-61 s on a 2-core AMD EPYC, most of it compiling every model's kernels at the bench's shapes
@pytest.mark.slow
def test_train_step_writes_per_token_and_component_tables(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ts"
    argv = ["bench", "train-step", "--size", "tiny", "--n", "16,32", "--tokens", "64", "--vocab", "64",
            "--repeat", "1", "--warmup", "0", "--components", "--components-n", "16", "--components-batch", "2",
            "--out", str(out)]
    assert bkexp_main(argv) == 0
    result = json.loads((out / "train_step.json").read_text())
    rows = result["rows"]
    assert {(r["model"], r["n"]) for r in rows} == {(m, n) for m in ("transformer", "bk", "mamba") for n in (16, 32)}
    for r in rows:
        assert r["batch"] == 64 // r["n"] and r["step_ms"] > 0
        assert r["us_per_token"] == pytest.approx(r["step_ms"] * 1e3 / (r["batch"] * r["n"]))
        assert r["vs_transformer"] > 0 and (r["model"] != "transformer" or r["vs_transformer"] == 1.0)
    assert result["meta"]["size"] == "tiny" and result["meta"]["vocab"] == 64
    printed = capsys.readouterr().out  # one ratio line per N, from the same rows
    for n in (16, 32):
        ratio = next(r["vs_transformer"] for r in rows if r["model"] == "mamba" and r["n"] == n)
        assert f"N={n:<6} bk/transformer" in printed and f"mamba/transformer {ratio:.3f}x" in printed
    for name in ("train_step.csv", "train_step.md", "train_step.png", "components.csv", "components.md"):
        assert (out / name).stat().st_size > 0
    # a table copied out of its directory still says where it was measured
    from bkexp.environment import describe_machine

    machine = describe_machine(result["meta"]["environment"])
    assert machine.startswith("cpu (") and "torch " in machine
    for name in ("train_step.md", "components.md"):
        assert (out / name).read_text().rstrip().endswith(f"Measured on {machine}.")
    comp = {(r["model"], r["component"]): r for r in json.loads((out / "components.json").read_text())["rows"]}
    assert {c for _, c in comp} >= {"mixer (AttentionMixer)", "ffn (MLP)", "mixer (BKMixer)", "ffn (MoEFeedForward)",
                                    "BK-Core op", "mixer (MambaMixer)", "selective scan op"}
    moe = comp[("bk", "ffn (MoEFeedForward)")]
    dense = comp[("bk", moe["reference"])]  # tiny: 4 experts of 1.5 x 128, top-1 -> a 192-wide dense MLP
    assert moe["reference"] == "dense MLP, same active FLOPs (192 hidden)"
    assert moe["vs_reference"] == pytest.approx(moe["fwd_bwd_ms"] / dense["fwd_bwd_ms"])


def test_bad_model_is_refused_with_the_valid_ones(capsys) -> None:
    with pytest.raises(SystemExit):
        bkexp_main(["bench", "train-step", "--models", "bk,gpt"])
    err = capsys.readouterr().err
    assert "gpt" in err and "transformer, bk, mamba" in err
    with pytest.raises(SystemExit):  # a mistyped baseline is an error, not a table without its ratio column
        bkexp_main(["bench", "train-step", "--baseline", "transfomer"])
    err = capsys.readouterr().err
    assert "--baseline 'transfomer'" in err and "transformer, bk, mamba" in err


# slow: with the test above (25 s on a 2-core AMD EPYC, the same compiles at other shapes)
@pytest.mark.slow
def test_components_only_writes_the_per_layer_table_alone(tmp_path: Path) -> None:
    out = tmp_path / "layers"
    argv = ["bench", "train-step", "--size", "tiny", "--models", "transformer,bk", "--vocab", "64", "--repeat", "1",
            "--warmup", "0", "--components-only", "--components-n", "16", "--components-batch", "2", "--out", str(out)]
    assert bkexp_main(argv) == 0
    assert not (out / "train_step.json").exists()
    rows = json.loads((out / "components.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"transformer", "bk"} and all(r["fwd_bwd_ms"] > 0 for r in rows)


def test_component_calls_drop_parameter_gradients_as_zero_grad_does() -> None:
    """Each timed call computes the module's gradients and leaves none behind: a training step's zero_grad sets
    them to None, so accumulating into them would time an add per weight tensor that training never runs."""
    import torch

    from bkexp.bench.train_step import _fwd_bwd

    layer = torch.nn.Linear(4, 3)
    seen = []
    layer.weight.register_hook(lambda grad: seen.append(grad.clone()))
    run = _fwd_bwd(layer, torch.randn(5, 4))
    run()
    run()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1]) and seen[0].abs().sum() > 0
    assert layer.weight.grad is None and layer.bias.grad is None
