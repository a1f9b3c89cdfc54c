"""Turn a RunSet into summary.csv, the summary.md pivot tables and the comparison against a baseline model."""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bkexp.held_out import OVERLAP_COLUMN, OVERLAP_N
from bkexp.report.collect import (
    EVAL_PREFIX,
    NOT_HELD_OUT,
    IDENTITY_KEYS,
    REPLICATE_KEY,
    ROW_KEY,
    RunSet,
    display,
    point_label,
    sort_key,
)


@dataclass(frozen=True)
class Metric:
    """A reported quantity: where it lives in the flattened summary and how to show it."""

    name: str  # short alias accepted by --metric
    column: str  # flattened summary column
    label: str
    better: str | None  # "lower", "higher" or None
    scale_like_length: bool  # time/memory/compute: plotted log-log against a length axis
    from_zero: bool = False  # sizes (parameters): the value axis starts at zero so differences keep their scale


METRICS: tuple[Metric, ...] = (
    Metric("val_ppl", "metrics.val/ppl", "val perplexity (final)", "lower", False),
    Metric("best_val_ppl", "metrics.best/val_ppl", "val perplexity (best)", "lower", False),
    Metric("test_ppl", "metrics.test/ppl", "test perplexity", "lower", False),
    Metric("val_acc", "metrics.val/acc", "val accuracy", "higher", False),
    Metric("train_tokens_per_sec", "throughput.train_tokens_per_sec", "train tokens/s", "higher", True),
    Metric("eval_tokens_per_sec", "throughput.eval_tokens_per_sec", "eval tokens/s", "higher", True),
    Metric("peak_mb", "memory.peak_mb", "peak memory (MB)", "lower", True),
    Metric("flops_forward_per_token", "flops.forward_per_token", "forward FLOPs per token", None, True),
    Metric("flops_train_step_per_token", "flops.train_step_per_token", "train-step FLOPs per token", None, True),
    Metric("params_non_embedding", "params.non_embedding", "parameters (non-embedding)", None, False, True),
)
METRICS_BY_NAME = {m.name: m for m in METRICS}

THROUGHPUT = METRICS_BY_NAME["train_tokens_per_sec"]
MEMORY = METRICS_BY_NAME["peak_mb"]
PERPLEXITIES = (METRICS_BY_NAME["test_ppl"], METRICS_BY_NAME["val_ppl"])


def _has_values(runs: RunSet, column: str) -> bool:
    return column in runs.frame.columns and runs.frame[column].notna().any()


def select_metrics(runs: RunSet, requested: Sequence[str] | None = None) -> list[Metric]:
    """The metrics to report: the known ones present in the runs, or exactly those requested.

    A requested name is an alias (val_ppl) or a flattened summary column (metrics.val/acc); anything else is an
    error listing the valid names.
    """
    if not requested:
        return [m for m in METRICS if _has_values(runs, m.column)]
    chosen: list[Metric] = []
    by_column = {m.column: m for m in METRICS}
    numeric_columns = [c for c in runs.frame.columns if pd.api.types.is_numeric_dtype(runs.frame[c])]
    for name in requested:
        if name in METRICS_BY_NAME:
            metric = METRICS_BY_NAME[name]
        elif name in by_column:
            metric = by_column[name]
        elif name in numeric_columns:
            metric = Metric(name, name, name, None, False)
        else:
            raise ValueError(
                f"unknown metric {name!r}; valid: {', '.join(METRICS_BY_NAME)} or a numeric summary column: "
                f"{', '.join(c for c in numeric_columns if c not in IDENTITY_KEYS)}"
            )
        if not _has_values(runs, metric.column):
            raise ValueError(f"metric {name!r} ({metric.column}) has no value in any run")
        chosen.append(metric)
    return chosen


