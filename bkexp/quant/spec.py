"""``QuantSpec``: the validated quantization settings of a run (conf/quant/*) and how they apply to a model.

Life cycle inside a run (bkexp.train.run)::

    spec = instantiate(cfg.quant); spec.validate()     # before anything is built
    model = spec.prepare(model)                          # swaps the policy's layers for fake-quant ones, in place
    ... trainer.fit ...
    spec.finalize(model)                                 # before test: PTQ switches quantization on
    record["quant"] = spec.describe(model)

Methods: ``qat`` quantizes in every forward from the start (straight-through gradients); ``ptq`` installs the
same layers switched off, so training and validation run in full precision, and ``finalize`` switches them
on. Quantized weights are recomputed from the float (latent) weights in each forward (cached when no
gradient is needed), so a float checkpoint loaded after ``finalize`` -- e.g. Lightning's test on the best
checkpoint -- is still evaluated quantized, and evaluation uses exactly the weights QAT trained through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from bkexp.quant.fake_quant import (
    GRANULARITIES,
    SCALE_DTYPE,
    QuantConv1d,
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
    latent_weight,
)
from bkexp.quant.policy import (
    full_precision_in_blocks,
    layer_names_by_parent,
    policy_targets,
    quantized_modules,
    replace_module,
)

METHODS = ("auto", "none", "qat", "ptq")
TRAIN_BITS = (32, 16, 8, 4, 2)  # what a training run accepts (the top-level ``bits``)
EVAL_BITS = (32, 16, 8, 4, 3, 2)  # eval-quant also draws 3 bits on the robustness curve
ACT_BITS = (16, 8, 4, 2)
CLIPS = ("none", "percentile")


class QuantConfigError(ValueError):
    """A quantization setting bkexp refuses; the message names the bad value and what is allowed."""


def _fmt(values: tuple) -> str:
    return ", ".join(str(v) for v in values)


@dataclass
class QuantSpec:
    """Quantization settings; see conf/quant/auto.yaml for the meaning of each field."""

    method: str = "auto"
    bits: int = 32
    granularity: str = "per_channel"
    group_size: int | None = None
    act_bits: int | None = None
    embeddings: bool = False
    conv: bool = False
    clip: str = "none"
    percentile: float = 99.9

    # ---------------------------------------------------------------- validation
    @property
    def resolved_method(self) -> str:
        """``auto`` -> ``none`` at 32 bits, ``qat`` below; other methods as given."""
        if self.method == "auto":
            return "none" if self.bits == 32 else "qat"
        return self.method

    def validate(self, allowed_bits: tuple[int, ...] = TRAIN_BITS) -> QuantSpec:
        """Refuse invalid values and combinations, naming what is allowed; returns self."""
        if self.method not in METHODS:
            raise QuantConfigError(f"quant method {self.method!r} is not supported; valid: {_fmt(METHODS)} "
                                   "(select with quant=<method>)")
        if isinstance(self.bits, bool) or self.bits not in allowed_bits:
            raise QuantConfigError(f"bits={self.bits!r} is not supported; valid: {_fmt(allowed_bits)}")
        low = tuple(b for b in allowed_bits if b != 32)
        if self.method == "none" and self.bits != 32:
            raise QuantConfigError(f"quant=none keeps full precision, which is bits=32, but bits={self.bits}; to "
                                   f"quantize use quant=auto (QAT below 32 bits), quant=qat or quant=ptq")
        if self.method in ("qat", "ptq") and self.bits == 32:
            raise QuantConfigError(f"quant={self.method} needs bits in {_fmt(low)}; bits=32 means no "
                                   "quantization (use quant=none or quant=auto)")
        if self.granularity not in GRANULARITIES:
            raise QuantConfigError(f"quant.granularity={self.granularity!r}; valid: {_fmt(GRANULARITIES)}")
        if self.granularity == "per_group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise QuantConfigError(f"quant.granularity=per_group needs quant.group_size = a positive integer, "
                                       f"got {self.group_size!r}")
        elif self.group_size is not None:
            raise QuantConfigError(f"quant.group_size={self.group_size} is used only with "
                                   f"quant.granularity=per_group (got {self.granularity}); set both, or "
                                   "group_size=null")
        if self.act_bits is not None:
            if isinstance(self.act_bits, bool) or self.act_bits not in ACT_BITS:
                raise QuantConfigError(f"quant.act_bits={self.act_bits!r} is not supported; valid: null (off), "
                                       f"{_fmt(ACT_BITS)}")
            if self.resolved_method == "none":
                raise QuantConfigError("quant.act_bits quantizes the inputs of quantized layers, but nothing is "
                                       "quantized at bits=32; use bits < 32 with quant=auto|qat|ptq, or "
                                       "act_bits=null")
        for flag in ("embeddings", "conv"):
            if not isinstance(getattr(self, flag), bool):
                raise QuantConfigError(f"quant.{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.clip not in CLIPS:
            raise QuantConfigError(f"quant.clip={self.clip!r}; valid: {_fmt(CLIPS)}")
        if self.clip == "percentile":
            if self.resolved_method != "ptq":
                raise QuantConfigError(f"quant.clip=percentile calibrates post-training quantization only; it "
                                       f"needs quant=ptq (method is {self.resolved_method}), or clip=none")
            if self.bits == 16:
                raise QuantConfigError("quant.clip=percentile applies to integer widths (8, 4, 3, 2), not to "
                                       "bits=16 (bfloat16 rounding has no scale); use clip=none")
            if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                    or not 0 < self.percentile <= 100:
                raise QuantConfigError(f"quant.percentile must be in (0, 100], got {self.percentile!r}")
        return self

    def weight_quantizer(self) -> WeightQuantizer:
        return WeightQuantizer(
            bits=self.bits, granularity=self.granularity,
            group_size=self.group_size if self.granularity == "per_group" else None,
            clip_percentile=float(self.percentile) if self.clip == "percentile" else None)

    # ---------------------------------------------------------------- applying
    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap the policy's layers for fake-quantized ones **in place** and return the same model.

        ``none``: unchanged. ``qat``: quantization on from the first forward. ``ptq``: installed switched off
        until ``finalize``. Parameters (names, objects, ties) are untouched, so checkpoints stay compatible.
        """
        self.validate(EVAL_BITS)
        method = self.resolved_method
        if quantized_modules(model):
            raise QuantConfigError("prepare() was already applied to this model (it holds quantized layers)")
        if method == "none":
            return model
        quantizer = self.weight_quantizer()
        targets = policy_targets(model, self.embeddings, self.conv)
        for target in targets:
            try:
                quantizer.check_shape(latent_weight(target.module).shape, name=target.name)
            except ValueError as exc:
                raise QuantConfigError(str(exc)) from None
        enabled = method == "qat"
        for target in targets:
            module = target.module
            if isinstance(module, nn.Linear):
                new: nn.Module = QuantLinear.from_module(module, quantizer, self.act_bits, enabled)
            elif isinstance(module, nn.Embedding):
                new = QuantEmbedding.from_module(module, quantizer, enabled)
            else:
                new = QuantConv1d.from_module(module, quantizer, enabled)
            replace_module(model, target.name, new)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        """After training, before evaluation: every quantized layer computes with quantized weights.

        ``ptq`` switches the layers ``prepare`` installed on (round-to-nearest of whatever float weights the
        model holds, also after a later checkpoint load); ``qat`` already evaluates quantized weights;
        ``none`` does nothing. Returns the same model.
        """
        if self.resolved_method == "none":
            return model
        layers = quantized_modules(model)
        if not layers:
            raise RuntimeError(f"finalize(): quant={self.resolved_method} bits={self.bits} but the model holds no "
                               "quantized layer; call spec.prepare(model) before training")
        for _, module in layers:
            module.quant_enabled = True
        return model

    # ---------------------------------------------------------------- reporting
    def describe(self, model: nn.Module) -> dict[str, Any]:
        """The policy and its effect on ``model`` for summary.json["quant"] (sizes count parameters only)."""
        method = self.resolved_method
        params = {id(p): p for p in model.parameters()}  # a tied weight once
        total = sum(p.numel() for p in params.values())
        info: dict[str, Any] = {
            "method": method, "requested_method": self.method, "bits": self.bits, "act_bits": self.act_bits,
            "granularity": self.granularity, "group_size": self.group_size, "embeddings": self.embeddings,
            "conv": self.conv, "clip": self.clip,
            "percentile": self.percentile if self.clip == "percentile" else None,
        }
        size_fp_bytes = total * 4
        if method == "none":
            info.update(policy="none: every parameter in float32", quantized_layers=0, quantized_params=0,
                        total_params=total, scales=0, effective_size_bytes=size_fp_bytes,
                        full_precision_size_bytes=size_fp_bytes, compression=1.0, layers=[])
            return info
        quantizer = self.weight_quantizer()
        targets = policy_targets(model, self.embeddings, self.conv)
        seen: set[int] = set()
        layers: list[dict[str, Any]] = []
        quantized = scales = 0
        for target in targets:
            weight = latent_weight(target.module)
            entry = {"name": target.name, "kind": target.kind, "shape": list(weight.shape),
                     "params": weight.numel(), "scales": quantizer.num_scales(weight.shape)}
            if id(weight) in seen:
                entry.update(params=0, scales=0, tied=True)  # the tied head: counted with the embedding
            else:
                seen.add(id(weight))
                quantized += weight.numel()
                scales += entry["scales"]
            layers.append(entry)
        scale_bits = 0 if self.bits == 16 else SCALE_DTYPE.itemsize * 8
        size_bits = quantized * self.bits + scales * scale_bits + (total - quantized) * 32
        effective = math.ceil(size_bits / 8)
        kinds = ["nn.Linear inside the blocks (mixer and FFN, incl. MoE experts and routers)"]
        if self.conv:
            kinds.append("nn.Conv1d kernels inside the blocks")
        tied = bool(getattr(model, "tie_embeddings", False))
        kinds.append(("embedding and LM head" + (" (tied: one matrix)" if tied else "")) if self.embeddings
                     else "not the embedding / LM head (full precision)")
        enabled = [m.quant_enabled for _, m in quantized_modules(model)]
        info.update(
            policy="; ".join(kinds),
            weight_scheme=quantizer.describe(),
            activations=(f"per-token dynamic symmetric int{self.act_bits}" if self.act_bits not in (None, 16)
                         else "bfloat16" if self.act_bits == 16 else "full precision"),
            gradient="straight-through (d quantized / d weight = 1, scale treated as constant)"
                     if method == "qat" else None,
            full_precision="norms, biases, non-layer parameters (e.g. BK z/couplings/output scale, Mamba A_log/D)"
                           + ("" if self.conv else ", Conv1d kernels")
                           + ("" if self.embeddings else ", embedding and LM head")
                           + "; the BK-Core op computes in float32 on the outputs of quantized layers",
            quantized_by_parent=layer_names_by_parent(model, targets),
            full_precision_in_blocks=full_precision_in_blocks(model, targets),
            quantized_layers=len(targets), quantized_params=quantized, total_params=total,
            scales=scales, scale_dtype=str(SCALE_DTYPE).removeprefix("torch.") if scale_bits else None,
            effective_size_bytes=effective, full_precision_size_bytes=size_fp_bytes,
            compression=size_fp_bytes / effective if effective else None,
            active=bool(enabled) and all(enabled),  # False for ptq before finalize (training in float)
            layers=layers,
        )
        return info
