"""``bkexp bench run MODEL``: a trained run's model under each execution mode, speed beside perplexity.

MODEL is a run directory, or a model folder written by ``bkexp export`` or a hub repository id of one
(``--revision``); a folder's training step uses the optimizer its ``config.json`` records (``conf/optimizer``'s
default for folders exported before bkexp recorded it).

Modes (``--modes``, default all that apply):

- ``eager``: float32, the kernels the run used (the baseline of every speedup);
- ``compile``: ``torch.compile`` of the model (inductor);
- ``bf16``: bfloat16 autocast, float32 weights;
- ``int8``: torchao int8 weight-only quantization of every ``nn.Linear`` (inference only: no training step);
- ``backend=<name>``: each other available backend of the model's custom op (``model.mixer.backend``), e.g.
  the pure-PyTorch BK-Core or the reference selective scan.

Each mode is timed on the same batches: inference (forward without gradients on one validation batch) and
one training step (forward, cross-entropy + auxiliary losses, backward, a step of the run's optimizer on a
copy of the model), and evaluated on the same fixed slice of the validation split (the first
``--eval-batches`` batches): its perplexity says what the speed costs in accuracy. A mode that cannot run
here (no compiler, torchao missing) is recorded with its error and does not stop the others.

Loads the run through ``bkexp.rundir`` (weights_only checkpoints; a quantized run as its test evaluated it).
Writes under ``RUN_DIR/benchmarks/`` (a model folder: ``FOLDER/benchmarks``; a hub model:
``benchmarks/<owner>--<name>``):
``<mode>_output.json`` per mode, ``comparison_results.json``, ``comparison_summary.csv``,
``comparison_bar_plot.png`` and ``speedup_comparison.png``.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from bkexp.environment import environment
from bkexp.rundir import (ModelFolder, RunDir, RunDirError, atomic_save_figure, atomic_write_json, atomic_write_text,
                          find_model)
from bkexp.train.module import build_optimizer, split_weight_decay

BASE_MODES = ("eager", "compile", "bf16", "int8")
IGNORE_INDEX = -100
SUMMARY_COLUMNS = ["mode", "status", "eval_ppl", "eval_loss", "infer_ms", "infer_tokens_per_s", "train_step_ms",
                   "train_tokens_per_s", "infer_speedup", "train_speedup", "error"]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bkexp bench run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="MODEL", help="a training run directory (outputs/<stamp> or a sweep job), a "
                   "model folder written by `bkexp export`, or a hub repository id (owner/name) of one")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub repository (default: main)")
    p.add_argument("--modes", default=None,
                   help="comma separated among eager, compile, bf16, int8, backend=<name> (default: all that apply)")
    p.add_argument("--checkpoint", default=None,
                   help="of a run directory: best (default), last or a checkpoint path")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches in the evaluation slice (default 8)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per mode (median; default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation; default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change the run's config before rebuilding, e.g. dataset.data_dir=/data/wt2 (repeatable; "
                   "+KEY=VALUE adds a key)")
    args = p.parse_args(argv)
    if args.eval_batches < 1 or args.repeat < 1 or args.warmup < 0:
        p.error("need --eval-batches >= 1, --repeat >= 1 and --warmup >= 0")
    return args


def op_backends(cfg: Any, device: torch.device) -> tuple[str | None, list[str]]:
    """The custom op of the run's mixer and its available backends (excluding dense test oracles)."""
    target = str(cfg.model.get("mixer", {}).get("_target_", ""))
    if target.endswith("BKMixer"):
        from bkexp.ops.bk_core import available_backends

        return "bk_core", [b for b in available_backends(device) if b != "reference"]
    if target.endswith("MambaMixer"):
        from bkexp.ops.selective_scan import available_backends

        return "selective_scan", available_backends(device)
    return None, []


