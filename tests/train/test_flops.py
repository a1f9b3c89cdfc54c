"""FLOPs per token against hand counts: matmuls, causal attention, and the mixers' custom-op counts."""

from __future__ import annotations

import functools

import pytest
import torch

from bkexp.models import MLP, LanguageModel
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer
from bkexp.train.flops import count_flops

V, D, N = 50, 32, 16


def test_transformer_flops_match_a_hand_count():
    lm = LanguageModel(V, D, 2, mixer=functools.partial(AttentionMixer, n_heads=2),
                       ffn=functools.partial(MLP, expansion=4.0))
    flops = count_flops(lm, torch.randint(0, V, (1, N)))
    matmul = 3 * D * D + D * D + 2 * 4 * D * D  # multiply-adds of qkv, out, fc1+fc2 per token and layer
    attention = 2 * (N // 2) * D  # Q K^T and P V; causal, so half of the N x N score matrix
    head = D * V
    expected = 2 * (2 * (matmul + attention) + head)  # 2 layers; FLOPs = 2 x multiply-adds
    assert flops["forward_per_token"] == pytest.approx(expected, rel=1e-9)
    assert flops["train_step_per_token"] == pytest.approx(3 * expected, rel=1e-9)
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
