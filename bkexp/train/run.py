"""``run(cfg)``: build data, model and Trainer from a composed config, train, test, and record the run."""

from __future__ import annotations

import logging
import math
import shlex
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from bkexp import config_env
from bkexp.allocator import configure_cpu_allocator
from bkexp.environment import environment
from bkexp.held_out import caveats, record_pairs
from bkexp.memory import peak_memory_mb, reset_peak_memory, resident_memory_mb
from bkexp.quant import QuantSpec
from bkexp.techniques import RunContext, Techniques
from bkexp.threads import cpu_threads
from bkexp.train.callbacks import LayerSummary, StepBudgetProgressBar, ThroughputMonitor
from bkexp.train.causality import check_causality
from bkexp.train.config import run_threads, validate_config
from bkexp.train.lifecycle import DivergenceLimits, Lifecycle, SignalWatch, classify, running_record
from bkexp.train.loggers import build_loggers, finish_loggers
from bkexp.train.module import LMTask
from bkexp.train.resume import plan_resume
from bkexp.train.summary import RunRecord, headline

log = logging.getLogger(__name__)


def job_identity() -> dict[str, Any]:
    """Overrides, and for a multirun job the sweep directory, job number and override dirname."""
    if not HydraConfig.initialized():
        return {"overrides": [], "override_dirname": "", "sweep": None, "multirun": False}
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    sweep = None
    if multirun:
        sweep = {"dir": str(Path(hydra_cfg.sweep.dir).resolve()), "job_num": hydra_cfg.job.num,
                 "override_dirname": hydra_cfg.job.override_dirname}
    return {"overrides": list(hydra_cfg.overrides.task), "override_dirname": hydra_cfg.job.override_dirname,
            "sweep": sweep, "multirun": multirun}


def applied_recipe(runtime: Any) -> str | None:
    """The ``conf/recipe/`` option the run composed (``runtime``: ``HydraConfig.get().runtime``), else None.

    Hydra records an optional group's choice even when no config of that name exists (``dataset=wikitext2``
    gives ``recipe: wikitext2_tiny_transformer``), so the choice counts only where its file is in a config source.
    """
    name = (runtime.choices or {}).get("recipe")
    if not name:
        return None
    for source in runtime.config_sources or []:
        if source.get("schema") == "file" and (Path(source.path) / "recipe" / f"{name}.yaml").is_file():
            return str(name)
    return None


def should_raise(cfg: DictConfig, identity: dict[str, Any]) -> bool:
    flag = cfg.get("continue_on_failure")
    continue_on_failure = identity["multirun"] if flag is None else bool(flag)
    return not continue_on_failure


