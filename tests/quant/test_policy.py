"""The shared policy on every model config: exactly the block Linear layers (plus switches), in the forward pass."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from testpaths import REPO_ROOT
from torch import nn

from bkexp.quant import (
    EVAL_BITS,
    QuantConfigError,
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    WeightQuantizer,
)
from bkexp.train.causality import check_causality

VOCAB = 50
MODEL_CONFIGS = sorted(p.stem for p in (REPO_ROOT / "conf" / "model").glob("*.yaml"))

# Linear layers per block, counted from the architectures (not from the code under test): attention qkv +
# out + MLP fc1 + fc2; BK w_v + w_o (w_k with input coupling) + MoE router + 2 per expert; Mamba in, x, dt, out.
EXPECTED_LINEARS_PER_BLOCK = {
    "transformer": lambda cfg: 4,
    "bk": lambda cfg: 2 + (cfg.model.mixer.coupling == "input") + 1 + 2 * cfg.model.ffn.n_experts,
    "bk_seed": lambda cfg: 2 + (cfg.model.mixer.coupling == "input") + 1 + 2 * cfg.model.ffn.n_experts,
    "mamba": lambda cfg: 4,
}


def build(model: str, *overrides: str) -> tuple[nn.Module, object]:
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        # ~recipe: the size preset's model (the default MQAR recipe drops the Transformer's MLP)
        cfg = compose("train", overrides=[f"model={model}", "model.d_model=32", "model.n_layers=1", "~recipe",
                                          *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model, vocab_size=VOCAB), cfg


def block_linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Independent enumeration: every parameter named ``blocks.*.weight`` whose owner is an ``nn.Linear``."""
    out = {}
    for name, param in model.named_parameters():
        owner_name = name.rsplit(".", 1)[0]
        if name.startswith("blocks.") and name.endswith(".weight") and \
                type(model.get_submodule(owner_name)) is nn.Linear:
            out[owner_name] = param
    return out


