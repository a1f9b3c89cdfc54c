"""Flag ``early_exit``: exit loss, exited logits and frozen states at evaluation, compute saved, causality."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bkexp.models import MLP, StagedLanguageModel, MoEFeedForward
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer
from bkexp.ops.testing import assert_rel_close
from bkexp.train.causality import check_causality

MIXERS = {"transformer": partial(AttentionMixer, n_heads=2), "bk": partial(BKMixer, n_heads=4),
          "mamba": partial(MambaMixer, d_state=4)}
VOCAB = 16


def build(kind: str = "transformer", n_layers: int = 3, d_model: int = 16, ffn=None, **flags) -> StagedLanguageModel:
    torch.manual_seed(0)
    return StagedLanguageModel(VOCAB, d_model, n_layers, MIXERS[kind], ffn or partial(MLP, expansion=2),
                         early_exit=True, **flags)


def easy_hard_batch(gen: torch.Generator, batch: int = 16, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random even tokens, each odd token = previous + 1: half the next-token targets are certain."""
    x = torch.randint(0, VOCAB, (batch, n + 1), generator=gen)
    x[:, 1::2] = (x[:, 0::2][:, : x[:, 1::2].shape[1]] + 1) % VOCAB
    return x[:, :-1], x[:, 1:]


def test_exit_loss_is_mean_cross_entropy_of_intermediate_exits() -> None:
    model = build(exit_loss_weight=0.5).double()
    states = []
    hooks = [blk.register_forward_hook(lambda m, i, o: states.append(o)) for blk in model.blocks]
    x = torch.randint(0, VOCAB, (2, 12))
    labels = torch.randint(0, VOCAB, (2, 12))
    labels[0, :3] = -100
    model(x)
    for h in hooks:
        h.remove()
    expected = sum(F.cross_entropy(model.head(model.exit_heads.norms[i](states[i])).flatten(0, 1),
                                   labels.flatten(), ignore_index=-100) for i in range(2)) / 2
    assert_rel_close(model.aux_losses(labels=labels)["exit_heads"], 0.5 * expected, 1e-12, "exit loss")
    with pytest.raises(ValueError, match="needs the labels"):
        model.aux_losses()


@torch.no_grad()
def test_threshold_zero_exits_everything_at_the_first_layer() -> None:
    model = build().double().eval()
    model.exit_heads.threshold = 1e-9  # every token is confident enough after block 0
    model.exit_block_rows = 4  # 12 tokens per sequence: no padding rows in the cost
    x = torch.randint(0, VOCAB, (2, 12))
    logits = model(x)
    first = model.blocks[0](model.embed(x))
    assert_rel_close(logits, model.head(model.exit_heads.norms[0](first)), 1e-12, "first-exit logits")
    stats = model.flag_stats()
    assert stats["mean_exit_layer"] == 1.0
    assert stats["compute_saved"] > 0  # two of three feed-forwards and the final head skipped


@torch.no_grad()
def test_exited_tokens_state_is_copied_forward_for_later_tokens() -> None:
    """Token 0 exits after block 0; block 1's mixer must read its block-0 state for the later tokens."""
    model = build(n_layers=2).double().eval()
    x = torch.randint(0, VOCAB, (1, 8))
    h0 = model.blocks[0](model.embed(x))
    confidence = torch.softmax(model.head(model.exit_heads.norms[0](h0)), -1).amax(-1)
    model.exit_heads.threshold = float(confidence[0, 0])  # only token 0 (ties aside) reaches it
    exited = confidence[0] >= model.exit_heads.threshold
    assert exited[0] and not exited.all()
    logits = model(x)
    h1 = model.blocks[1](h0)  # token 0's state is h0 either way, so block 1 sees exactly h0
    expected = torch.where(exited[None, :, None], model.head(model.exit_heads.norms[0](h0)),
                           model.head(model.norm_f(h1)))
    assert_rel_close(logits, expected, 1e-12, "mixed exits")


@torch.no_grad()
def test_no_exit_matches_the_full_depth_logits() -> None:
    model = build().eval()
    model.exit_heads.threshold = 1.0
    x = torch.randint(0, VOCAB, (2, 12))
    logits = model(x)
    assert model.flag_stats()["mean_exit_layer"] == 3.0
    model.train()
    assert_rel_close(logits, model(x), 1e-5, "no exits vs full depth")


def test_trained_model_exits_early_on_easy_tokens() -> None:
    model = build(d_model=24, exit_threshold=0.6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = easy_hard_batch(gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + sum(model.aux_losses(labels=y).values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.reset_flag_stats()
    with torch.no_grad():
        x, y = easy_hard_batch(gen)
        logits = model(x)
    stats = model.flag_stats()
    assert stats["mean_exit_layer"] < stats["max_layers"] == 3.0
    # The exited logits are the evaluation logits: they beat the uniform guess (loss ln VOCAB).
    assert F.cross_entropy(logits.flatten(0, 1), y.flatten()) < torch.log(torch.tensor(float(VOCAB)))


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_causal(kind: str) -> None:
    ffn = partial(MoEFeedForward, n_experts=2, expansion=2, block_rows=8) if kind == "bk" else None
    model = build(kind, ffn=ffn)
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():  # pick a threshold that makes some, not all, tokens exit at the first layer
        h0 = model.blocks[0](model.embed(x))
        confidence = torch.softmax(model.head(model.exit_heads.norms[0](h0)), -1).amax(-1)
    model.exit_heads.threshold = float(confidence.median())
    check_causality(model, x, VOCAB)
