"""`bkexp report DIR [DIR ...]`: aggregate run and sweep directories into tables, comparison and plots."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BASELINE = "transformer"


@dataclass
class Report:
    """What one report wrote."""

    out_dir: Path
    summary_csv: Path
    summary_md: Path
    comparison_json: Path
    plots: list[Path]
    n_runs: int
    n_failed: int
    comparison: dict[str, Any]
    runs: Any = None  # the collect.RunSet the report was made from
    metrics: list[Any] = field(default_factory=list)  # the tables.Metric reported

    @property
    def files(self) -> list[Path]:
        return [self.summary_csv, self.summary_md, self.comparison_json, *self.plots]


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: a ratio that cannot be computed is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None, *,
                 baseline: str = DEFAULT_BASELINE, metrics: Sequence[str] | None = None,
                 plots: bool = True, best_over: str | None = None) -> Report:
    """Read every summary.json under `dirs` and write summary.csv, summary.md, comparison.json and plots/.

    `out_dir` defaults to the single directory given. With `best_over` (a swept key such as ``optimizer.lr``) the
    tables, comparison and plots keep, per model and cell, only the runs at the value with the best validation
    loss (summary.csv keeps every run), and summary.md says which value won. Raises collect.NoRunsError when a
    directory holds no run and ValueError for a bad metric name, a `best_over` key that was not swept, or a
    missing out_dir with several directories.
    """
    from bkexp.report.collect import atomic_write_text, collect_runs
    from bkexp.report.tables import comparison, select_best, select_metrics, summary_csv, summary_markdown

    dirs = [Path(d) for d in dirs]
    if out_dir is None:
        if len(dirs) != 1:
            raise ValueError(f"several directories given ({', '.join(map(str, dirs))}): say where the report "
                             "goes with --out OUTDIR")
        out_dir = dirs[0]
    out = Path(out_dir)
    all_runs = collect_runs(dirs)
    runs, choices = select_best(all_runs, best_over) if best_over else (all_runs, [])
    chosen = select_metrics(runs, metrics)
    comparison_result = comparison(runs, baseline)
    out.mkdir(parents=True, exist_ok=True)

    csv_path, md_path, json_path = out / "summary.csv", out / "summary.md", out / "comparison.json"
    atomic_write_text(csv_path, summary_csv(all_runs))
    title = f"bkexp report: {out.resolve().name}"
    atomic_write_text(md_path, summary_markdown(runs, chosen, comparison_result, title, choices))
    if choices:
        comparison_result["best_over"] = choices
    atomic_write_text(json_path, json.dumps(_json_safe(comparison_result), indent=2, default=str) + "\n")
    written_plots: list[Path] = []
    if plots:
        from bkexp.report.plots import write_plots

        written_plots = write_plots(runs, chosen, comparison_result, out / "plots")
    return Report(out_dir=out, summary_csv=csv_path, summary_md=md_path, comparison_json=json_path,
                  plots=written_plots, n_runs=len(runs.frame), n_failed=runs.n_failed, comparison=comparison_result,
                  runs=runs, metrics=chosen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bkexp report",
        description="Aggregate run/sweep directories (every summary.json below them) into summary.csv, "
                    "summary.md, comparison.json and plots/*.png.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, sweep directories, or parents")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help=f"model the others are compared against (default: {DEFAULT_BASELINE})")
    parser.add_argument("--out", default=None, metavar="OUTDIR",
                        help="where to write the report (default: the DIR when only one is given)")
    parser.add_argument("--metric", action="append", default=None, metavar="NAME",
                        help="report only these metrics (repeatable): an alias such as val_ppl, test_ppl, "
                             "train_tokens_per_sec, peak_mb, or a summary column such as metrics.val/acc")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    parser.add_argument("--best-over", default=None, metavar="KEY",
                        help="a swept key (e.g. optimizer.lr): per model and cell keep only the value with the "
                             "best validation loss, and say which won")
    parser.add_argument("--wandb-workspace", action="store_true",
                        help="also save a W&B workspace view of the sweep (needs wandb-workspaces and a W&B server: "
                             "wandb login, runs uploaded with wandb sync)")
    parser.add_argument("--wandb-entity", default=os.environ.get("WANDB_ENTITY"),
                        help="W&B entity of the workspace (default: $WANDB_ENTITY)")
    parser.add_argument("--wandb-project", default=None,
                        help="W&B project of the workspace (default: the project the runs logged to)")
    return parser


def save_wandb_workspace(report: Report, entity: str | None, project: str | None) -> str:
    """Build and save the sweep's W&B workspace view; returns its URL. Errors name what is missing."""
    try:
        from bkexp.report.wandb_view import build_workspace
        import wandb_workspaces  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--wandb-workspace needs wandb-workspaces: pip install 'bkexp[wandb]' ({exc})") from exc
    from bkexp.report.collect import SUMMARY_FILE, load_summary

    groups, projects = set(), set()
    for run_dir in report.runs.frame["run_dir"]:
        logged = ((load_summary(Path(run_dir) / SUMMARY_FILE).get("dashboards") or {}).get("wandb")) or {}
        if logged.get("group"):
            groups.add(str(logged["group"]))
            projects.add(str(logged.get("project")))
    if len(groups) != 1:
        raise ValueError("--wandb-workspace needs runs of one W&B group; found "
                         f"{sorted(groups) or 'none (were the runs trained with logger=wandb in a multirun?)'}")
    if not entity:
        raise ValueError("--wandb-workspace needs --wandb-entity (or WANDB_ENTITY)")
    workspace = build_workspace(entity, project or projects.pop(), groups.pop())
    workspace.save()
    return str(workspace.url)


def main(argv: Sequence[str] | None = None) -> int:
    from bkexp.report.collect import NoRunsError

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = write_report(args.dirs, args.out, baseline=args.baseline, metrics=args.metric,
                              plots=not args.no_plots, best_over=args.best_over)
    except (NoRunsError, ValueError) as exc:
        print(f"bkexp report: error: {exc}", file=sys.stderr)
        return 2
    print(f"bkexp report: {report.n_runs} runs ({report.n_runs - report.n_failed} ok, {report.n_failed} failed)")
    machines = report.runs.machines()
    if len(machines) > 1:
        print(f"bkexp report: note: the runs were measured on {len(machines)} machines "
              f"({'; '.join(f'{m}: {n} runs' for m, n in machines.items())}): speed and memory compare across them")
    if args.wandb_workspace:
        try:
            print(f"bkexp report: W&B workspace saved: {save_wandb_workspace(report, args.wandb_entity, args.wandb_project)}")
        except ValueError as exc:
            print(f"bkexp report: error: {exc}", file=sys.stderr)
            return 2
    if "skipped" in report.comparison:
        print(f"bkexp report: comparison skipped: {report.comparison['skipped']}; choose one with --baseline")
    for path in report.files:
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
