"""Lightning callbacks bkexp adds to every run: measured throughput, step time and peak memory (``bkexp.memory``),
the layer table at the start of training with bkexp's FLOP count in place of Lightning's, and a progress bar that
does not print a negative epoch total under a step budget."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.callbacks import model_summary as lightning_model_summary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table, get_human_readable_count

from bkexp.memory import peak_memory_mb


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether per-step training metrics of the current step reach anything: a logger, or the end of training.

    Lightning forwards step metrics to the loggers only every ``log_every_n_steps`` steps; ``self.log`` on the
    other steps costs ~0.5 ms per call and is thrown away. Logging on those steps only (and on the last one,
    so ``callback_metrics`` ends with the final values) keeps per-step logging far below a millisecond.
    Progress-bar values therefore refresh every ``log_every_n_steps`` steps.
    """
    if trainer.fast_dev_run or trainer._logger_connector.should_update_logs:  # Lightning's own cadence rule
        return True
    max_steps = trainer.max_steps
    return (max_steps is not None and max_steps > 0 and trainer.global_step + 1 >= max_steps) or trainer.is_last_batch


class StepBudgetProgressBar(RichProgressBar):
    """Lightning's rich progress bar, whose training description reads ``Epoch 3`` instead of ``Epoch 3/-2`` when
    training is bounded by ``max_steps`` (Lightning sets ``max_epochs=-1`` then and 2.6 prints ``max_epochs - 1``;
    Lightning issue #21925, fixed after 2.6)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        # padded to the validation bar's description, as Lightning does, so the two bars do not flicker
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class ThroughputMonitor(pl.Callback):
    """Times every train/eval batch and logs ``throughput/tokens_per_sec``, ``time/step_ms``, ``mem/peak_mb``.

    Every training step is timed; the values are logged when step metrics reach the loggers (every
    ``log_every_n_steps``, see ``logs_this_step``) as aggregates over the steps since the
    last log: tokens/s = tokens / time, step_ms = mean step time, so no step is left out and the per-step
    cost stays a clock read. The first ``warmup_steps`` training steps (allocation, kernel compilation) are
    excluded from the run's average train tokens/s; ``results()`` returns the averages for summary.json.
    """

    def __init__(self, warmup_steps: int = 3) -> None:
        self.warmup_steps = warmup_steps
        self.train_tokens = 0
        self.train_time = 0.0
        self.eval_tokens = 0
        self.eval_time = 0.0
        self._t0 = 0.0
        self._steps = 0
        self._window = [0, 0, 0.0]  # steps, tokens, seconds since the last log

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _start(self, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def _elapsed(self, pl_module: pl.LightningModule) -> float:
        self._sync(pl_module)
        return time.perf_counter() - self._t0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        elapsed = self._elapsed(pl_module)
        tokens = batch["input_ids"].numel() * trainer.world_size
        self._steps += 1
        if self._steps > self.warmup_steps:
            self.train_tokens += tokens
            self.train_time += elapsed
        window = self._window
        window[0] += 1
        window[1] += tokens
        window[2] += elapsed
        if logs_this_step(trainer):
            steps, window_tokens, seconds = window
            pl_module.log_dict({"throughput/tokens_per_sec": window_tokens / max(seconds, 1e-9),
                                "time/step_ms": 1000.0 * seconds / steps,
                                "mem/peak_mb": peak_memory_mb(pl_module.device)})
            self._window = [0, 0, 0.0]

    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._start(pl_module)

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                  *args: Any) -> None:
        self.eval_time += self._elapsed(pl_module)
        self.eval_tokens += batch["input_ids"].numel() * trainer.world_size

    on_validation_batch_start = _eval_start
    on_test_batch_start = _eval_start
    on_validation_batch_end = _eval_end
    on_test_batch_end = _eval_end

    def results(self) -> dict[str, float | None]:
        return {
            "train_tokens_per_sec": self.train_tokens / self.train_time if self.train_time > 0 else None,
            "eval_tokens_per_sec": self.eval_tokens / self.eval_time if self.eval_time > 0 else None,
        }


class LayerSummary(ModelSummary):
    """Lightning's layer table (``enable_model_summary``), with FLOPs only where they were counted.

    Lightning counts FLOPs for its table only on the module's ``example_input_array``, which bkexp does not set
    (bkexp counts them itself, on a training batch and with its own kernels' FLOPs: ``bkexp.train.flops``), so
    its table would show a FLOPs column of zeros and "0 Total Flops". This table leaves both out and ends with
    bkexp's count instead, the ``flops`` of summary.json, when the run counted them (``compute_flops``).
    """

    def __init__(self, flops: dict[str, Any] | None = None, max_depth: int = 1) -> None:
        super().__init__(max_depth=max_depth)
        self.flops = flops or {}

    def summarize(self, summary_data: list[tuple[str, list[str]]], total_parameters: int,
                  trainable_parameters: int, model_size: float, total_training_modes: dict[str, int],
                  total_flops: int, **summarize_kwargs: Any) -> None:
        if total_flops:  # the module has an example input: Lightning counted, keep its table
            super().summarize(summary_data, total_parameters, trainable_parameters, model_size,
                              total_training_modes, total_flops, **summarize_kwargs)
            return
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        lines = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      0, *columns).splitlines()
        lines = [line for line in lines if not line.endswith("Total Flops")]
        per_token = self.flops.get("train_step_per_token")
        if per_token:
            lines.append(f"{get_human_readable_count(int(per_token)):<10}Training FLOPs per token "
                         f"(forward {get_human_readable_count(int(self.flops['forward_per_token']))}; bkexp's count, "
                         "summary.json 'flops')")
        lightning_model_summary.log.info("\n" + "\n".join(lines))
