"""Held-out splits: line ranges cut disjoint splits out of one file, and splits that are the same data are found,
recorded in summary.json and stated wherever their numbers are shown (run log and headline, report, model card)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from testpaths import WIKITEXT2_DIR

from bkexp.cli import main as bkexp_main
from bkexp.data import ByteTokenizer, MQARDataModule, StreamingTextDataModule, TextDataModule, text_datamodule
from bkexp.data.sources import count_lines, split_lines
from bkexp.eval.corpora import Corpus, _hub_split, run_splits_in
from bkexp.export import export_run
from bkexp.held_out import caveats, ngram_overlap, short_caveat
from bkexp.report.cli import write_report
import wandb_files
from runhelpers import TINY, compose_train, read_summary

N_LINES = 120


def session_hparams(folder: Path) -> dict:
    """The hyper-parameters of the HParams session that a run's TensorBoard event files start."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    for path in folder.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    return {k: v.string_value or v.number_value for k, v in data.session_start_info.hparams.items()}
    raise AssertionError(f"no HParams session under {folder}")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """corpus.txt (120 WikiText-2 lines), copy.txt (the same bytes), other.txt (different lines)."""
    lines = (WIKITEXT2_DIR / "valid.txt").read_text(encoding="utf-8").split("\n")
    out = tmp_path / "data"
    out.mkdir()
    (out / "corpus.txt").write_text("\n".join(lines[:N_LINES]) + "\n", encoding="utf-8")
    (out / "copy.txt").write_text("\n".join(lines[:N_LINES]) + "\n", encoding="utf-8")
    (out / "other.txt").write_text("\n".join(lines[200:260]) + "\n", encoding="utf-8")
    return out


def text_dm(folder: Path, train: str, validation: str, test: str) -> TextDataModule:
    dm = TextDataModule(name="text", seq_len=16, batch_size=2, tokenizer=ByteTokenizer(), data_dir=str(folder),
                        files={"train": train, "validation": validation, "test": test})
    dm.setup("fit")
    return dm


def ngrams(ids: torch.Tensor, n: int = 13, unique: bool = True):
    """The n-token windows of ``ids`` as tuples: a set, or every window in order."""
    values = ids.tolist()
    windows = [tuple(values[i:i + n]) for i in range(len(values) - n + 1)]
    return set(windows) if unique else windows


def encoded(folder: Path, lines: slice) -> torch.Tensor:
    """The lines tokenised independently of the datamodule: each line's UTF-8 bytes, then the byte tokenizer's
    end of line."""
    text = (folder / "corpus.txt").read_text(encoding="utf-8").split("\n")[:-1][lines]
    return ByteTokenizer().encode_lines(text)


@pytest.mark.parametrize("train,validation,train_lines,validation_lines", [
    ("corpus.txt[:90%]", "corpus.txt[90%:]", slice(0, 108), slice(108, 120)),
    ("corpus.txt[:-20]", "corpus.txt[-20:]", slice(0, 100), slice(100, 120)),
    ("corpus.txt[10:50]", "corpus.txt[50%:75%]", slice(10, 50), slice(60, 90)),
])
def test_line_ranges_cut_disjoint_splits_from_one_file(folder: Path, train: str, validation: str,
                                                       train_lines: slice, validation_lines: slice) -> None:
    dm = text_dm(folder, train, validation, "other.txt")
    assert torch.equal(dm.streams["train"], encoded(folder, train_lines))
    assert torch.equal(dm.streams["validation"], encoded(folder, validation_lines))
    assert dm.overlapping_splits() == []
    assert dm.describe()["overlapping_splits"] == []
    assert dm.describe()["source"]["files"] == {"train": train, "validation": validation, "test": "other.txt"}


