"""The text corpora ``bkexp eval --datasets`` scores a run on, read and tokenised with the run's own tokenizer.

``--datasets`` is a comma-separated list of:

* ``run``: the run's own dataset, exactly as configured for training (its ``--split``);
* ``NAME``: a text dataset config of ``conf/dataset`` (``wikitext2``, ``wikitext103``, ``ptb``, ...): from the
  hub when its config has one, or, when ``NAME`` is the dataset the run trained on, from the run's own
  ``data_dir``;
* ``NAME:DIR``: that config's split file (e.g. ``wiki.test.tokens``) inside the local folder ``DIR``;
* ``text:PATH``: a plain UTF-8 file, or a folder holding ``test.txt`` (``valid.txt`` / ``train.txt`` for the
  other splits); a json/jsonl/parquet file is read as documents (its ``text`` column).

Local json/jsonl/parquet files (a streamed run's splits, globs included) are read as a streamed split reads them:
each row's text column, split into lines; never as raw text, whose JSON markup would be scored instead. A dataset
that trains streamed from the hub (``dataset=c4``, ``pile``) is streamed here too, never downloaded whole, and
read only as far as its ``eval_chunks`` (the first ``eval_chunks x seq_len + 1`` tokens that the run's own
validation and test scored); the same cap applies to a streamed run's local files.

The tokenizer is never refitted: a word-level vocabulary stays the training split's, and words outside it
become ``<unk>``, whose share is reported (a word-level model scored on another corpus looks better than
it is when many words collapse into one cheap ``<unk>``). Bits per byte divide the summed loss (in bits) by
the UTF-8 bytes of the corpus text (its lines joined by newlines), so models with different tokenizers are
comparable; the first token of a corpus has no context and is not scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bkexp.data.sources import SPLITS, HubTextSource, LocalTextSource, parse_line_range, split_lines
from bkexp.data.streaming import StreamSource, chunk_sources, document_lines, is_document_file, match_files

TEXT_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}


class CorpusError(ValueError):
    """A ``--datasets`` entry that cannot be honoured; the message names it and the valid choices."""


def conf_dir() -> Path:
    """The repository's ``conf/`` (bkexp is installed from a checkout: ``pip install -e .``)."""
    import bkexp

    path = Path(bkexp.__file__).resolve().parents[1] / "conf"
    if not (path / "dataset").is_dir():
        raise CorpusError(f"cannot find the config tree (expected {path}/dataset); run bkexp from a checkout "
                          "installed with `pip install -e .`, or use text:PATH")
    return path


def dataset_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted((conf_dir() / "dataset").glob("*.yaml"))}


@dataclass
class Corpus:
    """One text to score: its name, where it came from, and its lines."""

    name: str
    source: dict[str, Any]
    lines: list[str]
    file: str | None = None  # a local corpus: its absolute file, with the line range it reads (valid.txt[90%:])
    documents: list[str] | None = None  # a local corpus of json/jsonl/parquet files: those files (read whole)
    hub_split: str | None = None  # a hub corpus: the hub split it reads
    rows: Iterator[list[str]] | None = None  # a streamed corpus: each document's lines, read by :func:`encode`
    max_tokens: int | None = None  # a streamed corpus is read up to this many tokens (its eval_chunks)
    tokens: torch.Tensor | None = None  # a corpus read from a token cache: its tokens (there is no text)
    shares: list[str] | None = None  # a cached run split: the run's splits it shares data with, known from the run

    @property
    def num_bytes(self) -> int:
        return sum(len(line.encode("utf-8")) + 1 for line in self.lines)


def _read_file(path: Path, name: str) -> list[str]:
    if not path.is_file():
        folder = path.parent
        present = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        where = f"(files there: {present})" if folder.is_dir() else f"(no folder {folder})"
        raise CorpusError(f"--datasets {name}: no such file {path} {where}")
    lines = split_lines(path.read_text(encoding="utf-8"))
    if sum(len(line.split()) for line in lines) == 0 and not any(lines):
        raise CorpusError(f"--datasets {name}: {path} is empty")
    return lines


def _text_dataset_config(name: str, cfg: DictConfig) -> dict[str, Any]:
    """The dataset config for NAME: the run's own when it trained on NAME, else conf/dataset/NAME.yaml."""
    if cfg.get("dataset") is not None and cfg.dataset.get("name") == name:
        return OmegaConf.to_container(cfg.dataset, resolve=False)
    configs = dataset_configs()
    if name not in configs:
        raise CorpusError(f"--datasets: unknown dataset {name!r}; valid: run, text:PATH, "
                          f"{', '.join(configs)} (NAME or NAME:DIR)")
    return OmegaConf.to_container(OmegaConf.load(configs[name]), resolve=False)


