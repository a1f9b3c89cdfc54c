"""Selective scan: the numba CPU path against the sequential float64 reference (values and every gradient)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bkexp.ops.selective_scan import available_backends, resolve_backend, selective_scan
from bkexp.ops.selective_scan.reference import selective_scan_reference
from bkexp.ops.testing import assert_rel_close

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="numba is not installed")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
SHAPES = [(2, 8, 4, 33), (1, 16, 16, 70), (3, 4, 1, 1), (2, 6, 3, 40)]  # (batch, d, n, l); 70 spans three
# checkpoint chunks; odd n (1, 3) takes the backward's single-state loop after its state pairs
OPTIONS = {  # which optional inputs are given, and whether delta goes through softplus
    "full": dict(D=True, z=True, delta_bias=True, delta_softplus=True),
    "bare": dict(D=False, z=False, delta_bias=False, delta_softplus=False),
    "D-softplus": dict(D=True, z=False, delta_bias=False, delta_softplus=True),
    "z-bias": dict(D=False, z=True, delta_bias=True, delta_softplus=False),
}


def make_inputs(b: int, d: int, n: int, l: int, form: str = "shared", *, D: bool = True, z: bool = True,
                delta_bias: bool = True, delta_softplus: bool = True, dtype=torch.float64, seed: int = 0) -> dict:
    """Random inputs in Mamba's ranges: negative A, step sizes around 0.01-1 (positive without softplus)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    delta = rand(b, d, l, scale=0.5) - 1.0 if delta_softplus else rand(b, d, l).abs().to(dtype) * 0.3
    if form == "shared":
        B, C = rand(b, n, l), rand(b, n, l)
    elif form == "grouped":
        groups = 2 if d % 2 == 0 else 1
        B, C = rand(b, groups, n, l), rand(b, groups, n, l)
    elif form == "time-invariant":
        B, C = rand(d, n), rand(d, n)
    else:  # "mixed": time-invariant B, shared C
        B, C = rand(d, n), rand(b, n, l)
    return {
        "u": rand(b, d, l), "delta": delta, "A": -torch.rand(d, n, generator=g, dtype=torch.float64).to(dtype) * 2 - 0.1,
        "B": B, "C": C, "D": rand(d) if D else None, "z": rand(b, d, l) if z else None,
        "delta_bias": rand(d, scale=0.5) if delta_bias else None, "delta_softplus": delta_softplus,
    }


def run_with_grads(inputs: dict, backend: str, dtype=None) -> tuple[torch.Tensor, dict]:
    """Output and the gradients of every tensor input for the loss <out, fixed random weights>."""
    leaves = {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in inputs.items() if torch.is_tensor(v)}
    args = {**inputs, **leaves}
    out = selective_scan(**args, backend=backend)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.to(torch.float64) * weights).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def shape_id(shape: tuple[int, int, int, int]) -> str:
    return "B{}-D{}-N{}-L{}".format(*shape)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cpu_matches_reference_float64(shape, option) -> None:
    inputs = make_inputs(*shape, **OPTIONS[option])
    out, grads = run_with_grads(inputs, "cpu")
    ref_out, ref_grads = run_with_grads(inputs, "ref")
    assert_rel_close(out, ref_out, 1e-12, "out")
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], 1e-11, f"d{name}")


