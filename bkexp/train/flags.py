"""Optimization flags (conf/flags): validated settings, their mapping onto model/trainer/quant, and training-side techniques.

Life cycle inside a run (bkexp.train.run)::

    flags, skipped = resolve_flags(cfg)        # validate values, check each flag applies to the model and bits
    apply_flags(cfg, flags)                    # model kwargs, mixer backend/sparsity, trainer precision, quant method
    check_data_flags(flags, datamodule, ...)   # flags that depend on the data (curriculum)
    callbacks = flag_callbacks(...)            # pruning and curriculum callbacks
    compile_blocks(model, ...)                 # torch.compile, after the causality check and FLOP count
    ... trainer.fit ...
    record["flags"] = describe_flags(...)      # settings, skipped flags and measured effects

Which flag applies to which model is documented in docs/flags.md; a flag that does not apply raises
``FlagNotApplicableError`` (or, with ``flags.strict=false``, is switched off and recorded under ``skipped``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import get_object
from lightning.pytorch.callbacks import ModelPruning
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn
from torch.nn.utils import prune

from bkexp.train.config import ConfigError

log = logging.getLogger(__name__)

# Boolean flags, in the order of docs/flags.md. ``analytic_gradient`` is on by default (it is the op's normal
# backward); every other flag is off by default.
FLAG_NAMES = ("analytic_gradient", "mixed_precision", "quantization", "pruning", "act", "multi_scale", "sparse_bk",
              "early_exit", "curriculum", "active_learning", "koopman", "physics_informed", "compile",
              "grad_checkpoint")
# Flags implemented by the model (bkexp.models): they become LanguageModel / BKMixer keyword arguments.
MODEL_FLAGS = ("act", "multi_scale", "early_exit", "koopman", "grad_checkpoint", "physics_informed", "sparse_bk")
BK_ONLY_FLAGS = ("sparse_bk", "physics_informed")
PRECISIONS = {"bf16": "bf16-mixed", "fp16": "16-mixed"}
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Backends of the recurrent ops that differentiate with the exact adjoint, and the autograd one the flag selects.
ADJOINT_BACKENDS = {"bk": ("auto", "cpu", "torch", "triton"), "mamba": ("auto", "cpu", "cuda")}
AUTOGRAD_BACKEND = {"bk": "torch_autograd", "mamba": "ref"}
AUTOGRAD_BACKENDS_USED = {"bk_core": ("torch_autograd", "reference"), "selective_scan": ("ref",)}
# Ops whose kernels (numba, Triton, CUDA extensions) torch.compile must not trace: their mixers stay eager.
CUSTOM_KERNEL_OPS = ("bk_core", "selective_scan")


class FlagError(ConfigError):
    """An optimization-flag value or combination bkexp refuses; the message says what to do instead."""


class FlagNotApplicableError(FlagError):
    """A flag that does not apply to this model, dataset or bit width (the ablation report shows it as n/a)."""


@dataclass
class Flags:
    """The optimization flags of a run; conf/flags/none.yaml documents every field."""

    strict: bool = True
    analytic_gradient: bool = True
    mixed_precision: bool = False
    mixed_precision_dtype: str = "bf16"
    quantization: bool = False
    pruning: bool = False
    pruning_amount: float = 0.5
    pruning_end: float = 0.8
    pruning_events: int = 10
    curriculum: bool = False
    curriculum_start: float = 0.125
    curriculum_fraction: float = 0.5
    curriculum_multiple: int = 8
    active_learning: bool = False
    active_fraction: float = 0.5
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    grad_checkpoint: bool = False
    act: bool = False
    act_threshold: float = 0.99
    ponder_weight: float = 0.01
    multi_scale: bool = False
    early_exit: bool = False
    exit_threshold: float = 0.9
    exit_loss_weight: float = 1.0
    koopman: bool = False
    koopman_dim: int = 64
    koopman_weight: float = 0.1
    physics_informed: bool = False
    physics_weight: float = 0.01
    sparse_bk: bool = False
    sparse_fraction: float = 0.5

    def validate(self) -> Flags:
        """Types and ranges of every setting (applicability to the model is ``check_applicable``)."""
        for name in ("strict", *FLAG_NAMES):
            if not isinstance(getattr(self, name), bool):
                raise FlagError(f"flags.{name} must be true or false, got {getattr(self, name)!r}")
        if self.mixed_precision_dtype not in PRECISIONS:
            raise FlagError(f"flags.mixed_precision_dtype={self.mixed_precision_dtype!r}; valid: "
                            f"{', '.join(PRECISIONS)}")
        _fraction("pruning_amount", self.pruning_amount, upper_open=True)
        _fraction("pruning_end", self.pruning_end)
        _fraction("curriculum_start", self.curriculum_start)
        _fraction("curriculum_fraction", self.curriculum_fraction)
        _fraction("active_fraction", self.active_fraction)
        _fraction("sparse_fraction", self.sparse_fraction)
        _fraction("act_threshold", self.act_threshold)
        _fraction("exit_threshold", self.exit_threshold)
        for name in ("pruning_events", "curriculum_multiple", "koopman_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FlagError(f"flags.{name} must be a positive integer, got {value!r}")
        for name in ("ponder_weight", "exit_loss_weight", "koopman_weight", "physics_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise FlagError(f"flags.{name} must be a number >= 0, got {value!r}")
        if self.physics_informed and not self.physics_weight > 0:
            raise FlagError("flags.physics_informed=true needs flags.physics_weight > 0 (the regulariser's weight)")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise FlagError(f"flags.compile_backend={self.compile_backend!r}; valid: {', '.join(COMPILE_BACKENDS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise FlagError(f"flags.compile_mode={self.compile_mode!r}; valid: null, "
                            f"{', '.join(m for m in COMPILE_MODES if m)}")
        if self.act and self.early_exit:
            raise FlagError("flags.act and flags.early_exit both choose a per-token depth; turn one of them off")
        if self.pruning and self.quantization:
            raise FlagError("flags.pruning and flags.quantization cannot be combined: pruning re-parametrises the "
                            "layers' weight (weight_orig * mask), which bypasses the fake quantizer; use one of them")
        return self

    def enabled(self) -> list[str]:
        """Flags that change the run, by name (``no_analytic_gradient`` when the adjoint is switched off)."""
        names = [n for n in FLAG_NAMES if n != "analytic_gradient" and getattr(self, n)]
        return (["no_analytic_gradient"] if not self.analytic_gradient else []) + names

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fraction(name: str, value: Any, upper_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if upper_open:
        ok = ok and value < 1
    if not ok:
        interval = "(0, 1)" if upper_open else "(0, 1]"
        raise FlagError(f"flags.{name} must be a number in {interval}, got {value!r}")


# ------------------------------------------------------------------------------------------- applicability


def mixer_kind(model_cfg: DictConfig) -> str:
    """``bk``, ``mamba`` or ``other`` (e.g. attention): which recurrent op, if any, the model's mixer runs."""
    from bkexp.models.mixers.bk import BKMixer
    from bkexp.models.mixers.mamba import MambaMixer

    target = (model_cfg.get("mixer") or {}).get("_target_")
    if target is None:
        return "other"
    cls = get_object(str(target))
    if isinstance(cls, type) and issubclass(cls, BKMixer):
        return "bk"
    if isinstance(cls, type) and issubclass(cls, MambaMixer):
        return "mamba"
    return "other"


