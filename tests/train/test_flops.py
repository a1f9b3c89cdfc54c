"""FLOPs per token against hand counts: matmuls, causal attention, and the mixers' custom-op counts."""

from __future__ import annotations

import functools

import pytest
import torch

from bkexp.models import MLP, LanguageModel
from bkexp.models.moe import MoEFeedForward
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer
from bkexp.train.flops import count_flops

V, D, N = 50, 32, 16


def test_transformer_flops_match_a_hand_count():
    lm = LanguageModel(V, D, 2, mixer=functools.partial(AttentionMixer, n_heads=2),
                       ffn=functools.partial(MLP, expansion=4.0))
    flops = count_flops(lm, torch.randint(0, V, (1, N)))
    matmul = 3 * D * D + D * D + 2 * 4 * D * D  # multiply-adds of qkv, out, fc1+fc2 per token and layer
    attention = 2 * N * D  # Q K^T and P V over the dense N x N scores (PyTorch's convention, causal or not)
    head = D * V
    dense = 2 * (2 * matmul + head)  # 2 layers; FLOPs = 2 x multiply-adds
    attn = 2 * 2 * attention
    assert flops["forward_per_token"] == pytest.approx(dense + attn, rel=1e-9)
    # Backward: 2x forward for every matmul; attention's backward has 5 products to the forward's 2.
    assert flops["train_step_per_token"] == pytest.approx(3 * dense + 3.5 * attn, rel=1e-9)
    assert flops["custom_ops_forward_per_token"] == 0


@pytest.mark.parametrize("mixer,per_token", [
    (functools.partial(MambaMixer, d_state=4, expand=2), 9 * 2 * D * 4 + 2 * 2 * D * 4),
    (functools.partial(BKMixer, n_heads=3), 10 * 3),
], ids=["mamba", "bk"])
def test_custom_op_flops_are_added(mixer, per_token):
    lm = LanguageModel(V, D, 1, mixer=mixer)
    flops = count_flops(lm, torch.randint(0, V, (1, N)))
    assert flops["custom_ops_forward_per_token"] == pytest.approx(per_token)
    assert flops["forward_per_token"] > per_token


def test_moe_padding_is_reported_apart_from_useful_flops():
    """With ``row_exact`` the MoE's zero-padded 128-row expert blocks do not count as the model's FLOPs: useful
    FLOPs equal those of the default forward (each expert once on exactly its rows), and the padding is the
    padded rows' matmuls."""
    batch, hidden = 2, int(1.5 * D)
    lm = LanguageModel(V, D, 1, mixer=functools.partial(AttentionMixer, n_heads=2),
                       ffn=functools.partial(MoEFeedForward, n_experts=4, expansion=1.5, block_rows=128,
                                             row_exact=True))
    x = torch.randint(0, V, (batch, N))
    padded = count_flops(lm, x)
    lm(x)  # same weights, same routing as the probe: which experts got tokens
    used = int((lm.blocks[0].ffn.router_stats["fraction"] > 0).sum())
    wasted_rows = 128 * used - batch * N  # top-1, fewer than 128 tokens: one block per used expert
    assert padded["padding_forward_per_token"] * batch * N == pytest.approx(2 * 2 * D * hidden * wasted_rows)
    assert padded["padding_train_step_per_token"] == pytest.approx(3 * padded["padding_forward_per_token"])
    assert padded["batch_shape"] == [batch, N]

    lm.blocks[0].ffn.row_exact = False  # the default: nothing padded
    exact = count_flops(lm, x)
    assert exact["padding_forward_per_token"] == 0
    assert padded["forward_per_token"] == pytest.approx(exact["forward_per_token"], rel=1e-12)
    assert padded["train_step_per_token"] == pytest.approx(exact["train_step_per_token"], rel=1e-12)


def test_moe_flops_are_the_same_with_compiled_row_moves():
    """Under the FLOP counter the MoE runs its PyTorch row moves (the counter sees the gate gradient's bmm and
    the router's input-gradient mm), so counts do not depend on ``compiled_moves``."""
    lm = LanguageModel(V, D, 1, mixer=functools.partial(AttentionMixer, n_heads=2),
                       ffn=functools.partial(MoEFeedForward, n_experts=4, top_k=2, expansion=1.5))
    x = torch.randint(0, V, (2, N))
    counts = []
    for compiled in (True, False):
        for module in lm.modules():
            if isinstance(module, MoEFeedForward):
                module.compiled_moves = compiled
        counts.append(count_flops(lm, x))
    assert counts[0] == counts[1] and counts[0]["train_step_per_token"] > 0