def _require_text(name: str, config: dict[str, Any]) -> None:
    if "tokenizer" not in config:  # text datamodules read the top-level tokenizer; synthetic tasks have none
        raise CorpusError(f"--datasets {name}: {config.get('_target_')} is not a text dataset (synthetic tasks "
                          "generate their own tokens, there is no text to score with a tokenizer); valid: run, "
                          f"text:PATH, {', '.join(n for n, p in dataset_configs().items() if _is_text(p))}")


def _is_text(path: Path) -> bool:
    return "tokenizer" in OmegaConf.load(path)


def load_corpus(item: str, cfg: DictConfig, split: str = "test") -> Corpus:
    """One ``--datasets`` entry (see the module docstring) read as lines; raises CorpusError with the fix."""
    if split not in SPLITS:
        raise CorpusError(f"--split {split!r}; valid: {', '.join(SPLITS)}")
    name, _, path = item.partition(":")
    name = name.strip()
    if name == "text":
        if not path:
            raise CorpusError("--datasets text needs a path: text:FILE or text:DIR (with test.txt)")
        target = Path(path).expanduser()
        file = target / TEXT_FILES[split] if target.is_dir() else target
        if is_document_file(file.name):
            return _documents(item, {"kind": "local"}, [str(file)], "text", split)
        return Corpus(item, {"kind": "local", "path": str(file.resolve())}, _read_file(file, item),
                      file=str(file.resolve()))
    if name == "run":
        if cfg.get("dataset") is None:
            raise CorpusError("--datasets run: this model folder records no training dataset (it was exported "
                              "before bkexp recorded one); name a corpus: NAME, NAME:DIR or text:PATH "
                              f"(NAME: {', '.join(n for n, p in dataset_configs().items() if _is_text(p))})")
        name = str(cfg.dataset.get("name"))
        config = OmegaConf.to_container(cfg.dataset, resolve=True)
        _require_text(f"run ({name})", config)
        label = "run"
    else:
        config = _text_dataset_config(name, cfg)
        _require_text(name, config)
        label = item
    files = config.get("files") or {}
    data_dir = path or config.get("data_dir")
    if isinstance(data_dir, str) and "${" in data_dir:  # the run's own config: resolve its interpolations
        data_dir = OmegaConf.to_container(cfg.dataset, resolve=True).get("data_dir")
    cap = _token_cap(config, cfg) if _streams(config) else None
    fix = " (a copy elsewhere: --override dataset.data_dir=DIR)" if item == "run" else ""  # for a missing file
    if data_dir and _documents_split(files.get(split)):  # json/jsonl/parquet files, names or globs
        folder = Path(data_dir).expanduser().resolve()
        try:
            matched = match_files(folder, files[split], f"--datasets {label}: dataset.files.{split}")
        except FileNotFoundError as err:
            raise CorpusError(f"{err}{fix}") from None
        return _documents(label, {"kind": "local", "dataset": name, "file": files[split]}, matched,
                          str(config.get("text_field") or "text"), split, cap)
    if data_dir:  # the split's file, or its line range (valid.txt[90%:]), as the run's datamodule reads it
        source = LocalTextSource(str(Path(data_dir).expanduser().resolve()), {split: str(files.get(split))})
        try:
            file = source.path(split)
            _read_file(file, label)  # a missing or empty file, named
            lines = source.load(split)
        except CorpusError as err:
            raise CorpusError(f"{err}{fix}") from None
        except ValueError as err:
            raise CorpusError(f"--datasets {label}: {err}") from None
        return Corpus(label, {"kind": "local", "dataset": name, "path": str(file), "file": files.get(split),
                              "max_tokens": cap}, lines,
                      file=str(Path(source.data_dir) / source.files[split]), max_tokens=cap)
    hub = config.get("hub")
    if not hub:
        raise CorpusError(f"--datasets {label}: dataset {name!r} has no hub source; give its folder: {name}:DIR "
                          f"(holding {files.get(split)})")
    if _streams(config):  # a pretraining-scale hub dataset: streamed, never downloaded whole
        try:
            source = StreamSource.hub(name, {**dict(hub), "text_field": hub.get("text_field")
                                             or config.get("text_field") or "text"})
            source.check_reachable(split)
        except (RuntimeError, ValueError) as err:
            raise CorpusError(f"--datasets {label}: {err}") from None
        hub_split = source.split_names[split]
        return Corpus(label, {**source.describe(), "split": hub_split, "max_tokens": cap}, [],
                      hub_split=_hub_split(source.path, source.name, hub_split), max_tokens=cap,
                      rows=_document_rows(source, split))
    try:
        source = HubTextSource.build(name, hub, files)
        lines = source.load(split)
    except RuntimeError as err:
        raise CorpusError(f"--datasets {label}: {err} (with this command: {name}:DIR)") from err
    return Corpus(label, source.describe(), lines, hub_split=_hub_split(source.path, source.name,
                                                                        source.split_names[split]))


