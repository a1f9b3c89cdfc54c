"""Token caches: a split tokenised once into memory-mapped token files that later runs and sweeps reuse.

``bkexp prepare-data dataset=c4 tokenizer=gpt2`` streams each split through its tokenizer (the same document ->
lines -> tokens path as :class:`~bkexp.data.streaming.TokenChunks`) and writes::

    <token_cache>/<dataset>-<split>-<tokenizer>-<key>/
        shard-00000.bin ...   raw little-endian uint16 tokens (uint32 when the vocabulary exceeds 65,536)
        progress.json         shards committed so far and the source position after them (resume point)
        meta.json             written last, when the split is done: shards, token count, source, tokenizer

The key hashes the source (hub path/config/split, or local files with their sizes and modification times), the
split and the tokenizer (its settings and a hash of its tokenizer.json), so a cache is found again exactly when
the same tokens would come out. Why plain token files rather than litdata's optimized chunks: the cache is then a
map-style dataset (:class:`ShardedTokens` under :class:`~bkexp.data.datamodule.ChunkedStream`) that Lightning's
DistributedSampler splits across ranks and nodes and the run's stateful loader resumes like every other
dataset, with no second loader stack and no new dependency; numpy reads the files anywhere (the nanoGPT /
Megatron ``.bin`` convention), and the OS page cache, not the process, holds what is read.

Writing is resumable mid-stream: a shard is committed (written atomically, then ``progress.json``) at a document
boundary with the source's own state (HF datasets ``state_dict``); an interrupted ``prepare-data`` restarts from
the last committed shard and produces the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bkexp.data.tokenizers import Tokenizer
from bkexp.utils import atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MB per uint16 shard


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer's settings without machine-specific paths, plus a hash of its vocabulary file if it has one."""
    info = {k: v for k, v in tokenizer.describe().items() if k != "path"}
    path = getattr(tokenizer, "path", None)
    if path and Path(path).is_file():
        info["file_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return info


def source_fingerprint(source: Mapping[str, Any], split: str) -> dict[str, Any]:
    """The source as described, with local files' sizes and mtimes (a changed file gives a new key)."""
    info = {k: v for k, v in source.items() if k != "files"}
    files = dict(source.get("files") or {})
    if files:
        info["files"] = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files[split]]
    return info


def cache_dir(root: str | Path, dataset: str, split: str, source: Mapping[str, Any], tokenizer: Tokenizer) -> Path:
    """Where the cache of (source, split, tokenizer) lives under ``root``."""
    identity = {"version": CACHE_VERSION, "split": split, "source": source_fingerprint(source, split),
                "tokenizer": tokenizer_fingerprint(tokenizer)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(root) / f"{dataset}-{split}-{tokenizer.name}-{key}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardedTokens:
    """The shards of a finished cache as one read-only 1-D token sequence (memory-mapped, sliced lazily).

    ``tokens[a:b]`` returns an int64 tensor, reading only the pages of the shards it spans; ``len(tokens)`` is the
    total count. It stands in for the in-memory stream of :class:`~bkexp.data.datamodule.ChunkedStream`.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        if self.meta is None:
            raise FileNotFoundError(f"{self.directory} is not a finished token cache (no meta.json); run "
                                    "`bkexp prepare-data` for it again to finish it")
        dtype = np.dtype(self.meta["dtype"])
        self._shards = [np.memmap(self.directory / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                        for s in self.meta["shards"]]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def dim(self) -> int:
        return 1

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        parts = []
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            lo = start - self._starts[shard]
            hi = min(stop, self._starts[shard + 1]) - self._starts[shard]
            parts.append(np.asarray(self._shards[shard][lo:hi], dtype=np.int64))
            start += hi - lo
            shard += 1
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.long)


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_cache(directory: str | Path, documents: Any, tokenizer: Tokenizer, text_field: str,
                describe: Mapping[str, Any], shard_tokens: int = DEFAULT_SHARD_TOKENS,
                max_tokens: int | None = None, docs_per_batch: int = 256) -> dict[str, Any]:
    """Tokenise the HF ``IterableDataset`` ``documents`` into ``directory``; resume from its progress.json if any.

    Returns the meta.json content. ``max_tokens`` stops after the first shard boundary at or past that many tokens
    (the cache then records ``exhausted: false``); running again with a larger value continues from there.
    """
    from bkexp.data.streaming import document_lines

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    progress_path = directory / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else None
    if progress is not None and not progress["exhausted"]:
        documents.load_state_dict(progress["source_state"])
        log.info("resuming %s after %d shard(s), %d tokens", directory.name, len(progress["shards"]),
                 progress["num_tokens"])
    elif progress is None:
        progress = {"version": CACHE_VERSION, "dtype": dtype.name, "shards": [], "num_tokens": 0, "documents": 0,
                    "exhausted": False, "source_state": None}
    if max_tokens is not None and progress["num_tokens"] >= max_tokens or progress["exhausted"]:
        return _finish(directory, progress, describe, max_tokens)

    started, written = time.perf_counter(), 0
    buffer: list[torch.Tensor] = []
    buffered = docs_in_buffer = 0

    def commit() -> None:
        nonlocal buffer, buffered, docs_in_buffer, written
        index = len(progress["shards"])
        name = f"shard-{index:05d}.bin"
        data = torch.cat(buffer).numpy()
        if data.size and int(data.max()) > np.iinfo(dtype).max:
            raise ValueError(f"token id {int(data.max())} does not fit {dtype.name}")
        tmp = directory / f".{name}.tmp"
        data.astype(dtype).tofile(tmp)
        os.replace(tmp, directory / name)
        progress["shards"].append({"file": name, "tokens": int(data.size)})
        progress["num_tokens"] += int(data.size)
        progress["documents"] += docs_in_buffer
        progress["source_state"] = documents.state_dict()
        atomic_write_text(progress_path, json.dumps(progress) + "\n")
        written += int(data.size)
        buffer, buffered, docs_in_buffer = [], 0, 0

    batch: list[list[str]] = []
    for row in documents:
        batch.append(document_lines(row, text_field))
        if len(batch) < docs_per_batch:
            continue
        for lines in batch:
            buffer.append(tokenizer.encode_lines(lines))
            buffered += len(buffer[-1])
        docs_in_buffer += len(batch)
        batch = []
        if buffered >= shard_tokens:
            commit()
            if max_tokens is not None and progress["num_tokens"] >= max_tokens:
                break
    else:
        for lines in batch:
            buffer.append(tokenizer.encode_lines(lines))
            buffered += len(buffer[-1])
        docs_in_buffer += len(batch)
        if buffered:
            commit()
        progress["exhausted"] = True
        atomic_write_text(progress_path, json.dumps(progress) + "\n")
    seconds = time.perf_counter() - started
    log.info("%s: %d tokens in %.1f s (%.0f tokens/s)", directory.name, written, seconds,
             written / max(seconds, 1e-9))
    return _finish(directory, progress, describe, max_tokens)


def _finish(directory: Path, progress: dict[str, Any], describe: Mapping[str, Any],
            max_tokens: int | None) -> dict[str, Any]:
    meta = {"version": CACHE_VERSION, "dtype": progress["dtype"], "shards": progress["shards"],
            "num_tokens": progress["num_tokens"], "documents": progress["documents"],
            "exhausted": progress["exhausted"], "max_tokens": max_tokens, **dict(describe)}
    atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta
