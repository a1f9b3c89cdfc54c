"""``bkexp eval RUN_DIR [...]``: measure trained runs on other datasets, at other context lengths, on downstream tasks.

Modes (any combination; ``--datasets run`` when none is given):

* ``--datasets run,wikitext2,text:PATH``: loss, perplexity, tokens, bits per byte and (word vocabularies) the
  ``<unk>`` share on each corpus, then mean ± std across corpora (``eval/perplexity.{json,csv,md}``);
* ``--lengths 128,256,...``: the same target tokens scored at every context length (``eval/length.*``, plots);
* ``--tasks NAME,...``: lm-evaluation-harness tasks through the ``bkexp`` model class (``eval/lm_eval.json``);
* ``--bits 16,8,4``: post-training quantization sweep (what ``bkexp eval-quant`` does).

``bkexp eval make-task NAME --kind multiple_choice|rolling --data FILE.jsonl --out DIR`` writes a local lm-eval
task; ``bkexp eval install-lm-eval`` lets ``lm_eval --model bkexp --model_args run=RUN_DIR`` find the model.

Each run is rebuilt from its ``.hydra/config.yaml``, its saved tokenizer and a checkpoint (``--checkpoint
best|last|PATH``), and the causality check runs on it before anything is scored. A sweep directory stands for
every run in it. A model folder written by ``bkexp export``, or a hub repository id of one (``--revision``), is
evaluated the same way from its config.json, tokenizer files and weights; its results go to ``--out`` (default:
``FOLDER/eval``, or ``eval/OWNER--NAME`` in the working directory for a hub model).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bkexp.devices import device_argument
from bkexp.eval.corpora import (CorpusError, bits_per_byte, cached_corpus, check_pairing, encode, load_corpus,
                                loads_hub_dataset, parse_datasets, run_splits_in)
from bkexp.held_out import OVERLAP_COLUMN, OVERLAP_N, RECORD_KEY, corpus_caveat, ngram_overlap
from bkexp.utils import atomic_write_text

if TYPE_CHECKING:
    from bkexp.rundir import ModelFolder

log = logging.getLogger(__name__)

EVAL_DIR = "eval"


class EvalError(ValueError):
    """Bad arguments or a run that cannot be evaluated as asked; the message says what is expected."""


# ----------------------------------------------------------------------------- arguments
def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise EvalError(f"--lengths {text!r}: expected comma-separated integers, e.g. 128,256,512") from None
    if not lengths or lengths[0] < 2:
        raise EvalError(f"--lengths {text!r}: every length must be an integer >= 2")
    return lengths


def parse_stride(text: str | None, lengths: Sequence[int]) -> dict[int, int | None]:
    """``None`` (non-overlapping), an integer number of tokens, or a fraction of each L such as 0.5."""
    if text is None:
        return {n: None for n in lengths}
    try:
        value = float(text)
    except ValueError:
        raise EvalError(f"--stride {text!r}: an integer (tokens) or a fraction of L in (0, 1)") from None
    if 0 < value < 1:
        return {n: max(1, int(n * value)) for n in lengths}
    if value != int(value) or value < 1:
        raise EvalError(f"--stride {text!r}: an integer >= 1 or a fraction in (0, 1)")
    too_short = [n for n in lengths if n < value]
    if too_short:
        raise EvalError(f"--stride {int(value)} is longer than L={too_short}; a stride must be <= L")
    return {n: int(value) for n in lengths}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bkexp eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="MODEL",
                   help="run directories, sweep directories holding runs, model folders written by bkexp export, "
                        "or hub repository ids of such folders (owner/name)")
    p.add_argument("--checkpoint", default=None,
                   help="of a run directory: best (checkpoints/best-*.ckpt, else last.ckpt; the default), last, or a "
                        "path to a .ckpt file")
    p.add_argument("--revision", default=None, help="hub models: branch, tag or commit (default: main)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the results (default: RUN_DIR/eval, where bkexp report finds them; a model "
                        "folder's FOLDER/eval; a hub model's eval/OWNER--NAME)")
    p.add_argument("--datasets", default=None,
                   help="corpora to score: run, NAME, NAME:DIR, text:PATH (comma-separated; default: run)")
    p.add_argument("--split", default="test", help="split of run/NAME datasets: train, validation, test")
    p.add_argument("--lengths", default=None, help="context lengths for the length sweep, e.g. 128,256,512,1024")
    p.add_argument("--stride", default=None,
                   help="length sweep with a sliding window: stride in tokens, or a fraction of L (e.g. 0.5)")
    p.add_argument("--length-dataset", default="run", help="corpus of the length sweep (a --datasets entry)")
    p.add_argument("--max-targets", type=int, default=None,
                   help="length sweep: score at most this many targets (rounded down to a multiple of max L)")
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="length sweep: tokens per forward (windows per batch = batch_tokens // L, at least 1)")
    p.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated (needs .[eval])")
    p.add_argument("--include-path", action="append", default=[], type=Path,
                   help="folder of extra lm-eval task YAMLs (repeatable); bkexp's own are always included")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples per task")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many documents per task")
    p.add_argument("--bits", default=None, help="post-training quantization sweep, e.g. 16,8,4 (bkexp eval-quant)")
    p.add_argument("--device", default="auto", type=device_argument,
                   help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change the run's config before rebuilding, e.g. dataset.data_dir=/data/wt2 (repeatable)")
    p.add_argument("--no-causality-check", action="store_true",
                   help="skip the causality check (only for models that are not autoregressive by design)")
    return p


# ----------------------------------------------------------------------------- the run
@dataclass
class LoadedRun:
    """A run (or an exported model folder) rebuilt for evaluation: config, model with the checkpoint's weights,
    fitted tokenizer (or None)."""

    run_dir: Path
    cfg: Any
    model: torch.nn.Module
    tokenizer: Any
    checkpoint: Path
    summary: dict[str, Any]
    train_tokens: torch.Tensor | None = None  # the training split's tokens when the run holds them in memory
    source: dict[str, Any] | None = None  # a model folder's origin (local folder, or hub repository and commit)
    default_out: Path | None = None  # where results go unless --out says otherwise
    train_data_error: str | None = None  # why the run's training data could not be read here (no overlap then)

    @property
    def name(self) -> str:
        return str(self.cfg.model.get("name", type(self.model).__name__))

    @property
    def train_len(self) -> int | None:
        return self.cfg.get("seq_len")


def load_run(run_dir: Path | ModelFolder, checkpoint: str | None, overrides: Sequence[str],
             device: torch.device, training_data: bool = True) -> LoadedRun:
    """Rebuild a run's model and tokenizer exactly as trained and load a checkpoint's weights into the model
    (``run_dir``: a run directory, or a :class:`bkexp.rundir.ModelFolder`). ``training_data``: also read the
    training data (the overlap column, a streamed run's token caches); lm-eval tasks need only model and tokenizer."""
    from bkexp.rundir import ModelFolder, RunDir

    if isinstance(run_dir, ModelFolder):
        return load_model_folder(run_dir, checkpoint, overrides, device, training_data)
    run = RunDir(run_dir)
    cfg = run.config(overrides)
    ckpt = run.checkpoint_path(checkpoint or "best")
    if run.has_tokenizer():
        datamodule, unreadable = _training_data(run, cfg) if training_data else (None, None)
        tokenizer = run.tokenizer() if datamodule is None else getattr(datamodule, "tokenizer", None)
    else:  # a run from before tokenizers were saved: its datamodule refits the tokenizer, so the data must be here
        datamodule, unreadable = run.build_datamodule(cfg=cfg), None
        tokenizer = getattr(datamodule, "tokenizer", None)
    model = run.build_model(ckpt, device=device, cfg=cfg)
    summary = run.summary() if run.summary_path.is_file() else {}
    if tokenizer is not None and tokenizer.name == "ids":  # a synthetic task's token ids: no text tokenizer
        tokenizer = None
    return LoadedRun(run_dir, cfg, model, tokenizer, ckpt, summary, default_out=run_dir / EVAL_DIR,
                     train_tokens=(getattr(datamodule, "streams", None) or {}).get("train"),
                     train_data_error=unreadable)


def _training_data(reader: Any, cfg: Any) -> tuple[Any, str | None]:
    """The datamodule of a run's or model folder's training data (its training tokens give the overlap column), or
    None and why it cannot be read here: other corpora, lengths and tasks need only the tokenizer, and the
    ``run`` corpus says itself what is missing."""
    from bkexp.rundir import RunDirError

    try:
        return reader.build_datamodule(cfg=cfg), None
    except RunDirError as err:
        log.warning("%s; scoring without the overlap with its training text", err)
        return None, str(err)


def load_model_folder(folder: ModelFolder, checkpoint: str | None, overrides: Sequence[str],
                      device: torch.device, training_data: bool = True) -> LoadedRun:
    """An exported model as a LoadedRun: no checkpoints to choose and no summary; its training tokens (the overlap
    column) and token caches where the training data its ``config.json`` records is readable here."""
    folder.refuse_checkpoint(checkpoint)
    cfg = folder.config(overrides)
    tokenizer = folder.tokenizer()
    if tokenizer.name == "ids":
        tokenizer = None
    if not training_data:
        datamodule, unreadable = None, None
    elif loads_hub_dataset(cfg):  # a shared model's user did not ask for its training corpus to download
        datamodule, unreadable = None, (f"{folder.name} trained on the hub dataset {cfg.dataset.get('name')!r}, "
                                        "which is not downloaded for this column (`--datasets run` reads it)")
    else:
        datamodule, unreadable = _training_data(folder, cfg)
    # A streamed dataset's record says which splits it reads from token caches here (as a run's summary does),
    # so `--datasets run` scores the cached tokens, also where the hub cannot be reached.
    record = {"data": datamodule.describe()} if getattr(datamodule, "reading", None) else {}
    return LoadedRun(folder.path, cfg, folder.build_model(device, cfg=cfg), tokenizer, folder.weights_path, record,
                     source=folder.source, default_out=folder.results_dir(),
                     train_tokens=(getattr(datamodule, "streams", None) or {}).get("train"),
                     train_data_error=unreadable)


def causality_check(run: LoadedRun, stream: torch.Tensor) -> None:
    from bkexp.train.causality import check_causality

    n = min(int(run.train_len or 64), stream.numel() // 2)
    sample = stream[: 2 * n].view(2, n)
    check_causality(run.model, sample, run.model.vocab_size, name=f"model {run.name!r} of {run.run_dir}")


def expand_models(paths: Sequence[str | Path], revision: str | None = None) -> list[Path | ModelFolder]:
    """Run directories (a sweep expands to its runs) and :class:`bkexp.rundir.ModelFolder` s, in order."""
    from bkexp.rundir import RunDirError, find_models

    try:
        return find_models(paths, revision)
    except RunDirError as err:
        raise EvalError(str(err)) from None


# ----------------------------------------------------------------------------- results
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _write_table(out: Path, stem: str, record: dict[str, Any], rows: list[dict[str, Any]],
                 columns: Sequence[str], md_lines: list[str]) -> None:
    import pandas as pd

    from bkexp.train.summary import _jsonable

    atomic_write_text(out / f"{stem}.json", json.dumps(_jsonable(record), indent=2) + "\n")
    atomic_write_text(out / f"{stem}.csv", pd.DataFrame(rows, columns=list(columns)).to_csv(index=False))
    atomic_write_text(out / f"{stem}.md", "\n".join(md_lines) + "\n")


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def _header(run: LoadedRun, device: torch.device) -> dict[str, Any]:
    return {"run_dir": str(run.run_dir.resolve()), **({"model_source": run.source} if run.source else {}),
            "model": run.name, "checkpoint": str(run.checkpoint),
            "train_seq_len": run.train_len, "device": str(device),
            "tokenizer": run.tokenizer.describe() if run.tokenizer is not None else None,
            **({"train_data_error": run.train_data_error} if run.train_data_error else {})}


def origin_md(record: dict[str, Any]) -> str:
    """Where a result's model came from, for the markdown files: the run and checkpoint, or the model folder."""
    source = record.get("model_source") or {}
    if source.get("kind") == "hub":
        return f"Hub model `{source['repo_id']}` (commit `{source['commit']}`)"
    if source:
        return f"Model folder `{source['path']}`"
    return f"Run `{record['run_dir']}`, checkpoint `{Path(record['checkpoint']).name}`"


def run_corpus(run: LoadedRun, item: str, split: str) -> Any:
    """A ``--datasets`` entry; the run's own split is read from the token cache its training read, when it read one
    (``bkexp prepare-data``): the same tokens, also where the cache's source cannot be reached."""
    reading = ((run.summary.get("data") or {}).get("reading") or {}).get(split)
    if item == "run" and isinstance(reading, str) and reading.startswith("cache:"):
        pairs = [sorted(pair) for pair in (run.summary.get("data") or {}).get(RECORD_KEY) or []]
        shares = [s for s in ("train", "validation") if s == split or sorted([s, split]) in pairs]
        corpus = cached_corpus(reading[len("cache:"):], run.cfg, split, shares)
        if corpus is not None:
            return corpus
        log.warning("%s: the token cache %s of its %s split is gone or unfinished; reading the split from its source",
                    run.name, reading[len("cache:"):], split)
    return load_corpus(item, run.cfg, split)


def _shared_run_splits(run: LoadedRun, corpus: Any) -> list[str]:
    """The run's training/validation splits this corpus shares data with, said on the console as it is scored."""
    shared = run_splits_in(corpus, run.cfg)
    if shared:
        log.warning("%s: %s shares data with the run's %s split(s): its perplexity is not held out", run.name,
                    corpus.name, " and ".join(shared))
    return shared


def _train_overlap(run: LoadedRun, stream: torch.Tensor) -> float | None:
    """How much of a corpus the run saw in training, by n-grams (None when its training tokens are streamed)."""
    return None if run.train_tokens is None else ngram_overlap(stream, run.train_tokens)


def _not_held_out_md(dataset: str, shared: Sequence[str]) -> list[str]:
    caveat = corpus_caveat(shared)
    return ["", f"**Not held out:** `{dataset}` {caveat}."] if caveat else []


# ----------------------------------------------------------------------------- perplexity on several corpora
DEFAULT_EVAL_BATCH = 16  # windows per forward for a model folder that records no dataset config


def _dataset_name(run: LoadedRun) -> str | None:
    return (run.cfg.get("dataset") or {}).get("name")


def eval_datasets(run: LoadedRun, items: Sequence[str], split: str, device: torch.device) -> dict[str, Any]:
    from bkexp.eval.scoring import score_stream

    check_pairing(run.tokenizer, run.model.vocab_size, _dataset_name(run))
    corpora = [run_corpus(run, item, split) for item in items]  # all read before anything is scored
    encoded = [encode(c, run.tokenizer) for c in corpora]
    causality_check(run, encoded[0][0])
    seq_len = int(run.train_len)
    dataset = run.cfg.get("dataset") or {}
    batch = int(dataset.get("eval_batch_size") or dataset.get("batch_size") or DEFAULT_EVAL_BATCH)
    rows = []
    for corpus, (stream, stats) in zip(corpora, encoded):
        # The training chunking (seq_len windows, eval batch size): on the run's own test split this is
        # bit-for-bit the batches of trainer.test, so the perplexity reproduces summary.json's.
        score = score_stream(run.model, stream, seq_len, batch_size=batch, device=device, measure_memory=False)
        row = {"dataset": corpus.name, "split": None if corpus.name.startswith("text:") else split,
               "loss": score.loss, "ppl": score.ppl, "tokens": stats["tokens"], "targets": score.targets,
               "bytes": stats["bytes"], "bits_per_byte": bits_per_byte(score.loss_sum, stats["bytes"]),
               "unk_share": stats.get("unk_share"), "oov_share": stats.get("oov_share"),
               "tokens_per_sec": score.tokens_per_sec, "source": corpus.source,
               "shares_data_with": _shared_run_splits(run, corpus), OVERLAP_COLUMN: _train_overlap(run, stream)}
        rows.append(row)
        log.info("%s on %s: ppl %.4f, %d tokens", run.name, corpus.name, row["ppl"], row["tokens"])
    ppl_mean, ppl_std = mean_std([r["ppl"] for r in rows])
    bpb_mean, bpb_std = mean_std([r["bits_per_byte"] for r in rows])
    return {**_header(run, device), "split": split, "window": seq_len, "batch_size": batch, "datasets": rows,
            "mean": {"ppl": ppl_mean, "bits_per_byte": bpb_mean},
            "std": {"ppl": ppl_std, "bits_per_byte": bpb_std}}


PPL_COLUMNS = ("dataset", "loss", "ppl", "bits_per_byte", "tokens", "bytes", "unk_share", "oov_share", OVERLAP_COLUMN)


def write_datasets(out: Path, record: dict[str, Any]) -> None:
    rows = record["datasets"]
    md = [f"# Perplexity on {len(rows)} corpora: {record['model']}", "",
          f"{origin_md(record)}, split `{record['split']}` "
          f"(run/NAME datasets), windows of {record['window']} tokens (the training length, non-overlapping). "
          "bits_per_byte = summed loss in bits / UTF-8 bytes of the text; unk_share = share of tokens that are "
          "`<unk>`, oov_share = share of tokens that became `<unk>` because the word is not in the training "
          f"vocabulary (word-level tokenizers only); {OVERLAP_COLUMN} = share of the corpus's {OVERLAP_N}-token "
          "windows that also occur in the run's training tokens (text read in memory only)."
          + (f" Not computed here: {record['train_data_error']}." if record.get("train_data_error") else ""), ""]
    md += _md_table(PPL_COLUMNS, [[r[c] for c in PPL_COLUMNS] for r in rows])
    md += [line for r in rows for line in _not_held_out_md(r["dataset"], r["shares_data_with"])]
    mean, std = record["mean"], record["std"]
    md += ["", f"Mean ± std over {len(rows)} corpora: perplexity {_fmt(mean['ppl'])} ± {_fmt(std['ppl'])}, "
           f"bits per byte {_fmt(mean['bits_per_byte'])} ± {_fmt(std['bits_per_byte'])}."]
    _write_table(out, "perplexity", record, rows, PPL_COLUMNS, md)


# ----------------------------------------------------------------------------- length generalisation
def eval_lengths(run: LoadedRun, lengths: Sequence[int], stride: str | None, dataset: str, split: str,
                 max_targets: int | None, batch_tokens: int, device: torch.device) -> dict[str, Any]:
    from bkexp.eval.scoring import score_stream

    strides = parse_stride(stride, lengths)
    check_pairing(run.tokenizer, run.model.vocab_size, _dataset_name(run))
    corpus = run_corpus(run, dataset, split)
    stream, stats = encode(corpus, run.tokenizer)
    longest = max(lengths)
    available = stream.numel() - 1
    if available < longest:
        raise EvalError(f"--lengths up to {longest} needs at least {longest + 1} tokens, but {corpus.name} has "
                        f"{stream.numel()}; use a longer --length-dataset or smaller lengths")
    n_targets = available // longest * longest
    if max_targets is not None:
        if max_targets < longest:
            raise EvalError(f"--max-targets {max_targets} is below the longest length {longest}")
        n_targets = min(n_targets, max_targets // longest * longest)
    causality_check(run, stream)
    rows = []
    for length in lengths:
        score = score_stream(run.model, stream, length, stride=strides[length], n_targets=n_targets,
                             batch_tokens=batch_tokens, device=device)
        row = score.to_dict()
        row["bits_per_byte"] = None  # a prefix of the corpus: bytes are not tracked per target
        rows.append(row)
        log.info("%s L=%d: %s", run.name, length, f"ppl {row['ppl']:.4f}" if score.status == "ok" else score.status)
    return {**_header(run, device), "dataset": corpus.name, "source": corpus.source, "split": split,
            "shares_data_with": _shared_run_splits(run, corpus), OVERLAP_COLUMN: _train_overlap(run, stream),
            "targets": n_targets, "corpus_tokens": stats["tokens"],
            "mode": "sliding" if stride is not None else "non-overlapping", "stride": stride, "lengths": rows}


LENGTH_COLUMNS = ("length", "stride", "status", "loss", "ppl", "tokens_per_sec", "peak_mb", "windows", "targets")


def write_lengths(out: Path, record: dict[str, Any]) -> list[Path]:
    from bkexp.eval.plots import length_plots, position_plot

    rows = record["lengths"]
    title = f"{record['model']}: {record['dataset']} ({record['targets']} targets)"
    md = [f"# Perplexity vs context length: {record['model']}", "",
          f"{origin_md(record)}, trained at "
          f"L={record['train_seq_len']}. The same {record['targets']} target tokens of {record['dataset']} "
          f"({record['split']}) are scored at every L ({record['mode']} windows"
          + (f", stride {record['stride']}" if record["stride"] else "") + "). tokens/s counts scored tokens on "
          f"{record['device']}; peak_mb is the process peak (CPU: resident set) while scoring that L.", ""]
    md += _md_table(LENGTH_COLUMNS, [[r.get(c) for c in LENGTH_COLUMNS] for r in rows])
    md += _not_held_out_md(record["dataset"], record.get("shares_data_with") or [])
    oom = [r for r in rows if r["status"] != "ok"]
    if oom:
        md += ["", "Out of memory: " + "; ".join(f"L={r['length']}: {r['error']}" for r in oom)]
    _write_table(out, "length", record, rows, LENGTH_COLUMNS, md)
    plots = length_plots([(record["model"], rows)], record["train_seq_len"], out, title)
    plots.append(position_plot(rows, out, title))
    return plots


# ----------------------------------------------------------------------------- driver
def scores_datasets(args: argparse.Namespace) -> bool:
    """Whether ``--datasets`` is scored: asked for, or the default when nothing else is."""
    return args.datasets is not None or not (args.lengths or args.tasks or args.bits)


def eval_one(run_dir: Path | ModelFolder, args: argparse.Namespace) -> list[Path]:
    device = args.device
    run = load_run(run_dir, args.checkpoint, args.override, device,
                   training_data=scores_datasets(args) or bool(args.lengths))
    out = args.out or run.default_out
    written: list[Path] = []
    if scores_datasets(args):
        record = eval_datasets(run, parse_datasets(args.datasets or "run"), args.split, device)
        write_datasets(out, record)
        written.append(out / "perplexity.md")
    if args.lengths:
        record = eval_lengths(run, parse_lengths(args.lengths), args.stride, args.length_dataset, args.split,
                              args.max_targets, args.batch_tokens, device)
        written += [out / "length.md", *write_lengths(out, record)]
    if args.tasks:
        from bkexp.eval.harness import run_tasks, write_lm_eval

        record = run_tasks(run, args.tasks, args.include_path, args.num_fewshot, args.limit, device)
        written.append(write_lm_eval(out, record))
    return written


def make_task(argv: list[str]) -> int:
    """``bkexp eval make-task NAME --kind multiple_choice|rolling --data FILE.jsonl --out DIR``."""
    from bkexp.eval.harness import TASK_KINDS, write_local_task

    p = argparse.ArgumentParser(prog="bkexp eval make-task",
                                description="write an lm-eval task YAML that reads a local JSON-lines file")
    p.add_argument("name", help="task name (what --tasks takes)")
    p.add_argument("--kind", required=True, choices=list(TASK_KINDS),
                   help='multiple_choice: {"query", "choices", "gold"} per line; rolling: {"text"} per line')
    p.add_argument("--data", required=True, type=Path, help="the JSON-lines file")
    p.add_argument("--out", required=True, type=Path, help="folder of task YAMLs (pass it as --include-path)")
    args = p.parse_args(argv)
    try:
        print(f"[bkexp] eval: wrote {write_local_task(args.out, args.name, args.kind, args.data)}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"bkexp eval make-task: {exc}", file=sys.stderr)
        return 2
    return 0


def install_lm_eval(argv: list[str]) -> int:
    """``bkexp eval install-lm-eval [--user] [--remove]``: let ``lm_eval --model bkexp`` find the model class."""
    from bkexp.eval.lm_eval_hook import write_pth

    p = argparse.ArgumentParser(prog="bkexp eval install-lm-eval",
                                description="register the bkexp model class with lm_eval's own command line "
                                            "(a start-up .pth file in site-packages)")
    p.add_argument("--user", action="store_true", help="into the user site-packages instead")
    p.add_argument("--remove", action="store_true", help="remove the start-up file")
    args = p.parse_args(argv)
    path = write_pth(user=args.user, remove=args.remove)
    print(f"[bkexp] eval: {'removed' if args.remove else 'wrote'} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "make-task":
        return make_task(argv[1:])
    if argv and argv[0] == "install-lm-eval":
        return install_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.lengths:
            parse_stride(args.stride, parse_lengths(args.lengths))  # bad arguments fail before any model loads
        if args.datasets:
            parse_datasets(args.datasets)
        runs = expand_models(args.run_dirs, args.revision)
        if args.out is not None and len(runs) > 1:
            raise EvalError(f"--out names one folder, for one model; {len(runs)} were given (or found in a sweep "
                            "directory): leave --out out to write each run's results into its own eval/")
        if args.bits:
            from bkexp.eval.quant import main as eval_quant

            code = eval_quant([*map(str, args.run_dirs), "--bits", args.bits, "--device", str(args.device),
                               *(["--checkpoint", args.checkpoint] if args.checkpoint else []),
                               *(["--revision", args.revision] if args.revision else []),
                               *(["--out", str(args.out)] if args.out else []),
                               *[f"--override={o}" for o in args.override]])
            if code:
                return code
            if not (scores_datasets(args) or args.lengths or args.tasks):
                return 0  # the sweep was all that was asked: no model to load again
        for run_dir in runs:
            for path in eval_one(run_dir, args):
                print(f"[bkexp] eval: {path}", flush=True)
                if path.suffix == ".md":
                    print(path.read_text())
    except (EvalError, CorpusError, ValueError, FileNotFoundError) as exc:
        print(f"bkexp eval: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
