"""Text datamodule: next-token labels on real WikiText-2 text, whole-split evaluation, clear source errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from testpaths import WIKITEXT2_DIR

from bkexp.data import IGNORE_INDEX, ByteTokenizer, TextDataModule, WordTokenizer

FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}


@pytest.fixture
def wiki_dir(tmp_path: Path) -> Path:
    """Three splits cut from the shared WikiText-2 validation file (line-aligned slices)."""
    lines = (WIKITEXT2_DIR / "valid.txt").read_text(encoding="utf-8").split("\n")
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    (folder / "valid.txt").write_text("\n".join(lines[200:260]) + "\n", encoding="utf-8")
    (folder / "test.txt").write_text("\n".join(lines[260:330]) + "\n", encoding="utf-8")
    return folder


def make_dm(folder: Path, tokenizer=None, seq_len: int = 32, batch_size: int = 3, seed: int = 0) -> TextDataModule:
    dm = TextDataModule(name="text", seq_len=seq_len, batch_size=batch_size, eval_batch_size=5,
                        tokenizer=tokenizer or WordTokenizer(), data_dir=str(folder), files=FILES, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def reference_stream(path: Path, dm: TextDataModule) -> torch.Tensor:
    """The split tokenised independently: each line's words then <eos>, ids from the fitted vocabulary."""
    stoi = dm.tokenizer.stoi
    ids = []
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        ids += [stoi.get(w, stoi["<unk>"]) for w in line.split()] + [stoi["<eos>"]]
    return torch.tensor(ids)


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_batches_are_the_split_in_order_with_next_token_labels(wiki_dir: Path, split: str) -> None:
    dm = make_dm(wiki_dir)
    loader = dm.val_dataloader() if split == "validation" else dm.test_dataloader()
    batches = list(loader)
    assert len(batches) > 2, "the slice must span several batches to test batch boundaries"
    x = torch.cat([b["input_ids"] for b in batches]).flatten()
    y = torch.cat([b["labels"] for b in batches]).flatten()
    stream = reference_stream(wiki_dir / FILES[split], dm)

    kept = y != IGNORE_INDEX
    # Every token but the first is predicted exactly once, in order: perplexity covers the whole split.
    assert int(kept.sum()) == len(stream) - 1
    assert torch.equal(y[kept], stream[1:])
    assert torch.equal(x[kept], stream[:-1])
    # y[t] == x[t+1] everywhere inside the flattened batches, i.e. across chunk and batch boundaries.
    both = kept[:-1] & kept[1:]
    assert torch.equal(y[:-1][both], x[1:][both])
    # Only the tail of the last chunk is padding.
    assert not kept[int(kept.sum()):].any()


