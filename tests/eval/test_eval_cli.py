"""``bkexp eval`` on a real run directory: perplexity on several corpora, the length sweep, refusals."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from evalhelpers import train_run
from runhelpers import MQAR_TINY, TINY, read_summary

from bkexp.cli import main as bkexp_main
from bkexp.eval.cli import LoadedRun, eval_lengths, load_run
from bkexp.eval.corpora import CorpusError
from bkexp.train.causality import CausalityError
from testpaths import WIKITEXT2_DIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def second_corpus(tmp_path: Path) -> Path:
    """Real English text outside WikiText that every Python install has: the PSF license."""
    import sysconfig

    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    path = tmp_path / "psf_license.txt"
    path.write_text(license_file.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def test_eval_reproduces_the_test_perplexity_of_training_and_scores_other_corpora(word_run: Path, tmp_path: Path,
                                                                                   capsys):
    other = second_corpus(tmp_path)
    assert bkexp_main(["eval", str(word_run), "--datasets", f"run,text:{other}"]) == 0
    record = json.loads((word_run / "eval" / "perplexity.json").read_text())
    summary = read_summary(word_run)
    own, second = record["datasets"]
    # Same checkpoint, same windows and batches as trainer.test: the perplexity training recorded, to 1e-6.
    assert Path(record["checkpoint"]).name == summary["metrics"]["test/checkpoint"]
    assert own["ppl"] == pytest.approx(summary["metrics"]["test/ppl"], rel=1e-6)
    assert own["targets"] == summary["data"]["splits"]["test"]["predicted_tokens"]
    # Statistics against independent counts: tokens, bytes, <unk> share of the word vocabulary, bits per byte.
    lines = other.read_text(encoding="utf-8").split("\n")[:-1]
    words = [w for line in lines for w in line.split()]
    assert second["tokens"] == len(words) + len(lines)
    assert second["bytes"] == len(other.read_bytes())
    assert 0 < second["oov_share"] <= second["unk_share"] < 1
    assert second["bits_per_byte"] == pytest.approx(second["loss"] * second["targets"] / math.log(2) / second["bytes"])
    assert record["mean"]["ppl"] == pytest.approx((own["ppl"] + second["ppl"]) / 2)
    assert record["std"]["ppl"] == pytest.approx(statistics.stdev([own["ppl"], second["ppl"]]))
    with (word_run / "eval" / "perplexity.csv").open() as f:
        assert [r["dataset"] for r in csv.DictReader(f)] == ["run", f"text:{other}"]
    assert "Mean ± std over 2 corpora" in (word_run / "eval" / "perplexity.md").read_text()
    assert "Perplexity on 2 corpora" in capsys.readouterr().out


def test_unk_share_counts_words_outside_the_training_vocabulary(word_run: Path, tmp_path: Path):
    run = load_run(word_run, "last", (), __import__("torch").device("cpu"))
    vocab = set(run.tokenizer.stoi)
    known = next(w for w in vocab if w not in ("<unk>", "<eos>"))
    text = tmp_path / "mixed.txt"
    text.write_text(f"{known} zzzqqq {known} <unk>\nyyyxxx {known}\n", encoding="utf-8")
    from bkexp.eval.corpora import encode, load_corpus

    _, stats = encode(load_corpus(f"text:{text}", run.cfg), run.tokenizer)
    assert stats["tokens"] == 8  # 6 words + 2 end-of-line tokens
    assert stats["unk_share"] == pytest.approx(3 / 8)  # zzzqqq, <unk>, yyyxxx
    assert stats["oov_share"] == pytest.approx(2 / 8)  # the literal <unk> is in the vocabulary


def test_length_sweep_scores_the_same_targets_at_every_length(word_run: Path):
    assert bkexp_main(["eval", str(word_run), "--lengths", "8,16,64", "--max-targets", "300",
                       "--batch-tokens", "256"]) == 0
    out = word_run / "eval"
    record = json.loads((out / "length.json").read_text())
    rows = record["lengths"]
    assert [r["length"] for r in rows] == [8, 16, 64]
    assert record["targets"] == 256 and all(r["targets"] == 256 for r in rows)
    assert [r["windows"] for r in rows] == [32, 16, 4]
    assert all(r["status"] == "ok" and r["tokens_per_sec"] > 0 and r["peak_mb"] > 0 for r in rows)
    assert all(sum(b["targets"] for b in r["loss_by_position"]) == 256 for r in rows)
    assert record["train_seq_len"] == 32 and record["mode"] == "non-overlapping"
    for name in ("length_ppl.png", "length_memory.png", "length_position.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert (out / "length.md").read_text().count("| ok |") == 3


def test_the_causality_check_runs_before_evaluation(word_run: Path):
    import torch

    from bkexp.models import LanguageModel
    from bkexp.models.mixers import AttentionMixer

    run = load_run(word_run, "best", (), torch.device("cpu"))
    leaky = LanguageModel(vocab_size=run.model.vocab_size, d_model=16, n_layers=1,
                          mixer=lambda d_model: AttentionMixer(d_model=d_model, n_heads=2, causal=False))
    bad = LoadedRun(run.run_dir, run.cfg, leaky, run.tokenizer, run.checkpoint, run.summary)
    with pytest.raises(CausalityError, match="non-causal mixer"):
        eval_lengths(bad, [8], None, "run", "test", None, 256, torch.device("cpu"))


def test_bad_requests_are_refused_with_the_valid_choices(word_run: Path, tmp_path: Path, capsys):
    cases = [
        (["--datasets", "nosuch"], "unknown dataset 'nosuch'; valid: run, text:PATH"),
        (["--datasets", "mqar"], "is not a text dataset"),
        (["--datasets", f"text:{tmp_path / 'missing.txt'}"], "no such file"),
        (["--datasets", "ptb"], "has no hub source; give its folder: ptb:DIR"),
        (["--lengths", "8,x"], "expected comma-separated integers"),
        (["--lengths", "8,16", "--stride", "12"], "longer than L=[8]"),
        (["--lengths", "100000"], "needs at least 100001 tokens"),
    ]
    for args, message in cases:
        assert bkexp_main(["eval", str(word_run), *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert bkexp_main(["eval", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_a_synthetic_run_cannot_score_text(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys):
    run = train_run(tmp_path_factory.mktemp("mqar_run"), *TINY, *MQAR_TINY)
    text = tmp_path / "a.txt"
    text.write_text((WIKITEXT2_DIR / "test.txt").read_text(encoding="utf-8")[:2000], encoding="utf-8")
    assert bkexp_main(["eval", str(run), "--datasets", f"text:{text}"]) == 2
    assert "a synthetic task without a text tokenizer" in capsys.readouterr().err
    with pytest.raises(CorpusError, match="synthetic task"):
        from bkexp.eval.corpora import check_pairing

        check_pairing(None, 64, "mqar")


@pytest.fixture(scope="module")
def documents_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A byte-level run streamed from jsonl documents (multi-line texts, an extra column, the training split in
    two shards read through a glob), and its data folder."""
    data = tmp_path_factory.mktemp("jsonl_data")
    lines = (WIKITEXT2_DIR / "valid.txt").read_text(encoding="utf-8").split("\n")[:400]
    docs = ["\n".join(lines[i:i + 5]) for i in range(0, len(lines), 5)]
    parts = {"train-0.jsonl": docs[:30], "train-1.jsonl": docs[30:60], "valid.jsonl": docs[60:70],
             "test.jsonl": docs[70:80]}
    for name, rows in parts.items():
        (data / name).write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(rows)))
    run = train_run(tmp_path_factory.mktemp("jsonl_run"), *TINY, "dataset=text", "tokenizer=byte",
                    f"dataset.data_dir={data}", "dataset.files.train=train-*.jsonl",
                    "dataset.files.validation=valid.jsonl", "dataset.files.test=test.jsonl")
    return run, data


