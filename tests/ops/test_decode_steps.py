"""Single-step kernels (BK-Core pivot step, selective_state_update) against the parallel float64 references."""

from __future__ import annotations

import pytest
import torch

from bkexp.ops.bk_core import bk_core, bk_core_state, bk_core_step
from bkexp.ops.bk_core.reference import bk_core_reference
from bkexp.ops.selective_scan import available_backends, selective_scan, selective_state_update
from bkexp.ops.selective_scan.reference import selective_scan_reference
from bkexp.ops.testing import assert_rel_close

SHIFTS = {"E0.3-eps0.5": complex(0.3, 0.5), "E-1-eps0.05": complex(-1.0, 0.05)}


def bk_inputs(rows: int, n: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)
    k = (1.5 * torch.rand(rows, n - 1, generator=gen, dtype=torch.float64)).to(dtype)
    return v, k


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("shift", list(SHIFTS))
@pytest.mark.parametrize("n", [1, 2, 97], ids=lambda n: f"N{n}")
def test_bk_steps_match_dense_reference(n: int, shift: str, dtype: torch.dtype, tol: float) -> None:
    z = SHIFTS[shift]
    v, k = bk_inputs(6, n, dtype)
    z_rows = torch.full((6,), z, dtype=torch.complex128)
    ref_re, ref_im = bk_core_reference(v.double(), k.double(), z_rows, causal=True)
    state, outs = None, []
    for t in range(n):
        re, im, state = bk_core_step(v[:, t], k[:, t - 1] if t else None, z, state)
        assert re.dtype == dtype and state.dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
        outs.append(torch.stack([re, im], -1))
    assert_rel_close(torch.stack(outs, 1), torch.stack([ref_re, ref_im], -1), tol, f"steps N={n}")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_bk_steps_continue_a_parallel_prefix(dtype: torch.dtype, tol: float) -> None:
    """State read off a parallel causal output (per-row z, per-row k) + steps == the whole sequence in parallel."""
    v, k = bk_inputs(8, 40, dtype, seed=3)
    z = torch.complex(torch.linspace(-1, 1, 8), torch.linspace(0.05, 1, 8)).to(
        torch.complex128 if dtype == torch.float64 else torch.complex64)
    full_re, full_im = bk_core(v, k, z, causal=True, backend="torch")
    prefix = 25
    re, im = bk_core(v[:, :prefix], k[:, :prefix - 1], z, causal=True, backend="torch")
    state = bk_core_state(re, im)
    steps = []
    for t in range(prefix, 40):
        s_re, s_im, state = bk_core_step(v[:, t], k[:, t - 1], z, state)
        steps.append(torch.stack([s_re, s_im], -1))
    assert_rel_close(torch.stack(steps, 1), torch.stack([full_re, full_im], -1)[:, prefix:], tol, "continued steps")


def test_bk_step_rejects_bad_input() -> None:
    v = torch.randn(3)
    with pytest.raises(ValueError, match="Im\\(z\\) > 0"):
        bk_core_step(v, None, complex(0.0, 0.0), None)
    with pytest.raises(ValueError, match="Im\\(z\\) > 0 for every row"):
        bk_core_step(v, None, torch.tensor([1j, -1j, 1j]), None)
    with pytest.raises(TypeError, match="z must be complex"):
        bk_core_step(v, None, torch.ones(3), None)
    with pytest.raises(ValueError, match="k .* is required"):
        bk_core_step(v, None, 1j, torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="broadcast to v's shape"):
        bk_core_step(v, torch.ones(2, 3), 1j, torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="state must be the complex tensor"):
        bk_core_step(v, 1.0, 1j, torch.ones(3))


def scan_inputs(b: int, d: int, n: int, l: int, grouped: bool, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    BC = (b, 2, n, l) if grouped else (b, n, l)
    return {"u": rand(b, d, l), "delta": rand(b, d, l, scale=0.5) - 1.0,
            "A": (-torch.rand(d, n, generator=gen, dtype=torch.float64) * 2 - 0.1).to(dtype),
            "B": rand(*BC), "C": rand(*BC), "D": rand(d), "z": rand(b, d, l), "delta_bias": rand(d, scale=0.5)}


@pytest.mark.parametrize("backend", [b for b in ("cpu", "ref") if b in available_backends("cpu")])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("grouped", [False, True], ids=["shared", "grouped"])
def test_selective_state_update_continues_a_parallel_scan(grouped: bool, dtype: torch.dtype, tol: float,
                                                          backend: str) -> None:
    """The last state of a parallel prefix (return_last_state) == the state stepped from zero; steps from it ==
    the float64 reference scan over the whole sequence."""
    b, d, n, l, prefix = 2, 6, 4, 90, 70  # 70 positions span three checkpoint chunks of the cpu kernel
    x = scan_inputs(b, d, n, l, grouped, dtype)
    ref = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    head = {k: (v[..., :prefix] if v.dim() >= 3 else v) for k, v in x.items()}
    out, state = selective_scan(**head, delta_softplus=True, return_last_state=True, backend=backend)
    assert state.shape == (b, d, n) and state.dtype == dtype
    assert torch.equal(out, selective_scan(**head, delta_softplus=True, backend=backend))
    walked = torch.zeros(b, d, n, dtype=dtype)
    for t in range(prefix):  # the same state, one step at a time from zero
        selective_state_update(walked, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t],
                               dt_bias=x["delta_bias"], dt_softplus=True)
    assert_rel_close(state, walked, tol, "last state vs stepped state")
    outs = []
    for t in range(prefix, l):
        step = selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                                      x["C"][..., t], x["D"], x["z"][..., t], x["delta_bias"], True)
        assert step.shape == (b, d) and step.dtype == dtype
        outs.append(step)
    assert_rel_close(torch.stack(outs, -1), ref[..., prefix:], tol, "steps after a parallel prefix")


def test_selective_state_update_rejects_bad_shapes() -> None:
    state = torch.zeros(2, 6, 4)
    good = dict(x=torch.randn(2, 6), dt=torch.randn(2, 6), A=-torch.ones(6, 4), B=torch.randn(2, 4),
                C=torch.randn(2, 4))
    with pytest.raises(ValueError, match="x must be \\(batch, d\\)"):
        selective_state_update(state, **{**good, "x": torch.randn(2, 5)})
    with pytest.raises(ValueError, match="B of shape \\(2, 5\\) is invalid"):
        selective_state_update(state, **{**good, "B": torch.randn(2, 5)})
    with pytest.raises(ValueError, match="A must be"):
        selective_state_update(state, **{**good, "A": -torch.ones(6, 3)})