# ---------------------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Cell:
    """One model at one swept point: the metric over its successful runs (seeds), and how many failed."""

    values: tuple[float, ...]
    n_failed: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (ddof=1); None with fewer than two runs."""
        if self.n < 2:
            return None
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (self.n - 1))


def cells(runs: RunSet, column: str, any_status: bool = False) -> dict[tuple[str, tuple], Cell]:
    """(model, point) -> Cell for every combination that has at least one run.

    Values come from successful runs only, unless ``any_status``: results measured after training (eval/)
    are valid for an interrupted run's checkpoint too.
    """
    out: dict[tuple[str, tuple], Cell] = {}
    has_column = column in runs.frame.columns
    groups: dict[tuple[str, tuple], list[dict[str, Any]]] = {}
    for row in runs.frame.to_dict("records"):
        groups.setdefault((str(row[ROW_KEY]), runs.point_of(row)), []).append(row)
    for key, rows in groups.items():
        ok = [r for r in rows if r["status"] == "ok" or (any_status and has_column and _is_number(r[column]))]
        values = tuple(float(r[column]) for r in ok if has_column and _is_number(r[column]))
        out[key] = Cell(values=values, n_failed=len(rows) - len(ok))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def fmt_number(x: float) -> str:
    """Four significant digits, scientific only for very large or small magnitudes."""
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1e6 or a < 1e-3:
        return f"{x:.3g}"
    if a >= 1e4:
        return f"{x:.0f}"
    return f"{x:.4g}"


def fmt_spread(std: float, mean: float) -> str:
    """A standard deviation to two significant digits, in the same notation as its mean."""
    if std == 0:
        return "0"
    if abs(mean) >= 1e6 or abs(mean) < 1e-3 or std < 1e-3:
        return f"{std:.2g}"
    return f"{float(f'{std:.2g}'):g}" if std < 1e4 else f"{float(f'{std:.2g}'):.0f}"


def format_cell(cell: Cell | None) -> str:
    """'12.3 ± 0.4 (3)' over seeds, '12.3' for one run, 'failed' when every run failed, '' when none ran."""
    if cell is None:
        return ""
    if cell.n == 0:
        return "failed" if cell.n_failed else "n/a"
    text = fmt_number(cell.mean)
    if cell.n > 1:
        text += f" ± {fmt_spread(cell.std, cell.mean)} ({cell.n})"
    return f"{text}; {cell.n_failed} failed" if cell.n_failed else text


# --------------------------------------------------------------------------------------------- summary.csv


def summary_frame(runs: RunSet) -> pd.DataFrame:
    """One row per run: where, status/error, recipe, identity and swept keys, varying config keys, then all metrics."""
    frame = runs.frame
    first = ["run_dir", "status", "error", "recipe", "machine", "not_held_out", *IDENTITY_KEYS]
    first += [k for k in runs.swept_keys if k not in first]
    first += ["sweep.dir", "sweep.job_num", *runs.config_keys]
    rest = sorted(c for c in frame.columns if c not in first)
    ordered = frame[[c for c in first if c in frame.columns] + rest]
    sort_cols = [c for c in (ROW_KEY, *runs.point_keys, "seed", "run_dir") if c in ordered.columns]
    records = ordered.to_dict("records")
    order = sorted(range(len(records)), key=lambda i: tuple(sort_key(records[i][c]) for c in sort_cols))
    return ordered.iloc[order]


def summary_csv(runs: RunSet) -> str:
    buffer = io.StringIO()
    summary_frame(runs).to_csv(buffer, index=False)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ comparison.json


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def comparison(runs: RunSet, baseline: str) -> dict[str, Any]:
    """Per swept point, each model's speedup, memory ratio and perplexity ratio against the baseline model.

    Ratios are of means over each model's successful runs (seeds): speedup = tokens/s(model) / tokens/s(baseline)
    (> 1 is faster), memory_ratio = peak_mb(model) / peak_mb(baseline), ppl ratios = ppl(model) / ppl(baseline).
    """
    models = runs.models()
    result: dict[str, Any] = {
        "baseline": baseline,
        "point_keys": runs.point_keys,
        "definitions": {
            "speedup": f"{THROUGHPUT.column} / baseline's (mean over successful seeds)",
            "memory_ratio": f"{MEMORY.column} / baseline's",
            "val_ppl_ratio": "metrics.val/ppl / baseline's",
            "test_ppl_ratio": "metrics.test/ppl / baseline's",
            "ppl_ratio": "test_ppl_ratio where both have test/ppl, else val_ppl_ratio",
        },
        "points": [],
    }
    if baseline not in models:
        result["skipped"] = f"baseline model {baseline!r} is not among the runs (models: {', '.join(models)})"
        return result
    stats = {m.name: cells(runs, m.column) for m in (THROUGHPUT, MEMORY, *PERPLEXITIES)}
    for point in runs.points():
        entry: dict[str, Any] = {"point": dict(zip(runs.point_keys, point)),
                                 "label": point_label(runs.point_keys, point)}
        base = {name: table.get((baseline, point)) for name, table in stats.items()}
        if base["train_tokens_per_sec"] is None or all(c is None or c.n == 0 for c in base.values()):
            entry["skipped"] = f"baseline {baseline!r} has no successful run at {entry['label']}"
            result["points"].append(entry)
            continue
        entry["baseline"] = {name: (c.mean if c else None) for name, c in base.items()}
        entry["models"] = {}
        for model in models:
            mine = {name: table.get((model, point)) for name, table in stats.items()}
            if all(c is None for c in mine.values()):
                continue
            means = {name: (c.mean if c else None) for name, c in mine.items()}
            val_ratio = _ratio(means["val_ppl"], entry["baseline"]["val_ppl"])
            test_ratio = _ratio(means["test_ppl"], entry["baseline"]["test_ppl"])
            entry["models"][model] = {
                "n_ok": max((c.n for c in mine.values() if c), default=0),
                "n_failed": max((c.n_failed for c in mine.values() if c), default=0),
                "speedup": _ratio(means["train_tokens_per_sec"], entry["baseline"]["train_tokens_per_sec"]),
                "memory_ratio": _ratio(means["peak_mb"], entry["baseline"]["peak_mb"]),
                "val_ppl_ratio": val_ratio,
                "test_ppl_ratio": test_ratio,
                "ppl_ratio": test_ratio if test_ratio is not None else val_ratio,
            }
        result["points"].append(entry)
    return result


# ------------------------------------------------------------------------------------------- flag ablation

FLAG_KEY = "flags"  # the config group an ablation sweeps (conf/sweep/flags_ablation.yaml)
FLAG_BASELINE = "none"
NOT_APPLICABLE_ERROR = "FlagNotApplicableError"  # bkexp.techniques: the flag does not apply to the model
FLAG_DELTA_METRICS = (("ppl", "perplexity"), ("train_tokens_per_sec", "train tokens/s"), ("peak_mb", "peak memory"))


def _mean_of(rows: Sequence[dict[str, Any]], column: str) -> float | None:
    values = [float(r[column]) for r in rows if column in r and _is_number(r[column])]
    return sum(values) / len(values) if values else None


def _ppl_column(rows: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]]) -> str:
    test = METRICS_BY_NAME["test_ppl"].column
    if _mean_of(rows, test) is not None and _mean_of(base, test) is not None:
        return test
    return METRICS_BY_NAME["val_ppl"].column


def _comparison_keys(runs: RunSet) -> list[str]:
    """Swept keys, other than the flag, that split the flag-vs-none comparison into separate cells.

    A key that changes only with the flag is part of the flag, not an axis: ``flags=quantization`` sets
    ``bits=8`` while every other flag runs at 32, and must still be compared with ``flags=none``.
    """
    records = runs.frame.to_dict("records")

    def flag_driven(key: str) -> bool:
        values: dict[str, set] = {}
        for row in records:
            value = row[key]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                values.setdefault(display(row[FLAG_KEY]), set()).add(display(value))
        return all(len(v) == 1 for v in values.values())

    return [k for k in runs.point_keys if k != FLAG_KEY and not flag_driven(k)]


def flag_deltas(runs: RunSet) -> list[dict[str, Any]]:
    """Each flag against ``flags=none`` per model (and per other swept point): relative changes of the means.

    ``ppl_change = ppl(flag) / ppl(none) - 1`` (test perplexity where both have one, else validation),
    likewise ``train_tokens_per_sec_change`` and ``peak_mb_change``, over each cell's successful runs (seeds).
    ``status``: ``ok``; ``n/a`` when every run of the cell failed because the flag does not apply to the model;
    ``failed`` when runs failed otherwise; ``no baseline`` when ``flags=none`` has no successful run there.
    Keys that change only with the flag (``bits`` under ``flags=quantization``) do not split the cells.
    Empty when ``flags`` is not a swept key.
    """
    if FLAG_KEY not in runs.point_keys:
        return []
    others = _comparison_keys(runs)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in runs.frame.to_dict("records"):
        other = tuple(row[k] for k in others)
        groups.setdefault((str(row[ROW_KEY]), other, display(row[FLAG_KEY])), []).append(row)
    flags = sorted({key[2] for key in groups if key[2] != FLAG_BASELINE}, key=sort_key)
    cells_out: list[dict[str, Any]] = []
    for model in runs.models():
        for other in sorted({key[1] for key in groups if key[0] == model}, key=lambda p: tuple(map(sort_key, p))):
            base = [r for r in groups.get((model, other, FLAG_BASELINE), []) if r["status"] == "ok"]
            for flag in flags:
                rows = groups.get((model, other, flag))
                if rows is None:
                    continue
                ok = [r for r in rows if r["status"] == "ok"]
                entry: dict[str, Any] = {"model": model, "flags": flag, **dict(zip(others, other)),
                                         "n_ok": len(ok), "n_failed": len(rows) - len(ok)}
                if not ok:
                    not_applicable = all(str(r.get("error") or "").startswith(NOT_APPLICABLE_ERROR) for r in rows)
                    entry["status"] = "n/a" if not_applicable else "failed"
                    entry["error"] = display(rows[0].get("error"))
                elif not base:
                    entry["status"] = "no baseline"
                else:
                    entry["status"] = "ok"
                    columns = {"ppl": _ppl_column(ok, base), "train_tokens_per_sec": THROUGHPUT.column,
                               "peak_mb": MEMORY.column}
                    for name, column in columns.items():
                        value, reference = _mean_of(ok, column), _mean_of(base, column)
                        entry[name] = value
                        entry[f"baseline_{name}"] = reference
                        ratio = _ratio(value, reference)
                        entry[f"{name}_change"] = None if ratio is None else ratio - 1
                    entry["ppl_column"] = columns["ppl"]
                cells_out.append(entry)
    return cells_out


def _fmt_change(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _flag_delta_md(runs: RunSet) -> list[str]:
    deltas = flag_deltas(runs)
    if not deltas:
        return []
    others = _comparison_keys(runs)
    columns = sorted({(d["model"], tuple(d.get(k) for k in others)) for d in deltas},
                     key=lambda c: (sort_key(c[0]), tuple(map(sort_key, c[1]))))
    header = ["flag"] + [m if not others else f"{m} ({point_label(others, p)})" for m, p in columns]
    lines = [f"## Flags against {FLAG_KEY}={FLAG_BASELINE}", "",
             ("Relative change of the mean over successful seeds: flag ÷ none − 1 (perplexity: test where both "
              "have it, else validation; lower is better; tokens/s: higher is better; peak memory: lower is "
              "better). `n/a`: the flag does not apply to the model."), ""]
    by_key = {(d["flags"], d["model"], tuple(d.get(k) for k in others)): d for d in deltas}
    for name, label in FLAG_DELTA_METRICS:
        lines += [f"### {label} change", "", _md_row(header), _md_row(["---"] * len(header))]
        for flag in sorted({d["flags"] for d in deltas}, key=sort_key):
            row = [flag]
            for model, point in columns:
                d = by_key.get((flag, model, point))
                if d is None:
                    row.append("")
                elif d["status"] != "ok":
                    row.append(d["status"])
                else:
                    row.append(_fmt_change(d[f"{name}_change"]))
            lines.append(_md_row(row))
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------ best over a key

BEST_OVER_METRICS = ("metrics.best/val_loss", "metrics.val/loss")  # what "best" means: lowest validation loss


def select_best(runs: RunSet, key: str) -> tuple[RunSet, list[dict[str, Any]]]:
    """Per cell (model and every other swept key), keep only the runs at the value of ``key`` with the lowest mean
    validation loss over seeds (``metrics.best/val_loss``, else ``metrics.val/loss``; successful runs only).

    Returns the selected runs, with ``key`` no longer a swept key, and one record per cell saying which value
    won and what every value scored. Raises ValueError when ``key`` was not swept.
    """
    if key not in runs.swept_keys or key in (ROW_KEY, REPLICATE_KEY):
        swept = [k for k in runs.swept_keys if k not in (ROW_KEY, REPLICATE_KEY)]
        raise ValueError(f"--best-over {key!r} is not a swept key of these runs; swept: {', '.join(swept) or 'none'}")
    metric = next((c for c in BEST_OVER_METRICS if c in runs.frame.columns), None)
    if metric is None:
        raise ValueError(f"--best-over needs a validation loss ({' or '.join(BEST_OVER_METRICS)}); no run has one")
    others = [k for k in runs.point_keys if k != key]
    groups: dict[tuple, dict[Any, list[dict[str, Any]]]] = {}
    for row in runs.frame.to_dict("records"):
        cell = (str(row[ROW_KEY]), tuple(row[k] for k in others))
        groups.setdefault(cell, {}).setdefault(row[key], []).append(row)
    keep: set[str] = set()
    choices: list[dict[str, Any]] = []
    for (model, point), by_value in sorted(groups.items(), key=lambda kv: (sort_key(kv[0][0]),
                                                                          tuple(map(sort_key, kv[0][1])))):
        scores = {value: _mean_of([r for r in rows if r["status"] == "ok"], metric) for value, rows in by_value.items()}
        ranked = sorted((v for v in scores if scores[v] is not None), key=lambda v: (scores[v], sort_key(v)))
        entry: dict[str, Any] = {"model": model, **dict(zip(others, point)), "key": key, "metric": metric,
                                 "scores": {display(v): scores[v] for v in sorted(scores, key=sort_key)}}
        if ranked:
            best = ranked[0]
            entry.update(best=best, best_score=scores[best], n_seeds=sum(r["status"] == "ok" for r in by_value[best]))
            keep.update(str(r["run_dir"]) for r in by_value[best])
        else:
            entry.update(best=None, best_score=None, n_seeds=0)
            keep.update(str(r["run_dir"]) for rows in by_value.values() for r in rows)  # show the failures
        choices.append(entry)
    frame = runs.frame[runs.frame["run_dir"].astype(str).isin(keep)].reset_index(drop=True)
    selected = RunSet(frame=frame, swept_keys=[k for k in runs.swept_keys if k != key],
                      point_keys=others, config_keys=[c for c in runs.config_keys if c != f"config.{key}"],
                      sources=runs.sources, curves={k: v for k, v in runs.curves.items() if k in keep})
    return selected, choices


def _best_over_md(choices: Sequence[dict[str, Any]], others: Sequence[str]) -> list[str]:
    if not choices:
        return []
    key, metric = choices[0]["key"], choices[0]["metric"]
    lines = [f"## Best {key} per cell", "",
             f"Every table above shows, per model and cell, only the runs at the {key} with the lowest mean `{metric}` "
             "over seeds. Scores of every value tried:", ""]
    header = [ROW_KEY, *others, f"best {key}", metric, "all values"]
    lines += [_md_row(header), _md_row(["---"] * len(header))]
    for c in choices:
        tried = ", ".join(f"{v}: {fmt_number(s) if s is not None else 'failed'}" for v, s in c["scores"].items())
        lines.append(_md_row([c["model"], *(display(c.get(k)) for k in others),
                              display(c["best"]) if c["best"] is not None else "all failed",
                              fmt_number(c["best_score"]) if c["best_score"] is not None else "-", tried]))
    return lines + [""]


# ------------------------------------------------------------------------------------- eval/ (bkexp eval)

EVAL_FAMILIES = (  # (column prefix, section title, what a column suffix is)
    (f"{EVAL_PREFIX}ppl.", "Perplexity on other corpora (bkexp eval --datasets)", "dataset"),
    (f"{EVAL_PREFIX}bits_per_byte.", "Bits per byte on other corpora", "dataset"),
    (f"{EVAL_PREFIX}{OVERLAP_COLUMN}.", f"Share of each corpus's {OVERLAP_N}-grams in the run's training tokens",
     "dataset"),
    (f"{EVAL_PREFIX}length_ppl.", "Perplexity vs context length (bkexp eval --lengths)", "L"),
    (f"{EVAL_PREFIX}length_tokens_per_sec.", "Eval tokens/s vs context length", "L"),
    (f"{EVAL_PREFIX}length_peak_mb.", "Peak memory (MB) vs context length", "L"),
    (f"{EVAL_PREFIX}lm_eval.", "lm-evaluation-harness tasks (value ± stderr)", "task.metric"),
)


def _eval_md(runs: RunSet) -> list[str]:
    """One table per eval/ family: rows = model (and swept point), columns = dataset / L / task metric."""
    columns = [c for c in runs.frame.columns if c.startswith(EVAL_PREFIX)]
    if not columns:
        return []
    lines = ["## Evaluation (eval/ of each run)", "",
             "Cells: mean ± sample std over seeds, or the single value. Written by `bkexp eval`.", ""]
    shared = [c for c in columns if c.startswith(f"{EVAL_PREFIX}{NOT_HELD_OUT}.")]
    columns = [c for c in columns if c not in shared]
    for column in shared:
        holders = runs.frame[runs.frame[column].notna()]
        lines += [f"**Not held out:** `{column.split('.', 2)[2]}` holds the training or validation data of "
                  + ", ".join(f"{row[ROW_KEY]} ({row[column]})" for row in holders.to_dict("records"))
                  + "; its perplexity there is not a held-out number.", ""]
    points = runs.points()
    for prefix, title, what in EVAL_FAMILIES:
        family = [c for c in columns if c.startswith(prefix) and not c.endswith("_stderr")]
        if not family:
            continue
        family.sort(key=lambda c: (c[len(prefix):] in ("mean", "std"), sort_key(_numeric(c[len(prefix):]))))
        header = [ROW_KEY if not runs.point_keys else f"{ROW_KEY} ({', '.join(runs.point_keys)})",
                  *(c[len(prefix):] for c in family)]
        lines += [f"### {title}", "", f"Columns: {what}.", "", _md_row(header), _md_row(["---"] * len(header))]
        tables = {c: cells(runs, c, any_status=True) for c in family}
        stderr = {c: cells(runs, f"{c}_stderr", any_status=True) for c in family
                  if f"{c}_stderr" in runs.frame.columns}
        for model in runs.models():
            for point in points:
                if not any((model, point) in t for t in tables.values()):
                    continue
                label = model if not runs.point_keys else f"{model} ({point_label(runs.point_keys, point)})"
                row = [label]
                for c in family:
                    text = format_cell(tables[c].get((model, point)))
                    err = stderr.get(c, {}).get((model, point))
                    if err is not None and err.n == 1 and text not in ("", "n/a", "failed"):
                        text += f" ± {fmt_number(err.mean)}"
                    row.append(text)
                lines.append(_md_row(row))
        lines.append("")
    return lines


def _numeric(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


# --------------------------------------------------------------------------------------------- summary.md


def _md_row(cells_: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells_) + " |"


def pivot_rows(runs: RunSet, column: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one pivot table: rows = models, columns = swept points."""
    table = cells(runs, column)
    points = runs.points()
    corner = f"{ROW_KEY} \\ {', '.join(runs.point_keys)}" if runs.point_keys else ROW_KEY
    header = [corner] + [point_label(runs.point_keys, p) for p in points]
    rows = [[m] + [format_cell(table.get((m, p))) for p in points] for m in runs.models()]
    return header, rows


