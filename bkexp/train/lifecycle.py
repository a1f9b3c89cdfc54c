"""How a run ends and how it continues: signals, divergence, exit codes and the status in summary.json.

Every run ends with one of four statuses, and the process exit code follows it:

==============  =====================================================  ==========================
status          when                                                   exit code (single run)
==============  =====================================================  ==========================
``ok``          training and evaluation finished                       0
``failed``      an exception (the error is recorded)                   1 (Hydra reports the error)
``diverged``    a non-finite or exploding loss (:class:`Diverged`)     1
``interrupted`` SIGTERM (``timeout``, SLURM, ``kill``) or SIGINT       128 + signal (143, 130)
==============  =====================================================  ==========================

A run killed with SIGKILL cannot write anything; its summary.json stays ``running`` (written when training
starts) and ``bkexp report`` shows it as interrupted at the step of its last checkpoint.

SIGTERM is handled by Lightning: it sets ``trainer.received_sigterm`` and raises ``SIGTERMException`` (a
``SystemExit`` with code 0) at the next batch boundary. SIGINT raises ``KeyboardInterrupt``, which Lightning
turns into ``sys.exit(1)``. Neither says which signal it was, so :class:`SignalWatch` records the signal
itself; :class:`Lifecycle` saves ``last.ckpt`` at the interrupted step so nothing trained is lost.

Under DDP a signal only reaches some ranks, or reaches them at different points of a step (``timeout``, SLURM
and Ctrl-C signal every process; ``kill PID`` only rank 0), and every rank must stop at the same step or the
others wait forever in the next collective. Lightning 2.6 broadcasts from inside its SIGTERM handler: 2-process
CPU runs hung in 3 of 4 tries with every rank signalled, and with rank 1 alone (Lightning issue #20806). So under
DDP bkexp's handler only records the signal (:meth:`SignalWatch.defer`), and the ranks agree once per step, in
the all-reduce that also makes the divergence test see the mean loss of all ranks (:class:`Lifecycle`): all of
them stop after the same step, save ``last.ckpt`` together and report ``interrupted``. A second Ctrl-C stops at
once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from bkexp.train.config import ConfigError

log = logging.getLogger(__name__)

WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """A run that stopped before its end for a reason that has a status of its own."""

    status = "failed"

    def record(self) -> dict[str, Any]:
        return {}


class Diverged(RunStopped):
    """The loss became non-finite, or stayed above ``ln(vocab) + margin``: training cannot recover."""

    status = "diverged"

    def __init__(self, metric: str, value: float, step: int, limit: float | None = None) -> None:
        self.metric, self.value, self.step, self.limit = metric, float(value), int(step), limit
        why = "is not finite" if not math.isfinite(self.value) else f"exceeds {limit:.4g} (ln(vocab) + margin)"
        super().__init__(f"{metric}={self.value:.6g} at step {step} {why}")

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "divergence": {"metric": self.metric, "value": self.value, "limit": self.limit}}


class Interrupted(RunStopped):
    """A signal stopped the run (raised by :class:`SignalWatch` outside ``trainer.fit``)."""

    status = "interrupted"

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by {signal.Signals(signum).name}"
                         + (f" at step {step}" if step is not None else ""))


def exit_code(status: str, signum: int | None = None) -> int:
    """The process exit code of a run that ended with ``status`` (shell convention 128 + n for signals)."""
    if status == "ok":
        return 0
    if status == "interrupted" and signum is not None:
        return 128 + int(signum)
    return 1


class SignalWatch:
    """Records SIGTERM/SIGINT during a run, so the run's status can name the signal.

    Inside ``trainer.fit``/``test`` Lightning composes its own SIGTERM handler with this one (it keeps handlers
    that were installed before it) and stops at the next batch boundary; outside them (data setup, the
    causality check) SIGTERM raises :class:`Interrupted` at once. SIGINT always raises ``KeyboardInterrupt``,
    as Python does by default. Under DDP, :meth:`defer` makes both only recorded inside ``fit``/``validate``/
    ``test``, and :meth:`agree` tells every rank what any of them received. The previous handlers are restored
    on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.step: int | None = None
        self.trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _note(self, signum: int, how: str = "stopping") -> None:
        if self.signum is None:
            self.signum = signum
            self.step = self.trainer.global_step if self.trainer is not None else None
            log.warning("received %s%s; %s", signal.Signals(signum).name,
                        f" at step {self.step}" if self.step is not None else "", how)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._note(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if signal.getsignal(signum) is self._handle:  # Lightning's handler is not active: stop here
            raise Interrupted(signum, self.step)

    def _record_only(self, signum: int, frame: FrameType | None) -> None:
        repeated = self.signum is not None
        self._note(signum, "all processes stop after the next step"
                   + (" (Ctrl-C again: stop now)" if signum == signal.SIGINT else ""))
        if repeated and signum == signal.SIGINT:
            raise KeyboardInterrupt

    def defer(self) -> None:
        """Under DDP: from now until Lightning restores its handlers (the end of ``fit``/``validate``/``test``), a
        signal is only recorded, for the ranks to agree on at a step boundary (:class:`Lifecycle`); no collective
        and no exception runs inside the handler."""
        try:
            for signum in WATCHED_SIGNALS:
                signal.signal(signum, self._record_only)
        except ValueError:  # not the main thread: signals cannot be handled here
            pass

    def agree(self, trainer: pl.Trainer, values: Sequence[float] = ()) -> tuple[int | None, list[float]]:
        """The signal any rank received (SIGTERM before SIGINT; None: none), now also this rank's, and ``values``
        summed over the ranks: one all-reduce, which every rank must call at the same point."""
        received = [float(self.signum == signum) for signum in WATCHED_SIGNALS]
        summed = all_ranks_sum(trainer, [*values, *received])
        stop = next((int(s) for s, count in zip(WATCHED_SIGNALS, summed[len(values):]) if count > 0), None)
        if stop is not None and self.signum is None:  # another rank's: this one stops with it (its status says so)
            self.signum, self.step = stop, trainer.global_step
        return stop, summed[:len(values)]

    def __enter__(self) -> SignalWatch:
        try:
            for signum in WATCHED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals cannot be handled here
            self._previous = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def all_ranks_sum(trainer: pl.Trainer, values: list[float]) -> list[float]:
    """``values`` summed over the DDP ranks (one all-reduce; the values themselves without DDP)."""
    if trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def classify(exc: BaseException, watch: SignalWatch, step: int | None) -> tuple[str, dict[str, Any]]:
    """The status and summary fields of a run that ended with ``exc``."""
    signum = watch.signum
    if signum is None and isinstance(exc, KeyboardInterrupt):
        signum = int(signal.SIGINT)
    if signum is not None:  # Lightning's SIGTERMException and sys.exit(1) after Ctrl-C land here too
        name = signal.Signals(signum).name
        return "interrupted", {"signal": name, "step": step, "error": f"interrupted by {name}",
                               "exit_code": exit_code("interrupted", signum)}
    if isinstance(exc, RunStopped):
        return exc.status, {**exc.record(), "error": f"{type(exc).__name__}: {exc}", "exit_code": 1}
    return "failed", {"error": f"{type(exc).__name__}: {exc}", "step": step, "exit_code": 1}


def running_record() -> dict[str, Any]:
    """Fields of the summary written when training starts: who runs it, so a report can tell a dead run."""
    return {"status": "running", "pid": os.getpid(), "hostname": socket.gethostname()}


# ------------------------------------------------------------------------------------------------ divergence


@dataclass
class DivergenceLimits:
    """When a loss counts as diverged: non-finite at any step, or above ``ln(vocab) + margin``.

    ``margin`` is in nats above uniform guessing; null disables the explosion test (non-finite losses are
    always divergence). The training loss is judged from ``after_steps`` on and must stay above the limit for
    ``patience`` consecutive steps (single batches spike). A validation loss only diverges when it is not
    finite: above the limit it may be overfitting (confidently wrong on unseen data), which is a result.
    """

    margin: float | None = 3.0
    after_steps: int = 50
    patience: int = 10

    @classmethod
    def from_config(cls, node: Any) -> DivergenceLimits:
        """From the ``divergence`` config node; unknown keys are an error that lists the valid ones."""
        values = dict(node or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"divergence.{unknown[0]} is not a setting; valid: {', '.join(cls.__dataclass_fields__)}")
        return cls(**values)

    def __post_init__(self) -> None:
        if self.margin is not None and not (isinstance(self.margin, (int, float)) and self.margin > 0):
            raise ConfigError(f"divergence.margin={self.margin!r} must be a positive number of nats or null")
        for key in ("after_steps", "patience"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "patience" else 0):
                raise ConfigError(f"divergence.{key}={value!r} must be an integer >= {1 if key == 'patience' else 0}")


def rng_states() -> dict[str, Any]:
    """Every global random state a training step may draw from (dropout, numpy and Python users)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Tensors and plain Python values only: checkpoints are loaded with weights_only=True.
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


VOLATILE_ENVIRONMENT = ("load_average_1m",)  # differs between any two moments: not a change of environment


def environment_changes(before: dict[str, Any] | None, now: dict[str, Any] | None) -> dict[str, list[Any]]:
    """Key -> [before, now] for what differs between two ``environment()`` records (empty when one is unknown,
    e.g. a checkpoint written before bkexp recorded it)."""
    if not before or not now:
        return {}
    return {key: [before.get(key), now.get(key)] for key in sorted(set(before) | set(now))
            if key not in VOLATILE_ENVIRONMENT and before.get(key) != now.get(key)}


class Lifecycle(pl.Callback):
    """Stops a diverging run, writes ``last.ckpt`` often and when a signal stops training, makes resume exact.

    It runs before ModelCheckpoint (Lightning orders checkpoint callbacks last), so a diverged state is never
    written as ``last.ckpt`` or as a best checkpoint. Its checkpoint state holds the global RNG states
    (restored on resume, so dropout draws the same numbers as in the uninterrupted run), the step training
    resumed from each time, and the training step the divergence test is counting.

    Under DDP (see the module docstring) every optimizer step makes one all-reduce of the loss and of the signals
    each rank received, after the gradients' all-reduce and before the update: the divergence test sees the mean
    loss of all ranks, so they stop together, and a signal any rank received stops all of them at the end of that
    step. A signal in the last validation stops them at the
    end of ``fit``, one during a later ``validate``/``test`` when it ends.

    Args:
        vocab_size: ``ln(vocab_size)`` is the loss of uniform guessing, the base of the divergence limit.
        limits: the divergence test.
        every_n_train_steps: also write ``last.ckpt`` every this many optimizer steps (null: only where
            ModelCheckpoint writes it), so a killed run loses at most this many steps.
        signals: the run's :class:`SignalWatch`, which records signals under DDP for the ranks to agree on.
        environment: this process's ``bkexp.environment.environment()`` (versions, commit, host, threads). Every
            checkpoint carries it, and a resume records what differs from the checkpoint's
            (``resumes[i].environment_changed``: key -> [checkpoint's, now]): a run continued under other code,
            libraries or thread counts may not be bit-identical to an uninterrupted one, and its record says so.
    """

    def __init__(self, vocab_size: int, limits: DivergenceLimits | None = None,
                 every_n_train_steps: int | None = None, signals: SignalWatch | None = None,
                 environment: dict[str, Any] | None = None) -> None:
        self.limits = limits or DivergenceLimits()
        self.limit = math.log(vocab_size) + self.limits.margin if self.limits.margin is not None else None
        self.every_n_train_steps = every_n_train_steps
        self._above = 0
        self.saved_on_interrupt: str | None = None
        self.resumes: list[dict[str, Any]] = []  # one entry per resume: from which step
        self._resume_recorded = False  # this fit's resume is in `resumes`
        # plain types: a checkpoint must load with weights_only=True (torch.__version__ is a TorchVersion object)
        self.environment = json.loads(json.dumps(environment, default=str)) if environment is not None else None
        self._checkpoint_environment: dict[str, Any] | None = None  # of the session that wrote the loaded checkpoint
        self.signals = signals
        self._stop_signal: int | None = None  # under DDP: the signal the ranks agreed to stop for
        self._step_losses: list[float] = []  # under DDP: this rank's micro-batch losses of the current step

    def _defer_signals(self, trainer: pl.Trainer) -> None:
        # Lightning installs its SIGTERM handler at the start of every fit/validate/test: replace it until the end
        if trainer.world_size > 1 and self.signals is not None:
            self.signals.defer()

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._defer_signals(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._defer_signals(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._defer_signals(trainer)

    def _stop_if_any_rank_was_signalled(self, trainer: pl.Trainer) -> None:
        if trainer.world_size > 1 and self.signals is not None:
            stop, _ = self.signals.agree(trainer)
            if stop is not None:
                raise Interrupted(stop, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_any_rank_was_signalled(trainer)  # a signal during the last validation

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_any_rank_was_signalled(trainer)

    def _last_path(self, trainer: pl.Trainer) -> str | None:
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath and ckpt.save_last:
            return str(Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}")
        return None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The same point in the loop where ModelCheckpoint(every_n_train_steps) saves, which Lightning resumes
        # mid-epoch from; saving here instead keeps validation-time best checkpoints (ModelCheckpoint skips a
        # validation save at a step it already saved).
        every = self.every_n_train_steps
        path = self._last_path(trainer)
        if every and path and trainer.global_step % every == 0 and not trainer.fit_loop._should_accumulate():
            # the full state (optimizer, loops, callbacks): an exact resume needs it; explicit, or Lightning
            # logs that it chose this itself on every save
            trainer.save_checkpoint(path, weights_only=False)
        if self._stop_signal is not None:  # every rank, after the same step: on_exception saves last.ckpt
            raise Interrupted(self._stop_signal, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states(), "resumes": list(self.resumes), "above_limit": self._above,
                "environment": self.environment}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict["rng"])
        self._above = state_dict.get("above_limit", 0)
        self.resumes = list(state_dict.get("resumes", []))
        self._checkpoint_environment = state_dict.get("environment")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._defer_signals(trainer)
        self._record_resume(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a checkpoint at the end of its step budget resumes with no training (e.g. killed during the test):
        # Lightning then skips on_train_start, and the resume is recorded here
        self._record_resume(trainer)

    def _record_resume(self, trainer: pl.Trainer) -> None:
        if trainer.ckpt_path and not self._resume_recorded:  # the loops are restored: the checkpoint's step
            entry: dict[str, Any] = {"from_step": trainer.global_step, "checkpoint": str(trainer.ckpt_path)}
            changed = environment_changes(self._checkpoint_environment, self.environment)
            if changed:
                entry["environment_changed"] = changed
                log.warning("resumed at step %d from a checkpoint written under another environment (%s): the run "
                            "may not be bit-identical to an uninterrupted one", trainer.global_step,
                            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
            self.resumes.append(entry)
            self._resume_recorded = True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        if trainer.world_size > 1:
            # A rank must not stop alone here: the others would wait in the gradient all-reduce. The ranks decide
            # together before the optimizer step (a NaN loss makes the averaged gradients NaN on every rank, and
            # the weights never see them).
            self._step_losses.append(value)
            return
        self._check_loss(value, trainer.global_step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if trainer.world_size <= 1 or not self._step_losses:
            return
        # One all-reduce, where the gradient all-reduce has just brought the ranks together: the mean loss of this
        # step's last micro-batch (NaN if any micro-batch of any rank had a non-finite loss) and the signals any
        # rank received.
        last = self._step_losses[-1] if all(math.isfinite(v) for v in self._step_losses) else math.nan
        self._step_losses.clear()
        if self.signals is None:
            (total,) = all_ranks_sum(trainer, [last])
        else:
            stop, (total,) = self.signals.agree(trainer, [last])
            self._stop_signal = self._stop_signal or stop
        self._check_loss(total / trainer.world_size, trainer.global_step)

    def _check_loss(self, value: float, step: int) -> None:
        if not math.isfinite(value):  # before the update: non-finite gradients never reach the weights
            raise Diverged("train/loss", value, step)
        if self.limit is None or step < self.limits.after_steps:
            return
        self._above = self._above + 1 if value > self.limit else 0
        if self._above >= self.limits.patience:
            raise Diverged("train/loss", value, step, self.limit)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # trainer.validate after fit (during fit: at the next step)
            self._stop_if_any_rank_was_signalled(trainer)
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):  # a finite but high validation loss may be overfitting, not divergence
            raise Diverged("val/loss", value, trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        stopped_by_signal = isinstance(exception, (KeyboardInterrupt, SystemExit, Interrupted))
        if stopped_by_signal and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            path = self._last_path(trainer)
            if path and trainer.global_step > 0:
                trainer.save_checkpoint(path, weights_only=False)
                self.saved_on_interrupt = path
                log.info("saved %s at step %d", path, trainer.global_step)


class FiniteModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that never ranks a checkpoint whose monitored metric is NaN or infinite as a best one.

    Lightning replaces a NaN score by +inf and may still keep it while fewer than ``save_top_k`` exist.
    """

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        current = monitor_candidates.get(self.monitor) if self.monitor else None
        if current is not None and not torch.isfinite(torch.as_tensor(current)).all():
            log.warning("%s=%s is not finite: no best checkpoint at step %d", self.monitor, float(current),
                        trainer.global_step)
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)
