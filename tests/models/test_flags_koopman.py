"""Flag ``koopman``: residual correction across layers, the auxiliary prediction loss and its decrease, causality."""

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


def build(kind: str = "transformer", **flags) -> StagedLanguageModel:
    torch.manual_seed(0)
    return StagedLanguageModel(VOCAB, 16, 3, MIXERS[kind], partial(MLP, expansion=2), koopman=True, koopman_dim=8,
                         **flags)


@torch.no_grad()
def test_forward_and_loss_follow_the_definition() -> None:
    model = build(koopman_weight=0.3).double()
    kp = model.koopman
    kp.K.normal_(std=0.5)
    kp.psi.weight.normal_(std=0.3)
    x = torch.randint(0, VOCAB, (2, 10))
    logits = model(x)
    h = model.embed(x)
    lifted, errors = [], []
    for blk in model.blocks:  # independent: h_{l+1} = block(h_l) + psi(K phi(h_l)), from the second block on
        h = blk(h) + (lifted[-1] @ kp.K.T @ kp.psi.weight.T if lifted else 0)
        g = h @ kp.phi.weight.T
        if lifted:
            errors.append(((g - lifted[-1] @ kp.K.T) ** 2).sum(-1).mean() / (g**2).sum(-1).mean())
        lifted.append(g)
    assert_rel_close(logits, model.head(model.norm_f(h)), 1e-12, "logits")
    assert_rel_close(model.aux_losses()["koopman"], 0.3 * torch.stack(errors).mean(), 1e-12, "aux loss")


def test_prediction_loss_decreases_with_training() -> None:
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    aux = []
    for _ in range(15):
        x = torch.randint(0, VOCAB, (8, 17), generator=gen)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        koopman = model.aux_losses()["koopman"]
        aux.append(float(koopman.detach()))
        (loss + koopman).backward()
        opt.step()
        opt.zero_grad()
    assert aux[-1] < 0.7 * aux[0]
    assert model.flag_stats()["koopman_prediction_error"] == pytest.approx(aux[-1] / 0.1)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_causal(kind: str) -> None:
    model = build(kind)
    with torch.no_grad():
        model.koopman.psi.weight.normal_(std=0.3)  # a correction large enough to matter
    check_causality(model, torch.randint(0, VOCAB, (2, 20)), VOCAB)


def test_needs_two_layers() -> None:
    with pytest.raises(ValueError, match="koopman"):
        StagedLanguageModel(VOCAB, 16, 1, MIXERS["transformer"], koopman=True)
