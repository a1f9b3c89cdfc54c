"""Resume in place: ``python train.py resume=<run dir | sweep dir>`` continues where a run was stopped.

A run directory is re-run with its own overrides (``.hydra/overrides.yaml``) into the same directory
(``hydra.run.dir``, with ``hydra.output_subdir=null`` so its ``.hydra/`` stays as it was) from its
``checkpoints/last.ckpt``; ``csv/metrics.csv`` keeps the rows logged before that checkpoint and the resumed
run appends the rest; the TensorBoard run continues in the same folder and the W&B run under the same id.
A sweep directory (``multirun.yaml``) is re-launched with its own sweep overrides into the same sweep
directory: jobs whose summary says ``ok`` are skipped, the others resume from their ``last.ckpt`` (or start,
if they never wrote one). Each job continues in its own directory (found by its overrides, apart from those the
resume command changes, although its name holds them), and a job that has its ``.hydra/`` keeps it as it was.
Extra overrides on the command line win over the saved ones (e.g. a longer ``trainer.max_steps``).

Path values of ``resume=`` and ``ckpt_path=`` are quoted before Hydra parses them, so directories of sweep
jobs (``0_model=bk,seq_len=256``) can be given as they are.

The resumed process works in the directory the run was launched in (Hydra's ``runtime.cwd``), so the relative
paths of its config (``dataset.data_dir=data/wt2``, the token cache, ``paths.root_dir=.``) name the files the run
read, wherever the resume is typed; extra overrides are read from there too. It says so when it changes
directory. Likewise the environment variables the config reads (``${oc.env:...}``, recorded in ``summary.json``'s
``config_env``) are set as the run had them before Hydra composes it (:mod:`bkexp.config_env`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from bkexp import config_env
from bkexp.rundir import SUMMARY_FILE, checkpoint_step
from bkexp.utils import atomic_write_text

log = logging.getLogger(__name__)

PATH_KEYS = ("ckpt_path", "resume")
# Hydra settings of the original launch that must not come back: the resumed launch sets its own.
HYDRA_SKIP = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.mode", "hydra.output_subdir")
LAST = Path("checkpoints") / "last.ckpt"
METRICS = Path("csv") / "metrics.csv"


def _key(arg: str) -> str:
    return arg.partition("=")[0].lstrip("+~")


def quote(value: str) -> str:
    """``value`` as a Hydra quoted string (commas, '=' and spaces in paths are then plain characters)."""
    if value[:1] in ("'", '"'):
        return value  # quoted by the user already
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace('"', '\\"') + '"'


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
        return value[1:-1].replace(f"\\{value[0]}", value[0])
    return value


def quote_path_overrides(args: list[str]) -> list[str]:
    """Quote the values of ``ckpt_path=`` and ``resume=`` (Hydra's grammar would split them at ',' or '=')."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        out.append(f"{key}={quote(value)}" if sep and value and key.lstrip("+") in PATH_KEYS else arg)
    return out


def _merge(saved: list[str], given: list[str]) -> list[str]:
    """The saved overrides, minus those the command line sets again (and minus ckpt_path/resume)."""
    given_keys = {_key(a) for a in given}
    return [a for a in saved if _key(a) not in given_keys and _key(a) not in PATH_KEYS] + given


def _saved_hydra_overrides(hydra_yaml: Path) -> list[str]:
    data = yaml.safe_load(hydra_yaml.read_text()) if hydra_yaml.is_file() else None
    overrides = ((data or {}).get("hydra") or {}).get("overrides") or {}
    return [str(o) for o in overrides.get("hydra") or [] if not str(o).startswith(HYDRA_SKIP)]


def _predates_recipe(hydra_cfg: dict[str, Any] | None, overrides: list[str]) -> list[str]:
    """``["~recipe"]`` for a run composed before conf/train.yaml had the ``recipe`` group (its recorded choices lack
    it and no override names it): recomposed today it would get the default MQAR recipe, another model than its
    checkpoint's."""
    choices = (((hydra_cfg or {}).get("hydra") or {}).get("runtime") or {}).get("choices")
    if not isinstance(choices, dict) or "recipe" in choices or any(_key(o) == "recipe" for o in overrides):
        return []
    return ["~recipe"]


def expand_argv(argv: list[str]) -> list[str]:
    """The command line Hydra should see: path values quoted, ``resume=<dir>`` turned into the run's own."""
    args = quote_path_overrides(argv[1:])
    resume = [a for a in args if _key(a) == "resume" and "=" in a]
    if not resume or unquote(resume[-1].partition("=")[2]) in ("", "null"):
        return [argv[0], *args]
    target = Path(unquote(resume[-1].partition("=")[2])).expanduser().resolve()
    given = [a for a in args if _key(a) != "resume" and a not in ("-m", "--multirun")]
    if (target / "multirun.yaml").is_file():
        record = yaml.safe_load((target / "multirun.yaml").read_text())
        saved = record["hydra"]["overrides"]
        hydra_saved = [str(o) for o in saved.get("hydra") or [] if not str(o).startswith(HYDRA_SKIP)]
        task = _merge([str(o) for o in saved.get("task") or []], given)
        _enter_launch_dir(record)
        _restore_environment(target, sorted(target.glob(f"*/{SUMMARY_FILE}")))
        # each job continues in its own directory, whose name holds its overrides, also when the resume changes some
        changed = " ".join(sorted({"resume", *(_key(a) for a in given if not _key(a).startswith("hydra"))}))
        subdir = ('"${bkexp.resume_job_dir:${hydra.sweep.dir},${hydra.job.num},${hydra.job.override_dirname},'
                  f"${{hydra.overrides.task}},'{changed}'}}\"")
        return [argv[0], "-m", *task, *_predates_recipe(record, task), *hydra_saved,
                f"hydra.sweep.dir={quote(str(target))}", f"hydra.sweep.subdir={subdir}",
                'hydra.output_subdir="${bkexp.resume_output_subdir:${hydra.runtime.output_dir}}"',
                f"resume={quote(str(target))}"]
    if (target / ".hydra" / "overrides.yaml").is_file():
        saved = yaml.safe_load((target / ".hydra" / "overrides.yaml").read_text()) or []
        hydra_yaml = target / ".hydra" / "hydra.yaml"
        hydra_saved = [o for o in _saved_hydra_overrides(hydra_yaml)
                       if not o.startswith("hydra/launcher")]  # one job resumes in this process
        task = _merge([str(o) for o in saved], given)
        record = yaml.safe_load(hydra_yaml.read_text()) if hydra_yaml.is_file() else None
        _enter_launch_dir(record)
        _restore_environment(target, [target / SUMMARY_FILE])
        return [argv[0], *task, *_predates_recipe(record, task), *hydra_saved,
                f"hydra.run.dir={quote(str(target))}", "hydra.output_subdir=null", f"resume={quote(str(target))}"]
    raise SystemExit(f"resume={target}: neither a run directory (no .hydra/overrides.yaml) nor a sweep directory "
                     "(no multirun.yaml) written by `python train.py`")


def _enter_launch_dir(hydra_record: dict[str, Any] | None) -> None:
    """Work where the run was launched (see the module docstring); a run that did not record it, or whose
    directory is gone, resumes here."""
    cwd = (((hydra_record or {}).get("hydra") or {}).get("runtime") or {}).get("cwd")
    if not isinstance(cwd, str) or not os.path.isabs(cwd) or Path(cwd).resolve() == Path.cwd().resolve():
        return
    if not Path(cwd).is_dir():
        print(f"[bkexp] resume: the run was launched in {cwd}, which is gone; relative paths in its config are "
              f"read from {Path.cwd()}", file=sys.stderr)
        return
    print(f"[bkexp] resume: working in {cwd}, where the run was launched (relative paths in its config and in "
          "the overrides given now are read from there)", file=sys.stderr)
    os.chdir(cwd)


def _restore_environment(target: Path, summaries: list[Path]) -> None:
    """The environment variables the run's config read, set as the run had them (the first job's record for a
    sweep: its jobs ran from one launch), so that ``${oc.env:...}`` values name what the run read."""
    for path in summaries:
        try:
            values = config_env.recorded(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if values:
            moved = config_env.restore(values)
            if moved:
                print(f"[bkexp] resume: the environment variables {target}'s config reads are set as the run had them:"
                      f" {config_env.describe(moved)} (override the config keys that read them to read elsewhere)",
                      file=sys.stderr)
            return


# ------------------------------------------------------------------------------------------ in the run


@dataclass
class ResumePlan:
    """What ``run()`` does with ``resume=`` for its output directory."""

    finished: bool  # the summary says ok: nothing to do
    ckpt_path: str | None  # last.ckpt to continue from; None: (re)start from scratch in this directory
    step: int | None  # the checkpoint's global step
    previous: dict[str, Any]  # the previous summary.json (empty if none)


def plan_resume(run_dir: Path) -> ResumePlan:
    """Skip a finished run; otherwise continue from last.ckpt and keep the metrics rows logged before it."""
    previous: dict[str, Any] = {}
    if (run_dir / SUMMARY_FILE).is_file():
        try:
            previous = json.loads((run_dir / SUMMARY_FILE).read_text())
        except ValueError:
            previous = {}
    if previous.get("status") == "ok":
        return ResumePlan(True, None, previous.get("steps"), previous)
    last = run_dir / LAST
    step = checkpoint_step(last) if last.is_file() else None
    trim_metrics(run_dir / METRICS, step or 0)
    return ResumePlan(False, str(last) if step is not None else None, step, previous)


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.csv`` logged before ``step``; the resumed run logs the later ones again.

    Lightning logs a training step's row with the step count before it (the checkpoint after step s holds
    the row of step s - 1) and the validation after step s with step s - 1 as well.
    """
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        rows = [row for row in reader if row.get("step") and int(float(row["step"])) < step]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer without deleting an existing metrics.csv: its header becomes the starting keys."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger that appends to the ``metrics.csv`` of a run resumed in place (no row lost)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