@pytest.mark.parametrize("train,validation,test,pairs", [
    ("corpus.txt", "other.txt", "other.txt", [["validation", "test"]]),  # one file for two splits
    ("corpus.txt[:90%]", "corpus.txt[80%:]", "other.txt", [["train", "validation"]]),  # ranges that overlap
    ("corpus.txt", "other.txt", "copy.txt", [["train", "test"]]),  # another file with the same text
    ("corpus.txt[:50%]", "corpus.txt[50%:]", "corpus.txt", [["train", "test"], ["validation", "test"]]),
])
def test_splits_that_share_data_are_found(folder: Path, train: str, validation: str, test: str,
                                          pairs: list[list[str]]) -> None:
    dm = text_dm(folder, train, validation, test)
    assert dm.overlapping_splits() == pairs
    assert dm.describe()["overlapping_splits"] == pairs


@pytest.mark.parametrize("text", ["", "\n", "a", "a\n", "a\nb", "a\n\nb\n", "é\r\nü\n\n", "x\u2028y\n"])
def test_counted_lines_are_the_lines_the_source_reads(tmp_path: Path, text: str) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(text.encode("utf-8"))
    assert count_lines(path) == len(split_lines(path.read_text(encoding="utf-8")))


def test_bad_line_ranges_are_refused_naming_the_value(folder: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset.files.train: .*'corpus.txt\[a:\]'.*bad line range bound 'a'"):
        text_dm(folder, "corpus.txt[a:]", "other.txt", "other.txt")
    with pytest.raises(ValueError, match=r"bad line range bound '150%'.*-100% to 100%"):
        text_dm(folder, "corpus.txt[:150%]", "other.txt", "other.txt")
    with pytest.raises(ValueError, match=r"bad line range bound '2.5'"):
        text_dm(folder, "corpus.txt[2.5:]", "other.txt", "other.txt")
    with pytest.raises(FileNotFoundError, match=r"dataset.files.validation='nothere.txt\[:10\]'"):
        text_dm(folder, "corpus.txt", "nothere.txt[:10]", "other.txt")
    with pytest.raises(ValueError, match=rf"dataset.files.train='corpus.txt\[:500\]': line 500 is outside the "
                                         rf"file's {N_LINES} lines"):
        text_dm(folder, "corpus.txt[:500]", "other.txt", "other.txt")
    with pytest.raises(ValueError, match=r"'corpus.txt\[60:50%\]' selects no lines \(lines 60 to 60 of 120\)"):
        text_dm(folder, "corpus.txt[60:50%]", "other.txt", "other.txt")


def test_a_file_named_with_brackets_is_read_whole(folder: Path) -> None:
    (folder / "odd[1:2]").write_text("a\nb\nc\n", encoding="utf-8")
    dm = text_dm(folder, "corpus.txt", "odd[1:2]", "other.txt")
    assert torch.equal(dm.streams["validation"], ByteTokenizer().encode_lines(["a", "b", "c"]))


def test_streamed_splits_that_share_a_file_are_found_and_ranges_are_refused(folder: Path) -> None:
    for name in ("corpus", "other"):
        lines = (folder / f"{name}.txt").read_text(encoding="utf-8").split("\n")[:-1]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), "utf-8")
    dm = text_datamodule(name="text", seq_len=16, batch_size=2, tokenizer=ByteTokenizer(), data_dir=str(folder),
                         files={"train": "corpus.jsonl", "validation": "other.jsonl", "test": "*.jsonl"})
    assert isinstance(dm, StreamingTextDataModule)
    assert dm.overlapping_splits() == [["train", "test"], ["validation", "test"]]
    with pytest.raises(ValueError, match=r"dataset.files.train='corpus.jsonl\[:90%\]': a line range .* in memory"):
        text_datamodule(name="text", seq_len=16, batch_size=2, tokenizer=ByteTokenizer(), data_dir=str(folder),
                        files={"train": "corpus.jsonl[:90%]", "validation": "other.jsonl", "test": "other.jsonl"})


def test_synthetic_splits_do_not_overlap() -> None:
    dm = MQARDataModule(name="mqar", seq_len=16, batch_size=4, vocab_size=32, num_train=32, num_val=8, num_test=8)
    dm.setup("fit")
    assert dm.describe()["overlapping_splits"] == []


