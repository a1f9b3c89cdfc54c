"""``bkexp generate`` on a real trained run: the printed text is the greedy continuation of the run's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runhelpers import TINY, data_overrides

from bkexp.cli import main as bkexp_main
from bkexp.infer.run import load_run
from bkexp.quant import quantized_modules


def greedy_by_recomputing(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def quantized_bk_run(tmp_path_factory: pytest.TempPathFactory, wikitext_slice: Path) -> Path:
    """A tiny BK run on WikiText-2 text with the word tokenizer, trained with 8-bit QAT."""
    import sys

    from runhelpers import load_train_entry

    root = tmp_path_factory.mktemp("generate_run")
    entry = load_train_entry()
    argv = sys.argv
    sys.argv = ["train.py", f"paths.root_dir={root}", *TINY, "model=bk", "dataset=text", "tokenizer=word",
                "bits=8", *data_overrides("text", wikitext_slice)]
    try:
        entry.main()
    finally:
        sys.argv = argv
    return next(p for p in sorted((root / "outputs").iterdir()) if p.is_dir())


def test_generate_prints_the_greedy_continuation_of_the_quantized_model(quantized_bk_run: Path, capsys) -> None:
    prompt = "The game was"
    assert bkexp_main(["generate", str(quantized_bk_run), "--prompt", prompt, "--max-new-tokens", "6",
                       "--temperature", "0", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # The loaded run computes with its 8-bit layers (as evaluated); greedy decoding by re-running its forward.
    model, tok = load_run(quantized_bk_run, "best")
    layers = quantized_modules(model)
    assert layers and all(m.quant_enabled and m.weight_quantizer.bits == 8 for _, m in layers)
    ids = tok.encode(prompt)
    assert printed["prompt_ids"] == ids
    expected = greedy_by_recomputing(model.eval(), ids, 6)
    assert printed["continuations"] == [{"ids": expected, "text": tok.decode(expected)}]
    # Plain output: the continuation text; --batch draws several seeded samples in one batch.
    assert bkexp_main(["generate", str(quantized_bk_run), "--prompt", prompt, "--max-new-tokens", "6",
                       "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tok.decode(expected) + "\n"
    args = ["generate", str(quantized_bk_run), "--prompt", prompt, "--max-new-tokens", "5", "--batch", "3",
            "--seed", "1", "--top-k", "20", "--json"]
    assert bkexp_main(args) == 0
    first = json.loads(capsys.readouterr().out)["continuations"]
    assert bkexp_main(args) == 0
    assert json.loads(capsys.readouterr().out)["continuations"] == first and len(first) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--checkpoint", "newest"], "valid: best, last, or a path"),
    (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 0, got -2"),
    (["--decode-threads", "-1"], "--decode-threads must be 'auto' or an integer >= 0 (0: the process's thread count), "
                                "got '-1'"),
])
def test_generate_rejects_bad_arguments(quantized_bk_run: Path, capsys, args: list[str], message: str) -> None:
    assert bkexp_main(["generate", str(quantized_bk_run), "--prompt", "the", *args]) == 2
    assert message in capsys.readouterr().err


def test_generate_rejects_a_directory_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert bkexp_main(["generate", str(tmp_path), "--prompt", "the"]) == 2
    assert f"{tmp_path} is neither a run directory" in capsys.readouterr().err


def test_generate_refuses_a_staged_run_naming_the_flag(train, wikitext_slice: Path, capsys) -> None:
    # flags=act runs the staged model, which has no incremental form: refused before any token is generated.
    run = train("dataset=text", "tokenizer=word", "flags=act", *data_overrides("text", wikitext_slice),
                *[o for o in TINY if o != "model.n_layers=1"], "model.n_layers=2")
    model, _ = load_run(run, "best")
    assert type(model).__name__ == "StagedLanguageModel"
    assert bkexp_main(["generate", str(run), "--prompt", "The game", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot decode incrementally: flag(s) act run staged execution" in err and not capsys.readouterr().out