def test_train_chunks_are_a_seeded_shuffle_of_the_same_chunking(wiki_dir: Path) -> None:
    dm = make_dm(wiki_dir, seed=3)
    stream = reference_stream(wiki_dir / FILES["train"], dm)
    n = dm.seq_len
    batches = list(dm.train_dataloader())
    x = torch.cat([b["input_ids"] for b in batches])
    y = torch.cat([b["labels"] for b in batches])
    assert x.shape[0] == -(-(len(stream) - 1) // n)  # drop_last=False: every chunk, the partial one too
    last = len(stream) - 1  # the last token is never an input with a target
    start_of = {tuple(stream[s : min(s + n, last)].tolist()): s for s in range(0, last, n)}
    seen = set()
    for xi, yi in zip(x, y, strict=True):
        kept = yi != IGNORE_INDEX
        start = start_of[tuple(xi[kept].tolist())]
        assert torch.equal(yi[kept], stream[start + 1 : start + 1 + int(kept.sum())])
        seen.add(start)
    assert seen == set(range(0, len(stream) - 1, n))
    order = lambda d: [tuple(b["input_ids"][:, 0].tolist()) for b in d.train_dataloader()]  # noqa: E731
    assert order(dm) == order(make_dm(wiki_dir, seed=3))
    assert order(dm) != order(make_dm(wiki_dir, seed=4))
    assert order(dm) != [tuple(b["input_ids"][:, 0].tolist()) for b in dm.val_dataloader()]


def test_full_wikitext2_files_give_the_published_token_counts() -> None:
    files = {"train": "valid.txt", "validation": "test.txt", "test": "test.txt"}
    dm = TextDataModule(name="wikitext2", seq_len=256, batch_size=4, tokenizer=WordTokenizer(),
                        data_dir=str(WIKITEXT2_DIR), files=files)
    dm.setup("fit")
    counts = dm.describe()["splits"]
    # Merity et al. (2016): 217,646 validation and 245,569 test tokens (<eos> after every line).
    assert counts["train"]["tokens"] == 217_646
    assert counts["test"]["tokens"] == 245_569
    assert counts["test"]["predicted_tokens"] == 245_568
    assert dm.vocab_size == len(set((WIKITEXT2_DIR / "valid.txt").read_text(encoding="utf-8").split()) | {"<eos>"})


def test_byte_tokenizer_datamodule_covers_the_file_bytes(wiki_dir: Path) -> None:
    dm = make_dm(wiki_dir, tokenizer=ByteTokenizer(), seq_len=64)
    raw = (wiki_dir / FILES["test"]).read_bytes()
    y = torch.cat([b["labels"] for b in dm.test_dataloader()]).flatten()
    assert dm.vocab_size == 256
    assert bytes(y[y != IGNORE_INDEX].tolist()) == raw[1:]


def test_describe_reports_source_tokenizer_and_counts(wiki_dir: Path) -> None:
    dm = make_dm(wiki_dir)
    d = dm.describe()
    assert d["name"] == "text" and d["source"]["kind"] == "local"
    assert d["tokenizer"]["name"] == "word" and d["vocab_size"] == dm.vocab_size
    assert d["splits"]["validation"]["predicted_tokens"] == d["splits"]["validation"]["tokens"] - 1
    assert dm.autoregressive and not dm.has_answer_mask and dm.ignore_index == -100


def test_text_without_data_dir_fails_with_the_override() -> None:
    with pytest.raises(ValueError, match=r"dataset\.data_dir=DIR"):
        TextDataModule(name="text", seq_len=8, batch_size=2, tokenizer=WordTokenizer(), files=FILES)


def test_data_dir_that_is_missing_or_a_file_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        TextDataModule(name="text", seq_len=8, batch_size=2, tokenizer=WordTokenizer(),
                       data_dir=str(tmp_path / "nope"), files=FILES)
    (tmp_path / "afile").write_text("x\n")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        TextDataModule(name="text", seq_len=8, batch_size=2, tokenizer=WordTokenizer(),
                       data_dir=str(tmp_path / "afile"), files=FILES)


def test_missing_split_file_names_the_path_and_the_key(wiki_dir: Path) -> None:
    files = {**FILES, "validation": "wiki.valid.tokens"}
    with pytest.raises(FileNotFoundError) as info:
        TextDataModule(name="text", seq_len=8, batch_size=2, tokenizer=WordTokenizer(),
                       data_dir=str(wiki_dir), files=files)
    message = str(info.value)
    assert "dataset.files.validation" in message and str(wiki_dir / "wiki.valid.tokens") in message


def test_wikitext2_offline_without_data_dir_fails_at_construction() -> None:
    files = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}
    with pytest.raises(RuntimeError) as info:
        TextDataModule(name="wikitext2", seq_len=8, batch_size=2, tokenizer=WordTokenizer(),
                       hub={"path": "Salesforce/wikitext", "name": "wikitext-2-v1"}, files=files)
    message = str(info.value)
    assert "offline" in message
    assert ("dataset.data_dir=DIR dataset.files.train=wiki.train.tokens "
            "dataset.files.validation=wiki.valid.tokens dataset.files.test=wiki.test.tokens") in message


def test_data_dir_takes_precedence_over_the_hub_offline(wiki_dir: Path) -> None:
    dm = TextDataModule(name="wikitext2", seq_len=16, batch_size=2, tokenizer=WordTokenizer(),
                        hub={"path": "Salesforce/wikitext", "name": "wikitext-2-v1"},
                        data_dir=str(wiki_dir), files=FILES)
    dm.setup("fit")
    assert dm.describe()["source"]["kind"] == "local"


def test_vocab_size_before_setup_is_an_error(wiki_dir: Path) -> None:
    dm = TextDataModule(name="text", seq_len=8, batch_size=2, tokenizer=WordTokenizer(),
                        data_dir=str(wiki_dir), files=FILES)
    with pytest.raises(RuntimeError, match="after setup"):
        _ = dm.vocab_size


def test_unreachable_hub_fails_at_once_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed local port: the probe is refused
    files = {"train": "a.txt", "validation": "b.txt", "test": "c.txt"}
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        TextDataModule(name="wikitext2", seq_len=8, batch_size=2, tokenizer=WordTokenizer(),
                       hub={"path": "Salesforce/wikitext", "name": "wikitext-2-v1"}, files=files)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "unreachable" in message and "127.0.0.1:9" in message
    assert "dataset.data_dir=DIR dataset.files.train=a.txt" in message
