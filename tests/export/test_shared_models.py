"""A shared model is used like a run: ``bkexp generate``, ``bkexp eval``, ``eval-quant`` and lm_eval read a folder
written by ``bkexp export``, or a hub repository of one through the Hugging Face cache, and give what the run gives.

The hub is unreachable from the tests: the repository is laid out in a hub cache (``models--OWNER--NAME/refs``
and ``snapshots/<commit>``, what a download leaves) and huggingface_hub's own download functions resolve it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runhelpers import TINY, data_overrides, load_train_entry

from bkexp.cli import main as bkexp_main
from bkexp.export import ExportError, export_run, from_pretrained, load_tokenizer
from bkexp.rundir import ModelFolder, RunDir, RunDirError, find_models
from testpaths import REPO_ROOT

REPO_ID = "someone/bkexp-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a snapshot folder is named by its 40-hex commit
PROMPT = "The game was"


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory: pytest.TempPathFactory, wikitext_slice: Path) -> tuple[Path, Path]:
    """A tiny BK run on WikiText-2 text (word tokenizer, 8-bit QAT) and its export."""
    root = tmp_path_factory.mktemp("shared_model")
    argv = sys.argv
    sys.argv = ["train.py", f"paths.root_dir={root}", *TINY, "model=bk", "dataset=text", "tokenizer=word", "bits=8",
                *data_overrides("text", wikitext_slice)]
    try:
        load_train_entry().main()
    finally:
        sys.argv = argv
    run = next(p for p in sorted((root / "outputs").iterdir()) if p.is_dir())
    return run, export_run(run, root / "export")


def hub_cache(folder: Path, cache: Path, repo_id: str = REPO_ID, commit: str = COMMIT) -> Path:
    """``cache`` holding ``folder`` as the main branch of hub repository ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("eval"))
    return cache


