"""Flag ``sparse_bk`` (``BKMixer(sparse_heads=...)``): only the top heads reach the BK-Core, gate gradients, causality."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import bkexp.models.mixers.bk as bk_module
from bkexp.models import MLP, LanguageModel
from bkexp.models.mixers.bk import BKMixer
from bkexp.ops.testing import assert_rel_close
from bkexp.train.causality import check_causality

VOCAB = 16


def make(sparse_heads: float | None, coupling: str = "head", n_heads: int = 8) -> BKMixer:
    torch.manual_seed(0)
    return BKMixer(12, n_heads=n_heads, coupling=coupling, v_bias=True, out_bias=True,
                   sparse_heads=sparse_heads).double()


@pytest.mark.parametrize("coupling", ["head", "input"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_only_top_heads_reach_the_bk_core(monkeypatch, coupling: str, fraction: float) -> None:
    rows = []
    real_bk_core = bk_module.bk_core

    def recording_bk_core(v, k, z, **kw):
        rows.append(v.shape[-2])  # (B, heads, N): heads that run the recurrence
        return real_bk_core(v, k, z, **kw)

    monkeypatch.setattr(bk_module, "bk_core", recording_bk_core)
    mixer = make(fraction, coupling)
    with torch.no_grad():
        mixer.head_logit.copy_(torch.linspace(-1, 1, 8))  # heads 8 - ceil(f * 8) .. 7 score highest
    mixer(torch.randn(2, 10, 12, dtype=torch.float64))
    kept = math.ceil(fraction * 8)
    assert rows == [kept]
    assert mixer.active_heads().tolist() == list(range(8 - kept, 8))
    assert mixer.core_flops(2, 10) == make(None, coupling).core_flops(2, 10) * kept // 8
    assert mixer.flag_stats()["active_heads_fraction"] == kept / 8


@pytest.mark.parametrize("coupling", ["head", "input"])
def test_equals_dense_mixer_with_skipped_heads_zeroed_and_kept_heads_gated(coupling: str) -> None:
    sparse = make(0.5, coupling)
    with torch.no_grad():
        sparse.head_logit.copy_(torch.tensor([0.3, 2.0, -1.0, 1.5, 0.0, -0.5, 0.9, 3.0], dtype=torch.float64))
    dense = make(None, coupling)
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if k != "head_logit"})
    kept = torch.tensor([1, 3, 6, 7])
    gate = torch.zeros(8, dtype=torch.float64)
    gate[kept] = torch.sigmoid(sparse.head_logit[kept].detach())
    with torch.no_grad():
        dense.w_o.weight.mul_(gate.repeat(2))  # columns [Re y_h, Im y_h]: skipped heads contribute zero
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    assert_rel_close(sparse(x), dense(x), 1e-12, "sparse vs gated dense")


def test_gate_gets_gradients_for_kept_heads_only() -> None:
    mixer = make(0.5)
    with torch.no_grad():
        mixer.head_logit.copy_(torch.linspace(-1, 1, 8))
    mixer(torch.randn(2, 10, 12, dtype=torch.float64)).pow(2).sum().backward()
    grad = mixer.head_logit.grad
    assert (grad[4:] != 0).all() and (grad[:4] == 0).all()


def test_invalid_fraction() -> None:
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sparse_heads"):
            make(bad)


@pytest.mark.parametrize("coupling", ["head", "input"])
def test_causal_in_language_model(coupling: str) -> None:
    torch.manual_seed(0)
    model = LanguageModel(VOCAB, 16, 2, partial(BKMixer, n_heads=4, coupling=coupling, sparse_heads=0.5),
                          partial(MLP, expansion=2))
    check_causality(model, torch.randint(0, VOCAB, (2, 20)), VOCAB)
    assert model.flag_stats()["active_heads_fraction"] == 0.5
    assert model.state_size(20) == 2 * (2 * 2)  # 2 layers x 2 active heads x one complex pivot
