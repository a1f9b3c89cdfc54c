"""PNG plots of a RunSet: each metric vs the swept key, speedup vs the baseline, and training curves."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.axis import Axis
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from bkexp.report.collect import ROW_KEY, RunSet, display, point_label, sort_key
from bkexp.report.tables import Metric, cells
from bkexp.rundir import atomic_save_figure

# Report-owned PNG names; a re-run deletes its own stale ones and nothing else in plots/.
PLOT_PREFIXES = ("metric_", "speedup_", "curves_")
CURVE_METRICS = ("train/loss", "val/loss")
# A curve with at most this many points gets a marker on each (a line alone hides how few points there are).
MARKER_MAX_POINTS = 30
# Below this max/min ratio a log axis has no room for tick labels and shows nothing a linear one would not.
LOG_MIN_RATIO = 3.0
MIN_LABELLED_TICKS = 3


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "all"


def is_length_key(key: str) -> bool:
    """Axes measured in tokens (seq_len, context_length, ...) are plotted on a log scale."""
    return bool(re.search(r"(^|[._])(seq_len|len|length|context_length|n_ctx)$", key))


def save_figure(fig: Figure, path: Path) -> Path:
    """The report's PNG settings on the shared atomic writer (no half-written PNG, mode 0644)."""
    return atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")


def tick_label(value: float, _pos: Any = None) -> str:
    """Short tick text: 300, 2k, 1.5M, 2e-05."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            return f"{value / threshold:.4g}{suffix}"
    return f"{value:.3g}"


def set_value_scale(axis: Axis, values: Sequence[float], log: bool) -> str:
    """A readable value axis for ``values``: log only over a wide, positive range, with at least three labelled
    ticks (1-2-5 or 1..9 per decade when the range is narrow); linear otherwise. Returns the scale used."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    set_scale = axis.axes.set_yscale if axis is axis.axes.yaxis else axis.axes.set_xscale
    if not log or lo <= 0 or hi / lo < LOG_MIN_RATIO:
        set_scale("linear")
        axis.set_major_locator(MaxNLocator(nbins=6))
        axis.set_major_formatter(FuncFormatter(tick_label))
        return "linear"
    set_scale("log")
    ticks: list[float] = []
    for subs in ((1.0,), (1.0, 2.0, 5.0), tuple(float(i) for i in range(1, 10))):
        candidates = LogLocator(base=10, subs=subs, numticks=100).tick_values(lo, hi)
        ticks = [t for t in candidates if lo / 1.05 <= t <= hi * 1.05]
        if len(ticks) >= MIN_LABELLED_TICKS:
            break
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(tick_label))
    axis.set_minor_formatter(NullFormatter())
    return "log"


def _x_key(runs: RunSet) -> str | None:
    """The point key that becomes the x axis: seq_len if swept, else the first numeric one, else the first."""
    if not runs.point_keys:
        return None
    if "seq_len" in runs.point_keys:
        return "seq_len"
    for key in runs.point_keys:
        values = [v for v in runs.frame[key] if v is not None]
        if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return key
    return runs.point_keys[0]


def _colors(models: Sequence[str]) -> dict[str, Any]:
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % len(palette)] for i, m in enumerate(models)}