def _comparison_md(result: dict[str, Any], runs: RunSet) -> list[str]:
    baseline = result["baseline"]
    lines = [f"## Against {baseline}", ""]
    if "skipped" in result:
        return lines + [f"Skipped: {result['skipped']}. Choose another with `--baseline`.", ""]
    lines.append("speedup = train tokens/s ÷ baseline's (>1 is faster); memory and perplexity are ratios to the "
                 "baseline (<1 is smaller). Means over successful seeds.")
    lines.append("")
    points = result["points"]
    header = [f"{ROW_KEY} \\ {', '.join(runs.point_keys)}" if runs.point_keys else ROW_KEY]
    header += [p["label"] for p in points]
    lines += [_md_row(header), _md_row(["---"] * len(header))]

    def ratio(value: float | None, suffix: str = "") -> str:
        return "-" if value is None else f"{value:.3g}{suffix}"

    for model in runs.models():
        row = [model]
        for p in points:
            stats = p.get("models", {}).get(model)
            if "skipped" in p:
                row.append("no baseline")
            elif stats is None:
                row.append("")
            elif stats["n_ok"] == 0:
                row.append("failed")
            else:
                row.append(f"{ratio(stats['speedup'], 'x')} speed, {ratio(stats['memory_ratio'])} mem, "
                           f"{ratio(stats['ppl_ratio'])} ppl")
        lines.append(_md_row(row))
    return lines + [""]