@pytest.mark.parametrize("form", ["shared", "grouped", "time-invariant", "mixed"])
@pytest.mark.parametrize("shape", [(2, 8, 4, 33), (1, 6, 3, 40)], ids=shape_id)
def test_cpu_float32_matches_float64_reference(shape, form) -> None:
    """The float32 kernels (polynomial exp, float32 accumulation) against the float64 oracle."""
    inputs = make_inputs(*shape, form=form)
    out, grads = run_with_grads(inputs, "cpu", dtype=torch.float32)
    ref_out, ref_grads = run_with_grads(inputs, "ref")
    assert out.dtype == torch.float32
    assert_rel_close(out, ref_out, 2e-5, "out")
    for name in NAMES:
        assert_rel_close(grads[name], ref_grads[name], 5e-5, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_mixer_layout_and_softplus_range(dtype) -> None:
    """The Mamba mixer's call: (b, d, l) views of position-major tensors, z a strided half of one projection,
    B/C strided slices of another; delta + bias across softplus' whole range (below exp's underflow, around
    0, past the threshold 20), so the fused vectorised softplus and its slope are checked against torch's.
    The strided views are copied into contiguous position-major order before they reach the kernel."""
    g = torch.Generator().manual_seed(3)
    b, l, d, n, rank = 2, 37, 136, 5, 3  # d = 136: one full CHANNEL_BLOCK (128) of channels and a ragged one

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    xz = rand(b, l, 2 * d)  # in_proj output: x and z halves of one tensor
    proj = rand(b, l, rank + 2 * n)  # x_proj output: (dt, B, C)
    delta = rand(b, l, d, scale=12.0)  # softplus input spans about -40..40 with the bias
    inputs = {
        "u": xz[..., :d].transpose(1, 2), "delta": delta.transpose(1, 2),
        "A": -torch.rand(d, n, generator=g, dtype=torch.float64) * 2 - 0.1,
        "B": proj[..., rank:rank + n].transpose(1, 2), "C": proj[..., rank + n:].transpose(1, 2),
        "D": rand(d), "z": xz[..., d:].transpose(1, 2), "delta_bias": rand(d, scale=3.0), "delta_softplus": True,
    }
    delta[0, :, 0] = -100.0  # exp underflows: softplus is 0 in float32
    delta[1, :, 1] = 60.0  # past the threshold: softplus(x) = x, slope 1
    tol = (2e-5, 5e-5) if dtype == torch.float32 else (1e-12, 1e-11)
    out, grads = run_with_grads(inputs, "cpu", dtype=dtype)
    ref_out, ref_grads = run_with_grads(inputs, "ref")
    assert_rel_close(out, ref_out, tol[0], "out")
    for name in NAMES:
        assert_rel_close(grads[name], ref_grads[name], tol[1], f"d{name}")


def test_cpu_kernels_compile_one_signature_per_dtype_whatever_the_layout() -> None:
    """Position-major, channel-major and strided-half inputs all reach the kernels as contiguous position-major
    arrays, so a dtype never compiles a second signature (each is a ~13 s compile on first use)."""
    import numba

    from bkexp.ops.selective_scan import cpu

    g = torch.Generator().manual_seed(5)
    b, l, d, n = 2, 9, 8, 4
    channel_major = make_inputs(b, d, n, l)
    position_major = {**channel_major, **{k: channel_major[k].transpose(1, 2).contiguous().transpose(1, 2)
                                          for k in ("u", "delta", "z")}}
    xz = torch.randn(b, l, 2 * d, generator=g, dtype=torch.float64)
    strided_half = {**position_major, "u": xz[..., :d].transpose(1, 2), "z": xz[..., d:].transpose(1, 2)}
    for inputs in (position_major, channel_major, strided_half):
        out, grads = run_with_grads(inputs, "cpu")
        ref_out, ref_grads = run_with_grads(inputs, "ref")
        assert_rel_close(out, ref_out, 1e-12, "out")
        for name in grads:
            assert_rel_close(grads[name], ref_grads[name], 1e-11, f"d{name}")
    for kernel in (cpu._scan_forward, cpu._scan_backward):
        float64 = {sig for sig in kernel.overloads if sig[0].dtype == numba.float64}
        assert len(float64) == 1, f"{kernel.py_func.__name__}: {sorted(map(str, float64))}"


def test_reference_matches_closed_form() -> None:
    """The oracle itself against the unrolled sum y_t = sum_s C_t . (prod_{s<r<=t} e^{dt_r A}) dt_s B_s u_s."""
    inputs = make_inputs(2, 3, 2, 6, D=True, z=True, delta_bias=True, delta_softplus=True)
    u, A, B, C, D, z = (inputs[k] for k in ("u", "A", "B", "C", "D", "z"))
    dt = F.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
    expected = torch.zeros_like(u)
    for b in range(u.shape[0]):
        for c in range(u.shape[1]):
            for t in range(u.shape[2]):
                total = 0.0
                for s in range(t + 1):
                    decay = torch.exp(dt[b, c, s + 1 : t + 1].sum() * A[c])  # (n,)
                    total += (C[b, :, t] * decay * dt[b, c, s] * B[b, :, s] * u[b, c, s]).sum()
                expected[b, c, t] = (total + D[c] * u[b, c, t]) * z[b, c, t] * torch.sigmoid(z[b, c, t])
    assert_rel_close(selective_scan_reference(**inputs), expected, 1e-13, "reference")


@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_causal_bit_exact(backend: str) -> None:
    """Changing every input at positions >= j leaves out[..., :j] bit-identical."""
    inputs = make_inputs(2, 8, 4, 40)
    base = selective_scan(**inputs, backend=backend)
    for j in (0, 7, 31, 39):
        changed = dict(inputs)
        for key in ("u", "delta", "z", "B", "C"):
            tensor = changed[key].clone()
            tensor[..., j:] += 1.0 + torch.rand_like(tensor[..., j:])
            changed[key] = tensor
        out = selective_scan(**changed, backend=backend)
        assert torch.equal(out[..., :j], base[..., :j]), f"position < {j} changed"
        assert not torch.equal(out[..., j], base[..., j])


def test_output_dtype_follows_u_and_no_grad_path() -> None:
    inputs = make_inputs(1, 4, 2, 9)
    half = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "z") else v) for k, v in inputs.items()}
    assert selective_scan(**half, backend="cpu").dtype == torch.bfloat16
    with torch.no_grad():
        out = selective_scan(**inputs, backend="cpu")
    assert_rel_close(out, selective_scan_reference(**inputs), 1e-12, "no-grad forward")


