"""``bkexp bench overhead``: bkexp's training step against a raw PyTorch loop on the same model, data and seed.

The two loops train the same composed run config (``model=... size=... seq_len=...`` plus ``--override``), as
``python train.py`` would build it: on the default MQAR task at the tiny size that includes the default
experiment's recipe (conf/recipe/: d_model 64, two layers, batch 128, the Transformer without MLP), which the
``d_model``/``n_layers``/``batch`` columns show; ``--override ~recipe`` times the size preset itself.

- ``bkexp``: ``LMTask`` in a Lightning ``Trainer`` built from the run's trainer config, with the run's
  callbacks (checkpointing left out: it runs after the last step) and loggers (writing under a temporary
  folder), validation off;
- ``raw``: the loop a researcher writes by hand -- the same data loader, forward, next-token cross-entropy
  plus the model's auxiliary losses, backward, gradient-norm clipping, ``optimizer.step()``,
  ``scheduler.step()`` -- with the optimizer and schedule built from the same config.

- ``quiet``: the ``bkexp`` loop with nothing logged: no loggers, and ``log_every_n_steps`` past the last
  step, so the step metrics, the gradient norm and the throughput values are never computed or written
  (the last step still logs, as it does in the ``bkexp`` loop).

All start from ``seed_everything(seed)`` and a freshly built model, so they see the same batches and
must produce the same losses (checked to 5 decimals, as Lightning's own parity tests do). Each step's
time is start-to-start (data fetching, hooks and logging included); steps are paired by index and the
overhead is the median of the per-step differences ``bkexp - raw``. Logging happens on one step in
``log_every_n_steps``, so its cost per step is the *mean* of ``bkexp - quiet`` (``logging_ms``, with its
standard error: resolve it with a small model and many steps, e.g. ``--steps 200``). ``--rounds``
repeats the loops, rotating which runs first, so a change of machine load hits all alike. Peak memory is
the process's peak resident set (or CUDA peak) during each loop.

Writes ``overhead.{json,csv,md}`` (one row per model), ``steps.csv`` (every paired step) and
``overhead.png`` (per-step times of the loops) under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from bkexp.bench.common import CONF_DIR, compose_config, model_list, write_table
from bkexp.environment import environment
from bkexp.memory import peak_memory_mb, reset_peak_memory
from bkexp.ops.cross_entropy import token_cross_entropy
from bkexp.train.module import LMTask, build_optimizer, split_weight_decay

COLUMNS = ["model", "size", "d_model", "n_layers", "seq_len", "batch", "steps", "raw_step_ms", "bkexp_step_ms",
           "overhead_ms", "overhead_pct", "log_every_n_steps", "logging_ms", "logging_ms_se", "raw_peak_mb",
           "bkexp_peak_mb", "max_loss_diff", "losses_equal"]
IGNORE_INDEX = -100


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bkexp bench overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=model_list, default="transformer,bk",
                   help="comma separated (default transformer,bk)")
    p.add_argument("--size", default="tiny", help="size preset (default tiny)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per loop and round (default 30)")
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the timing (warmup; default 3)")
    p.add_argument("--rounds", type=int, default=2, help="times the loops run, rotating their order (default 2)")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override for both loops (repeatable), e.g. dataset=iid")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--config-dir", type=Path, default=CONF_DIR, help="bkexp's conf/ tree")
    p.add_argument("--out", type=Path, default=Path("bench_results/overhead"))
    args = p.parse_args(argv)
    if args.steps < 2 or not 0 <= args.skip < args.steps - 1 or args.rounds < 1:
        p.error(f"need --steps >= 2, 0 <= --skip < steps - 1 and --rounds >= 1 (got steps={args.steps}, "
                f"skip={args.skip}, rounds={args.rounds})")
    return args


def _config(model: str, args: argparse.Namespace, log_dir: Path):
    overrides = [f"model={model}", f"size={args.size}", f"seq_len={args.seq_len}", f"trainer.max_steps={args.steps}",
                 "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", f"paths.output_dir={log_dir}", *args.override]
    return compose_config(overrides, args.config_dir, "bkexp bench overhead")


class _StepClock:
    """Start-to-start time of every training step, and every step's loss (a Lightning callback)."""

    def __init__(self) -> None:
        class Callback(pl.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):  # noqa: N805
                self.starts.append(time.perf_counter())

            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):  # noqa: N805
                self.losses.append(float(outputs["loss"].detach()))

            def on_train_end(cb, trainer, pl_module):  # noqa: N805
                self.starts.append(time.perf_counter())

        self.callback = Callback()
        self.starts: list[float] = []
        self.losses: list[float] = []


