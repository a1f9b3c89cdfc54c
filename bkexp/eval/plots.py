"""Plots of ``bkexp eval``: perplexity and memory against context length, loss by position in the window."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bkexp.utils import atomic_save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _length_axis(ax: Any, lengths: Sequence[int], train_len: int | None) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [str(n) for n in lengths])
    ax.minorticks_off()
    if train_len:
        ax.axvline(train_len, color="grey", linestyle="--", linewidth=1, label=f"training length {train_len}")
    ax.set_xlabel("context length L (tokens)")
    ax.grid(True, which="both", alpha=0.3)


def length_plots(series: Sequence[tuple[str, list[dict[str, Any]]]], train_len: int | None, out_dir: Path,
                 title: str) -> list[Path]:
    """``length_ppl.png`` (log x, training length marked, out-of-memory lengths marked) and ``length_memory.png``."""
    plt = _pyplot()
    lengths = sorted({r["length"] for _, rows in series for r in rows})
    written = []
    for stem, key, ylabel in (("length_ppl", "ppl", "perplexity"), ("length_memory", "peak_mb", "peak memory (MB)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, rows in series:
            ok = [r for r in rows if r["status"] == "ok" and r.get(key) is not None and math.isfinite(r[key])]
            line = ax.plot([r["length"] for r in ok], [r[key] for r in ok], marker="o", label=label)[0]
            failed = [r["length"] for r in rows if r["status"] != "ok"]
            if failed:
                ax.plot(failed, [ax.get_ylim()[1]] * len(failed), marker="x", linestyle="none",
                        color=line.get_color(), label=f"{label}: out of memory")
        _length_axis(ax, lengths, train_len)
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        atomic_save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def position_plot(rows: list[dict[str, Any]], out_dir: Path, title: str) -> Path:
    """Mean loss against position in the window (log2 bins), one line per context length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in rows:
        bins = row.get("loss_by_position") or []
        if row["status"] != "ok" or not bins:
            continue
        ax.plot([b["first"] + 1 for b in bins], [b["loss"] for b in bins], marker=".", label=f"L={row['length']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens of context (position in window + 1, log2 bins)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "length_position.png"
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path
