"""MambaMixer: mamba_ssm's parameter layout, its slow-path forward, causality, dt init, gradients, config build."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from runhelpers import compose_train

from bkexp.models import LanguageModel
from bkexp.models.mixers.mamba import MambaMixer
from bkexp.ops.selective_scan import available_backends
from bkexp.ops.selective_scan.reference import selective_scan_reference
from bkexp.ops.testing import assert_rel_close

BACKENDS = [b for b in ("cpu", "ref") if b in available_backends("cpu")]

# state_dict of mamba_ssm.modules.mamba_simple.Mamba(d_model=64) (d_state 16, d_conv 4, expand 2, so
# d_inner 128 and dt_rank ceil(64/16) = 4), read off its __init__: in_proj = Linear(d_model, 2*d_inner,
# bias=False); conv1d = Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True); x_proj =
# Linear(d_inner, dt_rank + 2*d_state, bias=False); dt_proj = Linear(dt_rank, d_inner, bias=True);
# A_log (d_inner, d_state); D (d_inner,); out_proj = Linear(d_inner, d_model, bias=False).
MAMBA_SSM_STATE_DICT_64 = {
    "in_proj.weight": (256, 64),
    "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,),
    "x_proj.weight": (36, 128),
    "dt_proj.weight": (128, 4),
    "dt_proj.bias": (128,),
    "A_log": (128, 16),
    "D": (128,),
    "out_proj.weight": (64, 128),
}


def mamba_simple_slow_path(m: MambaMixer, hidden_states: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba.forward without causal_conv1d (its fallback branch), line for line, on ``m``'s weights."""
    seqlen = hidden_states.shape[1]
    xz = (m.in_proj.weight @ hidden_states.reshape(-1, m.d_model).t()).reshape(m.d_inner * 2, -1, seqlen)
    xz = xz.permute(1, 0, 2)  # "d (b l) -> b d l"
    A = -torch.exp(m.A_log.float())
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :seqlen])
    x_dbl = m.x_proj(x.transpose(1, 2).reshape(-1, m.d_inner))  # "b d l -> (b l) d"
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (m.dt_proj.weight @ dt.t()).reshape(m.d_inner, -1, seqlen).permute(1, 0, 2)
    B = B.reshape(-1, seqlen, m.d_state).transpose(1, 2)
    C = C.reshape(-1, seqlen, m.d_state).transpose(1, 2)
    y = selective_scan_reference(x, dt, A, B, C, m.D.float(), z=z, delta_bias=m.dt_proj.bias.float(),
                                 delta_softplus=True)
    return m.out_proj(y.transpose(1, 2))


def test_state_dict_names_and_shapes_match_mamba_ssm() -> None:
    m = MambaMixer(64)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_STATE_DICT_64
    assert m.d_inner == 128 and m.dt_rank == 4
    MambaMixer(64, backend="ref").load_state_dict(m.state_dict())  # strict load into a fresh module


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_mamba_simple_slow_path(backend: str) -> None:
    torch.manual_seed(0)
    m = MambaMixer(32, d_state=8, backend=backend).double()
    with torch.no_grad():  # move every parameter away from its init so each one matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 37, 32, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 37, 32)
    assert_rel_close(out, mamba_simple_slow_path(m, x), 1e-12, "block output")
    assert m.backends() == {"selective_scan": backend, "causal_conv1d": "cpu" if backend == "cpu" else "ref"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_bit_exact_float64(backend: str) -> None:
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=4, backend=backend).double()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    base = m(x)
    for j in (0, 1, 3, 17, 29):
        changed = x.clone()
        changed[:, j:] = torch.randn_like(changed[:, j:])
        out = m(changed)
        assert torch.equal(out[:, :j], base[:, :j]), f"outputs before position {j} changed"
        assert not torch.equal(out[:, j], base[:, j])


