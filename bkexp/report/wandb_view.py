"""The sweep report on W&B: its tables with one plot each (report run), and a saved workspace view of the sweep.

Tables: one long-format ``wandb.Table`` per reported metric (model, swept keys, value; one row per run) with a
line plot of the metric against the swept key, one line per model (``wandb.plot.line``, which W&B draws from
the table, offline too); plus the summary.csv table and the comparison table.

Workspace (``bkexp report --wandb-workspace``, needs ``wandb-workspaces``): a view of the sweep's group with
the run-level numbers against ``seq_len`` per model (scatter plots of config vs summary) and the training
curves grouped by model. Building it is offline; *saving* it calls the W&B server (``WANDB_MODE=online``,
``wandb login``), which offline runs reach only after ``wandb sync``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from bkexp.report.collect import ROW_KEY, RunSet
from bkexp.report.tables import Metric

# Run-level numbers of the workspace panels: (title, W&B summary key as bkexp writes it).
WORKSPACE_RESULTS = (("val perplexity (best)", "best/val_ppl"), ("test perplexity", "test/ppl"),
                     ("train tokens/s", "throughput.train_tokens_per_sec"), ("peak memory (MB)", "memory.peak_mb"))
WORKSPACE_CURVES = (("loss", ["train/loss", "val/loss"]), ("val perplexity", ["val/ppl"]))


def metric_tables(runs: RunSet, metrics: Sequence[Metric]) -> dict[str, tuple[Any, Any]]:
    """{metric name: (wandb.Table, plot)}: each metric's successful runs, plotted against the swept key."""
    import wandb

    x_key = "seq_len" if "seq_len" in runs.point_keys else (runs.point_keys[0] if runs.point_keys else ROW_KEY)
    out: dict[str, tuple[Any, Any]] = {}
    ok = runs.frame[runs.frame["status"] == "ok"]
    for metric in metrics:
        if metric.column not in ok.columns:
            continue
        columns = list(dict.fromkeys([ROW_KEY, *runs.point_keys, "seed"]))
        rows = []
        for record in ok.to_dict("records"):
            value = record.get(metric.column)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                rows.append([record.get(c) for c in columns] + [float(value)])
        if not rows:
            continue
        table = wandb.Table(columns=[*columns, metric.name], data=rows, allow_mixed_types=True)
        if x_key == ROW_KEY:
            plot = wandb.plot.bar(table, ROW_KEY, metric.name, title=metric.label)
        else:
            plot = wandb.plot.line(table, x_key, metric.name, stroke=ROW_KEY, title=f"{metric.label} vs {x_key}")
        out[metric.name] = (table, plot)
    return out


def log_report(run: Any, runs: RunSet, metrics: Sequence[Metric], summary_csv: str, comparison: dict[str, Any],
               plots: Sequence[Any]) -> None:
    """Log the report's tables (each with its plot) and PNGs into the report run."""
    import wandb

    payload: dict[str, Any] = {"report/summary": wandb.Table(dataframe=pd.read_csv(summary_csv),
                                                             allow_mixed_types=True)}
    rows = [[point["label"], model, stats["n_ok"], stats["speedup"], stats["memory_ratio"], stats["ppl_ratio"]]
            for point in comparison.get("points", []) for model, stats in point.get("models", {}).items()]
    if rows:
        table = wandb.Table(columns=["point", "model", "n_ok", "speedup", "memory_ratio", "ppl_ratio"], data=rows,
                            allow_mixed_types=True)
        payload["report/comparison"] = table
        speedups = [r for r in rows if isinstance(r[3], (int, float))]
        if speedups:
            payload["report/comparison_speedup"] = wandb.plot.bar(
                wandb.Table(columns=["run", "speedup"], data=[[f"{r[1]} @ {r[0]}", r[3]] for r in speedups]),
                "run", "speedup", title=f"train tokens/s vs {comparison.get('baseline')}")
    for name, (table, plot) in metric_tables(runs, metrics).items():
        payload[f"report/table/{name}"] = table
        payload[f"report/plot/{name}"] = plot
    for path in plots:
        payload[f"report/plots/{path.stem}"] = wandb.Image(str(path))
    run.log(payload)


def build_workspace(entity: str, project: str, group: str, name: str | None = None) -> Any:
    """A W&B workspace view of one sweep (its group): results against seq_len per model, curves by model."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    results = [wr.ScatterPlot(title=f"{title} vs seq_len", x=wr.Config("seq_len"), y=wr.SummaryMetric(key),
                              log_x=True)
               for title, key in WORKSPACE_RESULTS]
    curves = [wr.LinePlot(title=title, x="Step", y=list(keys), groupby=wr.Config("model.name"),
                          groupby_aggfunc="mean", groupby_rangefunc="minmax")
              for title, keys in WORKSPACE_CURVES]
    return ws.Workspace(
        entity=entity, project=project, name=name or f"bkexp sweep {group}",
        sections=[ws.Section(name="Results vs seq_len", panels=results, is_open=True),
                  ws.Section(name="Training curves by model", panels=curves, is_open=True)],
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == group, ws.Metric("JobType") == "train"],
                                          groupby=[ws.Config("model.name")]),
    )