def plot_metric(runs: RunSet, metric: Metric, out_dir: Path) -> Path | None:
    """Metric vs the swept key, one line per model (and per value of any other swept key), std error bars."""
    table = cells(runs, metric.column)
    models = runs.models()
    colors = _colors(models)
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    x_key = _x_key(runs)
    if x_key is None:  # one configuration: a bar per model
        model_cells = [table[(m, ())] for m in models]  # every model has a cell: each has a run at the one point
        heights = [c.mean if c.n else 0.0 for c in model_cells]
        ax.bar(models, heights, yerr=[c.std or 0.0 for c in model_cells], capsize=4,
               color=[colors[m] for m in models])
        for i, cell in enumerate(model_cells):
            if cell.n == 0:
                ax.annotate("failed" if cell.n_failed else "n/a", (i, 0), ha="center", va="bottom", color="red")
        ax.set_xlabel(ROW_KEY)
        name = f"metric_{slug(metric.name)}.png"
    else:
        other_keys = [k for k in runs.point_keys if k != x_key]
        x_index = runs.point_keys.index(x_key)
        xs_all = sorted({p[x_index] for p in runs.points()}, key=sort_key)
        numeric_x = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
        position = {v: (float(v) if numeric_x else float(i)) for i, v in enumerate(xs_all)}
        all_values: list[float] = []
        for model in models:
            series: dict[tuple, list[tuple[Any, Any]]] = {}
            for (m, point), cell in table.items():
                if m != model:
                    continue
                rest = tuple(v for k, v in zip(runs.point_keys, point) if k != x_key)
                series.setdefault(rest, []).append((point[x_index], cell))
            ordered = sorted(series.items(), key=lambda kv: tuple(sort_key(v) for v in kv[0]))
            for line_index, (rest, items) in enumerate(ordered):
                items.sort(key=lambda xc: sort_key(xc[0]))
                rest_label = ", ".join(f"{k}={display(v)}" for k, v in zip(other_keys, rest))
                label = f"{model} ({rest_label})" if other_keys else model
                ok = [(position[x], c) for x, c in items if c.n > 0]
                failed = [position[x] for x, c in items if c.n == 0 and c.n_failed]
                if ok:
                    xs = [x for x, _ in ok]
                    ys = [c.mean for _, c in ok]
                    yerr = [c.std or 0.0 for _, c in ok]
                    all_values += ys
                    ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, color=colors[model], label=label,
                                linestyle=["-", "--", ":", "-."][line_index % 4])
                if failed:
                    # Failed points stay visible: a red x on the axis at the swept value.
                    ax.plot(failed, [0.02] * len(failed), "x", color="red", markersize=9,
                            transform=ax.get_xaxis_transform(), label=f"{label}: failed")
        length_axis = is_length_key(x_key) and numeric_x and all(float(v) > 0 for v in xs_all)
        if length_axis:
            ax.set_xscale("log", base=2)
        set_value_scale(ax.yaxis, all_values, log=length_axis and metric.scale_like_length)
        ax.set_xticks([position[v] for v in xs_all])
        ax.set_xticklabels([display(v) for v in xs_all])
        if length_axis:
            ax.xaxis.set_minor_locator(NullLocator())  # only the swept lengths as x ticks, not 2^k minor marks
        ax.set_xlabel(x_key)
        name = f"metric_{slug(metric.name)}_vs_{slug(x_key)}.png"
    if metric.from_zero:  # a size: a 1% difference must look like 1%
        ax.set_ylim(bottom=0)
    ax.set_ylabel(metric.label)
    title = metric.label + (f" ({metric.better} is better)" if metric.better else "")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, out_dir / name)


