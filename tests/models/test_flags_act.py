"""Flag ``act``: Graves-style halting over layers: the mix, the ponder cost, fewer layers once trained, causality."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bkexp.models import MLP, StagedLanguageModel
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer
from bkexp.ops.testing import assert_rel_close
from bkexp.train.causality import check_causality

MIXERS = {"transformer": partial(AttentionMixer, n_heads=2), "bk": partial(BKMixer, n_heads=4),
          "mamba": partial(MambaMixer, d_state=4)}
VOCAB = 16


def build(kind: str = "transformer", n_layers: int = 3, d_model: int = 16, **flags) -> StagedLanguageModel:
    torch.manual_seed(0)
    return StagedLanguageModel(VOCAB, d_model, n_layers, MIXERS[kind], partial(MLP, expansion=2), act=True, **flags)


def easy_hard_batch(gen: torch.Generator, batch: int = 16, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random even tokens, each odd token = previous + 1: half the next-token targets are certain."""
    x = torch.randint(0, VOCAB, (batch, n + 1), generator=gen)
    x[:, 1::2] = (x[:, 0::2][:, : x[:, 1::2].shape[1]] + 1) % VOCAB
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def test_mix_and_ponder_cost_match_graves_per_token() -> None:
    model = build(n_layers=3, act_threshold=0.9, ponder_weight=0.05).double()
    for unit, bias in zip(model.act_halting.halt, (0.5, 1.0, 0.0)):  # tokens halt at different layers
        unit.bias.fill_(bias)
        unit.weight.normal_(std=2.0)
    states = []
    hooks = [blk.register_forward_hook(lambda m, i, o: states.append(o)) for blk in model.blocks]
    x = torch.randint(0, VOCAB, (2, 12))
    logits = model(x)
    for h in hooks:
        h.remove()
    # Independent per-token loop of Graves (2016), eq. (7)-(12).
    mixed = torch.zeros_like(states[0])
    ponder = torch.zeros(x.shape, dtype=torch.float64)
    layers = torch.zeros(x.shape, dtype=torch.float64)
    for b in range(2):
        for t in range(12):
            total = 0.0
            for layer, h in enumerate(states):
                p = float(torch.sigmoid(model.act_halting.halt[layer](h[b, t])))
                if total + p >= 0.9 or layer == len(states) - 1:
                    remainder = 1 - total
                    mixed[b, t] += remainder * h[b, t]
                    ponder[b, t] = layer + 1 + remainder
                    layers[b, t] = layer + 1
                    break
                mixed[b, t] += p * h[b, t]
                total += p
    assert 1 < layers.mean() < 3, "the chosen biases should make tokens halt at different layers"
    assert_rel_close(logits, model.head(model.norm_f(mixed)), 1e-12, "ACT output")
    assert_rel_close(model.aux_losses()["act_halting"], 0.05 * ponder.mean(), 1e-12, "ponder cost")
    stats = model.flag_stats()
    assert stats["mean_layers"] == pytest.approx(float(layers.mean()))
    assert stats["max_layers"] == 3.0


def test_untrained_model_uses_every_layer_and_a_high_bias_halts_at_the_first() -> None:
    model = build(n_layers=4).eval()
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        model(x)
        assert model.flag_stats()["mean_layers"] == 4.0  # init: cumulative p stays below the threshold
        for unit in model.act_halting.halt:
            unit.bias.fill_(8.0)  # p ~ 0.9997 >= 0.99 after the first block
        model.reset_flag_stats()
        model(x)
    assert model.flag_stats()["mean_layers"] == 1.0


def test_training_with_ponder_cost_halts_before_the_last_layer() -> None:
    model = build(n_layers=3, d_model=24, ponder_weight=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        x, y = easy_hard_batch(gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + sum(model.aux_losses().values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        model(easy_hard_batch(gen)[0])
    stats = model.flag_stats()
    assert stats["mean_layers"] < stats["max_layers"] == 3.0


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_causal(kind: str) -> None:
    model = build(kind)
    with torch.no_grad():
        for unit in model.act_halting.halt:
            unit.weight.normal_(std=3.0)  # make halting genuinely token-dependent
    check_causality(model, torch.randint(0, VOCAB, (2, 20)), VOCAB)


def test_flag_errors() -> None:
    with pytest.raises(ValueError, match="act and early_exit"):
        build(early_exit=True)
    with pytest.raises(ValueError, match="at least 2 layer stages"):
        build(n_layers=1)
    with pytest.raises(ValueError, match="act_threshold"):
        build(act_threshold=1.5)
