"""Micro-benchmarks: ``bkexp bench NAME`` runs ``bkexp.bench.<NAME with - as _>.main``.

Each benchmark prints a table and writes JSON, CSV, markdown and plots into ``--out`` (default
``bench_results/<name>``), recording threads, device and library versions.
"""

from __future__ import annotations

import importlib
import sys

# benchmark -> (module, one-line help); each module exposes ``main(argv: list[str]) -> int``.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "bk-core": ("bkexp.bench.bk_core", "BK-Core per backend and N, every memory layout, the DRAM roofline case"),
    "mamba": ("bkexp.bench.mamba", "one Mamba block per selective-scan backend against N"),
    "quant": ("bkexp.bench.quant", "torchao int8 weights against bfloat16/float32: speed, size, accuracy"),
    "train-step": ("bkexp.bench.train_step", "training cost per token against N for the three models; per layer"),
    "overhead": ("bkexp.bench.overhead", "bkexp's training step against a raw PyTorch loop; the cost of logging"),
    "run": ("bkexp.bench.run", "a trained run under each execution mode: speed beside perplexity"),
    "decode": ("bkexp.bench.decode", "prefill and per-token decode cost, decoding-state memory, against context"),
}


def usage() -> str:
    lines = ["usage: bkexp bench <benchmark> [options]   (bkexp bench <benchmark> --help: its options)", "",
             "benchmarks:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"bkexp bench: unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[name][0]).main(argv[1:]) or 0)