@pytest.fixture
def use_cache(monkeypatch: pytest.MonkeyPatch):
    """Point this process's hub downloads at a cache (huggingface_hub reads HF_HUB_CACHE once, at import; its
    download functions look the constant up on every call)."""
    from huggingface_hub import constants

    return lambda cache: monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def bkexp_process(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """The ``bkexp`` command in a fresh process, offline, with ``cache`` as its hub cache."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "bkexp.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def greedy(model_spec: str, capsys: pytest.CaptureFixture, *extra: str) -> dict:
    assert bkexp_main(["generate", model_spec, "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0",
                       "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_from_the_folder_and_from_the_hub_gives_the_runs_continuation(run_and_export, tmp_path: Path,
                                                                               capsys, use_cache) -> None:
    run, folder = run_and_export
    from_run = greedy(str(run), capsys)
    assert greedy(str(folder), capsys) == from_run

    cache = hub_cache(folder, tmp_path / "hub")
    use_cache(cache)  # a fresh process with HF_HUB_CACHE set: the eval test below
    assert greedy(REPO_ID, capsys) == from_run
    assert greedy(REPO_ID, capsys, "--revision", COMMIT) == from_run

    # versions and repositories the cache does not hold, with the hub offline
    assert bkexp_main(["generate", REPO_ID, "--prompt", PROMPT, "--revision", "v2"]) == 2
    err = capsys.readouterr().err
    assert "the hub is offline" in err and "holds no copy of that repository at revision 'v2'" in err
    assert bkexp_main(["generate", "someone/other", "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err
    assert "someone/other: no such local folder" in err and f"the hub cache ({cache})" in err


def test_generate_refuses_what_a_model_folder_does_not_have(run_and_export, tmp_path: Path, capsys) -> None:
    run, folder = run_and_export
    assert bkexp_main(["generate", str(folder), "--prompt", PROMPT, "--checkpoint", "last"]) == 2
    assert "picks a checkpoint of a run directory" in capsys.readouterr().err
    assert bkexp_main(["generate", str(folder), "--prompt", PROMPT, "--revision", "main"]) == 2
    assert "is a local folder" in capsys.readouterr().err
    assert bkexp_main(["generate", str(run), "--prompt", PROMPT, "--revision", "main"]) == 2
    assert "is a run directory" in capsys.readouterr().err
    sweep = tmp_path / "sweep"
    for job in ("0_seed=0", "1_seed=1"):
        shutil.copytree(run, sweep / job)
    assert bkexp_main(["generate", str(sweep), "--prompt", PROMPT]) == 2
    assert f"{sweep} is a sweep directory of 2 runs; give one of them, e.g. {sweep / '0_seed=0'}" in \
        capsys.readouterr().err
    assert bkexp_main(["generate", "no/such/thing", "--prompt", PROMPT]) == 2
    assert "not a hub repository id (owner/name)" in capsys.readouterr().err

    other = tmp_path / "gpt2"  # another library's model folder
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert bkexp_main(["generate", str(other), "--prompt", PROMPT]) == 2
    assert "model_type 'gpt2', expected 'bkexp'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bkexp_main(["generate", str(empty), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err
    assert "neither a run directory" in err and "nor a model folder" in err


def test_a_hub_repository_of_another_librarys_model_is_refused(run_and_export, tmp_path: Path, capsys,
                                                               use_cache) -> None:
    _, folder = run_and_export
    cache = hub_cache(folder, tmp_path / "hub", repo_id="someone/gpt")
    snapshot = cache / "models--someone--gpt" / "snapshots" / COMMIT
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    use_cache(cache)
    assert bkexp_main(["eval", "someone/gpt", "--datasets", "run"]) == 2
    assert "model_type 'gpt2', expected 'bkexp'" in capsys.readouterr().err


def test_eval_of_the_folder_and_the_hub_model_reproduces_the_runs_numbers(run_and_export, tmp_path: Path,
                                                                          wikitext_slice: Path) -> None:
    run, folder = run_and_export
    corpora = f"run,text:{wikitext_slice / 'train.txt'}"
    assert bkexp_main(["eval", str(run), "--datasets", corpora, "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    assert bkexp_main(["eval", str(folder), "--datasets", corpora, "--device", "cpu"]) == 0
    by_run = json.loads((tmp_path / "r" / "perplexity.json").read_text())
    by_folder = json.loads((folder / "eval" / "perplexity.json").read_text())
    assert by_folder["model_source"] == {"kind": "folder", "path": str(folder.resolve())}
    for a, b in zip(by_run["datasets"], by_folder["datasets"]):
        assert (a["dataset"], a["ppl"], a["tokens"]) == (b["dataset"], b["ppl"], b["tokens"])
        # the training text is read where config.json says it is: the overlap with it is the run's too
        assert a["train_13gram_overlap"] == b["train_13gram_overlap"]
        # the export records the training data: a corpus that is the training split is flagged either way
        assert a["shares_data_with"] == b["shares_data_with"]
    assert [d["shares_data_with"] for d in by_folder["datasets"]] == [[], ["train"]]
    assert by_folder["datasets"][1]["train_13gram_overlap"] == 1.0 and "train_data_error" not in by_folder
    assert by_run["datasets"][0]["ppl"] == pytest.approx(json.loads((run / "summary.json").read_text())
                                                         ["metrics"]["test/ppl"], rel=1e-6)

    cache = hub_cache(folder, tmp_path / "hub")
    work = tmp_path / "work"
    work.mkdir()
    # a fresh process with HF_HUB_CACHE set, as a user sets it
    done = bkexp_process("eval", REPO_ID, "--datasets", corpora, "--device", "cpu", cache=cache, cwd=work)
    assert done.returncode == 0, done.stderr
    by_hub = json.loads((work / "eval" / "someone--bkexp-tiny" / "perplexity.json").read_text())
    assert by_hub["model_source"]["repo_id"] == REPO_ID and by_hub["model_source"]["commit"] == COMMIT
    assert [d["ppl"] for d in by_hub["datasets"]] == [d["ppl"] for d in by_run["datasets"]]
    assert f"Hub model `{REPO_ID}` (commit `{COMMIT}`)" in (work / "eval" / "someone--bkexp-tiny" /
                                                           "perplexity.md").read_text()


def test_eval_refuses_what_a_model_folder_cannot_do(run_and_export, tmp_path: Path, capsys) -> None:
    run, folder = run_and_export
    for args, message in (([folder, "--checkpoint", "last"], "picks a checkpoint of a run directory"),
                          ([folder, "--bits", "8", "--checkpoint", "last"], "picks a checkpoint of a run directory"),
                          ([folder, run, "--out", tmp_path / "o"], "--out names one folder, for one model; 2"),
                          ([folder, "--override", f"dataset.data_dir={tmp_path / 'gone'}"],  # data not on this machine
                           f"bkexp eval: --datasets run: no such file {tmp_path / 'gone' / 'test.txt'} (no folder "
                           f"{tmp_path / 'gone'}) (a copy elsewhere: --override dataset.data_dir=DIR)")):
        assert bkexp_main(["eval", *map(str, args), "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err
    # a folder exported before the training dataset was recorded: `run` names no corpus, and says what does
    old = tmp_path / "old"
    shutil.copytree(folder, old, ignore=shutil.ignore_patterns("eval"))
    config = json.loads((old / "config.json").read_text())
    del config["dataset"]
    (old / "config.json").write_text(json.dumps(config))
    assert bkexp_main(["eval", str(old), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--datasets run: this model folder records no training dataset" in err and "text:PATH" in err
    assert bkexp_main(["eval-quant", str(old), "--bits", "8"]) == 2
    assert "config.json records no training dataset (exported before bkexp recorded one): export the run again" \
        in capsys.readouterr().err


def test_eval_quant_of_the_folder_and_the_hub_model_gives_the_runs_rows(run_and_export, tmp_path: Path,
                                                                        monkeypatch, use_cache) -> None:
    """The quantization sweep of a shared model starts from its float (latent) weights and its recorded training
    data, as the run's does: the same perplexity at every width."""
    import csv

    run, folder = run_and_export
    assert bkexp_main(["eval-quant", str(run), "--bits", "8,4", "--out", str(tmp_path / "r")]) == 0
    assert bkexp_main(["eval", str(folder), "--bits", "8,4", "--device", "cpu"]) == 0  # = eval-quant FOLDER
    use_cache(hub_cache(folder, tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert bkexp_main(["eval-quant", REPO_ID, "--bits", "8,4"]) == 0

    def rows(path: Path) -> list[tuple]:
        return [(r["bits"], r["val_ppl"], r["test_ppl"], r["quantized_params"])
                for r in csv.DictReader(path.open())]

    by_run = rows(tmp_path / "r" / "quant_eval.csv")
    assert [r[0] for r in by_run] == ["32", "8", "4"]
    assert rows(folder / "eval" / "quant_eval.csv") == by_run
    hub_dir = tmp_path / "eval" / "someone--bkexp-tiny"
    assert rows(hub_dir / "quant_eval.csv") == by_run and (hub_dir / "quant_eval.png").stat().st_size > 0
    assert f"`{REPO_ID}@{COMMIT}`" in (hub_dir / "quant_eval.md").read_text()
    # the run trained with 8-bit QAT: its 8-bit row is its own test
    summary = json.loads((run / "summary.json").read_text())
    assert float(by_run[1][2]) == pytest.approx(summary["metrics"]["test/ppl"], rel=1e-5)


def test_from_pretrained_and_the_lm_eval_model_read_hub_repositories(run_and_export, tmp_path: Path,
                                                                     use_cache) -> None:
    run, folder = run_and_export
    use_cache(hub_cache(folder, tmp_path / "hub"))
    reference = RunDir(run).build_model("best")
    ids = torch.randint(0, reference.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(from_pretrained(REPO_ID)(ids), reference(ids))
        assert torch.equal(from_pretrained(REPO_ID, revision=COMMIT)(ids), reference(ids))
    assert load_tokenizer(REPO_ID).encode("the game") == RunDir(run).tokenizer().encode("the game")
    with pytest.raises(ExportError, match="no revision|holds no copy"):
        from_pretrained(REPO_ID, revision="nope")

    (model,) = find_models([REPO_ID])
    assert isinstance(model, ModelFolder) and model.source["commit"] == COMMIT and model.name == REPO_ID
    with pytest.raises(RunDirError, match="is a run directory"):
        find_models([run], revision="main")

    pytest.importorskip("lm_eval")
    from bkexp.eval.harness import BkexpLM

    requests = [(("The game was", " released"), *_split("The game was", " released", RunDir(run).tokenizer()))]
    by_run = BkexpLM(run=str(run), device="cpu")._loglikelihood_tokens(requests)
    for spec in (REPO_ID, str(folder)):
        assert BkexpLM(pretrained=spec, device="cpu")._loglikelihood_tokens(requests) == by_run
    with pytest.raises(ValueError, match="not both"):
        BkexpLM(run=str(run), pretrained=REPO_ID)


def _split(context: str, continuation: str, tokenizer) -> tuple[list[int], list[int]]:
    whole = tokenizer.encode(context + continuation)
    n = len(tokenizer.encode(context))
    return whole[:n], whole[n:]


def test_the_card_of_a_pushed_export_names_its_repository(run_and_export, tmp_path: Path) -> None:
    run, _ = run_and_export
    card = (export_run(run, tmp_path / "pushed", repo_id=REPO_ID) / "README.md").read_text()
    assert f'from_pretrained("{REPO_ID}")' in card
    assert f"bkexp generate {REPO_ID} --prompt" in card and f"pretrained={REPO_ID}" in card
    assert "--datasets run --lengths 32,64,128" in card  # seq_len 32 and two longer contexts


def test_bench_run_of_the_folder_and_the_hub_model_measures_the_runs_model(run_and_export, tmp_path: Path,
                                                                           monkeypatch, use_cache, capsys) -> None:
    run, folder = run_and_export
    args = ["--modes", "eager,backend=torch", "--repeat", "1", "--warmup", "0", "--eval-batches", "2"]
    assert bkexp_main(["bench", "run", str(run), *args]) == 0
    assert bkexp_main(["bench", "run", str(folder), *args]) == 0
    use_cache(hub_cache(folder, tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert bkexp_main(["bench", "run", REPO_ID, *args]) == 0

    def results(out: Path) -> dict:
        return json.loads((out / "comparison_results.json").read_text())

    by_run = results(run / "benchmarks")
    by_folder = results(folder / "benchmarks")
    by_hub = results(tmp_path / "benchmarks" / "someone--bkexp-tiny")
    for measured in (by_folder, by_hub):
        assert [m["eval"]["ppl"] for m in measured["modes"]] == [m["eval"]["ppl"] for m in by_run["modes"]]
        assert all(m["train_step"]["ms"] > 0 for m in measured["modes"])
    assert by_run["meta"]["optimizer"] == "the run's: torch.optim.AdamW"
    assert by_folder["meta"]["optimizer"] == "the folder's: torch.optim.AdamW"
    assert by_hub["meta"]["model_source"]["commit"] == COMMIT
    capsys.readouterr()
    assert bkexp_main(["bench", "run", str(folder), "--modes", "backend=cpu"]) == 2  # eager's own: not a mode
    assert "valid here: eager, compile, bf16, int8, backend=torch, backend=torch_autograd" in capsys.readouterr().err
    assert (tmp_path / "benchmarks" / "someone--bkexp-tiny" / "speedup_comparison.png").stat().st_size > 0
