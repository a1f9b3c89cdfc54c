"""BKMixer and the bk / bk_seed configs: wiring against a dense resolvent, causality, gradients, config builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from bkexp.models import LanguageModel
from bkexp.models.ffn import MLP
from bkexp.models.mixers.bk import BKMixer
from bkexp.models.moe import MoEFeedForward
from bkexp.ops.bk_core import available_backends, resolve_backend
from bkexp.train.causality import CausalityError, check_causality

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def dense_resolvent_diagonal(a: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """diag of ``A^-1`` (or of each leading block's inverse) with dense inverses; a (R, N) complex, k (R, N-1)."""
    off = k.to(torch.complex128).sqrt()  # symmetric split of the off-diagonal product k_i
    A = torch.diag_embed(a) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    n = a.shape[-1]
    if not causal:
        return torch.linalg.inv(A).diagonal(dim1=-2, dim2=-1)
    return torch.stack([torch.linalg.inv(A[:, : i + 1, : i + 1])[:, i, i] for i in range(n)], dim=-1)


def mixer_reference(m: BKMixer, x: torch.Tensor) -> torch.Tensor:
    """The mixer's documented formula, written out independently with dense linear algebra (float64)."""
    b, n, _ = x.shape
    v = F.linear(x, m.w_v.weight, m.w_v.bias)  # (B, N, H)
    if m.v_bound is not None:
        v = m.v_bound * torch.tanh(v / m.v_bound)
    v = v + m.base_diag
    if m.coupling == "input":
        k = F.softplus(F.linear(x[:, 1:], m.w_k.weight, m.w_k.bias))  # pair (t-1, t) from token t
    elif m.learn_coupling:
        k = F.softplus(m.k_param).expand(b, n - 1, m.n_heads)
    else:
        k = m.k_fixed.expand(b, n - 1, m.n_heads)
    eps = m.eps_min + F.softplus(m.eps_param) if m.learn_z else m.z_imag
    z = torch.complex(m.z_real, eps)  # (H,)
    a = v.to(torch.complex128) - z  # (B, N, H)
    rows_a = a.permute(0, 2, 1).reshape(b * m.n_heads, n)
    rows_k = k.permute(0, 2, 1).reshape(b * m.n_heads, n - 1)
    y = dense_resolvent_diagonal(rows_a, rows_k, m.causal).reshape(b, m.n_heads, n).permute(0, 2, 1)
    features = torch.cat([y.real, y.imag], dim=-1)  # (B, N, 2H)
    return F.linear(features, m.w_o.weight, m.w_o.bias) * m.bk_scale


def make_mixer(coupling: str = "head", causal: bool = True, n_heads: int = 3, d_model: int = 12,
               **kw) -> BKMixer:
    torch.manual_seed(0)
    m = BKMixer(d_model, n_heads=n_heads, causal=causal, coupling=coupling, v_bias=True, out_bias=True,
                **kw).double()
    with torch.no_grad():  # non-trivial values everywhere so a mis-wired index cannot hide
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


COUPLINGS = ["head", "input"]


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_matches_dense_resolvent(coupling: str, causal: bool) -> None:
    m = make_mixer(coupling, causal, base_diag=-0.5, v_bound=2.0)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, mixer_reference(m, x), rtol=1e-9, atol=1e-10)


