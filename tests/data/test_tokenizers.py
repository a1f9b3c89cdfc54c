"""Tokenizers: word vocabulary with <unk>/<eos>, byte round trip, local and offline pretrained tokenizers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from testpaths import WIKITEXT2_DIR

from bkexp.data import ByteTokenizer, PretrainedTokenizer, WordTokenizer


def test_word_tokenizer_unk_eos_and_blank_lines() -> None:
    tok = WordTokenizer()
    tok.fit(["the cat sat", "", "the dog"])
    ids = tok.encode_lines(["the bird sat", "", "dog"]).tolist()
    stoi = tok.stoi
    assert tok.itos[:2] == ["<unk>", "<eos>"] and tok.itos[2] == "the"  # most frequent word first
    assert ids == [stoi["the"], stoi["<unk>"], stoi["sat"], stoi["<eos>"], stoi["<eos>"], stoi["dog"], stoi["<eos>"]]
    assert tok.vocab_size == 2 + len({"the", "cat", "sat", "dog"})
    assert tok.decode(ids) == "the <unk> sat\n\ndog"


def test_word_tokenizer_min_freq_and_max_size() -> None:
    lines = ["a a a b b c"]
    tok = WordTokenizer(min_freq=2)
    tok.fit(lines)
    assert tok.itos == ["<unk>", "<eos>", "a", "b"]
    tok = WordTokenizer(max_size=3)
    tok.fit(lines)
    assert tok.itos == ["<unk>", "<eos>", "a"]
    assert tok.encode_lines(["c b a"]).tolist() == [0, 0, 2, 1]
    with pytest.raises(ValueError, match="min_freq"):
        WordTokenizer(min_freq=0)
    with pytest.raises(ValueError, match="max_size"):
        WordTokenizer(max_size=2)


def test_word_tokenizer_is_fast_on_wikitext2() -> None:
    lines = (WIKITEXT2_DIR / "test.txt").read_text(encoding="utf-8").split("\n")[:-1]
    tok = WordTokenizer()
    start = time.perf_counter()
    tok.fit(lines)
    ids = tok.encode_lines(lines)
    elapsed = time.perf_counter() - start
    assert len(ids) == 245_569
    assert elapsed < 5.0, f"fit+encode of 245k words took {elapsed:.1f}s"


def test_encoding_before_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="call fit"):
        WordTokenizer().encode_lines(["a"])


def test_byte_tokenizer_round_trip() -> None:
    lines = ["plain ascii", "", "ünïcödé — 東京 🙂"]
    tok = ByteTokenizer()
    ids = tok.encode_lines(lines)
    assert tok.vocab_size == 256 and int(ids.max()) < 256 and int(ids.min()) >= 0
    assert tok.decode(ids) == "plain ascii\n\nünïcödé — 東京 🙂\n"
    assert bytes(ids.tolist()) == "\n".join(lines).encode("utf-8") + b"\n"


def test_pretrained_tokenizer_from_a_local_file(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    built = Tokenizer(models.BPE(unk_token="[UNK]"))
    built.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = (WIKITEXT2_DIR / "valid.txt").read_text(encoding="utf-8").split("\n")[:300]
    built.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    path = tmp_path / "tokenizer.json"
    built.save(str(path))

    tok = PretrainedTokenizer(name="local-bpe", path=str(path))
    ids = tok.encode_lines(["the lobster , European", "species"])
    expected = built.encode("the lobster , European\n").ids + built.encode("species\n").ids
    assert ids.tolist() == expected
    assert tok.vocab_size == built.get_vocab_size() == 300
    assert tok.describe()["path"] == str(path)


def test_pretrained_tokenizer_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        PretrainedTokenizer(path=str(tmp_path / "missing.json"))


def test_pretrained_tokenizer_offline_and_uncached_fails_clearly(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))  # nothing cached
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    with pytest.raises(RuntimeError) as info:
        PretrainedTokenizer(name="gpt2")
    message = str(info.value)
    assert "'gpt2'" in message and "hub" in message and "tokenizer.path=" in message


def test_encode_free_text_as_a_prompt() -> None:
    """``encode(text)``: the lines as training encodes them, without the end-of-line after the last one."""
    word = WordTokenizer()
    word.fit(["the cat sat", "on the mat"])
    assert word.encode("the cat\non") == word.encode_lines(["the cat", "on"]).tolist()[:-1] == [2, 3, 1, 5]
    assert word.encode("the dog\n") == [2, 0, 1]  # a final newline is the <eos> it means; unknown word -> <unk>
    byte = ByteTokenizer()
    text = "ünï\ncödé "
    assert byte.decode(byte.encode(text)) == text and byte.encode("") == []
