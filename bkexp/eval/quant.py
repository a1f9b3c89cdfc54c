"""``bkexp eval-quant MODEL [MODEL ...] --bits 16,8,4,3,2``: perplexity of trained models at several weight widths.

MODEL is a run directory, a sweep directory (its runs), a model folder written by ``bkexp export`` or a hub
repository id of one (``--revision``). For each run: rebuild its datamodule and model from ``.hydra/config.yaml``,
load the best checkpoint (``checkpoints/best-*.ckpt``, else ``last.ckpt``; a model folder: its weights, and the
training dataset its ``config.json`` records), then for 32 bits (always: the reference row) and each
requested width quantize the weights post-training (round-to-nearest) with the run's policy (its
``quant`` config: granularity, group size, embeddings switch, ...) and evaluate the whole validation and
test splits with the training loss code (token-weighted mean, as ``val/ppl`` in training).

Writes ``quant_eval.csv``, ``quant_eval.md`` and ``quant_eval.png`` (perplexity vs bits, log scale) into
each run directory (a model folder: ``FOLDER/eval``; a hub model: ``eval/<owner>--<name>``); with several models
(or a sweep directory) also the combined table and one plot with all models into ``--out``. A run trained with
QAT is evaluated from its latent float weights: its row at the training width is exactly its QAT evaluation, the
other rows are PTQ of the QAT-trained weights.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bkexp.devices import device_argument
from bkexp.quant.fake_quant import GRANULARITIES
from bkexp.quant.spec import CLIPS, EVAL_BITS, QuantConfigError, QuantSpec
from bkexp.rundir import (ModelFolder, RunDir, RunDirError, atomic_save_figure, atomic_write_text, find_models,
                          is_run_dir)

log = logging.getLogger(__name__)

STEM = "quant_eval"
SPLITS = ("val", "test")
POLICY_KEYS = ("granularity", "group_size", "act_bits", "embeddings", "conv", "clip", "percentile")


class EvalQuantError(RunDirError):
    """Bad arguments or a run directory eval-quant cannot use; the message says what is expected."""


# ----------------------------------------------------------------------------- arguments
def parse_bits(text: str) -> list[int]:
    """``"16,8,4,3,2"`` -> ``[16, 8, 4, 3, 2]`` (32, the reference, is always added by the caller)."""
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            bits = int(item)
        except ValueError:
            raise EvalQuantError(f"--bits: {item!r} is not an integer; valid widths: "
                                 f"{', '.join(map(str, EVAL_BITS))}") from None
        if bits not in EVAL_BITS:
            raise EvalQuantError(f"--bits: {bits} is not supported; valid widths: {', '.join(map(str, EVAL_BITS))}")
        if bits != 32 and bits not in out:
            out.append(bits)
    return sorted(out, reverse=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bkexp eval-quant", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="MODEL",
                   help="run directories, sweep directories holding runs, model folders written by `bkexp export`, "
                   "or hub repository ids (owner/name) of such folders")
    p.add_argument("--revision", default=None, help="branch, tag or commit of the hub repositories (default: main)")
    p.add_argument("--bits", default="16,8,4,3,2", help="weight widths to evaluate, comma-separated "
                   f"(from {', '.join(map(str, EVAL_BITS))}; 32 is always evaluated)")
    p.add_argument("--method", default="ptq", choices=["ptq"],
                   help="ptq: round-to-nearest of the trained weights (QAT needs training: python train.py quant=qat)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the combined table and plot (required with several runs)")
    p.add_argument("--splits", default="val,test", help="splits to evaluate: val, test or val,test")
    p.add_argument("--checkpoint", default=None,
                   help="of a run directory: best (default; checkpoints/best-*.ckpt, else last.ckpt), last, or a "
                   ".ckpt path (a model folder holds one set of weights)")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None, help="override the run's granularity")
    p.add_argument("--group-size", type=int, default=None, help="override the run's group size (per_group)")
    p.add_argument("--embeddings", choices=["true", "false"], default=None,
                   help="override the run's embeddings switch (quantize embedding + LM head)")
    p.add_argument("--clip", choices=CLIPS, default=None, help="override the run's clip (percentile: PTQ clipping)")
    p.add_argument("--percentile", type=float, default=None, help="clip percentile of |w| with --clip percentile")
    p.add_argument("--device", default="auto", type=device_argument,
                   help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--limit-batches", type=int, default=None,
                   help="evaluate only this many batches per split (quick look; recorded in the table)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change the run's config before rebuilding, e.g. dataset.data_dir=/data/wt2 (repeatable; "
                   "+KEY=VALUE adds a key)")
    return p


def run_policy(cfg: DictConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The run's quantization policy (its ``quant`` config, else the defaults) with command-line overrides."""
    defaults = {f.name: f.default for f in fields(QuantSpec)}
    policy = {k: defaults[k] for k in POLICY_KEYS}
    quant_cfg = cfg.get("quant")
    if quant_cfg is not None:
        resolved = OmegaConf.to_container(quant_cfg, resolve=True)
        policy.update({k: resolved[k] for k in POLICY_KEYS if k in resolved})
    for key, value in (("granularity", args.granularity), ("group_size", args.group_size),
                       ("clip", args.clip), ("percentile", args.percentile)):
        if value is not None:
            policy[key] = value
    if args.group_size is not None and args.granularity is None:
        policy["granularity"] = "per_group"
    if args.granularity is not None and args.granularity != "per_group" and args.group_size is None:
        policy["group_size"] = None
    if args.embeddings is not None:
        policy["embeddings"] = args.embeddings == "true"
    return policy


