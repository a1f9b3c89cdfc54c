"""Find the runs under run/sweep directories, load their summary.json and tell which keys were swept."""

from __future__ import annotations

import functools
import json
import math
import os
import socket
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bkexp.environment import machine_label
from bkexp.held_out import OVERLAP_COLUMN, record_pairs, short_caveat
from bkexp.rundir import (  # noqa: F401  (re-exported)
    SUMMARY_FILE, RunDirError, atomic_write_text, checkpoint_step, find_run_dirs)
from bkexp.utils import flatten

# Top-level summary fields that identify a run; always in summary.csv, and swept when they vary.
IDENTITY_KEYS = ("model", "dataset", "seq_len", "bits", "seed")
# Keys that never make a pivot column: model is the row, seeds are replicates averaged in a cell.
ROW_KEY = "model"
REPLICATE_KEY = "seed"
# Summary sections flattened into metric columns ("metrics.val/ppl", "throughput.train_tokens_per_sec", ...).
METRIC_SECTIONS = ("metrics", "throughput", "memory", "flops", "params", "tokens", "backends",
                   "stopped_early")  # stopped_early: step, reason, best score of a run EarlyStopping ended
METRIC_SCALARS = ("steps", "state_size", "wall_time_s")
# Config subtrees that differ per run for bookkeeping reasons (paths, Hydra's own settings), not as a treatment.
CONFIG_NOISE_PREFIXES = ("hydra.", "paths.")


class NoRunsError(RunDirError):
    """A directory given to the report holds no run (no summary.json and no Hydra job directory)."""


@dataclass
class RunSet:
    """Every run found, as one flat row per run, plus which keys were swept."""

    frame: pd.DataFrame
    swept_keys: list[str]  # keys whose value differs across runs: model first, seed last
    point_keys: list[str]  # swept keys except model and seed: one combination = one pivot column
    config_keys: list[str]  # flattened resolved-config keys that differ across runs ("config.model.d_model")
    sources: list[Path]
    curves: dict[str, Path] = field(default_factory=dict)  # run_dir -> csv/metrics.csv

    @property
    def n_ok(self) -> int:
        return int((self.frame["status"] == "ok").sum())

    @property
    def n_failed(self) -> int:
        return int((self.frame["status"] != "ok").sum())

    def point_of(self, row: Mapping[str, Any]) -> tuple:
        return tuple(row[k] for k in self.point_keys)

    def points(self) -> list[tuple]:
        """The swept points (pivot columns), in natural order (numbers numerically)."""
        seen = {self.point_of(r) for r in self.frame.to_dict("records")}
        return sorted(seen, key=lambda p: tuple(sort_key(v) for v in p))

    def models(self) -> list[str]:
        return sorted({str(m) for m in self.frame[ROW_KEY]}, key=sort_key)

    def machines(self) -> dict[str, int]:
        """Successful runs per machine they were measured on (``machine_label``), most runs first."""
        ok = self.frame[self.frame["status"] == "ok"]
        counts = Counter(m for m in ok.get("machine", pd.Series(dtype=object)) if isinstance(m, str))
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def sort_key(value: Any) -> tuple:
    """Order numbers numerically before strings, and missing values last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0, "")
    if isinstance(value, bool):
        return (1, 0, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0, str(value))


def point_label(keys: Sequence[str], point: Sequence[Any]) -> str:
    """'128' for one swept key, 'bits=8, seq_len=128' for several, 'all' for none."""
    if not keys:
        return "all"
    if len(keys) == 1:
        return display(point[0])
    return ", ".join(f"{k}={display(v)}" for k, v in zip(keys, point))


def display(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(value)


def _parse_override(item: str) -> tuple[str, Any] | None:
    key, sep, raw = str(item).partition("=")
    if not sep:
        return None
    key = key.lstrip("+~")
    try:
        value = yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    return key, value


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


@functools.lru_cache(maxsize=4096)
def _hydra_choices(run_dir: Path) -> dict[str, Any]:
    """Config-group choices (model: bk, dataset: wikitext2, ...) Hydra recorded for the job."""
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}
    choices = (((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices")) or {}
    return {str(k): v for k, v in choices.items()}


def load_summary(path: Path) -> dict[str, Any]:
    """One run record; an unreadable summary.json becomes a failed record instead of stopping the report."""
    run_dir = path.parent
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        if not isinstance(summary, dict):
            raise ValueError(f"top level is {type(summary).__name__}, expected an object")
    except (OSError, ValueError) as exc:
        summary = {"status": "failed", "error": f"UnreadableSummary: {path}: {exc}"}
    return _with_location(summary, run_dir)


def run_record(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json, or for a job killed hard (SIGKILL, node lost: .hydra/ but no summary.json) a
    record that shows it as not finished."""
    path = run_dir / SUMMARY_FILE
    return load_summary(path) if path.is_file() else orphan_record(run_dir)