def _not_held_out_md(runs: RunSet) -> list[str]:
    """A warning above the tables when some runs evaluated on data they trained on or were selected on."""
    flagged = runs.frame["not_held_out"].dropna() if "not_held_out" in runs.frame else pd.Series(dtype=object)
    if flagged.empty:
        return []
    counts = ", ".join(f"`{caveat}` ({count} runs)" for caveat, count in flagged.value_counts(sort=False).items())
    return [f"**Not held out** in {len(flagged)} of {len(runs.frame)} runs: {counts}. Where validation and test are "
            "the same data, the best checkpoint was chosen on the test data; where training data is evaluated, "
            "those metrics measure fit, not generalisation. summary.csv's `not_held_out` column says which runs.",
            ""]


def _stopped_early_md(runs: RunSet) -> list[str]:
    """A note above the tables when EarlyStopping ended some runs: their budgets are not the configured one."""
    column = "stopped_early.step"
    if column not in runs.frame or runs.frame[column].dropna().empty:
        return []
    stopped = runs.frame[runs.frame[column].notna()]
    where = ", ".join(f"{row[ROW_KEY]} at step {int(row[column])}" for row in stopped.to_dict("records"))
    return [f"**Stopped early** ({len(stopped)} of {len(runs.frame)} runs): {where}. These runs trained on fewer steps "
            "and tokens than configured; compare budgets with summary.csv's `steps` and `tokens.train`.", ""]