def trained_as(cfg: DictConfig) -> str:
    quant_cfg = cfg.get("quant")
    bits = cfg.get("bits", 32)
    if quant_cfg is None:
        return "none@32" if bits == 32 else f"?@{bits}"
    spec = QuantSpec(method=str(quant_cfg.get("method", "auto")), bits=int(bits))
    return f"{spec.resolved_method}@{bits}"


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_split(task: Any, loader: Any, device: torch.device, has_answer_mask: bool,
                   limit_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean loss (and answer accuracy) over a split, with the training code's per-token loss."""
    task.eval()
    loss_sum = 0.0
    count = 0
    correct = 0
    for i, batch in enumerate(loader):
        if limit_batches is not None and i >= limit_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, losses, mask = task.token_losses(batch)
        loss_sum += float(losses[mask].double().sum())
        count += int(mask.sum())
        if has_answer_mask:
            correct += int((logits.argmax(-1)[mask] == batch["labels"][mask]).sum())
    if count == 0:
        raise EvalQuantError("a split has no labelled tokens to evaluate")
    loss = loss_sum / count
    out = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "tokens": count}
    if has_answer_mask:
        out["acc"] = correct / count
    return out


def eval_run(source: Path | ModelFolder, bits_list: Sequence[int],
             args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Rows (one per width, 32 first) for one run or model folder, and its metadata for the markdown header."""
    from bkexp.train.module import LMTask

    # a missing checkpoint fails before the data is built
    if isinstance(source, ModelFolder):
        source.refuse_checkpoint(args.checkpoint)
        reader: RunDir | ModelFolder = source
        ckpt = source.weights_path
        hub = source.source if source.source.get("kind") == "hub" else None
        name, where = source.name, f"{hub['repo_id']}@{hub['commit']}" if hub else str(source.path.resolve())
    else:
        reader = RunDir(source)
        ckpt = reader.checkpoint_path(args.checkpoint or "best")
        name, where = source.name, str(source.resolve())
    cfg = reader.config(args.override)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise EvalQuantError(f"--splits: {bad or args.splits!r} invalid; valid: {', '.join(SPLITS)}")
    policy = run_policy(cfg, args)
    QuantSpec(method="ptq", bits=8, **policy).validate(EVAL_BITS)  # fail before the data is built
    device = args.device
    torch.manual_seed(int(cfg.get("seed") or 0))

    datamodule = reader.build_datamodule(cfg=cfg)
    datamodule.setup("test")
    loaders = {"val": datamodule.val_dataloader, "test": datamodule.test_dataloader}
    # The float (latent) weights: every width below is quantized from them, also for a run that trained with QAT.
    base = (reader.build_model(cfg=cfg, quantized=False) if isinstance(reader, ModelFolder)
            else reader.build_model(ckpt, cfg=cfg, quantized=False)).train()  # eval_split switches to eval mode
    model_name = str(cfg.model.get("name", type(base).__name__))
    trained = trained_as(cfg)
    has_answer_mask = bool(getattr(datamodule, "has_answer_mask", False))

    rows: list[dict[str, Any]] = []
    for bits in [32, *bits_list]:
        model = copy.deepcopy(base)
        if bits == 32:
            spec = QuantSpec(method="none", bits=32)
        else:
            spec = QuantSpec(method="ptq", bits=bits, **{**policy, "clip": "none" if bits == 16 else policy["clip"]})
            spec.validate(EVAL_BITS)
            spec.prepare(model)
            spec.finalize(model)
        described = spec.describe(model)
        task = LMTask(model, optimizer=torch.optim.SGD, vocab_size=datamodule.vocab_size).to(device)
        row: dict[str, Any] = {"model": model_name, "run": name, "trained": trained, "bits": bits,
                               "method": "none" if bits == 32 else args.method}
        for split in splits:
            result = evaluate_split(task, loaders[split](), device, has_answer_mask, args.limit_batches)
            row[f"{split}_loss"] = result["loss"]
            row[f"{split}_ppl"] = result["ppl"]
            if "acc" in result:
                row[f"{split}_acc"] = result["acc"]
            row[f"{split}_tokens"] = result["tokens"]
        row.update(quantized_params=described["quantized_params"], total_params=described["total_params"],
                   effective_size_bytes=described["effective_size_bytes"], checkpoint=ckpt.name,
                   limit_batches=args.limit_batches)
        rows.append(row)
        log.info("%s %s bits=%d: %s", name, model_name, bits,
                 {k: v for k, v in row.items() if k.endswith("_ppl")})
    meta = {"run_dir": where, "model": model_name, "trained": trained, "checkpoint": ckpt.name,
            "policy": QuantSpec(method="ptq", bits=8, **policy).describe(base)["policy"], "settings": policy,
            "device": str(device)}
    if isinstance(source, ModelFolder):
        meta["model_source"] = source.source
    return rows, meta


# ----------------------------------------------------------------------------- outputs
def metric_column(rows: Sequence[dict]) -> str:
    return "test_ppl" if rows and "test_ppl" in rows[0] else "val_ppl"


def series_labels(metas: Sequence[dict]) -> list[str]:
    """One legend label per run: the model name, made unique with the training method or run name."""
    labels = [m["model"] if m["trained"].startswith("none@") else f"{m['model']} ({m['trained']})" for m in metas]
    if len(set(labels)) != len(labels):
        labels = [f"{label} [{Path(m['run_dir']).name}]" for label, m in zip(labels, metas)]
    return labels


def write_png(path: Path, series: Sequence[tuple[str, list[dict]]], column: str, title: str) -> None:
    """Perplexity vs bits (x: widths high to low, evenly spaced; y: log scale), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    widths = sorted({r["bits"] for _, rows in series for r in rows}, reverse=True)
    position = {b: i for i, b in enumerate(widths)}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in series:
        pts = [(position[r["bits"]], r[column]) for r in rows if math.isfinite(r[column])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xticks(range(len(widths)), [str(b) for b in widths])
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:.4g}")  # 62.2, not 6.22x10^1
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / low < 10:  # within a decade only minor ticks carry labels; beyond, they would crowd the axis
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("weight bits (32 = float32, 16 = bfloat16)")
    ax.set_ylabel(column.replace("_", " "))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def settings_text(settings: dict[str, Any]) -> str:
    text = settings["granularity"] + (f" (group {settings['group_size']})" if settings["group_size"] else "")
    if settings["clip"] != "none":
        text += f", clip at the {settings['percentile']}th percentile"
    if settings["act_bits"]:
        text += f", activations {settings['act_bits']} bits per token"
    return text


def write_outputs(out_dir: Path, rows: list[dict], metas: list[dict], runs_rows: list[list[dict]]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    atomic_write_text(out_dir / f"{STEM}.csv", frame.to_csv(index=False))
    column = metric_column(rows)
    shown = [c for c in ("model", "trained", "bits", "method", "val_ppl", "val_acc", "test_ppl", "test_acc",
                         "quantized_params", "effective_size_bytes") if c in frame.columns]
    lines = ["# Perplexity vs weight bits (bkexp eval-quant)", ""]
    for meta in metas:
        weights = "weights" if meta.get("model_source") else "checkpoint"  # a model folder has no checkpoints
        lines.append(f"- `{meta['run_dir']}`: {meta['model']}, trained {meta['trained']}, {weights} "
                     f"`{meta['checkpoint']}`, device {meta['device']}; {settings_text(meta['settings'])}; "
                     f"policy: {meta['policy']}")
    limit = rows[0].get("limit_batches")
    lines += ["", "Rows below 32 bits: round-to-nearest post-training quantization of the trained float "
              "weights (16 = bfloat16); 32 = the weights as trained. Perplexity = exp(token-weighted mean "
              "loss) over the whole split" + (f" (first {limit} batches only)" if limit else "") + ".", ""]
    lines.append(frame[shown].to_markdown(index=False, floatfmt=".4g"))
    atomic_write_text(out_dir / f"{STEM}.md", "\n".join(lines) + "\n")
    labels = series_labels(metas)
    title = "perplexity vs weight bits" if len(metas) > 1 else f"{metas[0]['model']}: perplexity vs weight bits"
    write_png(out_dir / f"{STEM}.png", list(zip(labels, runs_rows)), column, title)


def results_dir(source: Path | ModelFolder) -> Path:
    """Where one model's table and plot go: a run's own directory; a model folder's ``results_dir``."""
    return source.results_dir() if isinstance(source, ModelFolder) else source


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        bits_list = parse_bits(args.bits)
        models = find_models(args.run_dirs, args.revision)
        out = args.out
        if len(models) > 1 and out is None:
            given = Path(args.run_dirs[0])
            if len(args.run_dirs) == 1 and given.is_dir() and not is_run_dir(given):
                out = given  # a single sweep directory holds its own combined result
            else:
                raise EvalQuantError(f"{len(models)} models given: --out DIR is required for the combined table "
                                     "and plot")
        all_rows: list[dict] = []
        metas: list[dict] = []
        runs_rows: list[list[dict]] = []
        for source in models:
            rows, meta = eval_run(source, bits_list, args)
            write_outputs(results_dir(source), rows, [meta], [rows])
            all_rows.extend(rows)
            metas.append(meta)
            runs_rows.append(rows)
            print(f"[bkexp] eval-quant: {results_dir(source) / (STEM + '.md')}", flush=True)
        combined = out is not None and (len(models) > 1 or out.resolve() != results_dir(models[0]).resolve())
        if combined:
            write_outputs(out, all_rows, metas, runs_rows)
            print(f"[bkexp] eval-quant: combined {out / (STEM + '.md')}", flush=True)
        target = out if combined else results_dir(models[0])
        print((target / f"{STEM}.md").read_text())
    except (RunDirError, QuantConfigError) as exc:
        print(f"bkexp eval-quant: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