def quantize_reference(model: nn.Module, names: list[str], quantizer: WeightQuantizer) -> nn.Module:
    """A plain copy of ``model`` whose listed layers' weights are replaced by their quantized values."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            weight = ref.get_submodule(name).weight
            weight.copy_(quantizer(weight))
    return ref


@pytest.mark.parametrize("embeddings", [False, True], ids=["embeddings-fp", "embeddings-q"])
@pytest.mark.parametrize("model_name", MODEL_CONFIGS)
def test_prepare_quantizes_exactly_the_policy(model_name: str, embeddings: bool) -> None:
    model, cfg = build(model_name)
    linears = block_linear_weights(model)
    expected_per_block = EXPECTED_LINEARS_PER_BLOCK.get(model_name)
    if expected_per_block is not None:
        assert len(linears) == cfg.model.n_layers * expected_per_block(cfg)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        float_out = model(x)
    names = list(linears) + (["embed"] if embeddings else [])
    reference = quantize_reference(model, names, WeightQuantizer(4))
    state_keys = list(model.state_dict())
    params_before = [id(p) for p in model.parameters()]

    spec = QuantSpec(method="qat", bits=4, embeddings=embeddings).validate()
    assert spec.prepare(model) is model  # in place
    quantized = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert quantized == set(linears) | ({"embed", "head"} if embeddings else set())
    assert list(model.state_dict()) == state_keys  # checkpoints stay compatible
    assert [id(p) for p in model.parameters()] == params_before  # same parameter objects (optimizer, ties)
    if not embeddings:
        assert type(model.embed) is nn.Embedding and type(model.head) is nn.Linear
    if cfg.model.tie_embeddings:
        assert model.head.latent_weight is model.embed.weight if embeddings else model.head.weight is model.embed.weight

    with torch.no_grad():
        out = model(x)
        expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # the forward really uses quantized weights
    assert not torch.allclose(out, float_out, rtol=1e-3, atol=1e-3)

    info = spec.describe(model)
    unique = {id(p): p for p in linears.values()}
    n_quantized = sum(p.numel() for p in unique.values()) + (model.embed.weight.numel() if embeddings else 0)
    assert info["quantized_params"] == n_quantized
    assert info["quantized_layers"] == len(quantized)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert info["embeddings"] is embeddings and info["method"] == "qat" and info["bits"] == 4
    scales = sum(p.shape[0] for p in unique.values()) + (model.embed.weight.shape[0] if embeddings else 0)
    assert info["effective_size_bytes"] == math.ceil(
        (n_quantized * 4 + scales * 32 + (info["total_params"] - n_quantized) * 32) / 8)
    assert "BK-Core op computes in float32" in info["full_precision"]


@pytest.mark.parametrize("model_name", MODEL_CONFIGS)
def test_qat_model_trains_through_quantizer_and_stays_causal(model_name: str) -> None:
    model, _ = build(model_name)
    spec = QuantSpec(method="qat", bits=2, act_bits=8, embeddings=True).validate()
    spec.prepare(model)
    x = torch.randint(0, VOCAB, (2, 16))
    check_causality(model, x, VOCAB, name=model_name)  # per-token activation scales keep the model causal
    model(torch.randint(0, VOCAB, (4, 64))).logsumexp(-1).mean().backward()
    unrouted = {f"{name}.experts.{e}." for name, m in model.named_modules() if hasattr(m, "router_stats")
                for e in (m.router_stats["fraction"] == 0).nonzero().flatten().tolist()}  # no token, no gradient
    layers = [m for n, m in model.named_modules()
              if isinstance(m, QuantLinear) and not any(n.startswith(u) for u in unrouted)]
    assert len(layers) >= 3
    assert all(m.latent_weight.grad is not None and m.latent_weight.grad.abs().sum() > 0 for m in layers)


def test_ptq_is_float_until_finalize_and_survives_checkpoint_load() -> None:
    model, _ = build("transformer")
    float_state = copy.deepcopy(model.state_dict())
    names = list(block_linear_weights(model))
    reference = quantize_reference(model, names, WeightQuantizer(3))
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        float_out = model(x)
    spec = QuantSpec(method="ptq", bits=3).validate(EVAL_BITS)  # 3 bits: eval-quant widths
    spec.prepare(model)
    assert spec.describe(model)["active"] is False
    with torch.no_grad():
        torch.testing.assert_close(model(x), float_out, rtol=0, atol=0)  # training runs in float
    spec.finalize(model)
    assert spec.describe(model)["active"] is True
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        model.load_state_dict(float_state)  # what Lightning's test on the best checkpoint does
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_policy() -> None:
    model, _ = build("transformer")
    names = list(block_linear_weights(model))
    reference = quantize_reference(model, names, WeightQuantizer(16))
    spec = QuantSpec(bits=16).validate()  # auto -> qat at 16 bits: bfloat16 weights through the STE
    spec.prepare(model)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    info = spec.describe(model)
    assert info["scales"] == 0
    assert info["effective_size_bytes"] == info["quantized_params"] * 2 + (
        info["total_params"] - info["quantized_params"]) * 4


@pytest.mark.skipif("mamba" not in MODEL_CONFIGS, reason="no Mamba model config")
def test_mamba_conv_switch_and_direct_weight_use() -> None:
    model, _ = build("mamba")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv1d)}
    assert convs, "the Mamba mixer is expected to hold a depthwise Conv1d"
    names = list(block_linear_weights(model)) + list(convs)
    reference = quantize_reference(model, names, WeightQuantizer(4))
    spec = QuantSpec(method="qat", bits=4, conv=True).validate()
    spec.prepare(model)
    info = spec.describe(model)
    assert info["quantized_params"] == sum(m.weight.numel() for m in model.modules()
                                           if isinstance(m, QuantLinear)) + sum(
        m.latent_weight.numel() for m in model.modules() if type(m).__name__ == "QuantConv1d")
    assert "Conv1d" not in info["full_precision_in_blocks"]
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():  # dt_proj and the conv weight are used directly by the mixer: still quantized
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    plain, _ = build("mamba")
    QuantSpec(method="qat", bits=4).prepare(plain)
    assert QuantSpec(method="qat", bits=4).describe(plain)["full_precision_in_blocks"]["Conv1d"] > 0


def test_group_size_that_does_not_divide_fails_at_prepare() -> None:
    model, _ = build("transformer")
    spec = QuantSpec(method="qat", bits=4, granularity="per_group", group_size=24).validate()
    with pytest.raises(QuantConfigError, match=r"blocks\.0\.mixer\.qkv: group_size=24 does not divide its 32 "
                                               r"inputs.*choose a divisor of 32"):
        spec.prepare(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing half-prepared
    ok = QuantSpec(method="qat", bits=4, granularity="per_group", group_size=16).validate()
    ok.prepare(model)
    assert ok.describe(model)["scales"] == sum(m.latent_weight.numel() // 16 for m in model.modules()
                                               if isinstance(m, QuantLinear))


def test_prepare_twice_and_finalize_without_prepare_fail() -> None:
    model, _ = build("transformer")
    spec = QuantSpec(method="qat", bits=8).validate()
    with pytest.raises(RuntimeError, match="call spec.prepare"):
        spec.finalize(model)
    spec.prepare(model)
    with pytest.raises(QuantConfigError, match="already applied"):
        spec.prepare(model)


def test_full_precision_spec_changes_nothing() -> None:
    model, _ = build("transformer")
    spec = QuantSpec(bits=32).validate()
    assert spec.resolved_method == "none"
    assert spec.prepare(model) is model and spec.finalize(model) is model
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    info = spec.describe(model)
    assert info["method"] == "none" and info["quantized_params"] == 0
    assert info["effective_size_bytes"] == 4 * sum(p.numel() for p in model.parameters())
