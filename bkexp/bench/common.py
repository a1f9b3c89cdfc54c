"""Shared benchmark plumbing: timing, composing run configs, and writing JSON/CSV/markdown results and plots.

The environment record every result carries is ``bkexp.environment.environment()``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bkexp.environment import describe_machine
from bkexp.utils import atomic_save_figure, atomic_write_text

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MODELS = ("transformer", "bk", "mamba")  # the architectures the benchmarks compare (conf/model)


def model_list(text: str) -> list[str]:
    """``--models a,b`` as a list (argparse ``type=``): an unknown name is an error that lists the valid ones."""
    models = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; valid: {', '.join(MODELS)}")
    return models


def compose_config(overrides: Sequence[str], config_dir: Path = CONF_DIR, command: str = "bkexp bench"):
    """The run config ``train.yaml`` composed with ``overrides`` (what ``python train.py <overrides>`` builds)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not (config_dir / "train.yaml").is_file():
        raise FileNotFoundError(f"config tree not found at {config_dir} ({command} composes the run "
                                "configs; run it from a bkexp checkout or pass --config-dir)")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


# Benchmarks time the size presets as they are: the default experiment's task recipe (conf/recipe/, which
# changes widths and drops the Transformer's MLP on MQAR at the tiny size) must not apply.
NO_RECIPE = "~recipe"


def build_model(name: str, size: str, vocab: int, config_dir: Path = CONF_DIR) -> torch.nn.Module:
    """``model=<name> size=<size>`` composed from the config tree and instantiated (the preset, no recipe)."""
    from hydra.utils import instantiate

    cfg = compose_config([f"model={name}", f"size={size}", NO_RECIPE], config_dir, "bkexp bench decode")
    return instantiate(cfg.model, vocab_size=vocab)


def _timer(device: str | torch.device) -> Callable[[Callable[[], Any]], float]:
    """Seconds of one call; on CUDA synchronised around it, so the time covers the kernels, not their launch."""
    cuda = torch.device(device).type == "cuda"

    def once(fn: Callable[[], Any]) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return once


def time_fn(fn: Callable[[], Any], *, device: str | torch.device = "cpu", warmup: int = 2, repeat: int = 5,
            min_time_s: float = 0.0) -> dict[str, float]:
    """Median/min wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs.

    Repeats further (up to 10x ``repeat``) until at least ``min_time_s`` has been measured.
    """
    once = _timer(device)
    for _ in range(warmup):
        once(fn)
    times = [once(fn) for _ in range(repeat)]
    while sum(times) < min_time_s and len(times) < 10 * repeat:
        times.append(once(fn))
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def interleaved(fns: dict[Any, Callable[[], Any]], *, device: str | torch.device = "cpu", warmup: int = 1,
                repeat: int = 5) -> dict[Any, list[float]]:
    """Seconds per call of each function, called in turn (A, B, C, A, B, C, ...) after ``warmup`` rounds: on a
    machine shared with other processes the load drifts, and interleaving lets every function see the same drift."""
    once = _timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            once(fn)
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return times


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], out_dir: Path, stem: str,
                meta: dict[str, Any]) -> str:
    """Write ``rows`` as ``<stem>.json`` (with ``meta``), ``<stem>.csv`` and ``<stem>.md``; return the markdown."""
    import pandas as pd

    atomic_write_text(out_dir / f"{stem}.json", json.dumps({"meta": meta, "rows": list(rows)}, indent=2, default=str))
    frame = pd.DataFrame(list(rows), columns=list(columns))
    atomic_write_text(out_dir / f"{stem}.csv", frame.to_csv(index=False))
    md = frame.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else frame.to_string(index=False)
    if isinstance(meta.get("environment"), dict):  # a table copied elsewhere keeps where it was measured
        md += f"\n\nMeasured on {describe_machine(meta['environment'])}."
    atomic_write_text(out_dir / f"{stem}.md", md + "\n")
    return md


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def log_log_plot(path: Path, lines: Sequence[tuple[str, Sequence[float], Sequence[float], dict[str, Any]]],
                 xlabel: str, ylabel: str, title: str) -> Path:
    """One PNG of ``(label, xs, ys, plot kwargs)`` lines on log-log axes (x in powers of two)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, xs, ys, kwargs in lines:
        ax.plot(xs, ys, label=label, **{"marker": "o", **kwargs})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)  # the one PNG writer: atomic, mode 0644 like the tables
    plt.close(fig)
    return path