def test_dt_init_survives_language_model_reinit() -> None:
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=50, d_model=32, n_layers=2, mixer=partial(MambaMixer, d_state=8))
    for block in model.blocks:
        m = block.mixer
        dt = F.softplus(m.dt_proj.bias.detach())
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5), (dt.min(), dt.max())
        assert dt.max() / dt.min() > 10  # log-uniform spread, not a constant left by a zero re-init
        bound = m.dt_rank ** -0.5
        assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.std() > bound / 4  # uniform, not N(0, .02)
        assert torch.equal(m.A_log.detach(), torch.log(torch.arange(1, 9.0)).repeat(m.d_inner, 1))
        assert torch.equal(m.D.detach(), torch.ones(m.d_inner))
        assert m.in_proj.weight.std() < 0.03  # the backbone's normal(0.02) re-init did run elsewhere
        assert m.out_proj.weight.std() < 0.02 / math.sqrt(2 * 2) * 1.2  # residual-out scaling


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=40, d_model=16, n_layers=2, mixer=partial(MambaMixer, d_state=4))
    tokens = torch.randint(0, 40, (2, 24))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name} got a zero gradient"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="numba is not installed")
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-11), (torch.float32, 5e-5)])
def test_fused_kernels_match_pytorch_mixer(dtype, tol) -> None:
    """The numba path (conv + SiLU, then the fused scan with softplus, D and gate) against the all-PyTorch mixer
    (backend=ref): output and every parameter's and the input's gradient, from one float64 ref run."""
    torch.manual_seed(0)
    ref = MambaMixer(40, d_state=8, backend="ref").double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast = MambaMixer(40, d_state=8, backend="cpu").to(dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 70, 40, dtype=torch.float64)
    results = {}
    for name, m in (("ref", ref), ("cpu", fast)):
        leaf = x.to(next(m.parameters()).dtype, copy=True).requires_grad_()
        out = m(leaf)
        (out.double() * torch.cos(torch.arange(out.numel(), dtype=torch.float64)).view_as(out)).sum().backward()
        results[name] = (out.detach(), leaf.grad, {k: p.grad for k, p in m.named_parameters()})
    assert_rel_close(results["cpu"][0], results["ref"][0], tol, "out")
    assert_rel_close(results["cpu"][1], results["ref"][1], tol, "dx")
    for k, grad in results["ref"][2].items():
        assert_rel_close(results["cpu"][2][k], grad, tol, f"d{k}")


def test_split_in_proj_matches_the_module_call_and_keeps_its_hooks() -> None:
    """A plain in_proj runs as two matmuls on its weight halves; the output and every gradient equal the
    ``in_proj(x).chunk(2)`` path (float64), which a module with a forward hook still takes (the hook fires)."""
    torch.manual_seed(0)
    m = MambaMixer(24, d_state=4, bias=True, backend="ref").double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    results = []
    for hooked in (False, True):
        calls = []
        handle = m.in_proj.register_forward_hook(lambda mod, args, out: calls.append(1)) if hooked else None
        m.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        out = m(leaf)
        (out * torch.cos(torch.arange(out.numel(), dtype=torch.float64)).view_as(out)).sum().backward()
        results.append((out.detach(), leaf.grad, m.in_proj.weight.grad, m.in_proj.bias.grad))
        assert len(calls) == (1 if hooked else 0)
        if handle is not None:
            handle.remove()
    for split, joint in zip(*results):
        torch.testing.assert_close(split, joint, rtol=1e-12, atol=1e-14)


def test_state_size_is_constant_in_sequence_length() -> None:
    m = MambaMixer(32, d_state=16, d_conv=4, expand=2)
    assert m.state_size(1) == m.state_size(100_000) == 64 * 16 + 64 * 3


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(dt_min=0.1, dt_max=0.01), "dt_min <= dt_max"),
    (dict(dt_init="xavier"), "unknown dt_init 'xavier'; valid: random, constant"),
    (dict(backend="triton"), "unknown selective_scan backend 'triton'; valid: auto, cuda, cpu, ref"),
    (dict(d_state=0), "d_state must be a positive integer"),
    (dict(dt_rank=0), "dt_rank must be 'auto' or a positive integer"),
])
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MambaMixer(16, **kwargs)


def test_mamba_config_builds_a_causal_language_model(tmp_path) -> None:
    cfg = compose_train(["model=mamba", "model.d_model=16", "model.n_layers=2", "model.mixer.d_state=4"], tmp_path)
    model = instantiate(cfg.model, vocab_size=37)
    assert model.name == "mamba" and model.causal
    assert all(isinstance(b.mixer, MambaMixer) and b.ffn is None for b in model.blocks)
    logits = model(torch.randint(0, 37, (2, 12)))
    assert logits.shape == (2, 12, 37) and torch.isfinite(logits).all()
    assert model.backends() == {"selective_scan": "cpu", "causal_conv1d": "cpu"}


def test_mamba_language_model_passes_the_run_time_causality_check() -> None:
    """The spine's bit-exact check (float64 copy, future tokens perturbed at several t) accepts the Mamba LM."""
    from bkexp.train.causality import check_causality

    torch.manual_seed(0)
    model = LanguageModel(vocab_size=37, d_model=16, n_layers=2, mixer=partial(MambaMixer, d_state=4))
    check_causality(model, torch.randint(0, 37, (2, 40)), vocab_size=37, name="mamba")
