"""Micro-benchmarks: ``bkexp bench NAME`` runs ``bkexp.bench.<NAME with - as _>.main``.

Each benchmark prints a table and writes JSON, CSV, markdown and plots into ``--out`` (default
``bench_results/<name>``), recording threads, device and library versions.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "bk-core": "bkexp.bench.bk_core",
    "mamba": "bkexp.bench.mamba",
    "quant": "bkexp.bench.quant",
    "train-step": "bkexp.bench.train_step",
    "overhead": "bkexp.bench.overhead",
    "run": "bkexp.bench.run",
    "decode": "bkexp.bench.decode",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: bkexp bench {" + ",".join(BENCHMARKS) + "} [options]")
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"bkexp bench: unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[name]).main(argv[1:]) or 0)
