"""The LightningModule that trains any backbone model as a next-token language model."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from bkexp.ops.cross_entropy import token_cross_entropy
from bkexp.train.callbacks import logs_this_step
from bkexp.techniques.active_learning import highest_loss_rows

# Under DDP Lightning asks for sync_dist=True on every epoch-level tensor it is given. The evaluation metrics below
# are torchmetrics states, summed over all processes by compute(): every process logs the same, exact value, and a
# second all-reduce would average it again (in float32, not always bit-identical). Only these names are hidden.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/(loss|ppl|acc)', \.\.\., "
                        r"sync_dist=True\)`")

IGNORE_INDEX = -100


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], groups: list[dict[str, Any]],
                    fused_allowed: bool = True) -> torch.optim.Optimizer:
    """``factory(groups)``; a factory that leaves ``fused`` and ``foreach`` at None gets the fastest kernel.

    PyTorch's default (``fused=None, foreach=None``) is the per-parameter for-loop on CPU, which costs more per
    step than all of Lightning's overhead (AdamW, bk small: 18.5 ms vs 4.1 ms fused). So when the factory (a
    ``functools.partial`` from a ``_partial_`` config) says ``fused: null`` and no ``foreach``, it gets
    ``fused=True`` where its optimizer class has a fused kernel for every parameter's device, else
    ``foreach=True`` where it has ``foreach``. ``fused_allowed=False`` (gradient clipping under Lightning's
    mixed-precision plugin, which refuses optimizers that unscale inside ``step``) skips to ``foreach``.
    Explicit ``fused``/``foreach`` values are passed through untouched.
    """
    keywords = getattr(factory, "keywords", None) or {}
    optimizer_class = getattr(factory, "func", None)
    if not (isinstance(optimizer_class, type) and "fused" in keywords and keywords["fused"] is None
            and keywords.get("foreach") is None):
        return factory(groups)
    accepted = inspect.signature(optimizer_class).parameters
    if fused_allowed and "fused" in accepted and _all_on(groups, _fused_devices()):
        return factory(groups, fused=True)
    if "foreach" in accepted:
        return factory(groups, foreach=True)
    return factory(groups)


def _fused_devices() -> set[str]:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return set(_get_fused_kernels_supported_devices())


def _all_on(groups: list[dict[str, Any]], device_types: set[str]) -> bool:
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.device.type in device_types and p.is_floating_point() for p in params)


def split_weight_decay(model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups: weight decay on matrices only, not on norms, biases, gains or embeddings."""
    decay, no_decay, seen = [], [], set()
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 and id(param) not in embedding_params else no_decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class LMTask(pl.LightningModule):
    """Next-token cross-entropy on ``batch["labels"]`` (ignore index -100) plus the model's auxiliary losses.

    Validation and test accumulate the summed token loss over the whole split (torchmetrics, DDP-synced), so
    ``val/ppl = exp(mean token loss)`` is exact, not an average of per-batch perplexities. ``val/acc`` is
    logged for tasks with an answer mask (e.g. MQAR), where only answer positions carry labels.

    ``active_fraction`` (the ``active_learning`` flag) is online batch selection (Selective-Backprop, Jiang et
    al. 2019): a gradient-free forward scores every sequence of the batch by its mean token loss, and only
    the ``ceil(active_fraction * batch)`` highest-loss sequences are forwarded again and back-propagated.
    """

    def __init__(self, model: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, vocab_size: int | None = None,
                 log_accuracy: bool = False, active_fraction: float | None = None) -> None:
        super().__init__()
        if active_fraction is not None and not 0 < active_fraction <= 1:
            raise ValueError(f"active_fraction must be in (0, 1] or None, got {active_fraction}")
        self.active_fraction = active_fraction
        self.active_selected = 0
        self.active_rows = 0
        aux = getattr(model, "aux_losses", None)
        # Early-exit models need the batch labels for their exit heads' loss.
        self._aux_takes_labels = aux is not None and "labels" in inspect.signature(aux).parameters
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.vocab_size = vocab_size or model.vocab_size
        self.log_accuracy = log_accuracy
        self.tokens_seen = 0
        self.best_val_loss = float("inf")
        self.last_val_step = -1
        for split in ("val", "test"):
            setattr(self, f"{split}_loss", MeanMetric())
            if log_accuracy:
                setattr(self, f"{split}_acc", MulticlassAccuracy(
                    num_classes=self.vocab_size, ignore_index=IGNORE_INDEX, average="micro"))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Logits, per-position losses (0 where ignored) and the mask of positions that carry a label."""
        logits = self.model(batch["input_ids"])
        labels = batch["labels"]
        losses = token_cross_entropy(logits.float().flatten(0, 1), labels.flatten(), IGNORE_INDEX).view_as(labels)
        return logits, losses, labels != IGNORE_INDEX

    def select_active(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sub-batch of the highest-loss sequences (scored by a gradient-free forward)."""
        with torch.no_grad():
            _, losses, mask = self.token_losses(batch)
            counts = mask.sum(dim=1)
            row_losses = losses.sum(dim=1) / counts.clamp(min=1)
        rows = highest_loss_rows(row_losses, counts > 0, self.active_fraction)
        self.active_selected += int(rows.numel())
        self.active_rows += int(batch["input_ids"].shape[0])
        self.log("train/active_fraction", rows.numel() / batch["input_ids"].shape[0])
        return {key: value[rows] for key, value in batch.items()}

    def active_learning_stats(self) -> dict[str, Any]:
        """Sequences back-propagated / sequences seen over the whole training run."""
        return {"requested_fraction": self.active_fraction, "selected_sequences": self.active_selected,
                "seen_sequences": self.active_rows,
                "trained_fraction": self.active_selected / self.active_rows if self.active_rows else None}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        batch_tokens = batch["input_ids"].numel()  # every token read counts, also those active learning drops
        if self.active_fraction is not None:
            batch = self.select_active(batch)
        _, losses, mask = self.token_losses(batch)
        n_labels = mask.sum()
        if n_labels == 0:
            raise ValueError("a training batch has no labelled positions (all labels are -100)")
        loss = losses.sum() / n_labels
        if not hasattr(self.model, "aux_losses"):
            aux = {}
        elif self._aux_takes_labels:
            aux = self.model.aux_losses(labels=batch["labels"])
        else:
            aux = self.model.aux_losses()
        total = loss + sum(aux.values()) if aux else loss
        self.tokens_seen += batch_tokens * self.trainer.world_size
        if logs_this_step(self.trainer):
            self.log("train/loss", loss, prog_bar=True)
            metrics = {"train/tokens": float(self.tokens_seen), "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}
            if aux:
                metrics["train/aux_loss"] = sum(aux.values()).detach()
            self.log_dict(metrics)
        return total

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not logs_this_step(self.trainer):
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("grad_norm", torch.nn.utils.get_total_norm(grads))

    def _eval_step(self, batch: dict[str, Tensor], split: str) -> None:
        logits, losses, mask = self.token_losses(batch)
        getattr(self, f"{split}_loss").update(losses[mask])
        if self.log_accuracy:
            getattr(self, f"{split}_acc").update(logits.argmax(-1).flatten(), batch["labels"].flatten())

    def _eval_epoch_end(self, split: str) -> None:
        mean_loss = getattr(self, f"{split}_loss").compute()
        getattr(self, f"{split}_loss").reset()
        if split == "val" and not self.trainer.sanity_checking:
            self.best_val_loss = min(self.best_val_loss, float(mean_loss))
            self.last_val_step = self.global_step
        self.log(f"{split}/loss", mean_loss, prog_bar=True)
        self.log(f"{split}/ppl", torch.exp(mean_loss), prog_bar=True)
        if self.log_accuracy:
            acc = getattr(self, f"{split}_acc")
            self.log(f"{split}/acc", acc.compute(), prog_bar=True)
            acc.reset()

    def _reset_model_stats(self) -> None:
        # Per-evaluation measurements of the model-side flags (mean layers, exit layer) start afresh.
        if hasattr(self.model, "reset_flag_stats"):
            self.model.reset_flag_stats()

    def on_validation_epoch_start(self) -> None:
        self._reset_model_stats()

    def on_test_epoch_start(self) -> None:
        self._reset_model_stats()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.optimizer_factory, split_weight_decay(self.model),
                                    fused_allowed=not self._clips_under_mixed_precision())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _clips_under_mixed_precision(self) -> bool:
        if self._trainer is None:
            return False
        from lightning.pytorch.plugins.precision import MixedPrecision

        return isinstance(self.trainer.precision_plugin, MixedPrecision) and bool(self.trainer.gradient_clip_val)

    # Counters that are not parameters but that a resumed run must continue from.
    _RUN_STATE = ("tokens_seen", "best_val_loss", "last_val_step", "active_selected", "active_rows")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.update({key: getattr(self, key) for key in self._RUN_STATE})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key in self._RUN_STATE:
            if key in checkpoint:
                setattr(self, key, checkpoint[key])