def run_bkexp(cfg: Any, datamodule: Any, quiet: bool = False) -> tuple[list[float], list[float], float]:
    """Per-step seconds, per-step losses and peak MB of ``LMTask`` under the run's Lightning Trainer.

    ``quiet``: no loggers and no logging step before the last (the loop ``logging_ms`` is measured against).
    """
    reset_peak_memory()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    task = LMTask(model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
                  vocab_size=datamodule.vocab_size, log_accuracy=datamodule.has_answer_mask)
    clock = _StepClock()
    callbacks = [c for c in (instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None)
                 if not isinstance(c, ModelCheckpoint)]
    loggers = [] if quiet else [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    cadence = {"log_every_n_steps": int(cfg.trainer.max_steps) + 1} if quiet else {}
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[*callbacks, clock.callback],
                          enable_checkpointing=False, **cadence)
    trainer.fit(task, train_dataloaders=datamodule.train_dataloader())
    times = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
    return times, clock.losses, peak_memory_mb(trainer.strategy.root_device)


def run_raw(cfg: Any, datamodule: Any) -> tuple[list[float], list[float], float]:
    """The same training as a hand-written PyTorch loop: per-step seconds, losses and peak MB."""
    reset_peak_memory()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size).train()
    optimizer = build_optimizer(instantiate(cfg.optimizer), split_weight_decay(model))
    scheduler = instantiate(cfg.scheduler)(optimizer)
    clip = cfg.trainer.get("gradient_clip_val") or 0.0
    steps = int(cfg.trainer.max_steps)
    starts, losses = [], []
    done = 0
    loader = datamodule.train_dataloader()  # built once, as Lightning does: its sampler reshuffles every epoch
    while done < steps:
        for batch in loader:
            starts.append(time.perf_counter())
            logits = model(batch["input_ids"])
            labels = batch["labels"].flatten()  # the loss as the LightningModule computes it (same op, same sum)
            per_token = token_cross_entropy(logits.float().flatten(0, 1), labels, IGNORE_INDEX)
            loss = per_token.sum() / (labels != IGNORE_INDEX).sum()
            aux = model.aux_losses() if hasattr(model, "aux_losses") else {}
            total = loss + sum(aux.values()) if aux else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if clip:  # over the optimizer's parameters in group order, as Lightning clips (the norm's summation order)
                torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(total.detach()))
            done += 1
            if done == steps:
                break
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])], losses, peak_memory_mb(torch.device("cpu"))


