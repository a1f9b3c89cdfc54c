"""``pruning``: gradual L1-magnitude pruning of the block ``nn.Linear`` weights (Lightning ``ModelPruning``).

A cubic schedule (Zhu & Gupta 2017) raises every pruned layer's sparsity to ``pruning_amount`` over
``pruning_events`` events up to ``pruning_end`` of training; the masks are made permanent at the end, and the
test runs on the final (pruned) weights rather than the best checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.utils import prune

from bkexp.techniques.base import FlagError, RunContext, Technique, check_fraction, check_positive_int


@dataclass
class Settings:
    pruning: bool = False
    pruning_amount: float = 0.5
    pruning_end: float = 0.8
    pruning_events: int = 10


def prunable_linears(model: nn.Module, sample: Tensor) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """The block ``nn.Linear`` layers whose forward runs in a training forward, and those left dense.

    PyTorch pruning recomputes ``weight = weight_orig * weight_mask`` in a forward pre-hook, so a layer whose
    weight is read without calling the layer (Mamba's ``dt_proj``, the columns of a sparse BK mixer's output
    projection) would keep a stale weight; those are found by one probe forward and left dense.
    """
    linears = [(name, m) for name, m in model.blocks.named_modules(prefix="blocks") if isinstance(m, nn.Linear)]
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, args, out: called.add(id(mod))) for _, m in linears]
    was_training = model.training
    try:
        model.train()
        with torch.no_grad():
            model(sample[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    used = [(n, m) for n, m in linears if id(m) in called]
    skipped = [n for n, m in linears if id(m) not in called]
    return used, skipped


def cubic_sparsity_schedule(target: float, total_steps: int, end_fraction: float, events: int) -> list[tuple[int, float]]:
    """(step, sparsity) pairs: ``s(t) = target * (1 - (1 - t / T)^3)`` at ``events`` steps up to ``T = end * total``.

    The gradual schedule of Zhu & Gupta (2017): prune fast while many weights are redundant, slowly near the
    target. Steps are optimizer steps after which pruning is applied; the last event reaches ``target``.
    """
    end = max(1, min(total_steps, round(end_fraction * total_steps)))
    steps = sorted({max(1, round(end * i / events)) for i in range(1, events + 1)})
    return [(step, target * (1 - (1 - step / end) ** 3)) for step in steps]


class GradualMagnitudePruning(ModelPruning):
    """Lightning's ``ModelPruning`` (L1 magnitude, per layer) applied on a step schedule instead of per epoch.

    Each event brings every pruned weight to exactly ``round(sparsity * numel)`` zeros of its mask: the amount
    passed to PyTorch is the number of *still unpruned* weights to remove, because repeated pruning acts on the
    remaining entries. At the end of training the masks are made permanent (``make_pruning_permanent``).
    """

    def __init__(self, parameters_to_prune: list[tuple[nn.Module, str]], amount: float, end_fraction: float,
                 events: int) -> None:
        super().__init__(pruning_fn="l1_unstructured", parameters_to_prune=parameters_to_prune,
                         use_global_unstructured=False, amount=amount, make_pruning_permanent=True,
                         use_lottery_ticket_hypothesis=False, verbose=0)
        self.target = amount
        self.end_fraction = end_fraction
        self.events = events
        self.schedule: list[tuple[int, float]] = []
        self.applied: list[tuple[int, float]] = []
        self._pending: dict[int, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else \
            int(trainer.estimated_stepping_batches)
        self.schedule = cubic_sparsity_schedule(self.target, total, self.end_fraction, self.events)
        self._pending = {step: s for step, s in self.schedule if step > trainer.global_step}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sparsity = self._pending.pop(trainer.global_step, None)
        if sparsity is not None:
            self.apply_pruning(sparsity)
            self.applied.append((trainer.global_step, sparsity))
            pl_module.log("pruning/target_sparsity", sparsity)

    # Pruning follows the step schedule above, never the epoch hooks of ModelPruning.
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None

    def _apply_local_pruning(self, amount: float) -> None:
        for module, name in self._parameters_to_prune:
            numel = getattr(module, name).numel()
            mask = getattr(module, f"{name}_mask", None)
            pruned = int((mask == 0).sum()) if mask is not None else 0
            more = round(amount * numel) - pruned
            if more > 0:
                prune.l1_unstructured(module, name=name, amount=more)


def weight_sparsity(modules: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """Fraction of exactly-zero entries of the layers' effective weights (counted, not taken from masks)."""
    zeros = total = 0
    per_layer: dict[str, float] = {}
    for name, module in modules:
        weight = module.weight.detach()
        z = int((weight == 0).sum())
        zeros += z
        total += weight.numel()
        per_layer[name] = z / weight.numel()
    return {"sparsity": zeros / total if total else None, "zeros": zeros, "weights": total,
            "min_layer_sparsity": min(per_layer.values()) if per_layer else None}


class Pruning(Technique):
    name = "pruning"
    settings = Settings
    summary = "gradual magnitude pruning of the block Linear weights (cubic schedule)"
    tests_final_weights = True  # the best checkpoint by validation loss may predate the final sparsity
    conflicts = {"quantization": "flags.pruning and flags.quantization cannot be combined: pruning re-parametrises "
                                 "the layers' weight (weight_orig * mask), which bypasses the fake quantizer; use one "
                                 "of them"}

    def __init__(self, flags: Any) -> None:
        super().__init__(flags)
        self.layers: list[tuple[str, nn.Linear]] = []
        self.left_dense: list[str] = []
        self.callback: GradualMagnitudePruning | None = None

    def validate(self) -> None:
        check_fraction("pruning_amount", self.flags.pruning_amount, upper_open=True)
        check_fraction("pruning_end", self.flags.pruning_end)
        check_positive_int("pruning_events", self.flags.pruning_events)

    def config_changes(self, cfg: DictConfig) -> dict[str, Any]:
        if cfg.get("quant") is not None and cfg.get("bits") != 32:
            raise FlagError(f"flags.pruning cannot be combined with quantization (bits={cfg.get('bits')}): pruning "
                            "re-parametrises the weights, which bypasses the fake quantizer; use bits=32")
        return {}

    def setup(self, ctx: RunContext) -> list[pl.Callback]:
        self.layers, self.left_dense = prunable_linears(ctx.model, ctx.sample)
        if not self.layers:
            raise ValueError(f"flags.pruning found no nn.Linear layer called inside the blocks of model "
                             f"{ctx.cfg.model.get('name')!r}")
        self.callback = GradualMagnitudePruning([(m, "weight") for _, m in self.layers], self.flags.pruning_amount,
                                                self.flags.pruning_end, self.flags.pruning_events)
        return [self.callback]

    def describe(self, ctx: RunContext) -> dict[str, Any]:
        return {"pruning": {"layers": [n for n, _ in self.layers], "left_dense": self.left_dense,
                            "target": self.flags.pruning_amount, **weight_sparsity(self.layers),
                            "schedule": [[step, round(s, 6)] for step, s in self.callback.applied]}}
