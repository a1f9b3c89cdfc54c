"""Hydra callback that writes the sweep report when a multirun ends, and optionally logs it to W&B."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Where a project name may sit in the composed config, first match wins (logger=wandb or logger=many).
WANDB_PROJECT_KEYS = ("logger.wandb.project", "logger.project", "wandb.project")
DEFAULT_WANDB_PROJECT = "bkexp"


class ReportCallback(Callback):
    """`on_multirun_end`: `bkexp report <hydra.sweep.dir>`; never raises, so a report problem cannot fail a sweep.

    log_to_wandb: True, False, or "auto" (log when some job of the sweep wrote a wandb/ directory). The report is
    logged as one extra W&B run named "report" (job_type "report") in the sweep's group, offline unless
    WANDB_MODE says otherwise.
    """

    def __init__(self, baseline: str = "transformer", metrics: Sequence[str] | None = None, plots: bool = True,
                 log_to_wandb: bool | str = "auto", wandb_project: str | None = None,
                 wandb_entity: str | None = None, wandb_group: str | None = None) -> None:
        if log_to_wandb not in (True, False, "auto"):
            raise ValueError(f"log_to_wandb={log_to_wandb!r}; valid: true, false, auto")
        self.baseline = baseline
        self.metrics = list(metrics) if metrics else None
        self.plots = plots
        self.log_to_wandb = log_to_wandb
        self.wandb_project = wandb_project
        self.wandb_entity = wandb_entity
        self.wandb_group = wandb_group

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            self._write_tensorboard_experiment(sweep_dir)
        except Exception:
            log.exception("writing the sweep's TensorBoard HParams summary failed")
        try:
            from bkexp.report.cli import write_report

            report = write_report([sweep_dir], sweep_dir, baseline=self.baseline, metrics=self.metrics,
                                  plots=self.plots)
            log.info("report: %d runs (%d failed) -> %s", report.n_runs, report.n_failed, report.summary_md)
        except Exception:  # the sweep's runs are done and recorded; a report failure must not turn it red
            log.exception("bkexp report failed for the sweep; run `bkexp report <sweep dir>` to retry")
            return
        try:
            if self._want_wandb(sweep_dir):
                self._log_wandb(config, sweep_dir, report)
        except Exception:
            log.exception("logging the sweep report to W&B failed (the report files are written)")

    @staticmethod
    def _summaries(sweep_dir: Path) -> list[dict[str, Any]]:
        from bkexp.report.collect import load_summary
        from bkexp.rundir import SUMMARY_FILE, RunDirError, find_run_dirs

        try:
            runs = find_run_dirs([sweep_dir])
        except RunDirError:  # no directory, or no job in it
            return []
        return [load_summary(d / SUMMARY_FILE) for d in runs if (d / SUMMARY_FILE).is_file()]

    def _write_tensorboard_experiment(self, sweep_dir: Path) -> None:
        """The sweep's one HParams experiment summary (TensorBoard shows a single one per log directory)."""
        from bkexp.dashboards import write_sweep_experiment

        path = write_sweep_experiment(sweep_dir, self._summaries(sweep_dir))
        if path is not None:
            log.info("TensorBoard HParams summary of the sweep -> %s", path)

    def _group(self, sweep_dir: Path) -> str:
        """The W&B group the sweep's jobs used (from their summary.json), else the one they would have used."""
        for summary in self._summaries(sweep_dir):
            group = ((summary.get("dashboards") or {}).get("wandb") or {}).get("group")
            if group:
                return str(group)
        from bkexp.dashboards import sweep_group

        return sweep_group(sweep_dir)

    def _want_wandb(self, sweep_dir: Path) -> bool:
        if self.log_to_wandb is False:
            return False
        try:
            import wandb  # noqa: F401
        except ImportError:
            if self.log_to_wandb is True:
                log.warning("log_to_wandb=true but wandb is not installed (pip install 'bkexp[wandb]'); skipped")
            return False
        if self.log_to_wandb == "auto":
            return any(p.is_dir() for p in sweep_dir.glob("*/wandb"))
        return True

    def _project(self, config: DictConfig) -> str:
        if self.wandb_project:
            return self.wandb_project
        for key in WANDB_PROJECT_KEYS:
            value = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
            if isinstance(value, str) and value:
                return value
        return DEFAULT_WANDB_PROJECT

    def _log_wandb(self, config: DictConfig, sweep_dir: Path, report: Any) -> None:
        import wandb

        if wandb.run is not None:
            # With wandb's default reinit ("return_previous") init would hand back a job's unfinished run and the
            # report would land in that job; the sweep is over, so close it first.
            log.info("finishing the still-active W&B run %r before logging the report", wandb.run.name)
            wandb.run.finish()
        run = wandb.init(
            project=self._project(config),
            entity=self.wandb_entity,
            group=self.wandb_group or self._group(sweep_dir),  # the group the sweep's job runs share
            name="report",
            job_type="report",
            dir=str(sweep_dir),
            mode=os.environ.get("WANDB_MODE") or "offline",
            config={"baseline": self.baseline, "sweep_dir": str(sweep_dir.resolve())},
        )
        try:
            from bkexp.report.wandb_view import log_report

            log_report(run, report.runs, report.metrics, report.summary_csv, report.comparison, report.plots)
            run.summary["report/n_runs"] = report.n_runs
            run.summary["report/n_failed"] = report.n_failed
        finally:
            run.finish()


class SweepExitStatus(Callback):
    """`on_multirun_end`: exit with status 1 when a job of the sweep did not end ``ok``.

    Every job has run by then (a multirun records a failed job and goes on), and listed before the report
    callback it runs after it (Hydra calls end hooks in reverse order), so the report is written first. A
    script or CI job that launched the sweep sees the failure in the exit code.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bkexp.report.collect import run_record
        from bkexp.rundir import RunDirError, find_run_dirs

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            runs = find_run_dirs([sweep_dir])
        except RunDirError:  # no directory, or no job in it: nothing to judge
            runs = []
        statuses = [run_record(d)["status"] for d in runs]
        bad = {s: statuses.count(s) for s in sorted(set(statuses)) if s != "ok"}
        if bad:
            counts = ", ".join(f"{n} {s}" for s, n in bad.items())
            print(f"[bkexp] sweep {sweep_dir}: {sum(bad.values())} of {len(statuses)} jobs did not end ok "
                  f"({counts}); exit status 1", flush=True)
            raise SystemExit(1)
