"""Tokenizers that turn a text split (a list of lines) into one token stream: word, byte and pretrained BPE.

Every tokenizer has the same small interface, used by :class:`bkexp.data.TextDataModule`:

- ``fit(train_lines)``: build what depends on the training split (the word vocabulary); a no-op otherwise.
- ``encode_lines(lines) -> LongTensor``: the whole split as one 1-D stream; each line ends with an
  end-of-line token (``<eos>`` for ``word``, the newline byte for ``byte``, ``"\\n"`` for pretrained BPE).
- ``encode(text) -> list[int]``: free text (a prompt) as training would see it, without a final end-of-line.
- ``decode(ids) -> str``, ``vocab_size``, ``name`` and ``describe() -> dict`` (recorded in summary.json).
- ``save(directory)`` / :func:`load_tokenizer` ``(directory)``: what rebuilds the tokenizer exactly (the word
  vocabulary, the pretrained ``tokenizer.json`` with its hub name and revision) in ``<run>/tokenizer/``, so
  evaluation, generation and export decode with the run's own tokenizer without refitting it.

Synthetic tasks have no text: :class:`IdTokenizer` stands for their token ids (decimal numbers).
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from bkexp.utils import atomic_write_json, atomic_write_text

UNK = "<unk>"
EOS = "<eos>"
_TRUTHY = {"1", "on", "yes", "true"}
CONFIG_FILE = "tokenizer_config.json"  # in a saved tokenizer directory: {"type": ..., settings}


def hub_offline() -> bool:
    """True when the environment forbids reaching the Hugging Face hub (read now, not at import time)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUTHY
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unavailable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be used right now (offline by environment, or no TCP connection), else None.

    The connection probe lets an unreachable hub fail at once instead of after the download libraries'
    retries (tens of seconds). Behind a proxy the probe is skipped (a direct connection may be blocked
    while the proxy works); the loaders then report their own errors.
    """
    if hub_offline():
        return "the hub is offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE is set)"
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"the hub is unreachable ({host}:{port}: {err})"
    return None


class Tokenizer:
    """Base class: see the module docstring for the interface."""

    name: str = "tokenizer"

    def fit(self, train_lines: Sequence[str]) -> None:  # noqa: B027 - deliberately a no-op by default
        """Build state from the training split (default: nothing to build)."""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode_lines(self, lines: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of free text (a prompt, an lm-eval context): its lines encoded as in training, without the
        end-of-line token(s) training adds after the last line (the text decides whether it ends with one)."""
        ids = self.encode_lines(text.split("\n")).tolist()
        tail = self.encode_lines([""]).tolist()  # what an empty last line adds: the end-of-line token(s)
        if ids[len(ids) - len(tail):] != tail:
            raise ValueError(f"tokenizer {self.describe()} does not end the line {text.splitlines()[-1:]} with its "
                             f"end-of-line tokens {tail}; it cannot encode this text as a prompt")
        return ids[:len(ids) - len(tail)]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size}

    def state(self) -> dict[str, Any]:
        """The settings :func:`load_tokenizer` rebuilds this tokenizer from (``type`` names the class)."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer_config.json`` (and any files it names) into ``directory``; returns the directory."""
        directory = Path(directory)
        atomic_write_json(directory / CONFIG_FILE, self.state())
        return directory


def _as_int_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


