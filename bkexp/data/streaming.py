"""Streaming text for pretraining-scale corpora: documents read lazily through HF ``datasets`` (``streaming=True``),
tokenised on the fly and packed into next-token chunks, so no split is ever held whole in memory.

- :class:`StreamSource`: where a split's documents come from: a hub dataset (C4, the Pile) or local
  json/jsonl/parquet/txt files, opened as a ``datasets.IterableDataset``.
- :class:`TokenChunks`: a ``torch.utils.data.IterableDataset`` that turns documents into the same chunks as
  :class:`~bkexp.data.datamodule.ChunkedStream` (inputs ``stream[iN:iN+N]``, labels shifted by one, the last chunk
  padded), with ``state_dict()`` / ``load_state_dict()``: the source position plus the tokens read but not yet
  emitted, so a resumed run continues with exactly the next chunk (torchdata's StatefulDataLoader saves it in
  every Lightning checkpoint). Dataloader workers each read their own shards of the source (HF datasets assigns
  them); DDP ranks get disjoint parts through ``datasets.distributed.split_dataset_by_node``.
- :class:`StreamingTextDataModule`: the Lightning datamodule of ``dataset=c4``, ``dataset=pile`` and ``dataset=text``
  over json/jsonl/parquet files. When ``bkexp prepare-data`` has written a token cache for a split (same source,
  split and tokenizer), that split is read from the cache instead (memory-mapped, see
  :mod:`bkexp.data.token_cache`).

Each document (row of ``text_field``) is split into lines and encoded like the lines of a text file, so streaming a
``.txt`` file gives token for token the stream of the in-memory :class:`~bkexp.data.TextDataModule` (tested).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from bkexp.data.datamodule import ChunkedStream, TokenDataModule, _positive_int
from bkexp.data.sources import SPLITS, parse_line_range, split_lines
from bkexp.data.synthetic import IGNORE_INDEX
from bkexp.data.tokenizers import Tokenizer, WordTokenizer, _absolute, hub_unavailable
from bkexp.held_out import RECORD_KEY, overlapping_pairs

log = logging.getLogger(__name__)

# file extension -> HF datasets packaged builder that streams it
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".tokens": "text"}
STREAMING_FORMATS = {"json", "parquet"}  # what dataset=text streams with streaming=auto


def file_format(path: str) -> str:
    """The HF builder for a data file, from its extension (``.jsonl.gz`` etc. are read compressed)."""
    name = Path(path).name
    for compressed in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(compressed):
            name = name[: -len(compressed)]
    suffix = Path(name).suffix
    if suffix not in FORMATS:
        raise ValueError(f"cannot stream {path!r}: unknown extension {suffix!r}; valid: {sorted(FORMATS)} "
                         "(optionally compressed: .gz, .bz2, .xz, .zst)")
    return FORMATS[suffix]


def is_document_file(name: str) -> bool:
    """json/jsonl/parquet (optionally compressed): rows with a text column, not lines of text."""
    try:
        return file_format(parse_line_range(name)[0]) in STREAMING_FORMATS
    except ValueError:
        return False


def match_files(folder: Path, patterns: str | Sequence[str], label: str) -> list[str]:
    """The files of ``folder`` that the names or globs ``patterns`` match, in order (sorted per pattern); a pattern
    that matches nothing is a FileNotFoundError naming ``label`` and the files that are there."""
    matched: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        found = sorted(glob.glob(str(folder / str(pattern))))
        if not found:
            present = sorted(p.name for p in folder.iterdir() if p.is_file())[:20] if folder.is_dir() else []
            where = f"(files there: {present})" if folder.is_dir() else "(no such folder)"
            raise FileNotFoundError(f"{label}={pattern!r} matches no file in {folder} {where}")
        matched.extend(found)
    return matched


@dataclass
class StreamSource:
    """One dataset's splits as ``datasets.IterableDataset`` streams: hub (``path``) or local files (``data_files``).

    ``open(split)`` does no I/O beyond listing the source, so it is cheap; rows are read while iterating.
    """

    dataset: str
    text_field: str
    path: str | None = None  # hub repository (None for local files)
    name: str | None = None  # hub configuration (e.g. "en" for C4)
    split_names: dict[str, str] = field(default_factory=dict)  # our split -> the hub's split name
    data_files: dict[str, list[str]] = field(default_factory=dict)  # our split -> local files
    builder: str | None = None  # json | parquet | text, for local files
    unavailable: str | None = field(default=None, repr=False)  # why the hub cannot be reached (None: it can)

    @classmethod
    def local(cls, dataset: str, data_dir: str | None, files: Mapping[str, Any] | None,
              text_field: str = "text") -> StreamSource:
        """Local files: ``files[split]`` is a name, a glob (``train-*.parquet``) or a list of them, in ``data_dir``."""
        if data_dir is None:
            raise ValueError(f"dataset {dataset!r} reads local files and needs a folder: dataset.data_dir=DIR "
                             "dataset.files.train=NAME_OR_GLOB (json/jsonl/parquet/txt)")
        folder = Path(_absolute(data_dir)).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset.data_dir={data_dir!r}: no such folder ({folder})")
        files = dict(files or {})
        missing = [s for s in SPLITS if not files.get(s)]
        unknown = sorted(set(files) - set(SPLITS))
        if missing or unknown:
            raise ValueError(f"dataset.files must name the files of every split {list(SPLITS)}; "
                             f"missing or empty: {missing}, unknown: {unknown}")
        data_files: dict[str, list[str]] = {}
        for split in SPLITS:
            patterns = [files[split]] if isinstance(files[split], str) else list(files[split])
            for pattern in patterns:
                if parse_line_range(pattern)[1:] != (None, None) and not (folder / pattern).is_file():
                    raise ValueError(f"dataset.files.{split}={pattern!r}: a line range selects lines of a plain-text "
                                     "file read in memory (dataset.streaming=false); a streamed split reads whole "
                                     "files")
            data_files[split] = match_files(folder, patterns, f"dataset.files.{split}")
        return cls.of_files(dataset, data_files, text_field)

    @classmethod
    def of_files(cls, dataset: str, data_files: Mapping[str, list[str]], text_field: str = "text") -> StreamSource:
        """Local files per split, all of one format (a ValueError names the formats found)."""
        builders = {file_format(f) for files in data_files.values() for f in files}
        if len(builders) != 1:
            raise ValueError(f"dataset {dataset!r}: all files must have one format, got {sorted(builders)} "
                             f"from {dict(data_files)}")
        return cls(dataset=dataset, text_field=text_field, data_files=dict(data_files), builder=builders.pop())

    @classmethod
    def hub(cls, dataset: str, hub: Mapping[str, Any]) -> StreamSource:
        hub = dict(hub)
        unknown = sorted(set(hub) - {"path", "name", "text_field", "splits"})
        if unknown or not hub.get("path"):
            raise ValueError(f"dataset.hub needs `path` (and optionally name, text_field, splits); got {hub}")
        splits = {s: str(n) for s, n in dict(hub.get("splits") or {s: s for s in SPLITS}).items()}
        if set(splits) != set(SPLITS):
            raise ValueError(f"dataset.hub.splits must map every split {list(SPLITS)} to a hub split, got {splits}")
        # Probed now, refused only when a split is opened: splits with a token cache train offline.
        return cls(dataset=dataset, text_field=str(hub.get("text_field") or "text"), path=str(hub["path"]),
                   name=hub.get("name"), split_names=splits, unavailable=hub_unavailable())

    def check_reachable(self, split: str) -> None:
        """A RuntimeError saying what to do when ``split`` would stream from a hub that cannot be reached."""
        if self.path is not None and self.unavailable is not None:
            raise RuntimeError(f"dataset {self.dataset!r} streams {self.path} from the Hugging Face hub, but "
                               f"{self.unavailable}, and its {split} split has no token cache to read instead. "
                               "To stream local files instead: dataset=text dataset.data_dir=DIR "
                               "dataset.files.train=GLOB dataset.files.validation=GLOB dataset.files.test=GLOB "
                               "(json/jsonl/parquet with a text column); or write token caches with `bkexp "
                               "prepare-data` where the hub is reachable, which later runs read offline")

    def open(self, split: str) -> Any:
        """The split as a ``datasets.IterableDataset`` of rows."""
        import datasets

        self.check_reachable(split)

        if self.path is not None:
            return datasets.load_dataset(self.path, self.name, split=self.split_names[split], streaming=True)
        return datasets.load_dataset(self.builder, data_files={split: self.data_files[split]}, split=split,
                                     streaming=True)

    def shares_data(self, a: str, b: str) -> bool:
        """Whether splits ``a`` and ``b`` read the same hub split or share a local file."""
        if self.path is not None:
            return self.split_names[a] == self.split_names[b]
        return bool(set(self.data_files[a]) & set(self.data_files[b]))

    def describe(self) -> dict[str, Any]:
        if self.path is not None:
            return {"kind": "hub-stream", "path": self.path, "name": self.name, "text_field": self.text_field,
                    "splits": dict(self.split_names)}
        return {"kind": "local-stream", "format": self.builder, "text_field": self.text_field,
                "files": {s: list(f) for s, f in self.data_files.items()}}


def document_lines(row: Mapping[str, Any], text_field: str) -> list[str]:
    """A row's text as lines (an empty document is one blank line, as in :class:`~bkexp.data.HubTextSource`)."""
    try:
        text = row[text_field]
    except KeyError:
        raise KeyError(f"rows have no text column {text_field!r} (columns: {sorted(row)}); "
                       "set dataset.text_field=NAME") from None
    if not isinstance(text, str):
        raise TypeError(f"column {text_field!r} must hold strings, got {type(text).__name__}")
    return split_lines(text) or [""]


