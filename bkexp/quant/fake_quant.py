"""Fake quantizers (round-to-nearest, straight-through gradient) and the Linear/Embedding/Conv1d that use them.

Weight scheme (integer widths ``b``): symmetric, zero point 0, integer levels ``-qmax..qmax`` with
``qmax = 2^(b-1) - 1`` and ``scale = max|w| / qmax`` per output channel (row), per group of ``group_size``
consecutive inputs of a row, or per tensor. The extra negative level ``-2^(b-1)`` of two's complement is
deliberately not used: it would make the grid asymmetric (``-8..7`` at 4 bits) and the largest negative
weight would never map onto it with ``scale = max|w|/qmax``. So a row (group) takes at most ``2^b - 1``
distinct values; at 2 bits the grid is ternary ``{-s, 0, s}``. Storage is still counted at ``b`` bits per
weight. ``bits=16`` means bfloat16 rounding (round-to-nearest-even), no scale.

Optional percentile clipping (post-training only): the scale is ``quantile_p(|w|) / qmax`` per row/group
and weights beyond the range are clamped to ``+-qmax``.

Gradient: a pure straight-through estimator. ``d fq(w) / dw = 1`` everywhere (also outside a clip range;
clipping is only used after training) and the scale is treated as a constant, so a QAT weight receives
exactly the gradient its quantized value receives.

Activations (``act_bits``): dynamic symmetric quantization **per token** (one scale per row of the last
dimension). Per token, not per tensor, because a scale taken over a whole ``(batch, seq, dim)`` tensor would
let a future token's magnitude change the quantization of earlier tokens and break causality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRANULARITIES = ("per_channel", "per_group", "per_tensor")
SCALE_DTYPE = torch.float32  # scales are computed and (notionally) stored in float32


def qmax(bits: int) -> int:
    """Largest integer level of the symmetric ``bits``-bit grid ``-qmax..qmax``."""
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class WeightQuantizer:
    """How one weight tensor is fake-quantized; ``__call__`` returns the dequantized weight (no gradient logic).

    ``group_size`` applies to ``per_group``; a row with ``in_features <= group_size`` is one group (i.e. per
    channel). ``clip_percentile`` (0 < p <= 100, or None for ``max|w|``) sets the clip range per row/group.
    """

    bits: int
    granularity: str = "per_channel"
    group_size: int | None = None
    clip_percentile: float | None = None

    def __post_init__(self) -> None:
        if self.bits != 16 and not 2 <= self.bits <= 8:
            raise ValueError(f"weight bits={self.bits} not supported by the fake quantizer; valid: 16, 8..2")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.granularity == "per_group" and (self.group_size is None or self.group_size < 1):
            raise ValueError(f"granularity=per_group needs group_size >= 1, got {self.group_size!r}")
        if self.clip_percentile is not None and not 0 < self.clip_percentile <= 100:
            raise ValueError(f"clip percentile must be in (0, 100], got {self.clip_percentile}")

    def groups_per_row(self, row_size: int) -> int:
        """Number of scales per output channel for rows of ``row_size`` inputs (0 for bfloat16)."""
        if self.bits == 16:
            return 0
        if self.granularity != "per_group" or row_size <= self.group_size:
            return 1
        return row_size // self.group_size

    def check_shape(self, weight_shape: torch.Size | tuple[int, ...], name: str = "weight") -> None:
        """Refuse a ``per_group`` size that does not divide the row (inputs per output channel)."""
        if self.bits == 16 or self.granularity != "per_group":
            return
        row = math.prod(weight_shape[1:])
        if row > self.group_size and row % self.group_size != 0:
            raise ValueError(f"{name}: group_size={self.group_size} does not divide its {row} inputs per output "
                             f"channel; choose a divisor of {row}, a size >= {row} (one group per row), or "
                             "granularity=per_channel")

    def num_scales(self, weight_shape: torch.Size | tuple[int, ...]) -> int:
        if self.bits == 16:
            return 0
        if self.granularity == "per_tensor":
            return 1
        return weight_shape[0] * self.groups_per_row(math.prod(weight_shape[1:]))

    def __call__(self, weight: Tensor) -> Tensor:
        if self.bits == 16:
            return weight.to(torch.bfloat16).to(weight.dtype)
        self.check_shape(weight.shape)
        w = weight.detach().to(SCALE_DTYPE)
        if self.granularity == "per_tensor":
            groups = w.reshape(1, -1)
        else:
            rows = w.reshape(w.shape[0], -1)
            groups = rows.reshape(-1, rows.shape[1] // self.groups_per_row(rows.shape[1]))
        q = quantize_groups(groups, self.bits, self.clip_percentile)
        return q.reshape(weight.shape).to(weight.dtype)

    def describe(self) -> str:
        if self.bits == 16:
            return "bfloat16 (round to nearest even)"
        where = {"per_channel": "per output channel", "per_tensor": "per tensor",
                 "per_group": f"per group of {self.group_size} inputs"}[self.granularity]
        clip = "max|w|" if self.clip_percentile is None else f"{self.clip_percentile}th percentile of |w|"
        return (f"symmetric int{self.bits} levels -{qmax(self.bits)}..{qmax(self.bits)}, "
                f"scale = {clip} / {qmax(self.bits)} {where}")


def quantize_groups(groups: Tensor, bits: int, clip_percentile: float | None = None) -> Tensor:
    """Round-to-nearest symmetric quantize-dequantize of each row of ``groups`` (2-D, float32)."""
    levels = qmax(bits)
    magnitude = groups.abs()
    if clip_percentile is None or clip_percentile >= 100:
        limit = magnitude.amax(dim=1, keepdim=True)
    else:
        # kthvalue, not torch.quantile: quantile refuses inputs above 2^24 elements (large embeddings).
        k = min(max(math.ceil(clip_percentile / 100 * groups.shape[1]), 1), groups.shape[1])
        limit = magnitude.kthvalue(k, dim=1, keepdim=True).values
    # An all-zero group stays zero; any positive scale gives that, 1 avoids 0/0.
    scale = torch.where(limit > 0, limit / levels, torch.ones_like(limit))
    return torch.clamp(torch.round(groups / scale), -levels, levels) * scale


def quantize_activation(x: Tensor, bits: int) -> Tensor:
    """Per-token (last dimension) dynamic symmetric quantize-dequantize; ``bits=16`` rounds to bfloat16."""
    if bits == 16:
        return x.to(torch.bfloat16).to(x.dtype)
    flat = x.detach().to(SCALE_DTYPE).reshape(-1, x.shape[-1])
    return quantize_groups(flat, bits).reshape(x.shape).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the exactly quantized value. Backward: the incoming gradient unchanged (identity STE).

    A custom Function rather than ``w + (q - w).detach()``: the latter returns ``w + (q - w)``, which differs
    from ``q`` in the last bit and so would add spurious distinct values to a quantized tensor.
    """

    @staticmethod
    def forward(ctx, value: Tensor, quantized: Tensor) -> Tensor:  # type: ignore[override]
        return quantized

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_through(value: Tensor, quantized: Tensor) -> Tensor:
    """``quantized`` in the forward pass, gradient of ``value`` = incoming gradient (``d/dvalue = 1``)."""
    if not (torch.is_grad_enabled() and value.requires_grad):
        return quantized
    return _StraightThrough.apply(value, quantized.detach())