def plot_speedup(runs: RunSet, comparison_result: dict[str, Any], out_dir: Path) -> Path | None:
    """Grouped bars: train tokens/s relative to the baseline at each swept point (1 = as fast)."""
    if "skipped" in comparison_result:
        return None
    baseline = comparison_result["baseline"]
    points = [p for p in comparison_result["points"] if "skipped" not in p]
    models = [m for m in runs.models() if m != baseline]
    if not points or not models:
        return None
    colors = _colors(runs.models())
    fig = Figure(figsize=(min(20.0, max(6.4, 0.6 * len(points) * (len(models) + 1))), 4.4))
    ax = fig.subplots()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs, ys = [], []
        for j, p in enumerate(points):
            value = p["models"].get(model, {}).get("speedup")
            if value is not None:
                xs.append(j + (i - (len(models) - 1) / 2) * width)
                ys.append(value)
        bars = ax.bar(xs, ys, width=width, color=colors[model], label=model)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(points)))
    crowded = len(runs.point_keys) > 1 or len(points) > 8
    ax.set_xticklabels([p["label"] for p in points], rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_xlabel(", ".join(runs.point_keys) or "")
    ax.set_ylabel(f"train tokens/s ÷ {baseline}")
    ax.set_title(f"Speedup vs {baseline} (>1 is faster)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir / f"speedup_vs_{slug(baseline)}.png")


def read_curves(csv_path: Path) -> dict[str, pd.DataFrame]:
    """{metric: DataFrame(x_tokens, x_step, value)} from a Lightning CSVLogger file with sparse rows.

    Rows that carry val/loss usually lack train/tokens; their token count is interpolated from the step.
    """
    frame = pd.read_csv(csv_path)
    if "step" not in frame.columns:
        return {}
    frame = frame.sort_values("step", kind="stable")
    tokens = None
    if "train/tokens" in frame.columns:
        known = frame[["step", "train/tokens"]].dropna().drop_duplicates("step")
        if not known.empty:
            tokens = (known["step"].to_numpy(float), known["train/tokens"].to_numpy(float))
    curves: dict[str, pd.DataFrame] = {}
    for metric in CURVE_METRICS:
        if metric not in frame.columns:
            continue
        rows = frame[["step", metric]].dropna()
        if rows.empty:
            continue
        steps = rows["step"].to_numpy(float)
        x_tokens = np.interp(steps, *tokens) if tokens is not None else np.full(len(steps), np.nan)
        curves[metric] = pd.DataFrame({"x_tokens": x_tokens, "x_step": steps, "value": rows[metric].to_numpy(float)})
    return curves


def plot_curves(runs: RunSet, out_dir: Path) -> list[Path]:
    """One PNG per swept point: train/loss and val/loss vs tokens seen (steps if tokens were not logged)."""
    written: list[Path] = []
    colors = _colors(runs.models())
    by_point: dict[tuple, list[dict[str, Any]]] = {}
    for row in runs.frame.to_dict("records"):
        if row["run_dir"] in runs.curves:
            by_point.setdefault(runs.point_of(row), []).append(row)
    for point in sorted(by_point, key=lambda p: tuple(sort_key(v) for v in p)):
        loaded = []
        for row in sorted(by_point[point], key=lambda r: (sort_key(r[ROW_KEY]), sort_key(r.get("seed")))):
            try:
                curves = read_curves(runs.curves[row["run_dir"]])
            except (OSError, ValueError, pd.errors.ParserError):
                continue  # an unreadable metrics.csv loses its curve, not the report
            if curves:
                loaded.append((row, curves))
        if not loaded:
            continue
        use_tokens = all(not c.empty and c["x_tokens"].notna().all() for _, cs in loaded for c in cs.values())
        x_column, x_label = ("x_tokens", "tokens seen") if use_tokens else ("x_step", "step")
        fig = Figure(figsize=(11, 4.2))
        axes = fig.subplots(1, len(CURVE_METRICS))
        seeds = sorted({r.get("seed") for r, _ in loaded}, key=sort_key)
        styles = {s: ["-", "--", ":", "-."][i % 4] for i, s in enumerate(seeds)}
        for ax, metric in zip(axes, CURVE_METRICS):
            for row, curves in loaded:
                if metric not in curves:
                    continue
                c = curves[metric]
                label = f"{row[ROW_KEY]} seed={display(row.get('seed'))}"
                label += "" if row["status"] == "ok" else " (failed)"
                ax.plot(c[x_column], c["value"], linestyle=styles[row.get("seed")], color=colors[str(row[ROW_KEY])],
                        marker="o" if len(c) <= MARKER_MAX_POINTS else None, markersize=3, label=label)
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric)
            ax.set_title(metric)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        label = point_label(runs.point_keys, point)
        keys = ", ".join(runs.point_keys)
        fig.suptitle(f"Training curves at {keys}={label}" if len(runs.point_keys) == 1 else f"Training curves: {label}")
        name = "curves.png" if not runs.point_keys else "curves_" + slug(
            "_".join(f"{k}={display(v)}" for k, v in zip(runs.point_keys, point))) + ".png"
        written.append(save_figure(fig, out_dir / name))
    return written


def write_plots(runs: RunSet, metrics: Sequence[Metric], comparison_result: dict[str, Any] | None,
                out_dir: Path) -> list[Path]:
    """Every plot of the report, into out_dir; report-owned PNGs from an earlier report that no longer apply
    are removed so the folder matches the tables."""
    written: list[Path] = []
    for metric in metrics:
        path = plot_metric(runs, metric, out_dir)
        if path is not None:
            written.append(path)
    if comparison_result is not None:
        path = plot_speedup(runs, comparison_result, out_dir)
        if path is not None:
            written.append(path)
    written += plot_curves(runs, out_dir)
    keep = {p.resolve() for p in written}
    if out_dir.is_dir():
        for old in out_dir.glob("*.png"):
            if old.name.startswith(PLOT_PREFIXES) and old.resolve() not in keep:
                old.unlink()
    return written