def summary_markdown(runs: RunSet, metrics: Sequence[Metric], comparison_result: dict[str, Any] | None,
                     title: str, best_over: Sequence[dict[str, Any]] = ()) -> str:
    seeds = sorted({display(s) for s in runs.frame["seed"]}) if "seed" in runs.frame else []
    lines = [
        f"# {title}",
        "",
        f"Runs: {len(runs.frame)} ({runs.n_ok} ok, {runs.n_failed} failed) from "
        + ", ".join(f"`{s}`" for s in runs.sources) + ".",
        f"Swept: {', '.join(runs.swept_keys) or 'nothing (one configuration)'}; seeds: {', '.join(seeds) or '-'}.",
        "Cells: mean ± sample std (number of successful seeds), or the single value; `failed` when every run of "
        "the cell failed; `; k failed` when some did.",
        "",
    ]
    machines = runs.machines()
    if len(machines) > 1:
        lines += [f"**Measured on {len(machines)} machines**: "
                  + ", ".join(f"`{machine}` ({count} runs)" for machine, count in machines.items())
                  + ". Speed and memory depend on the machine, so the speed and memory cells and ratios below mix "
                  "machines; summary.csv's `machine` column says which run ran where.", ""]
    lines += _not_held_out_md(runs) + _stopped_early_md(runs)
    for metric in metrics:
        direction = f", {metric.better} is better" if metric.better else ""
        lines += [f"## {metric.label}", "", f"`{metric.column}`{direction}", ""]
        header, rows = pivot_rows(runs, metric.column)
        lines += [_md_row(header), _md_row(["---"] * len(header)), *(_md_row(r) for r in rows), ""]
    lines += _best_over_md(best_over, runs.point_keys)
    lines += _eval_md(runs)
    lines += _flag_delta_md(runs)
    if comparison_result is not None:
        lines += _comparison_md(comparison_result, runs)
    failed = runs.frame[runs.frame["status"] != "ok"]
    lines += ["## Failed runs", ""]
    if failed.empty:
        lines += ["None.", ""]
    else:
        keys = [ROW_KEY, *runs.point_keys, *(["seed"] if "seed" in runs.frame else [])]
        header = ["run", *keys, "status", "error"]
        lines += [_md_row(header), _md_row(["---"] * len(header))]
        for row in failed.to_dict("records"):  # status "running": killed mid-run, or not finished yet
            lines.append(_md_row([f"`{row['run_dir']}`", *(display(row[k]) for k in keys), row["status"],
                                  display(row.get("error"))]))
        lines.append("")
    return "\n".join(lines)