def fake_quantize(weight: Tensor, quantizer: WeightQuantizer) -> Tensor:
    """``quantizer(weight)`` with the straight-through gradient."""
    with torch.no_grad():
        quantized = quantizer(weight)
    return straight_through(weight, quantized)


def fake_quantize_activation(x: Tensor, bits: int) -> Tensor:
    with torch.no_grad():
        quantized = quantize_activation(x, bits)
    return straight_through(x, quantized)


def latent_weight(module: nn.Module) -> nn.Parameter:
    """The float parameter behind a layer's ``weight`` (for a quantized layer, ``.weight`` reads quantized)."""
    return module._parameters["weight"]


class QuantizedWeightMixin:
    """Shared by the quantized layers: on/off switch, the quantizer, and a cache for gradient-free passes.

    Parameters keep their names (``weight``, ``bias``) and objects, so state_dict keys, tied weights,
    ``parameters()`` and checkpoints are unchanged. While quantization is on, reading ``layer.weight`` of a
    ``QuantLinear``/``QuantConv1d`` returns the fake-quantized weight (with the straight-through gradient),
    so code that uses the weight directly instead of calling the layer -- Mamba applies ``dt_proj.weight``
    and ``conv1d.weight`` itself -- computes with quantized weights too; ``layer.latent_weight`` is the
    float parameter. An embedding's ``.weight`` stays the parameter (lookups go through ``forward``).

    The quantized weight is recomputed from the latent weight at each use, so loading a float checkpoint
    into a prepared model still evaluates quantized weights. Without autograd (validation, test) it is
    cached until the weight changes in place (optimizer step, ``load_state_dict``: both bump ``_version``).
    """

    weight_quantizer: WeightQuantizer
    act_bits: int | None
    quant_enabled: bool
    _reads_quantized: bool = True  # ``.weight`` returns the quantized weight while enabled

    def _init_quant(self, quantizer: WeightQuantizer, act_bits: int | None, enabled: bool) -> None:
        self.weight_quantizer = quantizer
        self.act_bits = act_bits
        self.quant_enabled = enabled
        self._cache: tuple[tuple, Tensor] | None = None

    def __getattr__(self, name: str):
        if name == "weight" and type(self)._reads_quantized and self.__dict__.get("quant_enabled", False):
            return self.quantized_weight()
        return super().__getattr__(name)  # type: ignore[misc]

    @property
    def latent_weight(self) -> nn.Parameter:
        return self._parameters["weight"]  # type: ignore[attr-defined]

    def quantized_weight(self) -> Tensor:
        weight = self.latent_weight
        if not self.quant_enabled:
            return weight
        if torch.is_grad_enabled() and weight.requires_grad:
            self._cache = None
            return fake_quantize(weight, self.weight_quantizer)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.weight_quantizer(weight))
        return self._cache[1]

    def quantize_input(self, x: Tensor) -> Tensor:
        if not self.quant_enabled or self.act_bits is None:
            return x
        return fake_quantize_activation(x, self.act_bits)

    def quant_repr(self) -> str:
        act = f", act_bits={self.act_bits}" if self.act_bits is not None else ""
        return f"quant=[{self.weight_quantizer.describe()}{act}, enabled={self.quant_enabled}]"