def resolve_modes(requested: str | None, used_backend: str | None, backends: list[str]) -> list[str]:
    """The modes to run, eager first; unknown names are an error listing the valid ones."""
    valid = [*BASE_MODES, *(f"backend={b}" for b in backends if b != used_backend)]
    modes = valid if requested is None else [m for m in requested.split(",") if m]
    unknown = [m for m in modes if m not in valid]
    if unknown:
        raise ValueError(f"unknown or unavailable mode(s) {unknown}; valid here: {', '.join(valid)}")
    return ["eager", *(m for m in modes if m != "eager")]


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean next-token loss (+ auxiliary losses) for training, and the summed loss and label count."""
    logits = model(batch["input_ids"])
    labels = batch["labels"]
    summed = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    count = int((labels != IGNORE_INDEX).sum())
    mean = summed / max(count, 1)
    aux = model.aux_losses() if hasattr(model, "aux_losses") and model.training else {}
    return (mean + sum(aux.values()) if aux else mean), summed, count


def _median_time(fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prepare(mode: str, model: torch.nn.Module) -> tuple[torch.nn.Module, Any, bool]:
    """The model for ``mode``, the autocast context to run it in, and whether it can train."""
    if mode == "compile":
        return torch.compile(model), nullcontext(), True
    if mode == "bf16":
        return model, torch.autocast("cpu" if not next(model.parameters()).is_cuda else "cuda",
                                     dtype=torch.bfloat16), True
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantized = copy.deepcopy(model)
        quantize_(quantized, Int8WeightOnlyConfig())
        return quantized, nullcontext(), False
    return model, nullcontext(), True


def measure_mode(mode: str, target: Target, args: argparse.Namespace, eval_batches: list, train_batch: dict,
                 device: torch.device) -> dict[str, Any]:
    """Perplexity on the evaluation slice, inference and training-step time of one mode."""
    overrides = [f"model.mixer.backend={mode.split('=', 1)[1]}"] if mode.startswith("backend=") else []
    model = target.build_model(overrides, device)
    result: dict[str, Any] = {"mode": mode, "overrides": overrides}
    runner, context, trains = prepare(mode, model)
    tokens = train_batch["input_ids"].numel()
    with torch.no_grad(), context:
        summed, count = 0.0, 0
        for batch in eval_batches:
            _, s, c = _loss(runner, batch)
            summed, count = summed + float(s), count + c
        infer = _median_time(lambda: runner(eval_batches[0]["input_ids"]), args.warmup, args.repeat)
    result["eval"] = {"loss": summed / count, "ppl": math.exp(summed / count) if summed / count < 700 else math.inf,
                      "labels": count, "batches": len(eval_batches)}
    eval_tokens = eval_batches[0]["input_ids"].numel()
    result["inference"] = {"ms": infer * 1e3, "tokens_per_s": eval_tokens / infer, "batch_shape":
                           list(eval_batches[0]["input_ids"].shape)}
    result["train_step"] = None
    if trains:
        trainee = copy.deepcopy(model).train()
        optimizer = build_optimizer(instantiate(target.optimizer), split_weight_decay(trainee))
        step_model = torch.compile(trainee) if mode == "compile" else trainee

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with context:
                loss, _, _ = _loss(step_model, train_batch)
            loss.backward()
            optimizer.step()

        seconds = _median_time(step, args.warmup, args.repeat)
        result["train_step"] = {"ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
                                "batch_shape": list(train_batch["input_ids"].shape)}
    result["backends"] = model.backends() if hasattr(model, "backends") else {}
    return result


@dataclass
class Target:
    """What is benchmarked: a run directory (its checkpoint) or a model folder (local, or a hub repository's)."""

    source: Path | ModelFolder
    cfg: Any  # the config with --override applied
    overrides: list[str]  # --override, applied again with each mode's own
    checkpoint: str | None
    optimizer: Any  # the training step's optimizer factory config
    optimizer_origin: str  # where it came from: the run, the folder, or the config tree's default

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def out(self) -> Path:
        """``RUN_DIR/benchmarks``; a model folder's ``FOLDER/benchmarks`` or ``benchmarks/<owner>--<name>``."""
        return self.source.results_dir("benchmarks") if isinstance(self.source, ModelFolder) else \
            self.source / "benchmarks"

    def build_model(self, extra: list[str], device: torch.device) -> torch.nn.Module:
        overrides = [*self.overrides, *extra]
        if isinstance(self.source, ModelFolder):
            return self.source.build_model(device, cfg=self.source.config(overrides))
        return RunDir(self.source).build_model(self.checkpoint or "best", device=device, overrides=overrides)


def _default_optimizer() -> Any:
    """``conf/optimizer``'s default, for a model folder exported before bkexp recorded the run's optimizer."""
    from bkexp.bench.common import NO_RECIPE, compose_config

    try:
        return compose_config([NO_RECIPE], command="bkexp bench run").optimizer
    except FileNotFoundError as err:  # installed without the config tree
        raise RunDirError(str(err)) from None


def _load(args: argparse.Namespace) -> tuple[Target, list[str], str | None, str | None, Any]:
    """What to benchmark, the modes to run, the op backend it trained with, the op, and its datamodule; a bad run
    directory, model, override, mode or checkpoint, or data that cannot be read, is an error before anything is
    timed."""
    source = find_model(args.run_dir, args.revision)
    reader = source if isinstance(source, ModelFolder) else RunDir(source)
    cfg = reader.config(args.override)
    if isinstance(reader, ModelFolder):
        reader.refuse_checkpoint(args.checkpoint)
    else:
        reader.checkpoint_path(args.checkpoint or "best")  # a missing checkpoint fails before the data is read
    op, backends = op_backends(cfg, torch.device("cpu"))
    used = None  # the op's backend in training (a run records it), which the eager mode runs
    if op and isinstance(reader, RunDir) and reader.summary_path.is_file():
        used = reader.summary().get("backends", {}).get(op)
    elif op:  # an export does not record it: the backend its config resolves to here is eager's
        used = reader.build_model(cfg=cfg).backends().get(op)
    try:
        modes = resolve_modes(args.modes, used, backends)
    except ValueError as exc:
        raise RunDirError(str(exc)) from None
    optimizer, origin = cfg.get("optimizer"), "the run's" if isinstance(reader, RunDir) else "the folder's"
    if optimizer is None:
        optimizer, origin = _default_optimizer(), "conf/optimizer's default (the folder records none)"
    target = Target(source, cfg, list(args.override), args.checkpoint, optimizer, origin)
    return target, modes, used, op, reader.build_datamodule(stage="fit", cfg=cfg)


def _summary_row(result: dict[str, Any], eager: dict[str, Any] | None) -> dict[str, Any]:
    infer, train = result.get("inference") or {}, result.get("train_step") or {}
    base_infer = (eager or {}).get("inference") or {}
    base_train = (eager or {}).get("train_step") or {}
    return {
        "mode": result["mode"], "status": result["status"],
        "eval_ppl": (result.get("eval") or {}).get("ppl"), "eval_loss": (result.get("eval") or {}).get("loss"),
        "infer_ms": infer.get("ms"), "infer_tokens_per_s": infer.get("tokens_per_s"),
        "train_step_ms": train.get("ms"), "train_tokens_per_s": train.get("tokens_per_s"),
        "infer_speedup": base_infer["ms"] / infer["ms"] if infer and base_infer else None,
        "train_speedup": base_train["ms"] / train["ms"] if train and base_train else None,
        "error": result.get("error"),
    }


def _plots(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    _grouped_bars(ok, "tokens_per_s", "tokens / s", f"{title}: throughput by execution mode",
                  [r["mode"] for r in ok], out / "comparison_bar_plot.png")
    _grouped_bars(ok, "speedup", "speedup over eager float32", f"{title}: speedup (and evaluation-slice perplexity)",
                  [f"{r['mode']}\nppl {r['eval_ppl']:.4g}" for r in ok], out / "speedup_comparison.png", line=1.0)


def _grouped_bars(rows: list[dict[str, Any]], field: str, ylabel: str, title: str, labels: list[str], path: Path,
                  line: float | None = None) -> None:
    """Inference and training-step bars side by side per mode (``infer_<field>``, ``train_<field>``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = range(len(rows))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    ax.bar([x - width / 2 for x in xs], [r[f"infer_{field}"] or 0 for r in rows], width, label="inference")
    ax.bar([x + width / 2 for x in xs], [r[f"train_{field}"] or 0 for r in rows], width, label="training step")
    if line is not None:
        ax.axhline(line, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        target, modes, used, op, datamodule = _load(args)
    except RunDirError as exc:  # one line naming the bad value, before any mode runs
        print(f"bkexp bench run: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cpu")
    eval_batches = []
    for batch in datamodule.val_dataloader():
        eval_batches.append(batch)
        if len(eval_batches) == args.eval_batches:
            break
    train_batch = next(iter(datamodule.train_dataloader()))
    out = target.out
    results = []
    for mode in modes:
        print(f"[bench run] {mode} ...", flush=True)
        try:
            result = {**measure_mode(mode, target, args, eval_batches, train_batch, device), "status": "ok"}
        except Exception as exc:  # one mode failing (no compiler, no torchao) must not hide the others
            result = {"mode": mode, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        results.append(result)
        atomic_write_json(out / f"{mode.replace('=', '_')}_output.json", result)
    eager = next((r for r in results if r["mode"] == "eager" and r["status"] == "ok"), None)
    rows = [_summary_row(r, eager) for r in results]
    source = target.source
    meta = {"run_dir": str(source) if isinstance(source, Path) else None, "model": target.cfg.model.get("name"),
            "checkpoint": args.checkpoint or "best" if isinstance(source, Path) else None,
            "model_source": source.source if isinstance(source, ModelFolder) else None,
            "optimizer": f"{target.optimizer_origin}: {target.optimizer.get('_target_')}",
            "eval_slice": f"first {args.eval_batches} validation batches", "repeat": args.repeat,
            "warmup": args.warmup, "environment": environment(), "threads": torch.get_num_threads(),
            "op": op, "op_backend_used_in_training": used if isinstance(source, Path) else None}
    atomic_write_json(out / "comparison_results.json", {"meta": meta, "modes": results, "summary": rows})
    import pandas as pd

    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    atomic_write_text(out / "comparison_summary.csv", frame.to_csv(index=False))
    _plots(rows, out, f"{meta['model']} ({target.name})")
    print(frame.drop(columns=["error"]).to_string(index=False))
    for r in rows:
        if r["error"]:
            print(f"  {r['mode']}: {r['error']}")
    print(f"\nwrote {out}/<mode>_output.json, comparison_results.json, comparison_summary.csv, "
          "comparison_bar_plot.png, speedup_comparison.png")
    return 0 if eager is not None else 1
