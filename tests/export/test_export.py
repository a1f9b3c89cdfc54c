"""``bkexp export``: a trained run -> Hugging Face folder -> from_pretrained gives the checkpoint's logits; the card
holds the run's numbers; ``--push`` uploads exactly that folder (checked offline: nothing touches the network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bkexp.export import ExportError, export_run, from_pretrained, load_tokenizer, push, upload_operations
from bkexp.export.cli import main as export_main
from bkexp.rundir import RunDir
from runhelpers import TINY, data_overrides, read_summary

SECRET = "hf_bkexpTestTokenNeverWritten"


@pytest.fixture
def trained(train, wikitext_slice: Path) -> Path:
    """A finished word-level WikiText run with 8-bit QAT (the quantization wrappers must be rebuilt too)."""
    run = train("dataset=text", "tokenizer=word", "bits=8", *data_overrides("text", wikitext_slice), *TINY)
    assert read_summary(run)["status"] == "ok"
    return run


def test_export_round_trip_gives_the_checkpoint_logits(trained: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = export_run(trained, tmp_path / "export")
    names = sorted(p.name for p in out.iterdir())
    assert {"model.safetensors", "config.json", "README.md", "tokenizer_config.json", "vocab.txt"} <= set(names)

    run = RunDir(trained)
    reference = run.build_model("best")  # the QAT model as the run tested it (quantization switched on)
    model = from_pretrained(out)
    ids = torch.randint(0, reference.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))
    config = json.loads((out / "config.json").read_text())
    assert config["bits"] == 8 and config["source"]["checkpoint"].startswith("best")
    assert config["vocab_size"] == reference.vocab_size

    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size == config["vocab_size"]
    assert tokenizer.encode_lines(["the game"]).tolist() == RunDir(trained).tokenizer().encode_lines(["the game"]).tolist()

    # what --push would upload: every file of the folder, nothing else, and no token anywhere in it
    ops = upload_operations(out)
    assert [op.path_in_repo for op in ops] == names
    assert all(Path(op.path_or_fileobj).read_bytes() == (out / op.path_in_repo).read_bytes() for op in ops)
    assert not any(SECRET.encode() in (out / n).read_bytes() for n in names)


def test_from_pretrained_is_strict(trained: Path, tmp_path: Path) -> None:
    out = export_run(trained, tmp_path / "export")
    weights = load_file(out / "model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="weights do not fit the model rebuilt from config.json: .*Missing key"):
        from_pretrained(out)
    save_file({**weights, "extra.weight": torch.zeros(1)}, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="Unexpected key"):
        from_pretrained(out)


def test_model_card_is_generated_from_the_summary(trained: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    summary = read_summary(trained)
    out = export_run(trained, tmp_path / "export")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "bkexp" and "bits-8" in card.data.tags
    (result,) = card.data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(summary["metrics"]["test/ppl"])
    text = card.text
    for expected in (f"{summary['params']['total']:,}", f"{summary['params']['non_embedding']:,}",
                     f"{summary['tokens']['train']:,}", "| causality checked before training | yes |",
                     f"torch {summary['env']['torch']}", "python train.py ", "seq_len=32", "| weight bits | 8 |",
                     "| recipe (conf/recipe/) | none |"):
        assert expected in text, expected
    assert "](https://github.com/)" not in text  # no link to a placeholder address


def test_cli_exports_and_push_refuses_offline_without_touching_the_network(trained: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert export_main([str(trained), "--out", str(out)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert export_main([str(trained), "--out", str(out)]) == 2  # not empty: refuses to overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    assert export_main([str(trained), "--out", str(out), "--overwrite", "--push", "me/bkexp-test"]) == 2
    err = capsys.readouterr().err
    assert "cannot push to me/bkexp-test: the hub is offline" in err and "huggingface-cli upload" in err
    assert (out / "model.safetensors").is_file()  # the export itself is kept
    with pytest.raises(ExportError, match="not a model folder"):
        push(tmp_path, "me/x")
    assert export_main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_a_staged_flag_run_exports_and_loads_as_the_staged_model(train, wikitext_slice: Path, tmp_path: Path) -> None:
    # flags.koopman=true from the command line: the run's .hydra/config.yaml names the plain LanguageModel (as
    # every run recorded before staged execution left it), and the technique selects StagedLanguageModel.
    run_dir = train("dataset=text", "tokenizer=word", "flags.koopman=true", *data_overrides("text", wikitext_slice),
                    *[o for o in TINY if o != "model.n_layers=1"], "model.n_layers=2")
    run = RunDir(run_dir)
    assert run.config().model._target_ == "bkexp.models.StagedLanguageModel"  # RunDir applies the techniques
    reference = run.build_model("best")
    assert type(reference).__name__ == "StagedLanguageModel" and reference.koopman is not None
    out = export_run(run_dir, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["StagedLanguageModel"]
    assert config["model"]["_target_"] == "bkexp.models.StagedLanguageModel" and config["model"]["koopman"] is True
    ids = torch.randint(0, reference.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pretrained(out)(ids), reference(ids))
        # a folder exported before bkexp/models/staged.py named the plain class with the staged keys
        config["model"]["_target_"] = "bkexp.models.LanguageModel"
        (out / "config.json").write_text(json.dumps(config))
        assert torch.equal(from_pretrained(out)(ids), reference(ids))
