"""Flag ``physics_informed`` (``physics_weight``): the BK energy-conservation regulariser, its gradient, errors."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bkexp.models import MLP, StagedLanguageModel
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer
from bkexp.ops.testing import assert_rel_close
from bkexp.train.causality import check_causality

VOCAB = 16


def build(coupling: str = "head", n_layers: int = 3, **kw) -> StagedLanguageModel:
    torch.manual_seed(0)
    mixer = partial(BKMixer, n_heads=4, coupling=coupling, base_diag=0.5, v_bias=True, **kw)
    return StagedLanguageModel(VOCAB, 16, n_layers, mixer, partial(MLP, expansion=2), physics_weight=0.2)


def uniform_state_energy(mixer: BKMixer, x: torch.Tensor) -> torch.Tensor:
    """<psi|H|psi>, psi = 1/sqrt(N), with H = tridiag(sqrt k; base_diag + v; sqrt k), dense, per row."""
    b, n, _ = x.shape
    v = F.linear(x, mixer.w_v.weight, mixer.w_v.bias) + mixer.base_diag  # (B, N, H)
    if mixer.coupling == "input":
        k = F.softplus(F.linear(x[:, 1:], mixer.w_k.weight, mixer.w_k.bias))
    else:
        k = F.softplus(mixer.k_param).expand(b, n - 1, mixer.n_heads)
    energies = []
    for bi in range(b):
        for h in range(mixer.n_heads):
            H = torch.diag(v[bi, :, h]) + torch.diag(k[bi, :, h].sqrt(), 1) + torch.diag(k[bi, :, h].sqrt(), -1)
            psi = torch.full((n,), n ** -0.5, dtype=x.dtype)
            energies.append(psi @ H @ psi)
    return torch.stack(energies).mean()


@pytest.mark.parametrize("coupling", ["head", "input"])
def test_regulariser_equals_independent_energy_drift(coupling: str) -> None:
    model = build(coupling).double()
    inputs = []
    for blk in model.blocks:
        blk.mixer.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
    model(torch.randint(0, VOCAB, (2, 9)))
    energies = torch.stack([uniform_state_energy(m, x) for m, x in inputs])
    expected = 0.2 * ((energies[1:] - energies[:-1]) ** 2).mean()
    loss = model.aux_losses()["energy_conservation"]
    assert_rel_close(loss, expected, 1e-12, "energy drift")
    loss.backward()
    assert model.blocks[0].mixer.w_v.bias.grad.abs().sum() > 0  # the potentials learn from it


def test_sparse_heads_use_the_active_heads_energy() -> None:
    model = build(sparse_heads=0.5).double()
    x = torch.randint(0, VOCAB, (2, 9))
    model(x)
    mixer = model.blocks[0].mixer
    heads = mixer.active_heads()
    h = model.blocks[0].norm1(model.embed(x))
    v = F.linear(h, mixer.w_v.weight, mixer.w_v.bias)[..., heads] + mixer.base_diag
    k = F.softplus(mixer.k_param[heads])
    expected = v.mean() + 2 * (9 - 1) / 9 * k.sqrt().mean()
    assert_rel_close(mixer.energy, expected, 1e-12, "active-head energy")


def test_errors_without_two_bk_layers() -> None:
    for mixer in (partial(AttentionMixer, n_heads=2), partial(MambaMixer, d_state=4)):
        with pytest.raises(ValueError, match="physics_informed.*BK mixer"):
            StagedLanguageModel(VOCAB, 16, 2, mixer, physics_weight=0.1)
    with pytest.raises(ValueError, match="at least 2"):
        build(n_layers=1)


def test_causal() -> None:
    check_causality(build("input"), torch.randint(0, VOCAB, (2, 20)), VOCAB)