def run(cfg: DictConfig) -> float | None:
    """Train and evaluate one run; returns the best validation loss (for Hydra sweepers), None on failure."""
    started = time.time()
    configure_cpu_allocator()
    reset_peak_memory()
    run_dir = Path(cfg.paths.output_dir)
    identity = job_identity()
    plan = plan_resume(run_dir) if cfg.get("resume") else None
    if plan is not None and plan.finished:
        print(f"[bkexp] run {run_dir} already finished (status ok); skipped{_train_further_hint(run_dir, plan)}",
              flush=True)
        return plan.previous.get("metrics", {}).get("best/val_loss")
    if plan is not None:  # refused before the interrupted run's record is touched
        try:
            _check_step_budget(cfg, plan, run_dir)
        except ValueError as err:
            raise SystemExit(f"[bkexp] {err}; nothing was changed") from None
    if plan is not None and plan.previous.get("sweep") and not identity["multirun"]:
        identity.update(sweep=plan.previous["sweep"], overrides=plan.previous.get("overrides", []))
    record = RunRecord(run_dir)
    # What the process holds before this run (interpreter, libraries, caches of earlier jobs): part of peak_mb.
    record.update(memory={"start_rss_mb": resident_memory_mb()})
    record.update(
        run_dir=str(run_dir.resolve()),
        model=cfg.model.get("name"), dataset=cfg.dataset.get("name"), seq_len=cfg.get("seq_len"),
        bits=cfg.get("bits"), seed=cfg.get("seed"),
        hardware=HydraConfig.get().runtime.choices.get("hardware") if HydraConfig.initialized() else None,
        recipe=applied_recipe(HydraConfig.get().runtime) if HydraConfig.initialized() else None,
        overrides=identity["overrides"], sweep=identity["sweep"], metrics={},
    )
    loggers: list[Logger] = []
    trainer: pl.Trainer | None = None
    watch = SignalWatch().__enter__()
    restore_threads = ExitStack()  # a multirun's jobs share the process: each job's count ends with the job
    try:
        record.update(config=OmegaConf.to_container(cfg, resolve=True), config_env=config_env.referenced(cfg))
        restore_threads.enter_context(cpu_threads(run_threads(cfg), export=True))  # before the record of it
        record.update(env=environment())
        if cfg.get("flags") is not None:  # as composed; replaced by the validated settings below
            record.update(flags=OmegaConf.to_container(cfg.flags, resolve=True))
        validate_config(cfg)
        if plan is None:
            _check_step_budget(cfg, None, run_dir)
        limits = DivergenceLimits.from_config(cfg.get("divergence"))
        techniques = Techniques.from_config(cfg)
        flag_changes = techniques.configure(cfg)
        record.update(flags={**techniques.record(), "config_changes": flag_changes})
        if flag_changes:  # the config that was actually built
            record.update(config=OmegaConf.to_container(cfg, resolve=True))
        quant: QuantSpec = instantiate(cfg.quant)
        quant.validate()
        pl.seed_everything(cfg.seed, workers=True)

        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")
        record.update(data=datamodule.describe())
        for caveat in caveats(record_pairs(record.data["data"])):
            log.warning("dataset %s: %s", cfg.dataset.get("name"), caveat)
        if rank_zero_only.rank == 0 and getattr(datamodule, "tokenizer", None) is not None:
            datamodule.tokenizer.save(run_dir / "tokenizer")  # eval, generate and export rebuild it from here
        techniques.check_data(datamodule, cfg.dataset.get("name"))
        record.data["flags"].update(enabled=techniques.enabled(), skipped=dict(techniques.skipped))
        model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
        record.update(params=model.param_counts(), state_size=model.state_size(cfg.seq_len))
        if cfg.get("size") is not None:  # which preset, and whether it matches parameters or FLOPs across models
            record.update(size={k: v for k, v in OmegaConf.to_container(cfg.size, resolve=True).items()
                                if k in ("name", "matched", "reference_seq_len")})
        model = quant.prepare(model)  # before the causality check: the quantized model is the one trained
        record.update(quant=quant.describe(model))
        log.info("model %s: %s parameters (%s non-embedding)", cfg.model.name,
                 f"{model.param_counts()['total']:,}", f"{model.param_counts()['non_embedding']:,}")

        sample = next(iter(datamodule.train_dataloader()))["input_ids"]
        if datamodule.autoregressive and cfg.check_causality:
            check_causality(model, sample, datamodule.vocab_size, name=f"model {cfg.model.name!r}")
            log.info("causality check passed")
        record.update(causality_checked=bool(datamodule.autoregressive and cfg.check_causality))
        if cfg.get("compute_flops"):
            try:
                record.update(flops=_count_flops(model, sample))
            except Exception as exc:  # FLOPs are informative only; say why they are missing
                log.warning("FLOP counting failed: %s", exc)
                record.update(flops={"error": f"{type(exc).__name__}: {exc}"})

        device_type = "cpu" if str(cfg.trainer.get("accelerator")) == "cpu" or not torch.cuda.is_available() \
            else "cuda"
        ctx = RunContext(cfg=cfg, model=model, sample=sample, datamodule=datamodule, device_type=device_type,
                         quant=quant)
        technique_callbacks = techniques.setup(ctx)
        techniques.before_fit(ctx)  # after the deep copies of the causality check and the FLOP count

        task = LMTask(model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler),
                      vocab_size=datamodule.vocab_size, log_accuracy=datamodule.has_answer_mask,
                      **techniques.task_kwargs())
        wandb_id = (plan.previous.get("dashboards") or {}).get("wandb", {}).get("id") if plan else None
        loggers, dashboards = build_loggers(cfg, identity, wandb_id)
        record.update(dashboards=dashboards)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
        if cfg.trainer.get("enable_model_summary", True) and not any(isinstance(c, pl.callbacks.ModelSummary)
                                                                      for c in callbacks):
            callbacks.append(LayerSummary(flops=record.data.get("flops")))  # instead of Lightning's default one
        if cfg.trainer.get("enable_progress_bar", True) and _RICH_AVAILABLE \
                and not any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks):
            callbacks.append(StepBudgetProgressBar())  # Lightning's default bar, without "Epoch 0/-2"
        lifecycle = Lifecycle(datamodule.vocab_size, limits, cfg.get("checkpoint_every_n_steps"), signals=watch,
                              environment=record.data["env"])
        trainer = watch.trainer = instantiate(cfg.trainer, logger=loggers or False,
                                              callbacks=callbacks + technique_callbacks + [lifecycle])
        record.update(**running_record())
        record.write()  # a run killed from here on is seen as such by `bkexp report`
        trainer.fit(task, datamodule=datamodule, ckpt_path=plan.ckpt_path if plan else cfg.get("ckpt_path"),
                    weights_only=True)  # explicit: Lightning would unpickle a checkpoint URL with weights_only=False
        tokens_trained = task.tokens_seen  # before trainer.test loads the best checkpoint's counters
        record.update(resumes=lifecycle.resumes)
        metrics = _final_metrics(trainer, task, datamodule, quant, test=bool(cfg.get("test_after_fit")),
                                 test_final_weights=techniques.tests_final_weights)
        record.update(quant=quant.describe(model))
        record.update(metrics=metrics, steps=trainer.global_step, tokens={"train": tokens_trained},
                      backends=model.backends(), device=str(task.device))
        _record_callbacks(record, trainer)
        ctx.trainer, ctx.task = trainer, task
        record.data["flags"]["effects"] = techniques.describe(ctx)
        record.update(status="ok", exit_code=0)
        return metrics.get("best/val_loss", metrics.get("val/loss"))
    except BaseException as exc:
        outcome, fields = classify(exc, watch, trainer.global_step if trainer is not None else None)
        record.update(status=outcome, **fields, traceback=traceback.format_exc())
        log.error("run %s: %s", outcome, fields["error"])
        if outcome == "interrupted":  # also in a multirun: the user (or the scheduler) stops the whole sweep
            raise SystemExit(fields["exit_code"]) from exc
        if should_raise(cfg, identity) or not isinstance(exc, Exception):
            raise
        return None
    finally:
        watch.__exit__()
        restore_threads.close()
        record.update(wall_time_s=time.time() - started)
        if "peak_mb" not in record.data["memory"]:  # failed before training: the process peak so far
            record.update(memory={**record.data["memory"], "peak_mb": peak_memory_mb(torch.device("cpu"))})
        if rank_zero_only.rank == 0:
            path = record.write()
            log.info("run %s: results in %s", record.data["status"], path.parent)
            if record.data["status"] == "ok":
                print(headline(record.data), flush=True)
            print(f"[bkexp] run {record.data['status']}; results in {path.parent}", flush=True)
        if loggers:
            finish_loggers(loggers, record.data)  # the same numbers as summary.json; records where they went
            if rank_zero_only.rank == 0:
                record.write()