def document_tokens(*files: Path) -> int:
    """Byte tokens of the rows' text, parsed here with json (one token per UTF-8 byte and per line end)."""
    texts = [json.loads(row)["text"] for f in files for row in f.read_text().splitlines()]
    return sum(len(line.encode()) + 1 for text in texts for line in text.split("\n"))


def test_a_streamed_runs_documents_are_scored_as_their_text_not_as_json(documents_run, tmp_path: Path, capsys):
    run, data = documents_run
    summary = read_summary(run)
    assert summary["data"]["source"]["kind"] == "local-stream"
    corpora = f"run,text:{data / 'test.jsonl'},text:{data / 'train-0.jsonl'}"
    assert bkexp_main(["eval", str(run), "--datasets", corpora, "--out", str(tmp_path / "test")]) == 0
    own, same_file, train_shard = json.loads((tmp_path / "test" / "perplexity.json").read_text())["datasets"]
    # the test split as training streamed it: its perplexity, token for token (JSON markup would add tokens)
    assert own["ppl"] == pytest.approx(summary["metrics"]["test/ppl"], rel=1e-6)
    assert own["tokens"] == same_file["tokens"] == document_tokens(data / "test.jsonl")
    assert same_file["ppl"] == own["ppl"]
    assert (own["shares_data_with"], same_file["shares_data_with"], train_shard["shares_data_with"]) == \
        ([], [], ["train"])
    # the training split's glob: both shards, and it is the training data
    assert bkexp_main(["eval", str(run), "--split", "train", "--out", str(tmp_path / "train")]) == 0
    (train,) = json.loads((tmp_path / "train" / "perplexity.json").read_text())["datasets"]
    assert train["tokens"] == document_tokens(data / "train-0.jsonl", data / "train-1.jsonl")
    assert train["shares_data_with"] == ["train"]
    # rows without the text column: named, not scored
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "words"}) + "\n")
    capsys.readouterr()
    assert bkexp_main(["eval", str(run), "--datasets", f"text:{tmp_path / 'other.jsonl'}"]) == 2
    assert "rows have no text column 'text' (columns: ['body'])" in capsys.readouterr().err