@pytest.mark.parametrize("vocab,n", [(3, 4), (50, 13), (1000, 13)])
def test_ngram_overlap_is_the_share_of_windows_seen_in_the_reference(vocab: int, n: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    reference = torch.randint(0, vocab, (3000,), generator=generator)
    corpus = torch.cat([reference[500:900], torch.randint(0, vocab, (400,), generator=generator), reference[:50]])
    windows = ngrams(corpus, n, unique=False)
    expected = sum(w in ngrams(reference, n) for w in windows) / len(windows)
    assert ngram_overlap(corpus, reference, n) == pytest.approx(expected, abs=0)
    assert ngram_overlap(reference, reference, n) == 1.0
    assert ngram_overlap(corpus[: n - 1], reference, n) is None and ngram_overlap(corpus, reference[: n - 1], n) is None


def test_a_hub_corpus_shares_the_runs_splits_it_reads() -> None:
    """The hub branch of run_splits_in (the hub is unreachable here, so the corpus is built by hand, as load_corpus
    builds it from a loaded hub split)."""
    cfg = OmegaConf.create({"dataset": {"name": "wikitext2", "data_dir": None, "files": {"train": "t", "validation": "v",
                                        "test": "e"}, "hub": {"path": "Salesforce/wikitext", "name": "wikitext-2-v1",
                                                              "splits": {"validation": "test"}}}})

    def corpus(split: str) -> Corpus:
        return Corpus("wikitext2", {}, ["x"], hub_split=_hub_split("Salesforce/wikitext", "wikitext-2-v1", split))

    assert run_splits_in(corpus("train"), cfg) == ["train"]
    assert run_splits_in(corpus("test"), cfg) == ["validation"]  # the run validated on the hub's test split
    assert run_splits_in(corpus("validation"), cfg) == []
    other = Corpus("x", {}, ["x"], hub_split=_hub_split("other/dataset", None, "train"))
    assert run_splits_in(other, cfg) == []


def test_caveats_say_what_each_overlap_means() -> None:
    assert caveats([]) == [] and short_caveat([]) is None
    (selection,) = caveats([["validation", "test"]])
    assert "best checkpoint was chosen on the test data" in selection
    assert [c.split(" data")[0] for c in caveats([["train", "validation"], ["train", "test"]])] == \
        ["validation", "test"]
    assert short_caveat([["train", "test"], ["validation", "test"]]) == "train = test data, validation = test data"


def test_wikitext2_local_validates_on_lines_held_out_of_training(tmp_path: Path) -> None:
    files = compose_train(["experiment=wikitext2_local"], tmp_path).dataset.files
    assert dict(files) == {"train": "valid.txt[:90%]", "validation": "valid.txt[90%:]", "test": "test.txt"}


def test_a_run_on_shared_splits_says_so_everywhere(train, folder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    text = ["dataset=text", "tokenizer=byte", f"dataset.data_dir={folder}"]
    shared = train(*text, "dataset.files.train=corpus.txt", "dataset.files.validation=other.txt",
                   "dataset.files.test=other.txt", "logger=many", *TINY)
    printed = capsys.readouterr().out
    held_out = train(*text, 'dataset.files.train="corpus.txt[:80%]"', 'dataset.files.validation="corpus.txt[80%:]"',
                     "dataset.files.test=other.txt", *TINY)

    summary = read_summary(shared)
    assert summary["status"] == "ok" and summary["data"]["overlapping_splits"] == [["validation", "test"]]
    assert read_summary(held_out)["data"]["overlapping_splits"] == []
    trained = ngrams(encoded(folder, slice(0, 96)))  # corpus.txt[:80%] of 120 lines, tokenised independently
    splits = read_summary(held_out)["data"]["splits"]
    other = (folder / "other.txt").read_text(encoding="utf-8").split("\n")[:-1]
    for split, ids in (("validation", encoded(folder, slice(96, 120))), ("test", ByteTokenizer().encode_lines(other))):
        windows = ngrams(ids, unique=False)
        assert splits[split]["train_13gram_overlap"] == pytest.approx(sum(w in trained for w in windows) / len(windows))
    assert "train_13gram_overlap" not in splits["train"]
    assert "| not held out: validation = test data" in printed.splitlines()[-2]  # the headline, then "run ok"
    assert "validation and test are the same data: the best checkpoint was chosen on the test data" in \
        (shared / "train.log").read_text()
    assert "held out" not in (held_out / "train.log").read_text()

    assert session_hparams(shared / "tensorboard")["not_held_out"] == "validation = test data"
    (run_file,) = shared.glob("wandb/offline-run-*/run-*.wandb")
    wandb_run = wandb_files.run_info(run_file)
    assert "not-held-out" in wandb_run["tags"] and wandb_run["summary"]["not_held_out"] == "validation = test data"

    write_report([shared.parent], tmp_path / "report", plots=False)
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "**Not held out** in 1 of 2 runs: `validation = test data` (1 runs)" in md
    rows = {r["run_dir"]: r["not_held_out"] for r in csv.DictReader(open(tmp_path / "report" / "summary.csv"))}
    assert rows == {str(shared): "validation = test data", str(held_out): ""}

    card = (export_run(shared, tmp_path / "shared_export") / "README.md").read_text()
    assert "(validation = test data, not held out)" in card and "model-index" not in card
    assert "| validation split | `other.txt` |" in card and "| test split | `other.txt` |" in card
    card = (export_run(held_out, tmp_path / "held_out_export") / "README.md").read_text()
    assert "not held out" not in card.lower() and "model-index" in card
    assert "| train split | `corpus.txt[:80%]` |" in card
    assert f"| test 13-grams also in training | {splits['test']['train_13gram_overlap']:.2%} |" in card

    # bkexp eval reads the run's validation range as training did: the same tokens, the best validation loss
    assert bkexp_main(["eval", str(held_out), "--split", "validation"]) == 0
    (scored,) = json.loads((held_out / "eval" / "perplexity.json").read_text())["datasets"]
    summary = read_summary(held_out)
    assert scored["tokens"] == summary["data"]["splits"]["validation"]["tokens"]
    assert scored["ppl"] == pytest.approx(summary["metrics"]["best/val_ppl"], rel=1e-5)
    assert scored["shares_data_with"] == ["validation"]  # the split the best checkpoint was chosen on
    # other corpora are checked against the run's files and line ranges: corpus.txt is its training and validation
    # text, other.txt only its test split
    assert bkexp_main(["eval", str(held_out), "--datasets", f"text:{folder}/corpus.txt,text:{folder}/other.txt"]) == 0
    record = json.loads((held_out / "eval" / "perplexity.json").read_text())
    assert [r["shares_data_with"] for r in record["datasets"]] == [["train", "validation"], []]
    for row, name in zip(record["datasets"], ("corpus", "other")):
        lines = (folder / f"{name}.txt").read_text(encoding="utf-8").split("\n")[:-1]
        windows = ngrams(ByteTokenizer().encode_lines(lines), unique=False)
        assert row["train_13gram_overlap"] == pytest.approx(sum(w in trained for w in windows) / len(windows))
    assert record["datasets"][0]["train_13gram_overlap"] > 0.7 > 0.1 > record["datasets"][1]["train_13gram_overlap"]
    md = (held_out / "eval" / "perplexity.md").read_text()
    assert f"**Not held out:** `text:{folder}/corpus.txt` holds the run's training data" in md
    assert "other.txt` holds" not in md
    report = write_report([held_out], tmp_path / "eval_report", plots=False)
    (row,) = csv.DictReader(open(report.summary_csv))
    assert row[f"eval.not_held_out.text:{folder}/corpus.txt"] == "train+validation"
    assert f"eval.not_held_out.text:{folder}/other.txt" not in row
    assert f"**Not held out:** `text:{folder}/corpus.txt` holds the training or validation data of transformer " \
           "(train+validation)" in report.summary_md.read_text()
