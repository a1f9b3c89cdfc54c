"""How runs appear on dashboards, without Lightning: run names, sweep groups, run-level numbers, TensorBoard HParams.

Shared by the training loggers (``bkexp.train.loggers``, which write each run's dashboards) and the end-of-sweep
report (``bkexp.report.hydra_callback``, which writes the sweep's one TensorBoard experiment summary from the
jobs' summary.json files), so the report reads files and never imports the training layer.

- **Run names** are the model, then the overrides that differ within the sweep (``bk · seq_len=64``). Which
  overrides differ is read from the sweep's own record, ``<sweep>/multirun.yaml`` (the multirun's overrides and
  ``hydra.sweeper.params``), which Hydra writes before the first job, so every launcher (local, joblib,
  submitit) names jobs alike. The full override list stays in the config (W&B config, summary.json).
- **W&B** groups a sweep's runs under ``sweep_group`` (stamp + hash of the full path).
- **TensorBoard**'s HParams view uses a single experiment summary: jobs only write their session
  (hyper-parameters, status) and the sweep writes the one experiment summary at its end
  (``write_sweep_experiment``), swept settings marked ``differs``, validation/test perplexity first.

Run-level numbers (``run_numbers``) are summary.json's, named as in the report's summary.csv
(``throughput.train_tokens_per_sec``, ``memory.peak_mb``, ``flops.forward_per_token``, ...); the per-step
curves keep their own names (``throughput/tokens_per_sec`` is one step's rate, not the run's average).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bkexp.held_out import record_pairs, short_caveat
from bkexp.utils import flatten

SEPARATOR = " · "
# Overrides that never tell runs apart in a name: where files go, which loggers, Hydra's own settings.
NAME_EXCLUDED_KEYS = ("logger", "callbacks", "ckpt_path", "sweep", "hydra", "paths", "dataset.data_dir",
                      "dataset.files")
SWEEP_RECORD = "multirun.yaml"
TENSORBOARD_DIR = "tensorboard"
# Where run-level numbers go in TensorBoard: one scalar category, so they do not scatter one-point charts.
RUN_LEVEL_PREFIX = "summary/"
# summary.json sections and scalars that are run-level numbers (named "<section>.<key>" like summary.csv).
RUN_LEVEL_SECTIONS = ("throughput", "memory", "flops", "params", "tokens")
RUN_LEVEL_SCALARS = ("state_size", "steps", "wall_time_s")
RUN_LEVEL_SKIP = ("flops.forward_by_op.", "flops.batch_shape")
# Metrics computed at the end of the run, never logged per step (so no dashboard has them otherwise).
END_OF_RUN_METRICS = ("best/val_ppl", "best/val_loss")
# HParams column order: the primary metrics first (TensorBoard shows five and colours by the first).
METRIC_ORDER = ("val/ppl", "test/ppl", "val/acc", "test/acc", "best/val_ppl", "throughput.train_tokens_per_sec",
                "memory.peak_mb", "flops.forward_per_token", "params.non_embedding", "state_size", "val/loss",
                "train/loss", "train/aux_loss", "test/loss")
# Per-step rates and peaks: a curve, not a run-level number (the run's own figures are throughput.* and memory.*
# of summary.json), so neither the HParams table nor W&B's run summary shows their last value.
PER_STEP_ONLY = ("throughput/tokens_per_sec", "time/step_ms", "mem/peak_mb")
# The run-level numbers TensorBoard gets as one-point scalars (HParams columns); W&B's summary gets all.
TENSORBOARD_RUN_LEVEL = ("best/val_ppl", "throughput.train_tokens_per_sec", "throughput.eval_tokens_per_sec",
                         "memory.peak_mb", "flops.forward_per_token", "flops.train_step_per_token",
                         "params.non_embedding", "params.total", "state_size")
# TensorBoard's Custom Scalars tab: training and validation first, train and val loss on one chart.
CUSTOM_SCALARS = (
    ("train / val", (("loss: train and val", ("train/loss", "val/loss")), ("perplexity", ("val/ppl", "test/ppl")),
                     ("accuracy", ("val/acc", "test/acc")), ("auxiliary loss", ("train/aux_loss",)))),
    ("speed and memory (per logged step)", (("tokens/s", ("throughput/tokens_per_sec",)),
                                            ("step time (ms)", ("time/step_ms",)),
                                            ("peak memory so far (MB)", ("mem/peak_mb",)))),
    ("optimisation", (("learning rate", ("lr",)), ("gradient norm", ("grad_norm",)))),
)
# Hyper-parameters every session records besides the swept ones.
IDENTITY_HPARAMS = ("model", "dataset", "seq_len", "bits", "seed")


# ------------------------------------------------------------------------------------------------- names


def _excluded(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NAME_EXCLUDED_KEYS)


def _parse(items: Iterable[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(i) for i in items])


def sweep_overrides(sweep_dir: str | Path) -> list[str] | None:
    """The multirun's overrides and sweeper params (``key=a,b`` strings), from ``<sweep>/multirun.yaml``."""
    path = Path(sweep_dir) / SWEEP_RECORD
    if not path.is_file():
        return None
    record = OmegaConf.load(path)
    items = [str(o) for o in OmegaConf.select(record, "hydra.overrides.task", default=[]) or []]
    params = OmegaConf.select(record, "hydra.sweeper.params", default=None)
    if params:
        given = {str(i).split("=", 1)[0].lstrip("+~") for i in items}
        items += [f"{k}={v}" for k, v in params.items() if k not in given]  # the command line wins
    return items


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """Keys an override list sweeps over more than one value (``model=bk,mamba``, ``seed=range(3)``)."""
    keys: list[str] = []
    for override in _parse(overrides):
        if not override.is_sweep_override() or _excluded(override.key_or_group):
            continue
        many = override.is_interval_sweep() or len(set(override.sweep_string_iterator())) > 1
        if many and override.key_or_group not in keys:
            keys.append(override.key_or_group)
    return keys