class TokenChunks(IterableDataset):
    """Documents of an HF ``IterableDataset`` -> tokens -> next-token chunks of ``seq_len``, resumable.

    Tokens of consecutive documents are concatenated; chunk k holds inputs ``stream[kN : kN+N]`` and labels
    ``stream[kN+1 : kN+N+1]`` (the last input token of a chunk is the first of the next). At the end of the
    source the remaining tokens form a last chunk padded with ``input_pad_id`` / ``IGNORE_INDEX``, so every token
    but the first is a label exactly once. ``max_chunks`` stops early (a fixed evaluation slice).

    ``state_dict()`` holds the source's own state (HF datasets) after the last document read, the tokens read but
    not yet emitted, and the chunk count, which is all it takes to continue with exactly the next chunk.
    """

    def __init__(self, source: Any, tokenizer: Tokenizer, seq_len: int, text_field: str = "text",
                 input_pad_id: int = 0, max_chunks: int | None = None, docs_per_batch: int = 64) -> None:
        super().__init__()
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.text_field = text_field
        self.input_pad_id = input_pad_id
        self.max_chunks = max_chunks
        self.docs_per_batch = docs_per_batch
        self._pending: torch.Tensor = torch.empty(0, dtype=torch.long)
        self._emitted = 0
        self._epoch = 0
        self._resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "pending": self._pending.clone(), "emitted": self._emitted,
                "epoch": self._epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def _chunk(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(tokens) - 1
        input_ids = torch.full((self.seq_len,), self.input_pad_id, dtype=torch.long)
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:n] = tokens[:n]
        labels[:n] = tokens[1:]
        return {"input_ids": input_ids, "labels": labels}

    def _documents(self) -> Iterator[list[list[str]]]:
        batch: list[list[str]] = []
        for row in self.source:
            batch.append(document_lines(row, self.text_field))
            if len(batch) == self.docs_per_batch:
                yield batch
                batch = []
        if batch:
            yield batch

    def _full(self) -> bool:
        return self.max_chunks is not None and self._emitted >= self.max_chunks

    def _drain(self, final: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Emit the chunks the pending tokens complete (at the end of the source, also the last partial one)."""
        while not self._full() and (len(self._pending) > self.seq_len or (final and len(self._pending) > 1)):
            cut = min(self.seq_len, len(self._pending) - 1)
            chunk, self._pending = self._pending[: cut + 1], self._pending[cut:]
            self._emitted += 1
            yield self._chunk(chunk)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._resume is not None:
            state, self._resume = self._resume, None
            self.source.load_state_dict(state["source"])
            self._pending, self._emitted, self._epoch = state["pending"].clone(), state["emitted"], state["epoch"]
        else:
            self._pending, self._emitted = torch.empty(0, dtype=torch.long), 0
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self._epoch)  # a new shuffle order (when shuffled) every pass
        yield from self._drain(final=False)  # tokens restored from a checkpoint come first
        for docs in self._documents():
            if self._full():
                return
            self._pending = torch.cat([self._pending, *(self.tokenizer.encode_lines(lines) for lines in docs)])
            yield from self._drain(final=False)
        yield from self._drain(final=True)
        self._pending, self._emitted = torch.empty(0, dtype=torch.long), 0
        self._epoch += 1


def require_fixed_vocabulary(tokenizer: Tokenizer, dataset: str) -> None:
    """Streaming cannot fit a word vocabulary (that needs the whole training split first)."""
    if isinstance(tokenizer, WordTokenizer):
        raise ValueError(f"dataset {dataset!r} streams its documents, so the tokenizer needs a fixed vocabulary: "
                         "tokenizer=byte or tokenizer=gpt2 (tokenizer=word fits its vocabulary on the whole "
                         "training split, which streaming never holds)")


def chunk_sources(files: Mapping[str, Any] | None, streaming: bool | str) -> bool:
    """Whether ``dataset=text`` streams: ``streaming`` true/false, or ``auto`` = the files are json/jsonl/parquet."""
    if isinstance(streaming, bool):
        return streaming
    if streaming != "auto":
        raise ValueError(f"dataset.streaming must be true, false or auto, got {streaming!r}")
    names: Sequence[str] = [parse_line_range(f)[0] for v in dict(files or {}).values()
                            for f in ([v] if isinstance(v, str) else list(v))]
    formats = {file_format(f) for f in names}
    return bool(formats & STREAMING_FORMATS)


class StreamingTextDataModule(TokenDataModule):
    """Language modelling on streamed documents (``dataset=c4``, ``dataset=pile``, ``dataset=text`` over json/parquet).

    Every split is a :class:`TokenChunks` stream unless ``token_cache`` holds a finished cache of that split for the
    same source and tokenizer (``bkexp prepare-data``), which is then read memory-mapped as a map-style dataset.
    Training streams are shuffled with a buffer of ``shuffle_buffer`` documents (0: source order, and resume is
    exact; HF datasets refills the buffer on resume otherwise) and split across DDP ranks; validation and test read
    their first ``eval_chunks`` chunks (null: the whole split) on every rank, so every model is evaluated on the
    same tokens.

    Args:
        hub: ``{path, name, text_field, splits}`` for ``datasets.load_dataset(path, name, streaming=True)``.
        data_dir, files: local files instead: per split a name, a glob or a list (json/jsonl/parquet/txt).
        text_field: the column holding each document's text.
    """

    def __init__(self, name: str, seq_len: int, batch_size: int, tokenizer: Tokenizer,
                 eval_batch_size: int | None = None, hub: Mapping[str, Any] | None = None,
                 data_dir: str | None = None, files: Mapping[str, Any] | None = None, text_field: str = "text",
                 eval_chunks: int | None = None, shuffle_buffer: int = 0, token_cache: str | None = None,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = False, docs_per_batch: int = 64) -> None:
        super().__init__(name, seq_len, batch_size, eval_batch_size, num_workers, seed, drop_last)
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a bkexp.data Tokenizer (conf/tokenizer: byte, gpt2), "
                            f"got {type(tokenizer).__name__}")
        require_fixed_vocabulary(tokenizer, name)
        if eval_chunks is not None and (isinstance(eval_chunks, bool) or not isinstance(eval_chunks, int)
                                        or eval_chunks < 1):
            raise ValueError(f"dataset.eval_chunks must be null (whole split) or a positive integer, got {eval_chunks!r}")
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"dataset.shuffle_buffer must be an integer >= 0, got {shuffle_buffer!r}")
        self.tokenizer = tokenizer
        self.text_field = text_field
        self.eval_chunks = eval_chunks
        self.shuffle_buffer = shuffle_buffer
        self.docs_per_batch = _positive_int("docs_per_batch", docs_per_batch)
        self.token_cache = str(Path(_absolute(token_cache))) if token_cache else None
        if data_dir is not None or hub is None:
            self.source = StreamSource.local(name, data_dir, files, text_field)
        else:
            self.source = StreamSource.hub(name, {**dict(hub), "text_field": hub.get("text_field", text_field)})
        self.reading: dict[str, str] = {}

    def cache_dir(self, split: str) -> Path | None:
        from bkexp.data.token_cache import cache_dir

        if self.token_cache is None:
            return None
        return cache_dir(self.token_cache, self.name, split, self.source.describe(), self.tokenizer)

    def open_split(self, split: str) -> Any:
        """The split's HF IterableDataset as this rank and run read it (shuffled and split for training)."""
        stream = self.source.open(split)
        if split == "train":
            if self.shuffle_buffer:
                stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                from datasets.distributed import split_dataset_by_node

                stream = split_dataset_by_node(stream, rank=torch.distributed.get_rank(),
                                               world_size=torch.distributed.get_world_size())
        return stream

    def setup(self, stage: str | None = None) -> None:
        from bkexp.data.token_cache import ShardedTokens, read_meta

        if self.datasets:
            return
        for split in SPLITS:
            cached = self.cache_dir(split)
            if cached is not None and read_meta(cached) is not None:
                tokens = ShardedTokens(cached)
                if len(tokens) < 2:
                    raise ValueError(f"token cache {cached} holds {len(tokens)} token(s); at least 2 are needed")
                if not tokens.meta["exhausted"]:
                    log.warning("token cache %s holds the first %d tokens of split %r only (prepare-data "
                                "max_tokens=%s)", cached, len(tokens), split, tokens.meta["max_tokens"])
                if split != "train" and self.eval_chunks is not None:  # the tokens a streamed split evaluates
                    tokens = tokens[0: min(len(tokens), self.eval_chunks * self.seq_len + 1)]
                self.datasets[split] = ChunkedStream(tokens, self.seq_len, self.input_pad_id)
                self.reading[split] = f"cache:{cached}"
            else:
                self.datasets[split] = TokenChunks(
                    self.open_split(split), self.tokenizer, self.seq_len, self.text_field, self.input_pad_id,
                    max_chunks=None if split == "train" else self.eval_chunks, docs_per_batch=self.docs_per_batch)
                self.reading[split] = "stream"
        log.info("dataset %s: %s", self.name, self.reading)

    def _loader(self, split: str, batch_size: int, train: bool) -> Any:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: split {split!r} is not set up; call setup() first")
        if not isinstance(self.datasets[split], TokenChunks):
            return super()._loader(split, batch_size, train)
        from torchdata.stateful_dataloader import StatefulDataLoader

        # no sampler or shuffle: the stream has its own order (and shuffle buffer); its state is the position
        return StatefulDataLoader(self.datasets[split], batch_size=batch_size, num_workers=self.num_workers,
                                  drop_last=self.drop_last if train else False,
                                  persistent_workers=self.num_workers > 0)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def overlapping_splits(self) -> list[list[str]]:
        """Pairs of splits that read the same source data (a token cache is keyed by its source)."""
        return overlapping_pairs(SPLITS, self.source.shares_data)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source.describe(), "tokenizer": self.tokenizer.describe(),
                "vocab_size": self.vocab_size, "seq_len": self.seq_len, "streaming": True,
                "reading": dict(self.reading), "eval_chunks": self.eval_chunks,
                "shuffle_buffer": self.shuffle_buffer, "splits": self._split_counts(),
                RECORD_KEY: self.overlapping_splits()}


def text_datamodule(streaming: bool | str = "auto", **kwargs: Any) -> TokenDataModule:
    """``dataset=text``: plain-text files in memory (:class:`TextDataModule`), or streamed (json/jsonl/parquet)."""
    from bkexp.data.datamodule import TextDataModule

    if chunk_sources(kwargs.get("files"), streaming):
        return StreamingTextDataModule(**kwargs)
    for key in ("text_field", "eval_chunks", "shuffle_buffer", "token_cache", "docs_per_batch"):
        kwargs.pop(key, None)  # streaming-only settings of conf/dataset/text.yaml
    return TextDataModule(**kwargs)