def _check_step_budget(cfg: DictConfig, plan: Any, run_dir: Path) -> None:
    """A ValueError for a run continued from a checkpoint (``resume=``, ``ckpt_path=``) whose step budget is below the
    checkpoint's step: Lightning would stop at once, and the run would end ok with more steps than its config says."""
    from bkexp.rundir import RunDirError, checkpoint_step

    max_steps = cfg.trainer.get("max_steps")
    if not isinstance(max_steps, int) or max_steps < 0:
        return
    if plan is not None:
        step, what = plan.step, f"resume={run_dir}: its last.ckpt"
    elif cfg.get("ckpt_path"):
        try:
            step, what = checkpoint_step(cfg.ckpt_path), f"ckpt_path={cfg.ckpt_path}"
        except RunDirError:
            return  # Lightning's loader says what is wrong with the file
    else:
        return
    if step is not None and max_steps < step:
        raise ValueError(f"{what} holds step {step}, beyond trainer.max_steps={max_steps}: give trainer.max_steps "
                         f"above {step} to train further"
                         + (", or leave it out to finish the run's own budget" if plan is not None else ""))


def _train_further_hint(run_dir: Path, plan: Any) -> str:
    """How to continue a finished run: a new run from its last checkpoint (resuming in place would overwrite the
    results it finished with)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return ""
    overrides = [o for o in plan.previous.get("overrides") or []
                 if not o.startswith(("resume=", "ckpt_path=", "trainer.max_steps="))]
    command = shlex.join(["python", "train.py", *overrides, f"ckpt_path={last.resolve()}"])
    return (f". It stopped at step {plan.previous.get('steps')}; to train it further, start a new run from its last "
            f"checkpoint with a larger budget:\n  {command} trainer.max_steps=N")


def _count_flops(model: torch.nn.Module, sample: torch.Tensor) -> dict[str, Any]:
    from bkexp.train.flops import count_flops

    return count_flops(model, sample)


def _final_metrics(trainer: pl.Trainer, task: LMTask, datamodule: Any, quant: QuantSpec,
                   test: bool, test_final_weights: bool = False) -> dict[str, Any]:
    """train/val metrics at the end of training, best val, and test on the best checkpoint.

    With PTQ, validation ran at full precision and the test runs on the quantized weights (``finalize``).
    With ``test_final_weights`` (a technique that asks for it, e.g. pruning) the test runs on the final
    weights: the best checkpoint by validation loss may predate what the technique did last.
    """
    metrics: dict[str, Any] = {}
    if trainer.callback_metrics.get("val/loss") is None or task.last_val_step != trainer.global_step:
        trainer.validate(task, datamodule=datamodule, verbose=False)
    for key, value in trainer.callback_metrics.items():
        metrics[key] = float(value)
    if math.isfinite(task.best_val_loss):  # still inf: no validation ran (limit_val_batches=0), so no best
        metrics["best/val_loss"] = task.best_val_loss
        metrics["best/val_ppl"] = math.exp(task.best_val_loss) if task.best_val_loss < 700 else math.inf
    quant.finalize(task.model)
    if test:
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        if test_final_weights:
            best = None
        results = trainer.test(task, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in results[0].items()})
        metrics["test/checkpoint"] = Path(best).name if best else "final weights"
    return metrics


def _record_callbacks(record: RunRecord, trainer: pl.Trainer) -> None:
    for callback in trainer.callbacks:
        if isinstance(callback, ThroughputMonitor):
            record.update(throughput=callback.results())
        if isinstance(callback, pl.callbacks.EarlyStopping) and callback.stopping_reason_message is not None:
            # Lightning's own reason, e.g. "Monitored metric val/loss did not improve in the last 3 records."
            record.update(stopped_early={"step": trainer.global_step, "reason": callback.stopping_reason.name.lower(),
                                         "message": callback.stopping_reason_message.strip(),
                                         "monitor": callback.monitor, "best": float(callback.best_score)})
            log.info("stopped early at step %d: %s", trainer.global_step, callback.stopping_reason_message.strip())
    record.update(memory={**record.data.get("memory", {}), "peak_mb": peak_memory_mb(trainer.strategy.root_device)})