def run_name(model: str | None, overrides: Sequence[str], keys: Sequence[str] | None) -> str:
    """``bk · seq_len=64``: the model, then the job's overrides of ``keys`` (all but noise when None)."""
    parts = [str(model)] if model else []
    for override in _parse(overrides):
        key = override.key_or_group
        if key == "model" or _excluded(key) or (keys is not None and key not in keys):
            continue
        parts.append(f"{key}={override.get_value_element_as_str()}")
    return SEPARATOR.join(parts) or "run"


def sweep_group(sweep_dir: str | Path) -> str:
    """A group name unique to one sweep: its folder name (the stamp) and a hash of its full path."""
    path = Path(sweep_dir).resolve()
    return f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def folder_name(name: str) -> str:
    """A run name as one folder name: path separators become the look-alike division slash."""
    return name.replace("/", "\u2215").replace("\\", "\u2215").strip(". ") or "run"


# -------------------------------------------------------------------------------------------- run numbers


def finite_number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def run_numbers(summary: Mapping[str, Any]) -> dict[str, float | int]:
    """summary.json's run-level numbers under the report's (summary.csv) names, finite numbers only."""
    out: dict[str, float | int] = {}
    for section in RUN_LEVEL_SECTIONS:
        if isinstance(summary.get(section), Mapping):
            for key, value in flatten(summary[section], section).items():
                if not key.startswith(RUN_LEVEL_SKIP) and finite_number(value) is not None:
                    out[key] = value
    for key in RUN_LEVEL_SCALARS:
        if finite_number(summary.get(key)) is not None:
            out[key] = summary[key]
    metrics = summary.get("metrics") or {}
    for key in END_OF_RUN_METRICS:
        if finite_number(metrics.get(key)) is not None:
            out[key] = metrics[key]
    return out


def session_hparams(summary: Mapping[str, Any], swept: Sequence[str] | None) -> dict[str, Any]:
    """The settings a session is filed under: the swept overrides, then the run's identity, and which splits are
    not held out (:mod:`bkexp.held_out`) where some are."""
    values: dict[str, Any] = {}
    for override in _parse(summary.get("overrides") or []):
        if swept is not None and override.key_or_group in swept:
            values[override.key_or_group] = override.get_value_element_as_str()
    for key in IDENTITY_HPARAMS:
        if key not in values and summary.get(key) is not None:
            values[key] = summary[key]
    not_held_out = short_caveat(record_pairs(summary.get("data")))
    if not_held_out:  # a column of the HParams table, as in summary.csv: "validation = test data"
        values["not_held_out"] = not_held_out
    # Typed values (seq_len 64, not "64") sort numerically in TensorBoard's table and axes.
    return {k: _typed(v) for k, v in values.items()}


def _typed(value: Any) -> Any:
    if isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


# ------------------------------------------------------------------------------------- TensorBoard HParams


def _hparams_summary(tag: str, **data: Any) -> Any:
    """A Summary holding one HParams plugin message (built from TensorBoard's protos, no TensorFlow needed)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=content, tensor=metadata.NULL_TENSOR)
    return summary


def session_pbs(hparams: Mapping[str, Any], status: str) -> tuple[Any, Any]:
    """Session start (the run's hyper-parameters) and end (its status) summaries of one run."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    values = {}
    for key, value in hparams.items():
        if isinstance(value, bool):
            values[key] = struct_pb2.Value(bool_value=value)
        elif isinstance(value, (int, float)):
            values[key] = struct_pb2.Value(number_value=float(value))
        else:
            values[key] = struct_pb2.Value(string_value=str(value))
    now = time.time()
    start = _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=plugin_data_pb2.SessionStartInfo(
        hparams=values, start_time_secs=now))
    # An interrupted run may be resumed: neither success nor failure.
    code = {"ok": api_pb2.STATUS_SUCCESS, "running": api_pb2.STATUS_RUNNING,
            "interrupted": api_pb2.STATUS_UNKNOWN}.get(status, api_pb2.STATUS_FAILURE)
    end = _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=plugin_data_pb2.SessionEndInfo(
        status=code, end_time_secs=now))
    return start, end