def test_a_streamed_split_is_read_as_far_as_the_run_evaluated_it(documents_run, tmp_path: Path, capsys):
    _, data = documents_run
    run = train_run(tmp_path / "capped", *TINY, "dataset=text", "tokenizer=byte", f"dataset.data_dir={data}",
                    "dataset.files.train=train-*.jsonl", "dataset.files.validation=valid.jsonl",
                    "dataset.files.test=test.jsonl", "dataset.eval_chunks=3")
    summary = read_summary(run)
    assert bkexp_main(["eval", str(run), "--out", str(tmp_path / "out")]) == 0
    (own,) = json.loads((tmp_path / "out" / "perplexity.json").read_text())["datasets"]
    # the first 3 chunks of 32 tokens, as the run's test read them
    assert own["targets"] == 3 * 32 and summary["data"]["eval_chunks"] == 3
    assert own["ppl"] == pytest.approx(summary["metrics"]["test/ppl"], rel=1e-6)
    assert own["bytes"] == 3 * 32 + 1  # byte tokens: the scored text's bytes
    # a hub dataset that trains streamed is streamed here too: offline, it says so, and downloads nothing
    capsys.readouterr()
    assert bkexp_main(["eval", str(run), "--datasets", "c4"]) == 2
    err = capsys.readouterr().err
    assert "--datasets c4: dataset 'c4' streams allenai/c4 from the Hugging Face hub, but the hub is offline" in err


def test_a_hub_dataset_that_trains_streamed_is_streamed_and_capped(documents_run, tmp_path: Path, monkeypatch):
    # A folder stands in for the hub repository (datasets.load_dataset streams a local folder the same way); with
    # a proxy set, bkexp skips its reachability probe, and a dead one fails any request at once: nothing is fetched.
    from omegaconf import OmegaConf

    from bkexp.data import ByteTokenizer
    from bkexp.eval.corpora import encode, load_corpus, run_splits_in

    _, data = documents_run
    hub = tmp_path / "hub_dataset"
    hub.mkdir()
    for ours, theirs in (("train-0.jsonl", "train.jsonl"), ("valid.jsonl", "validation.jsonl")):
        (hub / theirs).write_text((data / ours).read_text())
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    cfg = OmegaConf.create({"seq_len": 32, "dataset": {
        "_target_": "bkexp.data.StreamingTextDataModule", "name": "c4", "tokenizer": {"_target_": "x"},
        "hub": {"path": str(hub), "name": None, "splits": {"train": "train", "validation": "validation",
                                                            "test": "validation"}},  # as C4: no test split
        "data_dir": None, "files": {"train": None, "validation": None, "test": None}, "eval_chunks": 5}})
    test = load_corpus("run", cfg, "test")
    stream, stats = encode(test, ByteTokenizer())
    texts = [json.loads(row)["text"] for row in (data / "valid.jsonl").read_text().splitlines()]
    expected = ByteTokenizer().encode_lines([line for text in texts for line in text.split("\n")])
    assert stream.tolist() == expected[: 5 * 32 + 1].tolist() and stats["bytes"] == 5 * 32 + 1
    assert test.source["kind"] == "hub-stream" and test.source["split"] == "validation"
    assert run_splits_in(test, cfg) == ["validation"]  # the test split is the validation split
    assert run_splits_in(load_corpus("run", cfg, "train"), cfg) == ["train"]


@pytest.mark.parametrize(("overrides", "loads"), [(["dataset=wikitext2"], True),
                                                  (["dataset=wikitext2", "dataset.data_dir=/data/wt2"], False),
                                                  (["dataset=c4"], False), (["dataset=mqar"], False)],
                         ids=["hub", "local", "streamed", "synthetic"])
def test_a_shared_models_hub_training_corpus_is_not_downloaded_for_the_overlap(overrides, loads, tmp_path) -> None:
    """Evaluating a model folder builds its training datamodule for the overlap column only where that does not
    download a whole hub dataset."""
    from runhelpers import compose_train

    from bkexp.eval.corpora import loads_hub_dataset

    assert loads_hub_dataset(compose_train(overrides, tmp_path)) is loads
