"""The fake quantizers: level counts, round-to-nearest error, bfloat16, straight-through gradients, activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bkexp.quant import (
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
    fake_quantize,
    fake_quantize_activation,
    qmax,
    quantize_activation,
)


def distinct_per_row(t: torch.Tensor) -> list[int]:
    return [int(torch.unique(row).numel()) for row in t]


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("shape", [(16, 64), (5, 33)], ids=lambda s: f"O{s[0]}-I{s[1]}")
def test_per_channel_levels_and_rounding(bits: int, shape: tuple[int, int]) -> None:
    w = torch.randn(shape) * torch.linspace(0.01, 3.0, shape[0])[:, None]  # very different row ranges
    q = WeightQuantizer(bits)(w)
    assert q.shape == w.shape and q.dtype == w.dtype
    counts = distinct_per_row(q)
    assert max(counts) <= 2 ** bits - 1  # symmetric grid: at most 2^b - 1 (<= 2^bits) values per channel
    if bits >= 3:
        assert min(counts) >= 3  # and it is not degenerate
    # Independent check of the scheme: each row is an integer grid of step max|w|/qmax, and rounding is to
    # the nearest level (error at most half a step), with the row's extreme weight represented exactly.
    step = w.abs().amax(dim=1, keepdim=True) / qmax(bits)
    levels = q / step
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= qmax(bits) + 1e-4
    assert ((q - w).abs() <= step / 2 * (1 + 1e-5)).all()
    extreme = w.abs().argmax(dim=1)
    rows = torch.arange(shape[0])
    torch.testing.assert_close(q[rows, extreme], w[rows, extreme])


@pytest.mark.parametrize("bits", [2, 3, 4, 8], ids=lambda b: f"int{b}")
def test_per_group_levels(bits: int) -> None:
    group = 16
    w = torch.randn(8, 64)
    w[:, :group] *= 100.0  # one loud group per row must not flatten the other groups
    q = WeightQuantizer(bits, "per_group", group)(w)
    groups = q.reshape(8, 64 // group, group)
    for row in groups:
        assert max(distinct_per_row(row)) <= 2 ** bits - 1
    # Per-group scales: the quiet groups keep their own resolution (error bounded by their own step).
    quiet = w[:, group:].reshape(8, -1, group)
    step = quiet.abs().amax(dim=-1, keepdim=True) / qmax(bits)
    assert ((groups[:, 1:] - quiet).abs() <= step / 2 * (1 + 1e-5)).all()
    # Per channel the same weights lose the quiet groups entirely at 2 bits: the granularity is real.
    if bits == 2:
        per_channel = WeightQuantizer(bits)(w)
        assert (per_channel[:, group:] == 0).all() and not (groups[:, 1:] == 0).all()


def test_per_tensor_levels() -> None:
    w = torch.randn(12, 20)
    q = WeightQuantizer(4, "per_tensor")(w)
    assert torch.unique(q).numel() <= 15
    assert torch.allclose(q.abs().max(), w.abs().max())


def test_bfloat16_is_round_to_nearest_bf16() -> None:
    w = torch.randn(32, 48)
    q = WeightQuantizer(16)(w)
    assert q.dtype == torch.float32
    assert torch.equal(q, w.to(torch.bfloat16).float())
    assert torch.equal(q.to(torch.bfloat16).float(), q)  # every value representable in bfloat16
    assert not torch.equal(q, w)


def test_zero_rows_stay_zero_without_nan() -> None:
    w = torch.randn(4, 8)
    w[1] = 0.0
    q = WeightQuantizer(4)(w)
    assert torch.isfinite(q).all() and (q[1] == 0).all()


def test_percentile_clipping_clips_outliers() -> None:
    w = torch.randn(4, 1000)
    w[:, 0] = 50.0  # an outlier per row
    clipped = WeightQuantizer(4, clip_percentile=99.0)(w)
    plain = WeightQuantizer(4)(w)
    limit = w.abs().kthvalue(990, dim=1).values
    torch.testing.assert_close(clipped.abs().amax(dim=1), limit)  # the clip range is the 99th percentile
    # Clipping trades the outlier for resolution on everything else: the bulk error drops.
    assert (clipped[:, 1:] - w[:, 1:]).abs().mean() < 0.5 * (plain[:, 1:] - w[:, 1:]).abs().mean()


def test_group_size_must_divide_rows() -> None:
    with pytest.raises(ValueError, match=r"group_size=16 does not divide its 40 inputs"):
        WeightQuantizer(4, "per_group", 16)(torch.randn(3, 40))
    # A row no longer than the group is one group: per channel.
    torch.testing.assert_close(WeightQuantizer(4, "per_group", 64)(w := torch.randn(3, 40)), WeightQuantizer(4)(w))


@pytest.mark.parametrize("bits", [2, 4, 8, 16], ids=lambda b: f"bits{b}")
def test_straight_through_gradient_is_identity(bits: int) -> None:
    w = torch.randn(6, 10, requires_grad=True)
    upstream = torch.randn(6, 10)
    out = fake_quantize(w, WeightQuantizer(bits))
    assert torch.equal(out.detach(), WeightQuantizer(bits)(w.detach()))  # forward: exactly the quantized value
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)  # d fq(w)/dw = 1 everywhere
    assert w.grad.abs().sum() > 0


def test_quant_linear_weight_gradient_is_that_of_the_quantized_weight() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(12, 7)
    quantizer = WeightQuantizer(3)
    qlinear = QuantLinear.from_module(linear, quantizer)
    reference = nn.Linear(12, 7)
    with torch.no_grad():
        reference.weight.copy_(quantizer(linear.weight))
        reference.bias.copy_(linear.bias)
    x = torch.randn(5, 12)
    upstream = torch.randn(5, 7)
    (qlinear(x) * upstream).sum().backward()
    (reference(x) * upstream).sum().backward()
    torch.testing.assert_close(qlinear.latent_weight.grad, reference.weight.grad)  # straight through the quantizer
    torch.testing.assert_close(qlinear.bias.grad, reference.bias.grad)
    assert qlinear.latent_weight.grad.abs().sum() > 0
    torch.testing.assert_close(qlinear(x), reference(x))


def test_quant_layers_share_parameters_and_state_dict() -> None:
    embed = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = embed.weight
    qembed = QuantEmbedding.from_module(embed, WeightQuantizer(4))
    qhead = QuantLinear.from_module(head, WeightQuantizer(4))
    assert qembed.weight is embed.weight and qhead.latent_weight is embed.weight
    assert list(qhead.state_dict()) == list(head.state_dict()) == ["weight"]
    assert [p is embed.weight for p in qhead.parameters()] == [True]
    # Reading a quantized Linear's .weight gives the quantized weight (code that applies it directly is covered).
    assert torch.equal(qhead.weight, WeightQuantizer(4)(embed.weight))
    qhead.quant_enabled = False
    assert qhead.weight is embed.weight
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(qembed(ids), WeightQuantizer(4)(embed.weight)[ids])


def test_eval_cache_follows_in_place_weight_updates() -> None:
    layer = QuantLinear.from_module(nn.Linear(4, 3), WeightQuantizer(8))
    x = torch.randn(2, 4)
    with torch.no_grad():
        first = layer(x)
        layer.latent_weight.mul_(2.0)  # as an optimizer step or load_state_dict would
        second = layer(x)
    torch.testing.assert_close(second - layer.bias, 2 * (first - layer.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8], ids=lambda b: f"act{b}")
def test_activation_quantization_is_per_token(bits: int) -> None:
    x = torch.randn(2, 6, 16)
    x[0, 5] *= 1000.0  # a loud later token
    q = quantize_activation(x, bits)
    flat = q.reshape(-1, 16)
    assert max(distinct_per_row(flat)) <= 2 ** bits - 1
    # Causality: earlier tokens are quantized exactly as without the loud token.
    y = x.clone()
    y[0, 5] = torch.randn(16)
    torch.testing.assert_close(quantize_activation(y, bits)[0, :5], q[0, :5], rtol=0, atol=0)
    x.requires_grad_(True)
    upstream = torch.randn_like(x)
    (fake_quantize_activation(x, bits) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)
