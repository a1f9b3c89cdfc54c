"""Dashboards of a run: TensorBoard and W&B loggers that name, group and summarise runs like the report does.

- **TensorBoard** names a run by its folder, so the jobs of a multirun write to one sweep-level folder,
  ``<sweep>/tensorboard/<run name>/``; each job writes its HParams session and run-level numbers, the sweep
  the one experiment summary (``bkexp.dashboards.write_sweep_experiment``).
- **W&B**: one group per sweep (``sweep_group``), ``job_type`` train, tags for model and dataset; the summary
  gets summary.json's run-level numbers under the report's names and never overwrites what ``define_metric``
  keeps (``val/ppl`` holds its minimum).

Names, groups, run-level numbers and the HParams protos are ``bkexp.dashboards`` (no Lightning there).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from bkexp.dashboards import (
    END_OF_RUN_METRICS,
    PER_STEP_ONLY,
    RUN_LEVEL_PREFIX,
    RUN_LEVEL_SECTIONS,
    TENSORBOARD_DIR,
    TENSORBOARD_RUN_LEVEL,
    custom_scalars_pb,
    experiment_pb,
    finite_number,
    folder_name,
    run_name,
    run_numbers,
    session_hparams,
    session_pbs,
    sweep_group,
    sweep_overrides,
    swept_keys,
)
from bkexp.held_out import record_pairs, short_caveat
from bkexp.utils import flatten

log = logging.getLogger(__name__)

NOT_HELD_OUT_TAG = "not-held-out"  # W&B tag of a run whose validation or test data is not held out
STOPPED_EARLY_TAG = "stopped-early"  # W&B tag of a run that EarlyStopping ended before its budget


def dashboard_identity(cfg: DictConfig, identity: Mapping[str, Any]) -> dict[str, Any]:
    """Run name, swept keys, W&B group and TensorBoard folder of this run (recorded in summary.json)."""
    sweep = identity.get("sweep")
    model = cfg.model.get("name") if cfg.get("model") is not None else None
    overrides = list(identity.get("overrides") or [])
    if sweep:
        sweep_items = sweep_overrides(sweep["dir"])
        keys = swept_keys(sweep_items) if sweep_items is not None else None
        name = run_name(model, overrides, keys)
        return {"name": name, "swept": keys, "group": sweep_group(sweep["dir"]),
                "tensorboard_dir": str(Path(sweep["dir"]) / TENSORBOARD_DIR / folder_name(name))}
    return {"name": run_name(model, overrides, None), "swept": None, "group": None, "tensorboard_dir": None}


# -------------------------------------------------------------------------------------------- TensorBoard


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger, in ``<sweep>/tensorboard/<run name>/`` for a multirun job.

    Lightning's ``epoch`` counter is not written (TensorBoard has its own step axis, and a chart of it would
    sort first in the Scalars tab); HParams data is written by ``finish_loggers``, not by Lightning.
    """

    def __init__(self, save_dir: str, name: str | None = "tensorboard", version: int | str | None = "",
                 run_dir: str | None = None, **kwargs: Any) -> None:
        if run_dir is not None:  # the folder is the run's name in TensorBoard
            path = Path(run_dir)
            save_dir, name, version = str(path.parent), "", path.name
        super().__init__(save_dir, name=name, version=version, **kwargs)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def log_hyperparams(self, params: Any, metrics: Any = None) -> None:
        # Lightning would write its own experiment summary per run; the sweep writes the single one.
        self.hparams.update(params if isinstance(params, dict) else vars(params))


def _write_session(logger: LightningTensorBoardLogger, summary: Mapping[str, Any], swept: Sequence[str] | None,
                   numbers: Mapping[str, float], single_run: bool) -> dict[str, Any]:
    """Session start/end (hyper-parameters, status) and run-level numbers into the run's event files."""
    hparams = session_hparams(summary, swept)
    writer = logger.experiment
    step = int(summary.get("steps") or 0)
    numbers = {k: v for k, v in numbers.items() if k in TENSORBOARD_RUN_LEVEL}
    for key, value in numbers.items():
        writer.add_scalar(RUN_LEVEL_PREFIX + key, float(value), step)
    curves = [k for k, v in (summary.get("metrics") or {}).items()
              if finite_number(v) is not None and k not in (*END_OF_RUN_METRICS, "epoch")]
    tags = [k for k in curves if k not in PER_STEP_ONLY] + [RUN_LEVEL_PREFIX + k for k in numbers]
    file_writer = writer._get_file_writer()
    if single_run:  # a lone run is its own experiment; a sweep writes one for all its runs
        file_writer.add_summary(experiment_pb([hparams], tags))
        file_writer.add_summary(custom_scalars_pb(curves))
    for pb in session_pbs(hparams, str(summary.get("status"))):
        file_writer.add_summary(pb)
    writer.flush()
    return {"dir": logger.log_dir, "hparams": hparams, "metrics": tags, "curves": curves}


# ------------------------------------------------------------------------------------------------------ W&B