CPU_BACKENDS = [b for b in available_backends("cpu") if b != "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_parameter_gradients_match_dense_autograd(backend: str, coupling: str, causal: bool) -> None:
    """End to end through torch.complex(E, eps): the op's z-gradient convention must give the true gradient."""
    m = make_mixer(coupling, causal, base_diag=0.3, backend=backend)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    weight = torch.randn(2, 7, 12, dtype=torch.float64)
    (m(x) * weight).sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (mixer_reference(m, x) * weight).sum().backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-8, atol=1e-10, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize(("b", "n", "h"), [(2, 1, 4), (1, 2, 1), (3, 17, 2)], ids=["B2-N1-H4", "B1-N2-H1", "B3-N17-H2"])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_shapes_float32(b: int, n: int, h: int, coupling: str) -> None:
    m = BKMixer(16, n_heads=h, coupling=coupling)
    out = m(torch.randn(b, n, 16))
    assert out.shape == (b, n, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def future_changed_outputs(m: torch.nn.Module, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs for x and for x with every position after t replaced; returns both."""
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 3.0
    with torch.no_grad():
        return m(x), m(x2)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_causal_mode_is_bit_exact_causal(coupling: str) -> None:
    m = make_mixer(coupling, causal=True)
    x = torch.randn(2, 20, 12, dtype=torch.float64)
    for t in (0, 7, 18):
        y, y2 = future_changed_outputs(m, x, t)
        assert torch.equal(y[:, : t + 1], y2[:, : t + 1]), f"output at <= {t} changed with the future"
        assert not torch.equal(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_bidirectional_mode_is_not_causal(coupling: str) -> None:
    m = make_mixer(coupling, causal=False)
    assert m.causal is False
    x = torch.randn(2, 20, 12, dtype=torch.float64)
    y, y2 = future_changed_outputs(m, x, 7)
    assert (y[:, :8] - y2[:, :8]).abs().max() > 1e-6  # the same check detects the leak


def learned_parts(m: BKMixer) -> dict[str, torch.nn.Parameter]:
    parts = {"v": m.w_v.weight, "z_real": m.z_real, "z_eps": m.eps_param}
    if m.coupling == "input":
        parts |= {"k_weight": m.w_k.weight, "k_bias": m.w_k.bias}
    else:
        parts["k"] = m.k_param
    return parts


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_one_sgd_step_moves_v_k_and_z(coupling: str, causal: bool) -> None:
    m = make_mixer(coupling, causal)
    parts = learned_parts(m)
    before = {name: p.detach().clone() for name, p in parts.items()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    target = torch.randn(2, 10, 12, dtype=torch.float64)
    F.mse_loss(m(x), target).backward()
    for name, p in parts.items():
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient reaches {name}"
    opt.step()
    for name, p in parts.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change after an SGD step"


def test_initial_coupling_shift_and_fixed_options() -> None:
    m = BKMixer(8, n_heads=2, base_coupling=0.7, eps_init=0.5, shift_init=0.25)
    torch.testing.assert_close(F.softplus(m.k_param), torch.full((2,), 0.7))
    torch.testing.assert_close(m.shift(), torch.full((2,), complex(0.25, 0.5)))
    fixed = BKMixer(8, n_heads=1, base_diag=-2.0, learn_coupling=False, learn_z=False, eps_min=0.0)
    assert sorted(n for n, _ in fixed.named_parameters()) == ["bk_scale", "w_o.weight", "w_v.weight"]
    assert fixed.shift().item() == 1j and fixed.k_fixed.item() == 1.0
    inp = BKMixer(8, n_heads=2, coupling="input", base_coupling=0.7)
    LanguageModel(11, 8, 1, mixer=lambda d_model: inp)  # the backbone re-initialises Linear weights ...
    torch.testing.assert_close(F.softplus(inp.w_k.bias.detach()), torch.full((2,), 0.7))  # ... not this bias


def test_state_size_and_backends() -> None:
    m = BKMixer(8, n_heads=3)
    assert m.state_size(16) == m.state_size(4096) == 6  # one complex pivot per head, constant in N
    assert BKMixer(8, n_heads=3, causal=False).state_size(16) == 48
    m(torch.randn(1, 4, 8))
    assert m.backends() == {"bk_core": resolve_backend("auto", torch.device("cpu"))}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"coupling": "pairwise"}, "coupling"),
    ({"coupling": "input", "learn_coupling": False}, "learn_coupling"),
    ({"n_heads": 0}, "n_heads"),
    ({"eps_init": 0.005}, "eps_init"),
    ({"base_coupling": 0.0}, "base_coupling"),
    ({"v_bound": -1.0}, "v_bound"),
    ({"backend": "cuda_magic"}, "valid: auto, "),
])
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BKMixer(8, **kwargs)


def test_bad_input_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="d_model=8"):
        BKMixer(8)(torch.randn(2, 5, 7))


# ---- configs ---------------------------------------------------------------------------------------


def build(overrides: list[str], vocab_size: int = 37) -> LanguageModel:
    """Compose ``conf/model/<name>.yaml`` with its nested ffn group through Hydra and instantiate it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(overrides=overrides)
    return instantiate(cfg.model, vocab_size=vocab_size)


TINY_BK = ["+model=bk", "model.d_model=16", "model.n_layers=2", "model.mixer.n_heads=2"]


def test_bk_config_builds_with_moe_and_switches_to_mlp() -> None:
    model = build(TINY_BK)
    assert model.name == "bk" and model.causal
    assert all(isinstance(b.mixer, BKMixer) and isinstance(b.ffn, MoEFeedForward) for b in model.blocks)
    logits = model(torch.randint(0, 37, (2, 12)))
    assert logits.shape == (2, 12, 37) and torch.isfinite(logits).all()
    assert len(model.aux_losses()) == 2  # one load-balancing loss per MoE layer
    assert model.state_size(12) == model.state_size(1000) == 2 * 2 * 2
    dense = build(TINY_BK + ["model/ffn=mlp"])
    assert all(isinstance(b.ffn, MLP) for b in dense.blocks)


@pytest.mark.parametrize("ffn", ["moe", "mlp"])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_bk_language_model_passes_the_run_time_causality_check(ffn: str, coupling: str) -> None:
    """The spine's bit-exact check (float64, future tokens perturbed at several t) accepts the causal LM."""
    torch.manual_seed(0)
    model = build(TINY_BK + [f"model/ffn={ffn}", f"model.mixer.coupling={coupling}"])
    check_causality(model, torch.randint(0, 37, (2, 40)), vocab_size=37)


def test_bk_seed_is_the_original_layer() -> None:
    model = build(["+model=bk_seed"])
    assert model.name == "bk_seed" and model.d_model == 64 and len(model.blocks) == 4
    assert model.causal
    for block in model.blocks:
        m, ffn = block.mixer, block.ffn
        assert block.parallel and block.norm2 is None  # BK branch beside the FFN on one norm
        assert isinstance(m, BKMixer) and m.n_heads == 1 and m.causal
        assert m.base_diag == -2.0 and m.k_fixed.tolist() == [1.0] and m.shift().tolist() == [1j]
        assert not hasattr(m, "k_param") and not hasattr(m, "eps_param")  # Laplacian and z fixed
        assert isinstance(ffn, MoEFeedForward) and ffn.n_experts == 4 and ffn.top_k == 1
    logits = model(torch.randint(0, 37, (1, 8)))
    assert logits.shape == (1, 8, 37)


def test_bk_seed_causal_passes_and_bidirectional_is_refused_and_leaks() -> None:
    torch.manual_seed(0)
    check_causality(build(["+model=bk_seed"]), torch.randint(0, 37, (2, 24)), vocab_size=37)
    model = build(["+model=bk_seed", "model.mixer.causal=false"])
    assert model.causal is False
    with pytest.raises(CausalityError, match="non-causal mixer"):
        check_causality(model, torch.randint(0, 37, (2, 24)), vocab_size=37)
    # and the refusal is not just a declaration: the bidirectional layer really reads the future
    model = model.double().eval()
    tokens = torch.randint(0, 37, (1, 16))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 37
    with torch.no_grad():
        assert (model(tokens)[:, :8] - model(changed)[:, :8]).abs().max() > 1e-8