def _clone_as(cls: type[nn.Module], old: nn.Module) -> nn.Module:
    """A ``cls`` instance sharing every attribute of ``old``: the same parameter objects (ties survive), buffers,
    hyper-parameters and training flag, so state_dict keys are unchanged."""
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        new.__dict__[registry] = dict(old.__dict__[registry])
    return new


class QuantLinear(QuantizedWeightMixin, nn.Linear):
    """``nn.Linear`` whose weight (and optionally input) pass through the fake quantizer in forward."""

    @classmethod
    def from_module(cls, linear: nn.Linear, quantizer: WeightQuantizer, act_bits: int | None = None,
                    enabled: bool = True) -> QuantLinear:
        new = _clone_as(cls, linear)
        new._init_quant(quantizer, act_bits, enabled)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


class QuantEmbedding(QuantizedWeightMixin, nn.Embedding):
    """``nn.Embedding`` looking up rows of the fake-quantized table (rows = tokens = output channels of a tied head)."""

    _reads_quantized = False  # ``.weight`` stays the parameter: code that finds embeddings by ``id(m.weight)``

    @classmethod
    def from_module(cls, embedding: nn.Embedding, quantizer: WeightQuantizer, enabled: bool = True
                    ) -> QuantEmbedding:
        new = _clone_as(cls, embedding)
        new._init_quant(quantizer, None, enabled)  # an embedding's input is token ids: nothing to quantize
        return new

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


class QuantConv1d(QuantizedWeightMixin, nn.Conv1d):
    """``nn.Conv1d`` with a fake-quantized kernel (rows = output channels); inputs are not quantized."""

    @classmethod
    def from_module(cls, conv: nn.Conv1d, quantizer: WeightQuantizer, enabled: bool = True) -> QuantConv1d:
        new = _clone_as(cls, conv)
        new._init_quant(quantizer, None, enabled)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


QUANTIZED_TYPES = (QuantLinear, QuantEmbedding, QuantConv1d)