def _metric_order(tag: str) -> tuple:
    name = tag[len(RUN_LEVEL_PREFIX):] if tag.startswith(RUN_LEVEL_PREFIX) else tag
    return (METRIC_ORDER.index(name) if name in METRIC_ORDER else len(METRIC_ORDER), tag.startswith(
        RUN_LEVEL_PREFIX), name)


def experiment_pb(hparams: Sequence[Mapping[str, Any]], metric_tags: Iterable[str],
                  swept: Sequence[str] = ()) -> Any:
    """The HParams experiment summary of sessions with ``hparams``: swept/differing settings first (ticked
    by TensorBoard), metrics in ``METRIC_ORDER`` (TensorBoard ticks five and colours by the first)."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    names = list(dict.fromkeys([*swept, *(k for h in hparams for k in h)]))
    infos = []
    for name in names:
        values = [h[name] for h in hparams if name in h and h[name] is not None]
        distinct = list(dict.fromkeys(values))
        info = api_pb2.HParamInfo(name=name, differs=len(distinct) > 1)
        if all(isinstance(v, bool) for v in distinct):
            info.type = api_pb2.DATA_TYPE_BOOL
            info.domain_discrete.extend(distinct)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_discrete.extend(sorted(float(v) for v in distinct))
        else:
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.extend(sorted(str(v) for v in distinct))
        infos.append(info)
    infos.sort(key=lambda i: not i.differs)  # stable: swept keys first, in sweep order
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag),
                                  display_name=tag[len(RUN_LEVEL_PREFIX):] if tag.startswith(RUN_LEVEL_PREFIX)
                                  else tag)
               for tag in sorted(set(metric_tags), key=_metric_order)]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=time.time())
    return _hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment)


def custom_scalars_pb(tags: Iterable[str]) -> Any:
    """The Custom Scalars layout (``CUSTOM_SCALARS``) restricted to charts with at least one of ``tags``."""
    import re

    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import metadata as cs_metadata

    present = set(tags)
    layout = layout_pb2.Layout()
    for title, charts in CUSTOM_SCALARS:
        category = layout_pb2.Category(title=title)
        for chart_title, chart_tags in charts:
            if present.intersection(chart_tags):
                category.chart.add(title=chart_title, multiline=layout_pb2.MultilineChartContent(
                    tag=[f"^{re.escape(t)}$" for t in chart_tags]))
        if category.chart:
            layout.category.append(category)
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                    string_val=[layout.SerializeToString()])
    summary = summary_pb2.Summary()
    summary.value.add(tag=cs_metadata.CONFIG_SUMMARY_TAG, metadata=cs_metadata.create_summary_metadata(),
                      tensor=tensor)
    return summary


def write_sweep_experiment(sweep_dir: str | Path, summaries: Sequence[Mapping[str, Any]]) -> Path | None:
    """Write the sweep's one HParams experiment summary into ``<sweep>/tensorboard`` (replacing an earlier one).

    Built from what each job recorded in summary.json (``dashboards.tensorboard``): the union of every job's
    hyper-parameters and metric tags (bk's ``train/aux_loss`` as well as attention's). None when no job
    logged to TensorBoard.
    """
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    sessions = [s["dashboards"]["tensorboard"] for s in summaries
                if isinstance(s.get("dashboards"), Mapping) and s["dashboards"].get("tensorboard")]
    if not sessions:
        return None
    swept = next((s["dashboards"].get("swept") for s in summaries
                  if isinstance(s.get("dashboards"), Mapping) and s["dashboards"].get("swept")), None) or []
    pb = experiment_pb([s.get("hparams") or {} for s in sessions], [t for s in sessions for t in s.get("metrics", [])],
                       swept)
    out = Path(sweep_dir) / TENSORBOARD_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("events.out.tfevents.*.experiment"):  # TensorBoard keeps the first summary it reads
        old.unlink()
    writer = EventFileWriter(str(out), filename_suffix=".experiment")
    from tensorboard.compat.proto.event_pb2 import Event

    writer.add_event(Event(wall_time=time.time(), summary=pb))
    curves = [t for s in sessions for t in s.get("curves", [])]
    writer.add_event(Event(wall_time=time.time(), summary=custom_scalars_pb(curves)))
    writer.close()
    return next(out.glob("events.out.tfevents.*.experiment"))