class WordTokenizer(Tokenizer):
    """Whitespace words with a vocabulary from the training split (the classic word-level LM setup).

    Each line becomes its words followed by ``<eos>``; a blank line becomes a lone ``<eos>``. This is the
    convention behind the published WikiText-2 token counts (217,646 validation and 245,569 test tokens),
    so perplexities are comparable with the literature. Words not in the vocabulary map to ``<unk>`` (the
    literal ``<unk>`` already in WikiText maps to the same id). Ids: ``<unk>`` = 0, ``<eos>`` = 1, then
    words by decreasing training count, ties alphabetical (deterministic).

    Args:
        min_freq: words seen fewer times than this in the training split become ``<unk>``.
        max_size: keep at most this many entries in total (specials included); ``None`` = no limit.
    """

    name = "word"

    def __init__(self, min_freq: int = 1, max_size: int | None = None) -> None:
        if not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"min_freq must be an integer >= 1, got {min_freq!r}")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 3):
            raise ValueError(f"max_size must be null or an integer >= 3 (two specials + a word), got {max_size!r}")
        self.min_freq = min_freq
        self.max_size = max_size
        self.itos: list[str] | None = None
        self.stoi: dict[str, int] | None = None
        self.loaded = False  # a vocabulary read by load_tokenizer is kept: fit() does not rebuild it

    def fit(self, train_lines: Sequence[str]) -> None:
        if self.loaded:
            return
        counts: Counter[str] = Counter()
        for line in train_lines:
            counts.update(line.split())
        counts.pop(UNK, None)
        counts.pop(EOS, None)
        words = sorted((w for w, c in counts.items() if c >= self.min_freq), key=lambda w: (-counts[w], w))
        if self.max_size is not None:
            words = words[: self.max_size - 2]
        self.itos = [UNK, EOS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def _require_fitted(self) -> dict[str, int]:
        if self.stoi is None:
            raise RuntimeError("WordTokenizer has no vocabulary yet: call fit(train_lines) first "
                               "(TextDataModule.setup() does this with the training split)")
        return self.stoi

    @property
    def vocab_size(self) -> int:
        return len(self._require_fitted())

    @property
    def unk_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    def encode_lines(self, lines: Sequence[str]) -> torch.Tensor:
        get = self._require_fitted().get
        ids: list[int] = []
        for line in lines:
            ids.extend([get(w, 0) for w in line.split()])
            ids.append(1)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        self._require_fitted()
        assert self.itos is not None
        out: list[str] = []
        line: list[str] = []
        for i in _as_int_list(ids):
            if i == self.eos_id:
                out.append(" ".join(line))
                line = []
            else:
                line.append(self.itos[i])
        if line:
            out.append(" ".join(line))
        return "\n".join(out)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size if self.stoi is not None else None,
                "min_freq": self.min_freq, "max_size": self.max_size}

    def state(self) -> dict[str, Any]:
        self._require_fitted()
        return {"type": "word", "min_freq": self.min_freq, "max_size": self.max_size, "vocab_file": "vocab.txt"}

    def save(self, directory: str | os.PathLike) -> Path:
        # One word per line, in id order: words never contain whitespace (they come from str.split()).
        state = self.state()
        atomic_write_text(Path(directory) / state["vocab_file"], "".join(w + "\n" for w in self.itos or ()))
        return super().save(directory)

    @classmethod
    def from_vocab(cls, itos: Sequence[str], min_freq: int = 1, max_size: int | None = None) -> WordTokenizer:
        """A fitted tokenizer with this vocabulary (id order); ``fit`` keeps it."""
        if list(itos[:2]) != [UNK, EOS] or len(set(itos)) != len(itos):
            raise ValueError(f"a word vocabulary starts with {UNK!r}, {EOS!r} and has no repeated entry; got "
                             f"{list(itos[:3])}... ({len(itos)} entries, {len(set(itos))} distinct)")
        tok = cls(min_freq=min_freq, max_size=max_size)
        tok.itos = list(itos)
        tok.stoi = {w: i for i, w in enumerate(tok.itos)}
        tok.loaded = True
        return tok


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes (ids 0-255); lines are joined by the newline byte, so decode(encode(text)) == text."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode_lines(self, lines: Sequence[str]) -> torch.Tensor:
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return bytes(_as_int_list(ids)).decode("utf-8", errors="replace")

    def state(self) -> dict[str, Any]:
        return {"type": "byte"}


class IdTokenizer(Tokenizer):
    """The token ids of a synthetic task (MQAR, i.i.d.) written as decimal numbers, one line per sequence.

    ``encode_lines(["3 17 5"])`` is ``[3, 17, 5]`` (no end-of-line token: synthetic examples have none);
    ``decode`` is the inverse. It lets generation and evaluation treat synthetic runs like text runs.
    """

    name = "ids"

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode_lines(self, lines: Sequence[str]) -> torch.Tensor:
        ids: list[int] = []
        for line in lines:
            for word in line.split():
                if not word.isdigit() or int(word) >= self._vocab_size:
                    raise ValueError(f"token {word!r} is not an id in [0, {self._vocab_size}) (synthetic tasks "
                                     "are written as space-separated token ids)")
                ids.append(int(word))
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return " ".join(str(i) for i in _as_int_list(ids))

    def state(self) -> dict[str, Any]:
        return {"type": "ids", "vocab_size": self._vocab_size}