def cached_corpus(directory: str, cfg: DictConfig, split: str, shares: list[str]) -> Corpus | None:
    """The run's own ``split`` from the token cache its training read (``bkexp prepare-data``), as far as the run
    evaluated it; None when the cache is gone or unfinished (the split is then read from its source). ``shares``:
    the run's splits with the same data, from the run's record (a cache holds no file names to compare)."""
    from bkexp.data.token_cache import ShardedTokens, read_meta

    if read_meta(Path(directory)) is None:
        return None
    tokens = ShardedTokens(directory)
    cap = _token_cap(OmegaConf.to_container(cfg.dataset, resolve=True), cfg)
    stream = tokens[0: len(tokens) if cap is None else min(cap, len(tokens))]
    return Corpus("run", {"kind": "token-cache", "path": directory, "split": split, "max_tokens": cap}, [],
                  tokens=stream, shares=shares)


def _documents_split(patterns: Any) -> bool:
    return any(is_document_file(str(p)) for p in ([patterns] if isinstance(patterns, str) else patterns or []))


def _documents(label: str, source: dict[str, Any], files: list[str], text_field: str, split: str,
               cap: int | None = None) -> Corpus:
    """A corpus of json/jsonl/parquet files: the rows' ``text_field``, as a streamed split reads them (up to
    ``cap`` tokens)."""
    resolved = [str(Path(f).resolve()) for f in files]
    for file in resolved:
        if not Path(file).is_file():
            raise CorpusError(f"--datasets {label}: no such file {file}")
    try:
        stream = StreamSource.of_files(label, {split: resolved}, text_field)
    except ValueError as err:
        raise CorpusError(f"--datasets {label}: {err}") from None
    return Corpus(label, {**source, "files": resolved, "text_field": text_field, "max_tokens": cap}, [],
                  documents=resolved, rows=_document_rows(stream, split), max_tokens=cap)


def _document_rows(source: StreamSource, split: str) -> Iterator[list[str]]:
    """Each document of a streamed split as its lines (read lazily: a hub split is never loaded whole)."""
    for row in source.open(split):
        yield document_lines(row, source.text_field)


def _streams(config: dict[str, Any]) -> bool:
    """Whether the dataset config trains streamed (its datamodule reads documents, not lines held in memory)."""
    target = str(config.get("_target_") or "")
    if target.endswith("StreamingTextDataModule"):
        return True
    if target.endswith("text_datamodule"):
        try:
            return chunk_sources(config.get("files"), config.get("streaming", "auto"))
        except ValueError:
            return False
    return False


def loads_hub_dataset(cfg: DictConfig) -> bool:
    """Whether building the datamodule of ``cfg.dataset`` loads a hub dataset whole (a text dataset without a local
    ``data_dir`` that is not streamed: HF datasets downloads every split into its cache)."""
    dataset = cfg.get("dataset")
    if dataset is None:
        return False
    config = OmegaConf.to_container(dataset, resolve=True)
    return "hub" in config and not config.get("data_dir") and not _streams(config)


def _token_cap(config: dict[str, Any], cfg: DictConfig) -> int | None:
    """The tokens a streamed dataset's validation and test read: ``eval_chunks`` chunks of the run's seq_len, plus the
    last label (None: the whole split)."""
    chunks, seq_len = config.get("eval_chunks"), cfg.get("seq_len")
    if isinstance(chunks, int) and not isinstance(chunks, bool) and isinstance(seq_len, int):
        return chunks * seq_len + 1
    return None


def _hub_split(path: str | None, name: str | None, split: str) -> str:
    """One key for a hub dataset's split, so a corpus and a run's split compare equal when they read the same."""
    return f"{path}/{name}/{split}"