def orphan_record(run_dir: Path) -> dict[str, Any]:
    if (run_dir / "checkpoints" / "last.ckpt").is_file():  # killed after its first checkpoint
        return _with_location(_killed_record(run_dir), run_dir)
    summary = {
        "status": "failed",
        "error": f"MissingSummary: no {SUMMARY_FILE} in {run_dir} (the job was killed, or is still running)",
    }
    return _with_location(summary, run_dir)


def _with_location(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    summary = dict(summary)
    # Where the file is now wins over the recorded run_dir: sweeps get copied off clusters.
    summary["_run_dir"] = run_dir.resolve()
    if not summary.get("overrides"):
        overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
        summary["overrides"] = [str(o) for o in overrides] if isinstance(overrides, list) else []
    summary.setdefault("status", "failed")
    if summary["status"] == "running" and not _still_running(summary):
        summary.update(_killed_record(run_dir))
    return summary


def _still_running(summary: Mapping[str, Any]) -> bool:
    """A run that says "running" is alive when its process still exists on this host (else it was killed)."""
    pid, host = summary.get("pid"), summary.get("hostname")
    if not isinstance(pid, int) or host != socket.gethostname():
        return False  # another machine's run (a copied sweep): it ended when it was copied, or we cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killed_record(run_dir: Path) -> dict[str, Any]:
    """A run killed without a word (SIGKILL, power loss): interrupted at its last checkpoint's step."""
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        step = checkpoint_step(last) if last.is_file() else None
    except RunDirError:  # a truncated or foreign file: the step is unknown, the report goes on
        step = None
    where = f"its last checkpoint is at step {step} ({last})" if step is not None else "no checkpoint to resume from"
    return {"status": "interrupted", "step": step, "signal": None,
            "error": f"killed without an exit status (e.g. SIGKILL); {where}"}


def _override_keys(summaries: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for summary in summaries:
        for item in summary.get("overrides") or []:
            parsed = _parse_override(item)
            if parsed and not parsed[0].startswith("hydra") and parsed[0] not in keys:
                keys.append(parsed[0])
    return keys


def _key_value(summary: Mapping[str, Any], flat_config: Mapping[str, Any], key: str) -> Any:
    """What a run used for `key`: its summary field, its own override, its resolved config, or its group choice."""
    if key in IDENTITY_KEYS and summary.get(key) is not None:
        return summary[key]
    for item in summary.get("overrides") or []:
        parsed = _parse_override(item)
        if parsed and parsed[0] == key:
            return parsed[1]
    if key in flat_config:
        return flat_config[key]
    return _hydra_choices(summary["_run_dir"]).get(key)


def _hashable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _config_noise(key: str, values: Sequence[Any], run_dirs: Sequence[Path]) -> bool:
    if any(key.startswith(p) or key == p.rstrip(".") for p in CONFIG_NOISE_PREFIXES):
        return True
    # Per-run paths (output dirs, logger save dirs, W&B names) differ for every run without being a treatment.
    # The directory name counts too (a sweep copied off a cluster has moved), unless it is a bare job number.
    return all(isinstance(v, str) and (str(d) in v or (len(d.name) > 3 and d.name in v))
               for v, d in zip(values, run_dirs) if v)


def collect_runs(dirs: Sequence[str | os.PathLike]) -> RunSet:
    """Load every run under `dirs` (run dirs, sweep dirs, or parents of either) into one RunSet.

    Raises NoRunsError naming the directory when a directory does not exist or holds no run.
    """
    sources = [Path(d) for d in dirs]
    if not sources:
        raise NoRunsError("no directory given")
    summaries: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for source in sources:
        if not source.is_dir():
            raise NoRunsError(f"{source} is not a directory")
        try:
            runs = find_run_dirs([source])
        except RunDirError:
            raise NoRunsError(
                f"no {SUMMARY_FILE} found under {source}: give a run directory (outputs/<stamp>) or a sweep "
                f"directory (multirun/<stamp>) written by `python train.py`"
            ) from None
        records = [run_record(d) for d in runs]
        for record in records:
            if record["_run_dir"] not in seen:  # the same run reached through overlapping dirs counts once
                seen.add(record["_run_dir"])
                summaries.append(record)

    flat_configs = [flatten(s.get("config") or {}) for s in summaries]
    run_dirs = [s["_run_dir"] for s in summaries]

    candidates = [k for k in IDENTITY_KEYS if k not in (REPLICATE_KEY,)]
    candidates += [k for k in _override_keys(summaries) if k not in candidates and k != REPLICATE_KEY]
    candidates.append(REPLICATE_KEY)
    values = {k: [_key_value(s, c, k) for s, c in zip(summaries, flat_configs)] for k in candidates}
    # A run that failed before a key was known (None) does not make that key look swept.
    swept = [k for k in candidates if len({_hashable(v) for v in values[k]} - {None}) > 1]
    point_keys = [k for k in swept if k not in (ROW_KEY, REPLICATE_KEY)]

    config_keys: list[str] = []
    all_config_keys = sorted({k for c in flat_configs for k in c})
    for key in all_config_keys:
        if key in IDENTITY_KEYS:  # config.seq_len etc. would repeat the identity columns
            continue
        column = [c.get(key) for c in flat_configs]
        if len({_hashable(v) for v in column}) > 1 and not _config_noise(key, column, run_dirs):
            config_keys.append(key)

    rows: list[dict[str, Any]] = []
    for summary, flat_config in zip(summaries, flat_configs):
        row: dict[str, Any] = {
            "run_dir": str(summary["_run_dir"]),
            "status": str(summary.get("status")),
            "error": summary.get("error"),
            "recipe": summary.get("recipe"),  # the conf/recipe/ settings the run composed, if any
            "machine": machine_label(summary.get("env")),  # speed and memory are this machine's
            # splits that are the same data, e.g. "validation = test data": their metrics are not held out
            "not_held_out": short_caveat(record_pairs(summary.get("data"))),
        }
        for key in [*IDENTITY_KEYS, *[k for k in swept if k not in IDENTITY_KEYS]]:
            row[key] = _hashable(_key_value(summary, flat_config, key))
        row[ROW_KEY] = "?" if row[ROW_KEY] is None else str(row[ROW_KEY])
        sweep = summary.get("sweep") or {}
        row["sweep.dir"] = sweep.get("dir")
        row["sweep.job_num"] = sweep.get("job_num")
        for key in config_keys:
            row[f"config.{key}"] = _hashable(flat_config.get(key))
        for section in METRIC_SECTIONS:
            if isinstance(summary.get(section), Mapping):
                for key, value in flatten(summary[section], section).items():
                    row[key] = _hashable(value)
        for key in METRIC_SCALARS:
            if key in summary:
                row[key] = _hashable(summary[key])
        row.update(eval_columns(Path(summary["_run_dir"])))
        rows.append(row)

    frame = pd.DataFrame(rows)
    # Keys stay Python objects: a None (failed run) must not turn seq_len 128 into 128.0 in labels and the CSV.
    key_columns = ["run_dir", "status", "error", "recipe", "machine", "not_held_out", *IDENTITY_KEYS, *swept,
                   "sweep.dir", "sweep.job_num", *(f"config.{k}" for k in config_keys)]
    for column in dict.fromkeys(key_columns):
        if column in frame.columns:
            frame[column] = pd.Series([row.get(column) for row in rows], index=frame.index, dtype=object)
    curves = {}
    for summary in summaries:
        csv = _metrics_csv(summary["_run_dir"])
        if csv is not None:
            curves[str(summary["_run_dir"])] = csv
    return RunSet(frame=frame, swept_keys=swept, point_keys=point_keys,
                  config_keys=[f"config.{k}" for k in config_keys], sources=sources, curves=curves)


EVAL_DIR = "eval"
EVAL_PREFIX = "eval."  # columns from a run's eval/ results (written by `bkexp eval`)
NOT_HELD_OUT = "not_held_out"  # eval.not_held_out.<dataset>: the run's splits that corpus holds


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def eval_columns(run_dir: Path) -> dict[str, Any]:
    """Flat columns from ``eval/perplexity.json``, ``eval/length.json`` and ``eval/lm_eval.json`` of a run.

    ``eval.ppl.<dataset>``, ``eval.bits_per_byte.<dataset>``, ``eval.unk_share.<dataset>``, ``eval.ppl.mean`` /
    ``.std``, ``eval.not_held_out.<dataset>`` (the run's splits a corpus holds, e.g. ``train+validation``),
    ``eval.train_13gram_overlap.<dataset>`` (the share of its 13-grams found in the run's training tokens);
    ``eval.length_ppl.<L>``, ``eval.length_tokens_per_sec.<L>``, ``eval.length_peak_mb.<L>`` (an out-of-memory
    length has no value); ``eval.lm_eval.<task>.<metric>`` and ``...<metric>_stderr``.
    """
    out: dict[str, Any] = {}
    folder = run_dir / EVAL_DIR
    ppl = _read_json(folder / "perplexity.json")
    if isinstance(ppl, dict):
        for row in ppl.get("datasets") or []:
            for key in ("ppl", "bits_per_byte", "unk_share", OVERLAP_COLUMN):
                if isinstance(row.get(key), (int, float)):
                    out[f"{EVAL_PREFIX}{key}.{row['dataset']}"] = row[key]
            if row.get("shares_data_with"):  # the run's own training/validation data: not held out
                out[f"{EVAL_PREFIX}{NOT_HELD_OUT}.{row['dataset']}"] = "+".join(row["shares_data_with"])
        for stat in ("mean", "std"):
            value = (ppl.get(stat) or {}).get("ppl")
            if isinstance(value, (int, float)):
                out[f"{EVAL_PREFIX}ppl.{stat}"] = value
    length = _read_json(folder / "length.json")
    if isinstance(length, dict):
        if length.get("shares_data_with"):
            out[f"{EVAL_PREFIX}{NOT_HELD_OUT}.{length.get('dataset')}"] = "+".join(length["shares_data_with"])
        for row in length.get("lengths") or []:
            if row.get("status") != "ok":
                continue
            for key, name in (("ppl", "length_ppl"), ("tokens_per_sec", "length_tokens_per_sec"),
                              ("peak_mb", "length_peak_mb")):
                if isinstance(row.get(key), (int, float)):
                    out[f"{EVAL_PREFIX}{name}.{row['length']}"] = row[key]
    harness = _read_json(folder / "lm_eval.json")
    if isinstance(harness, dict):
        for row in harness.get("metrics") or []:
            if isinstance(row.get("value"), (int, float)):
                base = f"{EVAL_PREFIX}lm_eval.{row['task']}.{row['metric']}"
                out[base] = row["value"]
                if isinstance(row.get("stderr"), (int, float)):
                    out[f"{base}_stderr"] = row["stderr"]
    return out


def _metrics_csv(run_dir: Path) -> Path | None:
    """csv/metrics.csv, or the newest csv/version_*/metrics.csv when the CSVLogger kept versions."""
    direct = run_dir / "csv" / "metrics.csv"
    if direct.is_file():
        return direct
    versions = sorted((run_dir / "csv").glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return versions[-1] if versions else None