class PretrainedTokenizer(Tokenizer):
    """A pretrained ``tokenizers`` tokenizer: from the hub by name (e.g. ``gpt2``) or a local tokenizer.json.

    With ``path`` set, that file is loaded and the hub is never contacted. Otherwise ``tokenizer.json`` of
    the hub repository ``name`` is fetched (or taken from the local Hugging Face cache); when offline and
    not cached, construction fails with a message saying how to fix it. Each line is encoded with its
    trailing newline, independently of the others (batched in Rust), without special tokens.
    """

    def __init__(self, name: str = "gpt2", path: str | None = None, revision: str | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.name = name
        self.revision = revision
        if path is not None:
            file = Path(_absolute(path))
            if not file.is_file():
                raise FileNotFoundError(f"tokenizer.path={path!r}: no such file ({file}); it must be a "
                                        "tokenizer.json saved by the `tokenizers` library")
            self.path: str = str(file)
        else:
            self.path = self._download(name, revision)
        self._tok = HFTokenizer.from_file(self.path)

    @staticmethod
    def _download(name: str, revision: str | None) -> str:
        from huggingface_hub import hf_hub_download

        why = hub_unavailable()
        try:
            # Cache only when the hub cannot be used: huggingface_hub reads HF_HUB_OFFLINE at import time only.
            return hf_hub_download(repo_id=name, filename="tokenizer.json", revision=revision,
                                   local_files_only=why is not None)
        except Exception as err:  # noqa: BLE001 - any failure here gets the same actionable message
            reason = f"{why} and it is not in the local cache" if why else \
                f"it could not be fetched ({type(err).__name__}: {err})"
            raise RuntimeError(
                f"pretrained tokenizer {name!r} needs the Hugging Face hub: {reason}. Either run once with the "
                f"hub reachable (it is then cached), or point at a local file: tokenizer.path=/path/to/tokenizer.json"
            ) from err

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_lines(self, lines: Sequence[str]) -> torch.Tensor:
        encodings = self._tok.encode_batch([line + "\n" for line in lines], add_special_tokens=False)
        ids = [i for enc in encodings for i in enc.ids]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "path": self.path, "revision": self.revision}

    def state(self) -> dict[str, Any]:
        return {"type": "pretrained", "name": self.name, "revision": self.revision, "source_path": self.path,
                "file": "tokenizer.json"}

    def save(self, directory: str | os.PathLike) -> Path:
        # The file itself, not only the hub name: a revision can move and the hub may be unreachable later.
        atomic_write_text(Path(directory) / "tokenizer.json", self._tok.to_str())
        return super().save(directory)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved by ``Tokenizer.save(directory)``, rebuilt exactly (never refitted, never downloaded)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    try:
        state = json.loads(config_path.read_text(encoding="utf-8"))
        kind = state["type"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config_path}: not a saved bkexp tokenizer ({type(err).__name__}: {err})") from err
    if kind == "word":
        itos = (directory / state["vocab_file"]).read_text(encoding="utf-8").splitlines()
        return WordTokenizer.from_vocab(itos, min_freq=state["min_freq"], max_size=state["max_size"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "ids":
        return IdTokenizer(int(state["vocab_size"]))
    if kind == "pretrained":
        return PretrainedTokenizer(name=state["name"], path=str((directory / state["file"]).resolve()),
                                   revision=state.get("revision"))
    raise ValueError(f"{config_path}: unknown tokenizer type {kind!r}; valid: word, byte, ids, pretrained")


def _absolute(path: str) -> str:
    """Relative paths are relative to where the user launched the command (Hydra's original cwd)."""
    from hydra.utils import to_absolute_path

    return to_absolute_path(str(path))