def test_non_finite_inputs_propagate() -> None:
    inputs = make_inputs(1, 4, 2, 9)
    inputs["u"][0, 1, 3] = math.nan
    out = selective_scan(**inputs, backend="cpu")
    assert torch.isnan(out[0, 1, 3:]).all() and torch.isfinite(out[0, 1, :3]).all()
    assert torch.isfinite(out[0, 0]).all()


def test_float32_exp_in_the_scan_kernels_is_accurate_and_handles_extremes() -> None:
    """The scan's in-register float32 exp (``_exp``, compiled with the kernels' fast-math flags, which it takes
    when inlined) is within 4e-7 relative of float64 exp, flushes below e^-87.3 to 0, overflows to inf, keeps
    NaN; the array version (``_exp_into``) within 1e-7 (it compiles without reassociation)."""
    import numpy as np
    from numba import njit

    from bkexp.ops.selective_scan.cpu import _FASTMATH, _exp, _exp_into

    @njit(fastmath=_FASTMATH)
    def scalar(x, out):
        for i in range(x.size):
            out[i] = _exp(x[i])

    @njit(fastmath=_FASTMATH)
    def array(x, out):
        _exp_into(x, out, np.empty(x.size, np.int32))

    x = np.concatenate([np.linspace(-90, 90, 200_001, dtype=np.float32),
                        np.array([0.0, -0.0, -1e-30, 88.7, 89.0, -87.4, -104.0, -np.inf, np.inf, np.nan],
                                 np.float32)])
    exact = np.exp(x.astype(np.float64))
    finite = (exact > 2.0 ** -126) & (x < 88.0)  # above 127 ln 2 = 88.03 the kernels return inf
    for fn, tol in ((scalar, 4e-7), (array, 1e-7)):
        got = np.empty_like(x)
        fn(x, got)
        assert np.max(np.abs(got[finite] / exact[finite] - 1)) < tol, fn
        assert np.all(got[x < -87.34] == 0) and np.all(np.isposinf(got[x > 88.73])), fn
        assert np.isnan(got[-1]) and got[-3] == 0, fn


def test_backend_resolution() -> None:
    assert resolve_backend("auto", "cpu") == "cpu"
    assert available_backends("cpu")[-2:] == ["cpu", "ref"]
    with pytest.raises(ValueError, match="unknown selective_scan backend 'triton'; valid: auto, cuda, cpu, ref"):
        resolve_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
        resolve_backend("cuda", "cpu")


@pytest.mark.parametrize(("change", "match"), [
    (dict(delta=torch.zeros(2, 8, 32)), r"delta must be .* shaped like u \(2, 8, 33\)"),
    (dict(A=torch.zeros(7, 4)), r"A must be \(d, n\) = \(8, n\), got \(7, 4\)"),
    (dict(A=torch.zeros(8, 4, dtype=torch.complex64)), "complex A"),
    (dict(B=torch.zeros(2, 3, 4, 33)), r"B of shape \(2, 3, 4, 33\) is invalid; valid: .*d % g == 0"),
    (dict(C=torch.zeros(2, 5, 33)), r"C of shape \(2, 5, 33\) is invalid"),
    (dict(D=torch.zeros(9)), r"D must be None or a \(8,\) tensor, got \(9,\)"),
    (dict(z=torch.zeros(2, 8)), r"z must be None or shaped like u"),
    (dict(u=torch.zeros(2, 8, 33, dtype=torch.int64)), "u must be a real floating tensor"),
])
def test_bad_inputs_are_rejected(change: dict, match: str) -> None:
    inputs = make_inputs(2, 8, 4, 33, dtype=torch.float32)
    inputs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        selective_scan(**inputs, backend="cpu")
