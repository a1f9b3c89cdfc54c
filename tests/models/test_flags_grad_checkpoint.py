"""Flag ``grad_checkpoint``: same outputs and gradients as without it, blocks recomputed in backward, causality."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from bkexp.models import MLP, StagedLanguageModel, MoEFeedForward
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer
from bkexp.ops.testing import assert_rel_close
from bkexp.train.causality import check_causality

MIXERS = {"transformer": partial(AttentionMixer, n_heads=2), "bk": partial(BKMixer, n_heads=4),
          "mamba": partial(MambaMixer, d_state=4)}
VOCAB = 16


def build(kind: str, **flags) -> StagedLanguageModel:
    torch.manual_seed(0)
    ffn = partial(MoEFeedForward, n_experts=2, expansion=2, block_rows=8) if kind == "bk" else partial(MLP)
    return StagedLanguageModel(VOCAB, 16, 2, MIXERS[kind], ffn, dropout=0.1, **flags)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_same_outputs_and_gradients(kind: str) -> None:
    x = torch.randint(0, VOCAB, (2, 12))
    results = []
    for flag in (False, True):
        model = build(kind, grad_checkpoint=flag)
        calls = []
        for blk in model.blocks:  # count executions (module hooks do not fire on checkpoint recomputes)
            blk.forward = partial(lambda *a, fwd: calls.append(1) or fwd(*a), fwd=blk.forward)
        torch.manual_seed(1)  # same dropout masks; checkpoint replays the RNG state on recompute
        logits = model(x)
        (logits.pow(2).mean() + sum(model.aux_losses().values())).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads, len(calls)))
    (plain, plain_grads, plain_calls), (ckpt, ckpt_grads, ckpt_calls) = results
    assert torch.equal(plain, ckpt)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        assert_rel_close(ckpt_grads[name], plain_grads[name], 1e-6, name)
    assert (plain_calls, ckpt_calls) == (2, 4)  # every block ran again in the backward pass


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_causal(kind: str) -> None:
    check_causality(build(kind, grad_checkpoint=True), torch.randint(0, VOCAB, (2, 20)), VOCAB)