def _wandb_summary(run: Any, summary: Mapping[str, Any], numbers: Mapping[str, Any]) -> None:
    """Run-level numbers into the W&B summary (nested by section: shown as ``throughput.train_tokens_per_sec``);
    keys W&B already summarises from the logged history (``val/ppl``: min via define_metric) are left alone."""
    update: dict[str, Any] = {}
    for key, value in numbers.items():
        section, dot, rest = key.partition(".")
        if dot and section in RUN_LEVEL_SECTIONS:
            node = update.setdefault(section, {})
            for part in rest.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[rest.split(".")[-1]] = value
        else:
            update[key] = value
    tracked = set(run.summary.keys())
    for key, value in (summary.get("metrics") or {}).items():
        if key in tracked or key in update or key in PER_STEP_ONLY or key == "epoch":
            continue
        if finite_number(value) is not None or isinstance(value, str):
            update[key] = value
    update["status"] = summary.get("status")
    tags = []  # in the runs table's columns and filterable by tag, like summary.csv's columns
    not_held_out = short_caveat(record_pairs(summary.get("data")))
    if not_held_out:
        update["not_held_out"] = not_held_out
        tags.append(NOT_HELD_OUT_TAG)
    if summary.get("stopped_early"):
        update["stopped_early"] = {k: summary["stopped_early"][k] for k in ("step", "reason", "monitor", "best")}
        tags.append(STOPPED_EARLY_TAG)
    if tags:
        run.tags = (*run.tags, *tags)
    run.summary.update(update)


# ------------------------------------------------------------------------------------------- build/finish


def build_loggers(cfg: DictConfig, identity: Mapping[str, Any],
                  wandb_id: str | None = None) -> tuple[list[Logger], dict[str, Any]]:
    """Instantiate ``cfg.logger`` with short names, the sweep's W&B group and TensorBoard folder.

    Returns the loggers and what summary.json records under ``dashboards`` (name, swept keys, group, and per
    logger where it wrote). ``wandb_id``: the W&B run that a run resumed in place continues (``resume="allow"``).
    """
    names = dashboard_identity(cfg, identity)
    loggers: list[Logger] = []
    record: dict[str, Any] = {"name": names["name"], "swept": names["swept"]}
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        target = str(logger_cfg.get("_target_", ""))
        kwargs: dict[str, Any] = {}
        if target == f"{__name__}.TensorBoardLogger" and names["tensorboard_dir"] \
                and logger_cfg.get("run_dir") is None:
            kwargs["run_dir"] = names["tensorboard_dir"]
        if target.endswith("WandbLogger"):
            kwargs.update(_wandb_kwargs(cfg, logger_cfg, names))
            if wandb_id:
                kwargs.update(id=wandb_id, resume="allow")
        logger = instantiate(logger_cfg, **kwargs)
        if isinstance(logger, WandbLogger):
            experiment = logger.experiment
            # Flat keys ("model.name", "seq_len", "bits") let the dashboard group and filter runs.
            experiment.config.update({**flatten(OmegaConf.to_container(cfg, resolve=True)),
                                      "overrides": list(identity.get("overrides") or []),
                                      "swept": names["swept"] or []}, allow_val_change=True)
            experiment.define_metric("val/ppl", summary="min")
            experiment.define_metric("val/loss", summary="min")
            for key in PER_STEP_ONLY:  # the run's figures are the summary's throughput.* and memory.*
                experiment.define_metric(key, summary="none")
            record["wandb"] = {"id": experiment.id, "name": experiment.name, "group": experiment.group,
                               "job_type": experiment.job_type, "project": experiment.project}
        loggers.append(logger)
        log.info("logger %s -> %s", key, type(logger).__name__)
    return loggers, record


def _wandb_kwargs(cfg: DictConfig, logger_cfg: DictConfig, names: Mapping[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if logger_cfg.get("name") is None:
        kwargs["name"] = names["name"]
    if logger_cfg.get("group") is None and names["group"]:
        kwargs["group"] = names["group"]
    if logger_cfg.get("job_type") is None:
        kwargs["job_type"] = "train"
    tags = [str(t) for t in (logger_cfg.get("tags") or [])]
    for value in (cfg.model.get("name") if cfg.get("model") is not None else None,
                  cfg.dataset.get("name") if cfg.get("dataset") is not None else None):
        if value and str(value) not in tags:
            tags.append(str(value))
    kwargs["tags"] = tags
    return kwargs


def finish_loggers(loggers: Sequence[Logger], summary: dict[str, Any]) -> None:
    """Session and run-level numbers to TensorBoard, summary to W&B; always close W&B so sweep runs never merge.

    ``summary`` is the run's summary.json record; what TensorBoard got is added under
    ``summary["dashboards"]["tensorboard"]`` (the sweep's experiment summary is built from it).
    """
    if rank_zero_only.rank != 0:  # Lightning's loggers write on rank 0 only
        return
    status = str(summary.get("status"))
    numbers = run_numbers(summary)
    dashboards = summary.setdefault("dashboards", {})
    for logger in loggers:
        try:
            if isinstance(logger, LightningTensorBoardLogger):
                dashboards["tensorboard"] = _write_session(logger, summary, dashboards.get("swept"), numbers,
                                                           single_run=not summary.get("sweep"))
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                _wandb_summary(logger.experiment, summary, numbers)
            logger.finalize("success" if status == "ok" else "failed")
        except Exception:  # closing one logger must not hide the run's own result
            log.exception("could not finalise logger %s", type(logger).__name__)
        if isinstance(logger, WandbLogger):
            import wandb

            try:
                wandb.finish(exit_code=int(summary.get("exit_code") or (0 if status == "ok" else 1)))
            except Exception:
                log.exception("could not close the W&B run")
