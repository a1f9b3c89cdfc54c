"""``bkexp bench train-step``: training cost per token against N for the three models at one size preset.

Each model is composed from the run configs (``model=<name> size=<size>``) and trained as a run trains it:
forward, next-token cross-entropy plus the model's auxiliary losses, backward, and one step of the
configured optimizer (``conf/optimizer``, built like the LightningModule builds it). A step holds about
``--tokens`` tokens (batch = tokens // N, at least 1). For each N the models are timed interleaved (model
A, B, C, A, B, C, ...) and the median step is reported, so on a shared machine a load change hits every
model alike; ``vs_<baseline>`` is the ratio of per-token costs to the baseline model at the same N (also
printed as one line per N, e.g. ``N=256  mamba/transformer 1.180x``).

``--components`` adds the per-layer table (``components.*``; ``--components-only``: that table alone): forward+backward
of each sublayer of one block on ``(batch, N, d_model)`` activations -- every mixer and feed-forward, the custom ops alone
(BK-Core, selective scan) on the inputs their mixer passes them, and the references the issue compares
against (a dense MLP with the MoE's active FLOPs) -- timed interleaved in one process.

Writes ``train_step.{json,csv,md}``, ``train_step.png`` (µs per token against N) and, with
``--components``, ``components.{json,csv,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

import bkexp.models.mixers.bk as bk_module
from bkexp.bench.common import (CONF_DIR, MODELS, NO_RECIPE, compose_config, interleaved, log_log_plot,
                                model_list, write_table)
from bkexp.devices import device_argument
from bkexp.environment import environment
from bkexp.models.ffn import MLP
from bkexp.ops.cross_entropy import token_cross_entropy
from bkexp.train.module import build_optimizer, split_weight_decay

DEFAULT_N = "64,128,256,512,1024,2048,4096,8192"
COLUMNS = ["model", "n", "batch", "step_ms", "us_per_token", "tokens_per_s", "runs", "non_embedding_params"]
COMPONENT_COLUMNS = ["component", "model", "batch", "n", "d_model", "fwd_bwd_ms", "us_per_token", "vs_reference",
                     "reference", "runs"]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bkexp bench train-step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", help="size preset (conf/size): tiny, small, medium, ... (default small)")
    p.add_argument("--models", type=model_list, default=",".join(MODELS),
                   help=f"comma separated (default {','.join(MODELS)})")
    p.add_argument("--n", default=DEFAULT_N, help=f"sequence lengths (default {DEFAULT_N})")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step: batch = tokens // N (default 8192)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (embedding and LM head; default 8192)")
    p.add_argument("--repeat", type=int, default=5, help="timed steps per model and N (median; default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--baseline", default="transformer",
                   help="model the vs_ column divides by; no vs_ column when it is not among --models "
                        "(default transformer)")
    p.add_argument("--components", action="store_true", help="also time each sublayer of one block (components.*)")
    p.add_argument("--components-only", action="store_true",
                   help="only the per-layer table (implies --components; no training steps, no train_step.*)")
    p.add_argument("--components-n", type=int, default=256, help="N of the components table (default 256)")
    p.add_argument("--components-batch", type=int, default=32, help="batch of the components table (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="auto", type=device_argument,
                   help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"],
                   help="32: float32; bf16-mixed: bfloat16 autocast with float32 weights (flash SDPA on GPU)")
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override applied to every model (repeatable), e.g. model/ffn=mlp")
    p.add_argument("--config-dir", type=Path, default=CONF_DIR, help="bkexp's conf/ tree")
    p.add_argument("--out", type=Path, default=Path("bench_results/train-step"))
    args = p.parse_args(argv)
    args.components = args.components or args.components_only
    try:
        args.n = [int(x) for x in args.n.split(",")]
    except ValueError:
        p.error(f"--n must be comma separated integers, got {args.n!r}")
    if any(n < 2 for n in args.n) or args.tokens < 1 or args.repeat < 1 or args.vocab < 2:
        p.error("need every N >= 2, --tokens >= 1, --repeat >= 1 and --vocab >= 2")
    if args.baseline not in MODELS:
        p.error(f"unknown --baseline {args.baseline!r}; valid: {', '.join(MODELS)}")
    if args.baseline not in args.models:  # a valid model that was not timed: nothing to divide by
        args.baseline = None
    return args


def build(name: str, args: argparse.Namespace, n: int) -> tuple[torch.nn.Module, Callable[..., Any]]:
    """The model and its optimizer factory as ``python train.py model=<name> size=<size> seq_len=<n>`` builds them
    (the size preset itself: no task recipe)."""
    cfg = compose_config([f"model={name}", f"size={args.size}", f"seq_len={n}", NO_RECIPE, *args.override],
                         args.config_dir, "bkexp bench train-step")
    torch.manual_seed(0)
    return instantiate(cfg.model, vocab_size=args.vocab), instantiate(cfg.optimizer)


def train_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int, n: int,
                  vocab: int, precision: str = "32") -> Callable[[], float]:
    """One optimizer step on random tokens (loss = next-token cross-entropy + auxiliary losses).

    The returned float synchronises with the device, so a timed call covers the step's kernels.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, vocab, (batch, n + 1), generator=gen).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(inputs)
        loss = token_cross_entropy(logits.float().flatten(0, 1), labels.flatten()).mean()  # as the runs' loss
        aux = model.aux_losses() if hasattr(model, "aux_losses") else {}
        total = loss + sum(aux.values()) if aux else loss
        total.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.n:
        batch = max(1, args.tokens // n)
        fns, params = {}, {}
        for name in args.models:
            model, factory = build(name, args, n)
            model.to(args.device).train()
            fns[name] = train_step_fn(model, build_optimizer(factory, split_weight_decay(model)), batch, n, args.vocab,
                                      args.precision)
            params[name] = model.param_counts()["non_embedding"]
        times = interleaved(fns, device=args.device, warmup=args.warmup, repeat=args.repeat)
        for name, ts in times.items():
            median = statistics.median(ts)
            rows.append({"model": name, "n": n, "batch": batch, "step_ms": median * 1e3,
                         "us_per_token": median / (batch * n) * 1e6, "tokens_per_s": batch * n / median,
                         "runs": len(ts), "non_embedding_params": params[name]})
            print(f"{name:>12} N={n:<6} batch={batch:<4} step {median * 1e3:9.1f} ms  "
                  f"{rows[-1]['us_per_token']:8.2f} µs/token", flush=True)
    if args.baseline:
        base = {r["n"]: r["us_per_token"] for r in rows if r["model"] == args.baseline}
        for r in rows:
            r[f"vs_{args.baseline}"] = r["us_per_token"] / base[r["n"]]
        others = [m for m in args.models if m != args.baseline]
        print(f"\nper-token cost relative to {args.baseline} (same N, interleaved medians):")
        for n in args.n:
            ratios = {r["model"]: r[f"vs_{args.baseline}"] for r in rows if r["n"] == n}
            print(f"  N={n:<6} " + "  ".join(f"{m}/{args.baseline} {ratios[m]:.3f}x" for m in others), flush=True)
    return rows


class _Capture:
    """Wraps an op so the next call records its arguments (the op still runs)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.args: tuple | None = None
        self.kwargs: dict[str, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.args, self.kwargs = args, kwargs
        return self.fn(*args, **kwargs)


def _fwd_bwd(fn: Callable[..., Any], *inputs: torch.Tensor, **kwargs: Any) -> Callable[[], None]:
    """forward+backward of ``fn`` on detached leaf views of ``inputs`` (layout kept) (gradient: ones on every float
    output). A module's parameter gradients are dropped after each call, as a training step's ``zero_grad``
    does: left in place, every call would add into them (one more op per parameter, which charges a module
    with many weight tensors, such as the MoE's experts, for what no training step runs)."""
    leaves = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) if isinstance(t, torch.Tensor)
              else t for t in inputs]
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []

    def run() -> None:
        out = fn(*leaves, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for tensor in (*leaves, *params):
            if isinstance(tensor, torch.Tensor):
                tensor.grad = None

    return run


def component_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Forward+backward of each sublayer of one block of every model at (components_batch, components_n)."""
    n, batch = args.components_n, args.components_batch
    fns: dict[tuple[str, str], Callable[[], None]] = {}
    shapes: dict[tuple[str, str], int] = {}
    references: dict[tuple[str, str], tuple[str, str]] = {}
    for name in args.models:
        model, _ = build(name, args, n)
        model.to(args.device)
        block = model.blocks[0]
        d = model.d_model
        x = torch.randn(batch, n, d, device=args.device)
        fns[(name, f"mixer ({type(block.mixer).__name__})")] = _fwd_bwd(block.mixer, x)
        shapes[(name, f"mixer ({type(block.mixer).__name__})")] = d
        if block.ffn is not None:
            label = f"ffn ({type(block.ffn).__name__})"
            fns[(name, label)] = _fwd_bwd(block.ffn, x)
            shapes[(name, label)] = d
            experts = getattr(block.ffn, "experts", None)
            if experts is not None:  # a dense MLP with the MoE's active FLOPs: top_k experts' hidden width
                hidden = experts[0].fc1.out_features * block.ffn.top_k
                dense = MLP(d, expansion=hidden / d, bias=experts[0].fc1.bias is not None).to(args.device)
                ref = (name, f"dense MLP, same active FLOPs ({hidden} hidden)")
                fns[ref] = _fwd_bwd(dense, x)
                shapes[ref] = d
                references[(name, label)] = ref
        # The custom op alone, on the inputs the mixer passes it in one forward.
        if hasattr(block.mixer, "scan"):
            capture = _Capture(block.mixer.scan)
            block.mixer.scan = capture
            with torch.no_grad():
                block.mixer(x)
            del block.mixer.scan
            fns[(name, "selective scan op")] = _fwd_bwd(capture.fn, *capture.args, **capture.kwargs)
            shapes[(name, "selective scan op")] = d
        elif hasattr(bk_module, "bk_core") and type(block.mixer).__module__ == bk_module.__name__:
            capture = _Capture(bk_module.bk_core)
            bk_module.bk_core = capture
            try:
                with torch.no_grad():
                    block.mixer(x)
            finally:
                bk_module.bk_core = capture.fn
            fns[(name, "BK-Core op")] = _fwd_bwd(capture.fn, *capture.args, **capture.kwargs)
            shapes[(name, "BK-Core op")] = d
    times = interleaved(fns, device=args.device, warmup=args.warmup, repeat=args.repeat)
    medians = {key: statistics.median(ts) for key, ts in times.items()}
    rows = []
    for (model, component), median in medians.items():
        ref = references.get((model, component))
        rows.append({"component": component, "model": model, "batch": batch, "n": n, "d_model": shapes[(model, component)],
                     "fwd_bwd_ms": median * 1e3, "us_per_token": median / (batch * n) * 1e6,
                     "vs_reference": median / medians[ref] if ref else None, "reference": ref[1] if ref else None,
                     "runs": len(times[(model, component)])})
        print(f"{model:>12} {component:<48} {median * 1e3:9.2f} ms"
              + (f"  x{rows[-1]['vs_reference']:.2f} of {ref[1]}" if ref else ""), flush=True)
    return rows


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"environment": environment(), "size": args.size, "models": args.models, "tokens_per_step": args.tokens,
            "vocab": args.vocab, "repeat": args.repeat, "warmup": args.warmup, "overrides": args.override,
            "threads": torch.get_num_threads(), "device": str(args.device), "precision": args.precision,
            "note": "median wall time of one optimizer step (forward, cross-entropy + aux losses, backward, "
                    "optimizer.step) per model, models interleaved per N; batch = tokens // N"}
    written = []
    if args.components:
        comp = component_rows(args)
        md = write_table(comp, COMPONENT_COLUMNS, args.out, "components",
                         {**meta, "note": "forward+backward of one block's sublayers on random (batch, N, d_model) "
                                          "activations, gradient of ones; interleaved, median"})
        print(f"\nper-layer components, N={args.components_n}, batch {args.components_batch}\n{md}\n")
        written.append("components.{json,csv,md}")
        if args.components_only:
            print(f"threads={meta['threads']}; wrote {args.out}/components.{{json,csv,md}}")
            return 0 if all(math.isfinite(r["fwd_bwd_ms"]) for r in comp) else 1
    rows = step_rows(args)
    columns = COLUMNS + ([f"vs_{args.baseline}"] if args.baseline else [])
    md = write_table(rows, columns, args.out, "train_step", meta)
    lines = []
    for i, name in enumerate(args.models):
        rs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["n"])
        lines.append((name, [r["n"] for r in rs], [r["us_per_token"] for r in rs], {"color": f"C{i}"}))
    log_log_plot(args.out / "train_step.png", lines, "sequence length N", "µs per token (training step)",
                 f"Training cost per token, size={args.size}, {args.tokens} tokens per step")
    print(f"\n{md}\n\nthreads={meta['threads']}; wrote {args.out}/train_step.{{json,csv,md,png}}"
          + (f", {', '.join(written)}" if written else ""))
    return 0 if all(math.isfinite(r["us_per_token"]) for r in rows) else 1
