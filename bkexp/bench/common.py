"""Shared benchmark plumbing: timing, environment record, and writing JSON/CSV/markdown results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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


def build_model(name: str, size: str, vocab: int, config_dir: Path = CONF_DIR) -> torch.nn.Module:
    """``model=<name> size=<size>`` composed from the config tree and instantiated (what a run trains)."""
    from hydra.utils import instantiate

    cfg = compose_config([f"model={name}", f"size={size}"], config_dir, "bkexp bench decode")
    return instantiate(cfg.model, vocab_size=vocab)


def environment() -> dict[str, Any]:
    """Threads, device and library versions: what a benchmark number depends on."""
    import numpy

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
    }
    for mod in ("numba", "triton", "mamba_ssm"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed or fails to import: record that it was absent
            env[mod] = None
    return env


def time_fn(fn: Callable[[], Any], *, device: str | torch.device = "cpu", warmup: int = 2, repeat: int = 5,
            min_time_s: float = 0.0) -> dict[str, float]:
    """Median/min wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs.

    On CUDA, synchronises around each call so the time covers the kernels, not just their launch.
    Repeats further (up to 10x ``repeat``) until at least ``min_time_s`` has been measured.
    """
    cuda = torch.device(device).type == "cuda"

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        once()
    times = [once() for _ in range(repeat)]
    while sum(times) < min_time_s and len(times) < 10 * repeat:
        times.append(once())
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], out_dir: Path, stem: str,
                meta: dict[str, Any]) -> str:
    """Write ``rows`` as ``<stem>.json`` (with ``meta``), ``<stem>.csv`` and ``<stem>.md``; return the markdown."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2, default=str))
    frame = pd.DataFrame(list(rows), columns=list(columns))
    frame.to_csv(out_dir / f"{stem}.csv", index=False)
    md = frame.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else frame.to_string(index=False)
    (out_dir / f"{stem}.md").write_text(md + "\n")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