def run_splits_in(corpus: Corpus, cfg: DictConfig) -> list[str]:
    """The run's training and validation splits whose data ``corpus`` shares: the same hub split, or overlapping
    lines of one file. A perplexity on such a corpus is not held out (:mod:`bkexp.held_out`)."""
    if corpus.shares is not None:
        return list(corpus.shares)
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True) if cfg.get("dataset") is not None else {}
    files = dataset.get("files") or {}
    shared = []
    for split in ("train", "validation"):
        if dataset.get("data_dir") and not files.get(split):
            continue
        if dataset.get("data_dir") and (corpus.documents is not None or _documents_split(files[split])):
            # whole files on one side at least (documents, globs): shared when a file is read by both
            try:
                run_files = match_files(Path(dataset["data_dir"]).expanduser().resolve(), files[split], split)
            except FileNotFoundError:
                continue
            corpus_files = corpus.documents or ([parse_line_range(corpus.file)[0]] if corpus.file else [])
            if {str(Path(f).resolve()) for f in run_files} & {str(Path(f).resolve()) for f in corpus_files}:
                shared.append(split)
        elif dataset.get("data_dir") and corpus.file is not None:
            run_file = str(Path(dataset["data_dir"]).expanduser().resolve() / str(files[split]))
            # one source over both absolute files: shares_data compares resolved paths and line ranges
            if LocalTextSource("/", {"corpus": corpus.file, split: run_file}).shares_data("corpus", split):
                shared.append(split)
        elif not dataset.get("data_dir") and dataset.get("hub") and corpus.hub_split is not None:
            hub = dataset["hub"]
            name = (hub.get("splits") or {}).get(split, split)
            if corpus.hub_split == _hub_split(hub.get("path"), hub.get("name"), name):
                shared.append(split)
    return shared


def parse_datasets(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CorpusError("--datasets is empty; e.g. --datasets run,text:/path/to/file.txt")
    if len(set(items)) != len(items):
        raise CorpusError(f"--datasets lists an entry twice: {items}")
    return items


def check_pairing(tokenizer: Any, model_vocab: int, run_dataset: str | None) -> None:
    """Refuse to score text with a run that has no text tokenizer, or whose tokenizer the model cannot read."""
    if tokenizer is None:
        raise CorpusError(f"the run trained on {run_dataset!r}, a synthetic task without a text tokenizer: its "
                          "model cannot read text, so --datasets cannot be scored (only --lengths on its own data)")
    if tokenizer.vocab_size != model_vocab:
        raise CorpusError(f"the run's tokenizer has {tokenizer.vocab_size} ids but its model reads {model_vocab}: "
                          "this tokenizer is not the one the model was trained with")


DOCS_PER_BATCH = 64  # streamed documents tokenised together


def encode(corpus: Corpus, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The corpus as one token stream, and its token statistics (tokens, bytes, <unk> share for word vocabularies).

    A streamed corpus is read here, document by document, until ``max_tokens``; its stream is then cut there, and
    its bytes are those of the scored tokens' text (decoded), since the cut falls inside a document; so are a
    cached corpus's, which has no text."""
    if corpus.tokens is not None:
        stream = corpus.tokens
    elif corpus.rows is not None:
        stream = _read_rows(corpus, tokenizer)
    else:
        stream = tokenizer.encode_lines(corpus.lines)
    cut = corpus.max_tokens is not None and stream.numel() > corpus.max_tokens
    if cut:
        stream = stream[: corpus.max_tokens]
    # a stream cut inside a document, or read from a cache (no text): the bytes of its tokens' text
    cut_or_cached = cut or corpus.tokens is not None
    num_bytes = len(tokenizer.decode(stream.tolist()).encode("utf-8")) if cut_or_cached else corpus.num_bytes
    if stream.numel() < 2:
        raise CorpusError(f"--datasets {corpus.name}: {stream.numel()} token(s), at least 2 are needed")
    stats: dict[str, Any] = {"tokens": int(stream.numel()), "bytes": num_bytes}
    unk_id = getattr(tokenizer, "unk_id", None)
    if unk_id is not None:
        unk = int((stream == unk_id).sum())
        stats["unk_share"] = unk / stream.numel()
        stoi = getattr(tokenizer, "stoi", None)
        if stoi is not None:  # words the vocabulary lacks, as opposed to a literal <unk> already in the text
            words = [w for line in corpus.lines for w in line.split()]
            stats["oov_share"] = sum(w not in stoi for w in words) / stream.numel()
    return stream, stats


def _read_rows(corpus: Corpus, tokenizer: Any) -> torch.Tensor:
    """Tokens of a streamed corpus's documents, in batches, until ``max_tokens``; keeps the lines read."""
    parts: list[torch.Tensor] = []
    count, docs, batch = 0, 0, []
    rows, corpus.rows = corpus.rows, None
    try:
        for doc in rows:
            batch.extend(doc)
            corpus.lines.extend(doc)
            docs += 1
            if docs % DOCS_PER_BATCH == 0:
                parts.append(tokenizer.encode_lines(batch))
                count += parts[-1].numel()
                batch = []
                if corpus.max_tokens is not None and count >= corpus.max_tokens:
                    break
    except (KeyError, TypeError) as err:  # rows without the text column, or not text
        raise CorpusError(f"--datasets {corpus.name}: {err.args[0] if err.args else err}") from None
    if batch:
        parts.append(tokenizer.encode_lines(batch))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def bits_per_byte(loss_sum: float, num_bytes: int) -> float:
    return loss_sum / math.log(2) / num_bytes
