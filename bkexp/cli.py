"""The ``bkexp`` command: ``bench``, ``report``, ``eval``, ``eval-quant``, ``prepare-data``, ``generate``,
``doctor`` (training is ``python train.py``).

Each subcommand lives in its own module and is imported only when used, so ``bkexp report`` does not pay
for importing the kernels and ``bkexp bench`` does not import the reporting stack.
"""

from __future__ import annotations

import importlib
import sys

from bkexp.allocator import configure_cpu_allocator

# subcommand -> (module, one-line help); each module exposes ``main(argv: list[str]) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("bkexp.bench", "micro-benchmarks of ops and blocks (bkexp bench bk-core|mamba|...)"),
    "report": ("bkexp.report.cli", "aggregate run/sweep directories into summary.csv/.md, comparison.json, plots"),
    "eval": ("bkexp.eval.cli", "evaluate trained runs or exported (hub) models: other datasets, context lengths, "
                               "lm-eval tasks, bit widths"),
    "eval-quant": ("bkexp.eval.quant", "evaluate a trained run at several weight bit widths"),
    "prepare-data": ("bkexp.data.prepare", "tokenise a streamed dataset once into a token cache later runs reuse"),
    "generate": ("bkexp.infer.cli", "continue a prompt with a trained run or an exported (hub) model "
                                    "(incremental decoding)"),
    "export": ("bkexp.export.cli", "write a run as a Hugging Face model folder (safetensors, config, tokenizer, card)"),
    "doctor": ("bkexp.doctor", "print versions, devices and which kernel backends are available"),
}


def usage() -> str:
    lines = ["usage: bkexp <command> [args]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Training: python train.py [hydra overrides], e.g. python train.py model=bk bits=8"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"bkexp: unknown command {name!r}; valid: {', '.join(SUBCOMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        configure_cpu_allocator()
    except ValueError as err:
        print(f"bkexp: {err}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