def compare(model: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with tempfile.TemporaryDirectory(prefix="bkexp-overhead-") as tmp:
        cfg = _config(model, args, Path(tmp))
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")
        pairs: list[dict[str, Any]] = []
        loops = {"raw": run_raw, "bkexp": run_bkexp, "quiet": lambda c, d: run_bkexp(c, d, quiet=True)}
        peaks: dict[str, list[float]] = {name: [] for name in loops}
        max_diff = 0.0
        for r in range(args.rounds):
            names = list(loops)
            result = {}
            for name in names[r % 3:] + names[:r % 3]:
                result[name] = loops[name](cfg, datamodule)
                peaks[name].append(result[name][2])
            (raw_t, raw_l, _), (bk_t, bk_l, _), (q_t, q_l, _) = (result[name] for name in loops)
            if not len(raw_l) == len(bk_l) == len(q_l):
                raise RuntimeError(f"{model}: the loops ran {len(raw_l)}, {len(bk_l)} and {len(q_l)} steps")
            max_diff = max(max_diff, *(abs(a - b) for a, b in zip(raw_l, bk_l)),
                           *(abs(a - b) for a, b in zip(q_l, bk_l)))
            for i, (tr, tb, tq, lr, lb) in enumerate(zip(raw_t, bk_t, q_t, raw_l, bk_l)):
                pairs.append({"model": model, "round": r, "step": i, "raw_ms": tr * 1e3, "bkexp_ms": tb * 1e3,
                              "quiet_ms": tq * 1e3, "diff_ms": (tb - tr) * 1e3, "logging_ms": (tb - tq) * 1e3,
                              "raw_loss": lr, "bkexp_loss": lb})
    timed = [p for p in pairs if p["step"] >= args.skip]
    raw_ms = statistics.median(p["raw_ms"] for p in timed)
    overhead = statistics.median(p["diff_ms"] for p in timed)
    logging = [p["logging_ms"] for p in timed]
    batch = int(cfg.dataset.get("batch_size", 0))
    row = {"model": model, "size": args.size, "d_model": int(cfg.model.d_model), "n_layers": int(cfg.model.n_layers),
           "seq_len": args.seq_len, "batch": batch, "steps": len(timed),
           "raw_step_ms": raw_ms, "bkexp_step_ms": statistics.median(p["bkexp_ms"] for p in timed),
           "overhead_ms": overhead, "overhead_pct": 100.0 * overhead / raw_ms,
           "log_every_n_steps": int(cfg.trainer.log_every_n_steps), "logging_ms": statistics.fmean(logging),
           "logging_ms_se": statistics.stdev(logging) / math.sqrt(len(logging)),
           "raw_peak_mb": max(peaks["raw"]), "bkexp_peak_mb": max(peaks["bkexp"]),
           "max_loss_diff": max_diff, "losses_equal": max_diff < 0.5e-5}
    return row, pairs


def _plot(pairs: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({p["model"] for p in pairs})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rs = [p for p in pairs if p["model"] == model]
        xs = range(len(rs))
        ax.plot(xs, [p["raw_ms"] for p in rs], ".-", label="raw PyTorch loop")
        ax.plot(xs, [p["bkexp_ms"] for p in rs], ".-", label="bkexp (Lightning)")
        ax.plot(xs, [p["quiet_ms"] for p in rs], ".-", alpha=0.6, label="bkexp, nothing logged")
        ax.set_title(model)
        ax.set_xlabel("step (rounds concatenated)")
        ax.set_ylabel("ms per step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, pairs = [], []
    for model in args.models:
        row, model_pairs = compare(model, args)
        rows.append(row)
        pairs.extend(model_pairs)
        print(f"{model:>12}: raw {row['raw_step_ms']:.1f} ms, bkexp {row['bkexp_step_ms']:.1f} ms, overhead "
              f"{row['overhead_ms']:+.2f} ms ({row['overhead_pct']:+.1f}%), logging {row['logging_ms']:+.2f} "
              f"+- {row['logging_ms_se']:.2f} ms per step, losses equal to 5 decimals: "
              f"{row['losses_equal']} (max diff {row['max_loss_diff']:.2e})", flush=True)
    meta = {"environment": environment(), "threads": torch.get_num_threads(), "overrides": args.override,
            "rounds": args.rounds, "skip": args.skip,
            "note": "start-to-start step times paired by step index; overhead = median of (bkexp - raw); "
                    "logging_ms = mean of (bkexp - quiet) +- its standard error; bkexp = LMTask in the run's "
                    "Trainer with its callbacks (no checkpointing) and loggers; quiet = the same without loggers "
                    "and without logging steps before the last"}
    md = write_table(rows, COLUMNS, args.out, "overhead", meta)
    write_table(pairs, list(pairs[0]), args.out, "steps", meta)
    _plot(pairs, args.out / "overhead.png")
    print(f"\n{md}\n\nthreads={meta['threads']}; wrote {args.out}/overhead.{{json,csv,md,png}}, steps.{{json,csv,md}}")
    return 0 if all(r["losses_equal"] and math.isfinite(r["overhead_ms"]) for r in rows) else 1