def _accelerator_is_cpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def not_applicable_reasons(cfg: DictConfig, flags: Flags) -> dict[str, str]:
    """Flag -> why it does not apply to this model / bit width / hardware (only for flags that are on)."""
    model = cfg.model.get("name") or "?"
    kind = mixer_kind(cfg.model)
    mixer = str((cfg.model.get("mixer") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
    reasons: dict[str, str] = {}
    for name in BK_ONLY_FLAGS:
        if getattr(flags, name) and kind != "bk":
            reasons[name] = f"flags.{name} applies to BK mixers; model {model!r} has none (its mixer is {mixer})"
    if not flags.analytic_gradient and kind not in AUTOGRAD_BACKEND:
        reasons["analytic_gradient"] = (
            f"flags.analytic_gradient=false switches the BK-Core or the selective scan to autograd through its "
            f"recurrence; model {model!r} has neither (its mixer is {mixer}, differentiated by autograd already)")
    if flags.quantization and cfg.get("bits") == 32:
        reasons["quantization"] = ("flags.quantization trains with QAT at the top-level bits, but bits=32 means no "
                                   "quantization; set bits=8 (or 16, 4, 2), or use flags=quantization (bits=8)")
    if flags.mixed_precision and flags.mixed_precision_dtype == "fp16" and _accelerator_is_cpu(cfg):
        reasons["mixed_precision"] = ("flags.mixed_precision_dtype=fp16 (16-mixed) needs a GPU; on CPU use "
                                      "flags.mixed_precision_dtype=bf16")
    return reasons


def resolve_flags(cfg: DictConfig) -> tuple[Flags, dict[str, str]]:
    """The run's validated flags and the flags switched off because they do not apply (``strict=false`` only)."""
    from hydra.utils import instantiate

    node = cfg.get("flags")
    flags: Flags = instantiate(node) if node is not None else Flags()
    flags.validate()
    reasons = not_applicable_reasons(cfg, flags)
    if reasons and flags.strict:
        raise FlagNotApplicableError("; ".join(reasons.values())
                                     + " (flags.strict=false switches flags that do not apply off instead)")
    for name, reason in reasons.items():
        log.warning("flag %s switched off: %s", name, reason)
        setattr(flags, name, name == "analytic_gradient")  # off, i.e. back to the default
    return flags, dict(reasons)


# ------------------------------------------------------------------------------------------------ mapping


def model_overrides(flags: Flags) -> dict[str, Any]:
    """Keyword arguments of LanguageModel (``model.*``) and of the mixer (``model.mixer.*``) the flags set.

    Only flags that are on add keys, so ``flags=none`` leaves the model config exactly as composed.
    """
    out: dict[str, Any] = {}
    if flags.act:
        out.update({"act": True, "act_threshold": flags.act_threshold, "ponder_weight": flags.ponder_weight})
    if flags.multi_scale:
        out["multi_scale"] = True
    if flags.early_exit:
        out.update({"early_exit": True, "exit_threshold": flags.exit_threshold,
                    "exit_loss_weight": flags.exit_loss_weight})
    if flags.koopman:
        out.update({"koopman": True, "koopman_dim": flags.koopman_dim, "koopman_weight": flags.koopman_weight})
    if flags.grad_checkpoint:
        out["grad_checkpoint"] = True
    if flags.physics_informed:
        out["physics_weight"] = float(flags.physics_weight)
    if flags.sparse_bk:
        out["mixer.sparse_heads"] = float(flags.sparse_fraction)
    return out


def apply_flags(cfg: DictConfig, flags: Flags) -> dict[str, Any]:
    """Write the flags into the config the run builds from; returns the changed keys (for summary.json)."""
    changes: dict[str, Any] = {f"model.{k}": v for k, v in model_overrides(flags).items()}
    kind = mixer_kind(cfg.model)
    if kind in ADJOINT_BACKENDS:
        backend = str(cfg.model.mixer.get("backend", "auto"))
        autograd = AUTOGRAD_BACKEND[kind]
        if flags.analytic_gradient and backend not in ADJOINT_BACKENDS[kind]:
            raise FlagError(f"model.mixer.backend={backend} does not differentiate with the exact adjoint, but "
                            f"flags.analytic_gradient=true; use an adjoint backend "
                            f"({', '.join(ADJOINT_BACKENDS[kind])}) or flags.analytic_gradient=false")
        if not flags.analytic_gradient:
            if backend not in ("auto", autograd):
                raise FlagError(f"flags.analytic_gradient=false runs the {kind} op through autograd (backend "
                                f"{autograd}), but model.mixer.backend={backend} was forced; remove that override")
            changes["model.mixer.backend"] = autograd
    if flags.mixed_precision:
        wanted = PRECISIONS[flags.mixed_precision_dtype]
        current = str(cfg.trainer.get("precision", "32-true"))
        if current not in ("32-true", "32", wanted):
            raise FlagError(f"flags.mixed_precision asks for precision {wanted}, but the hardware config sets "
                            f"trainer.precision={current}; use hardware=cpu|gpu (32-true) with the flag, or drop "
                            "the flag")
        changes["trainer.precision"] = wanted
    if flags.quantization:
        method = str(cfg.quant.get("method", "auto"))
        if method not in ("auto", "qat"):
            raise FlagError(f"flags.quantization is quantization-aware training (quant=qat), but quant={method} was "
                            "chosen; drop one of them")
        changes["quant.method"] = "qat"
    if flags.pruning and cfg.get("quant") is not None and cfg.get("bits") != 32:
        raise FlagError(f"flags.pruning cannot be combined with quantization (bits={cfg.get('bits')}): pruning "
                        "re-parametrises the weights, which bypasses the fake quantizer; use bits=32")
    with open_dict(cfg):
        for key, value in changes.items():
            node = cfg
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
    return changes


def check_data_flags(flags: Flags, datamodule: Any, dataset: str) -> dict[str, str]:
    """Flags that depend on the data; returns those switched off (``strict=false``), raises otherwise."""
    reasons: dict[str, str] = {}
    if flags.curriculum and getattr(datamodule, "has_answer_mask", False):
        reasons["curriculum"] = (
            f"flags.curriculum truncates training sequences, but dataset {dataset!r} labels only answer positions "
            "near the end of each example (truncation would cut them off); use it on text datasets, e.g. "
            "dataset=wikitext2 or experiment=wikitext2_local")
    if flags.curriculum and not getattr(datamodule, "autoregressive", True):
        reasons["curriculum"] = f"flags.curriculum applies to autoregressive language modelling; {dataset!r} is not"
    if reasons and flags.strict:
        raise FlagNotApplicableError("; ".join(reasons.values()))
    for name, reason in reasons.items():
        log.warning("flag %s switched off: %s", name, reason)
        setattr(flags, name, False)
    return reasons


# ------------------------------------------------------------------------------------------------ pruning


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


# ---------------------------------------------------------------------------------------------- curriculum


class SequenceLengthCurriculum(pl.Callback):
    """Sequence-length warmup: the first training batches are cut to ``start * seq_len`` tokens, growing
    linearly to ``seq_len`` over ``fraction`` of the training steps.

    The batch is truncated in place in ``on_train_batch_start`` (``input_ids[:, :L]`` and ``labels[:, :L]``,
    which keeps the next-token alignment), so the training step, the token count and the throughput monitor
    all see the shorter batch. Lengths are rounded down to a multiple of ``multiple`` (fewer distinct shapes
    for compiled kernels), never below the start length.
    """

    def __init__(self, seq_len: int, start: float = 0.125, fraction: float = 0.5, multiple: int = 8) -> None:
        self.seq_len = seq_len
        self.start_len = max(2, min(seq_len, math.ceil(start * seq_len)))
        self.fraction = fraction
        self.multiple = multiple
        self.total_steps = 1
        self.lengths: list[int] = []  # the length of every training batch, in order

    def length_at(self, step: int) -> int:
        ramp = self.fraction * self.total_steps
        if step >= ramp:
            return self.seq_len
        raw = self.start_len + (self.seq_len - self.start_len) * step / ramp
        rounded = int(raw) // self.multiple * self.multiple
        return max(self.start_len, min(self.seq_len, rounded))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total_steps = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else \
            int(trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        length = self.length_at(trainer.global_step)
        if length < batch["input_ids"].shape[1]:
            batch["input_ids"] = batch["input_ids"][:, :length]
            batch["labels"] = batch["labels"][:, :length]
        self.lengths.append(int(batch["input_ids"].shape[1]))
        pl_module.log("curriculum/seq_len", float(self.lengths[-1]))

    def describe(self) -> dict[str, Any]:
        ramp_steps = math.ceil(self.fraction * self.total_steps)
        return {"start_len": self.start_len, "seq_len": self.seq_len, "ramp_steps": ramp_steps,
                "first_batch_lengths": self.lengths[:5],
                "mean_train_len": sum(self.lengths) / len(self.lengths) if self.lengths else None,
                "token_fraction": (sum(self.lengths) / (self.seq_len * len(self.lengths))) if self.lengths else None}


# ---------------------------------------------------------------------------------------- active learning


def highest_loss_rows(row_losses: Tensor, has_label: Tensor, fraction: float) -> Tensor:
    """Indices of the ``ceil(fraction * rows)`` rows with the highest loss among rows that carry a label."""
    rows = int(has_label.sum())
    if rows == 0:
        raise ValueError("a training batch has no labelled positions (all labels are -100)")
    keep = min(rows, max(1, math.ceil(fraction * row_losses.shape[0] - 1e-9)))
    scores = torch.where(has_label, row_losses, torch.full_like(row_losses, -math.inf))
    return scores.topk(keep).indices.sort().values


# ------------------------------------------------------------------------------------------------ compile


def _check_compiler(backend: str, device_type: str) -> None:
    if backend != "inductor" or device_type != "cpu":
        return
    compilers = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise FlagError("flags.compile with compile_backend=inductor generates C++ on CPU, but no C++ compiler was "
                        "found (CXX, c++, g++, clang++); install one (e.g. apt-get install g++), or use "
                        "flags.compile_backend=aot_eager, or flags.compile=false")


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str | None = None,
                   device_type: str = "cpu") -> dict[str, Any]:
    """``torch.compile`` every backbone block in place (state_dict keys unchanged).

    Mixers that run custom kernels (the BK-Core's numba/Triton kernels, the selective scan) are excluded from
    the graph with ``torch.compiler.disable``: Dynamo cannot trace numba or CUDA-extension calls and would
    otherwise break the graph at many points inside them. Their blocks are still compiled around them (norms,
    residuals, feed-forward). Call this after any deepcopy of the model (causality check, FLOP count): the
    disabled forward is bound to this model's mixers.
    """
    _check_compiler(backend, device_type)
    eager: list[str] = []
    for index, block in enumerate(model.blocks):
        mixer = block.mixer
        ops = [op for op in mixer.backends() if op in CUSTOM_KERNEL_OPS]
        if ops:
            mixer.forward = torch.compiler.disable(mixer.forward)
            eager.append(f"blocks.{index}.mixer ({', '.join(ops)})")
        block.compile(backend=backend, mode=mode)
    return {"backend": backend, "mode": mode, "compiled_blocks": len(model.blocks), "eager_mixers": eager}


# ------------------------------------------------------------------------------------------------ effects


def gradient_effect(backends: dict[str, str]) -> dict[str, str]:
    """How each recurrent op was differentiated in this run, from the backends that actually ran."""
    return {op: ("autograd through the recurrence" if used in AUTOGRAD_BACKENDS_USED[op] else "exact adjoint")
            + f" ({op}={used})" for op, used in backends.items() if op in AUTOGRAD_BACKENDS_USED}
