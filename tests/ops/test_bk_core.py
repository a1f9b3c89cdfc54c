"""BK-Core backends against the float64 dense reference: values, gradients, causality, edge cases, dtypes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bkexp.ops.bk_core as bk
from bkexp.ops import backends
from bkexp.ops.bk_core import BACKENDS, available_backends, bk_core, resolve_backend
from bkexp.ops.bk_core.reference import bk_core_reference, dense_matrix
from bkexp.ops.testing import as_real, assert_rel_close, rel_err

FAST_BACKENDS = [b for b in available_backends("cpu") if b != "reference"]
MODES = {"causal": True, "bidir": False}
SHIFTS = {"E0.3-eps0.5": complex(0.3, 0.5), "E-1-eps0.05": complex(-1.0, 0.05), "E2-eps1": complex(2.0, 1.0)}
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run these small ops on one thread: on a shared 2-core box, intra-op threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(batch: int, heads: int, n: int, *, seed: int = 0, dtype=torch.float32, z=0.3 + 0.5j,
                per_row_z: bool = False):
    """v (B, H, N) ~ N(0, 1); k (B, H, N-1) ~ U(0, 1.5), non-constant; z scalar or per-row complex tensor."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, heads, n, generator=gen, dtype=torch.float64).to(dtype)
    k = (1.5 * torch.rand(batch, heads, n - 1, generator=gen, dtype=torch.float64)).to(dtype)
    if per_row_z:
        real = z.real + 0.5 * torch.randn(batch, heads, generator=gen, dtype=torch.float64)
        imag = z.imag * (1.0 + torch.rand(batch, heads, generator=gen, dtype=torch.float64))
        z = torch.complex(real, imag).to(torch.complex128 if dtype == torch.float64 else torch.complex64)
    return v, k, z


def pair(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    return torch.stack([re.double(), im.double()], dim=-1)


def reference_rows(v, k, z, causal):
    """Float64 dense reference on (B, H, N) inputs, shaped like v."""
    b, h, n = v.shape
    z_t = z if isinstance(z, torch.Tensor) else torch.full((b, h), z, dtype=torch.complex128)
    re, im = bk_core_reference(v.reshape(b * h, n).double(), k.reshape(b * h, n - 1).double(),
                               z_t.reshape(b * h).to(torch.complex128), causal)
    return re.reshape(v.shape), im.reshape(v.shape)


_REFERENCE_CACHE: dict = {}


def cached_reference(n, z_name, causal):
    key = (n, z_name, causal)
    if key not in _REFERENCE_CACHE:
        v, k, z = make_inputs(1, 2, n, seed=n, z=SHIFTS[z_name])
        _REFERENCE_CACHE[key] = reference_rows(v, k, z, causal)
    return _REFERENCE_CACHE[key]


# ----------------------------------------------------------------------------------------------------
# The reference itself: dense bordering agrees with explicit inverses of every leading block.


@pytest.mark.parametrize("n", [1, 2, 7])
def test_reference_causal_is_last_diagonal_entry_of_leading_block_inverses(n):
    v, k, z = make_inputs(1, 3, n, dtype=torch.float64, z=complex(0.2, 0.3))
    A = dense_matrix(v.reshape(3, n), k.reshape(3, n - 1), torch.full((3,), z, dtype=torch.complex128))
    expected = torch.stack([torch.linalg.inv(A[:, : i + 1, : i + 1])[:, i, i] for i in range(n)], dim=-1)
    re, im = bk_core_reference(v.reshape(3, n), k.reshape(3, n - 1), torch.full((3,), z, dtype=torch.complex128),
                               causal=True)
    assert_rel_close(pair(re, im), as_real(expected), 1e-12, "bordering vs per-block inverse")
    # and the off-diagonal convention: only the product k_i = A[i,i+1] * A[i+1,i] enters
    if n > 1:
        prod = A[:, :-1, 1:].diagonal(dim1=-2, dim2=-1) * A[:, 1:, :-1].diagonal(dim1=-2, dim2=-1)
        assert_rel_close(prod.real, k.reshape(3, n - 1), 0.0, "k is the product of the off-diagonals")


# ----------------------------------------------------------------------------------------------------
# Forward values


FORWARD_CASES = [(n, z) for n in (1, 2, 3, 17, 64, 130) for z in SHIFTS] + [(512, "E-1-eps0.05")]


@pytest.mark.parametrize(("n", "z_name"), FORWARD_CASES, ids=[f"B1-H2-N{n}-{z}" for n, z in FORWARD_CASES])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_forward_matches_dense_reference_float32(backend, mode, n, z_name):
    v, k, z = make_inputs(1, 2, n, seed=n, z=SHIFTS[z_name])
    ref_re, ref_im = cached_reference(n, z_name, MODES[mode])
    re, im = bk_core(v, k, z, causal=MODES[mode], backend=backend)
    assert re.dtype == im.dtype == torch.float32 and re.shape == v.shape
    assert_rel_close(pair(re, im), pair(ref_re, ref_im), 1e-5, f"{backend} {mode} N={n} {z_name}")


# ----------------------------------------------------------------------------------------------------
# Gradients


def _weighted_loss(re, im, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w_re = torch.randn(re.shape, generator=gen, dtype=torch.float64)
    w_im = torch.randn(im.shape, generator=gen, dtype=torch.float64)
    return (re.double() * w_re).sum() + (im.double() * w_im).sum()


def _grads(backend, v, k, z, causal):
    v = v.clone().requires_grad_()
    k = k.clone().requires_grad_()
    z = z.clone().requires_grad_()
    if backend == "reference-dense":
        re, im = reference_rows(v, k, z, causal)
    else:
        re, im = bk_core(v, k, z, causal=causal, backend=backend)
    return torch.autograd.grad(_weighted_loss(re, im), (v, k, z), materialize_grads=True)


@pytest.mark.parametrize("z_name", ["E0.3-eps0.5", "E-1-eps0.05"])
@pytest.mark.parametrize("n", [1, 2, 5, 70], ids=lambda n: f"B2-H3-N{n}")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradients_match_dense_reference_autograd(backend, mode, n, z_name):
    v, k, z = make_inputs(2, 3, n, seed=10 + n, z=SHIFTS[z_name], per_row_z=True)
    expected = _grads("reference-dense", v.double(), k.double(), z.to(torch.complex128), MODES[mode])
    actual = _grads(backend, v, k, z, MODES[mode])
    for name, a, e in zip("vkz", actual, expected):
        assert a.shape == e.shape, name
        assert_rel_close(as_real(a), as_real(e), 1e-4, f"{backend} {mode} N={n} d/d{name}")


@pytest.mark.parametrize("layout", ["plane-view", "4d-plane-view", "strided"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradients_in_every_layout(backend, mode, layout):
    # The plane kernels convert layouts inside their autograd Functions: the gradients must come back in the
    # caller's layout, for a mixer's transposed view, a 4-D batch of such views and a strided gather.
    b, h, n = 2, 3, 11
    gen = torch.Generator().manual_seed(3)
    if layout == "plane-view":
        v = torch.randn(b, n, h, generator=gen).transpose(1, 2)
        k = torch.rand(b, n - 1, h, generator=gen).transpose(1, 2)
    elif layout == "4d-plane-view":
        v = torch.randn(2, b, n, h, generator=gen).transpose(-1, -2)
        k = torch.rand(2, b, n - 1, h, generator=gen).transpose(-1, -2)
    else:
        v = torch.randn(b, h, 2 * n, generator=gen)[..., ::2]
        k = torch.rand(b, h, 2 * (n - 1), generator=gen)[..., ::2]
    z = torch.complex(0.3 * torch.randn(v.shape[:-1], generator=gen), 0.2 + torch.rand(v.shape[:-1], generator=gen))
    expected = _grads("reference", v.double(), k.double(), z.to(torch.complex128), MODES[mode])  # rows path, float64
    actual = _grads(backend, v, k, z, MODES[mode])
    for name, a, e in zip("vkz", actual, expected):
        assert a.shape == e.shape, name
        assert_rel_close(as_real(a), as_real(e), 1e-4, f"{backend} {mode} {layout} d/d{name}")


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of (B, H, L) ``t`` in a given memory layout: contiguous rows, the transpose of contiguous
    planes (a mixer's), every other element of a wider tensor, or (gradients only) broadcast along L."""
    if layout == "rows":
        return t.contiguous()
    if layout == "planes":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t[..., :1].expand(t.shape)


# B, H, N: 66 rows = eight whole 8 x 8 transpose blocks and 2 rows left, 70 positions = a full and a partial
# chunk (64); 300 rows = two jobs of the causal kernels (152 + 148 rows, ragged blocks), 77 positions.
LAYOUT_SHAPES = [(2, 66, 70), (1, 300, 77)]
_LAYOUT_CASES = [(lv, lk, lg) for lv in ("rows", "planes", "strided") for lk in ("rows", "planes")
                 for lg in ("rows", "planes", "strided", "broadcast")]


def _layout_run(v, k, z, g_re, g_im, causal):
    v, k, z = (t.clone().requires_grad_() if t.is_complex() else t.detach().requires_grad_() for t in (v, k, z))
    re, im = bk_core(v, k, z, causal=causal, backend="cpu")
    return (re, im, *torch.autograd.grad((re, im), (v, k, z), (g_re, g_im))), (v, k)


@pytest.fixture(scope="module", params=LAYOUT_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def layout_base(request):
    b, h, n = request.param
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(b, h, n, generator=gen)
    k = 1.5 * torch.rand(b, h, n - 1, generator=gen)
    z = torch.complex(0.3 * torch.randn(b, h, generator=gen), 0.2 + torch.rand(b, h, generator=gen))
    g = torch.randn(2, b, h, n, generator=gen)
    return v, k, z, g


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="needs numba")
@pytest.mark.parametrize("mode", list(MODES))
def test_cpu_kernels_give_the_same_bits_in_every_layout(layout_base, mode):
    """Inputs and output gradients in every layout combination: outputs and input gradients bit-identical to
    the mixer's layout (rows only move through cache, the arithmetic is the same), and outputs and gradients
    come back as the transposes of contiguous planes, whatever the inputs' layout."""
    v, k, z, g = layout_base
    causal = MODES[mode]
    base, _ = _layout_run(_in_layout(v, "planes"), _in_layout(k, "planes"), z, g[0], g[1], causal)
    for lv, lk, lg in _LAYOUT_CASES:
        grads = [_in_layout(t, lg) for t in g]
        if lg == "broadcast":
            want, _ = _layout_run(_in_layout(v, "planes"), _in_layout(k, "planes"), z,
                                  *(t.contiguous() for t in grads), causal)
        else:
            want = base
        got, (vv, kk) = _layout_run(_in_layout(v, lv), _in_layout(k, lk), z, *grads, causal)
        for name, a, e in zip(("re", "im", "dv", "dk", "dz"), got, want):
            assert torch.equal(a, e), f"{mode} v {lv}, k {lk}, grad {lg}: {name} differs"
        for name, t in zip(("re", "im", "dv", "dk"), got if lv != "strided" else ()):  # planes, as a mixer's
            assert t.transpose(1, 2).is_contiguous(), f"{mode} v {lv}, k {lk}, grad {lg}: {name} not planes"


@pytest.mark.skipif("cpu" not in FAST_BACKENDS, reason="needs numba")
def test_cpu_output_pool_reuses_only_memory_nothing_holds(monkeypatch):
    """The cpu kernels reuse large outputs' memory (fresh pages cost a page fault and zeroing each): never an
    output that a tensor or view still holds, and reused memory gives the same values and gradients."""
    from bkexp.ops import workspace

    monkeypatch.setattr(workspace, "POOL_MIN_BYTES", 0)  # pool every output of this small case
    monkeypatch.setattr(workspace, "_pool", [])
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(2, 64, 40, generator=gen).requires_grad_()
    k = torch.rand(2, 64, 39, generator=gen)
    z = torch.complex(torch.randn(2, 64, generator=gen), 0.1 + torch.rand(2, 64, generator=gen))
    g = torch.randn(2, 2, 64, 40, generator=gen)

    def run():
        re, im = bk_core(v, k, z, backend="cpu")
        (dv,) = torch.autograd.grad((re, im), (v,), (g[0], g[1]))
        return re, im, dv

    first = run()
    kept = [t.clone() for t in first]
    second = run()  # first's outputs are held: second gets other memory
    assert not {t.data_ptr() for t in first} & {t.data_ptr() for t in second}
    ptrs = {t.data_ptr() for t in second}
    view = second[0][:, :3]  # a view holds its output
    del second
    third = run()
    assert view.data_ptr() not in {t.data_ptr() for t in third}
    assert not {t.data_ptr() for t in first} & {t.data_ptr() for t in third}
    for a, b, c in zip(first, kept, third):
        assert torch.equal(a, b) and torch.equal(c, b)  # held outputs untouched, reused memory same values
    del view, third
    fourth = run()
    assert len({t.data_ptr() for t in fourth} & ptrs) >= 2  # freed memory is taken again


@pytest.mark.parametrize("mode", list(MODES))
def test_layout_case_matches_the_dense_reference(layout_base, mode):
    """The rows the layout test compares (block and chunk edges) against the float64 dense reference."""
    v, k, z, g = layout_base
    causal = MODES[mode]
    backend = "cpu" if "cpu" in FAST_BACKENDS else "torch"
    got, _ = _layout_run(_in_layout(v, "rows"), _in_layout(k, "planes"), z, g[0], g[1], causal)
    h = v.shape[1]
    rows = [r for r in (0, 31, 63, 64, 65, 151, 152, h - 1) if r < h]  # the last batch: block edges, last row
    sub = [t[-1:, rows] for t in (v, k, z, g[0], g[1])]
    vd, kd, zd = (t.double() if not t.is_complex() else t.to(torch.complex128) for t in sub[:3])
    vd, kd, zd = (t.clone().requires_grad_() for t in (vd, kd, zd))
    re, im = reference_rows(vd, kd, zd, causal)
    want = (re, im, *torch.autograd.grad((re, im), (vd, kd, zd), (sub[3].double(), sub[4].double())))
    for name, a, e in zip(("re", "im", "dv", "dk", "dz"), got, want):
        assert_rel_close(as_real(a[-1:, rows]), as_real(e), 1e-4, f"{backend} {mode} {name}")


def test_exact_gradient_differs_from_diagonal_only_shortcut():
    """The shortcut dv_i = -Re(g_i y_i^2) drops the G_ij G_ji terms; the true gradient is far from it."""
    v, k, z = make_inputs(1, 4, 32, dtype=torch.float64, z=complex(0.1, 0.2))
    v.requires_grad_()
    re, im = bk_core(v, k, z, backend="torch")
    g_re, g_im = torch.randn_like(re), torch.randn_like(im)
    (dv,) = torch.autograd.grad((re * g_re + im * g_im).sum(), v)
    y = torch.complex(re, im).detach()
    shortcut = -(torch.complex(g_re, -g_im) * y * y).real
    assert rel_err(shortcut, dv) > 0.2


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", ["torch", "torch_autograd", "cpu"])
def test_gradcheck_float64(backend, mode):
    if backend not in FAST_BACKENDS:
        pytest.skip(f"{backend} unavailable")
    v, k, z = make_inputs(1, 2, 6, dtype=torch.float64, z=complex(0.3, 0.4), per_row_z=True)
    inputs = (v.requires_grad_(), k.requires_grad_(), z.requires_grad_())

    def fn(v_, k_, z_):
        return bk_core(v_, k_, z_, causal=MODES[mode], backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_causal_outputs_before_a_change_are_bit_identical(backend):
    n, j = 40, 23
    v, k, z = make_inputs(2, 3, n, seed=3)
    re0, im0 = bk_core(v, k, z, backend=backend)
    v2, k2 = v.clone(), k.clone()
    v2[..., j] += 1.7
    k2[..., j:] *= 3.0  # k_j couples j and j+1: also in the future of every i <= j
    re1, im1 = bk_core(v2, k2, z, backend=backend)
    assert torch.equal(re0[..., :j], re1[..., :j]) and torch.equal(im0[..., :j], im1[..., :j])
    assert not torch.equal(re0[..., j], re1[..., j])  # the change does reach position j


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bidirectional_sees_the_future(backend):
    v, k, z = make_inputs(1, 2, 20, seed=4)
    re0, _ = bk_core(v, k, z, causal=False, backend=backend)
    v2 = v.clone()
    v2[..., 15] += 1.0
    re1, _ = bk_core(v2, k, z, causal=False, backend=backend)
    assert (re0[..., :15] - re1[..., :15]).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------------
# Large N: backends agree with each other and stay bounded (the dense reference is too slow here)


@pytest.mark.parametrize("mode", list(MODES))
def test_backends_agree_at_n4096_and_stay_bounded(mode):
    eps = 0.05
    v, k, z = make_inputs(1, 4, 4096, seed=5, z=complex(0.5, eps))
    gen = torch.Generator().manual_seed(6)
    g_re, g_im = torch.randn(v.shape, generator=gen), torch.randn(v.shape, generator=gen)

    def run(backend, dtype):
        vv = v.to(dtype).requires_grad_()
        kk = k.to(dtype).requires_grad_()
        re, im = bk_core(vv, kk, z, causal=MODES[mode], backend=backend)
        dv, dk = torch.autograd.grad((re * g_re.to(dtype) + im * g_im.to(dtype)).sum(), (vv, kk))
        return re.detach(), im.detach(), dv, dk

    # float64 O(N) recurrence as the yardstick
    ref = run("torch", torch.float64)
    for backend in FAST_BACKENDS:
        out = run(backend, torch.float32)
        re, im = out[0], out[1]
        # |y_i| <= 1/eps in both modes: Im(L_i), Im(R_i) <= -eps, so Im(L_i + R_i - a_i) <= -eps as well
        assert torch.isfinite(re).all() and torch.isfinite(im).all()
        assert torch.complex(re, im).abs().max() <= 1 / eps * (1 + 1e-5)
        for name, a, e in zip(("Re y", "Im y", "dv", "dk"), out, ref):
            tol = 1e-5 if name.endswith("y") else 1e-4
            assert_rel_close(a, e, tol, f"{backend} {mode} N=4096 {name}")


# ----------------------------------------------------------------------------------------------------
# Shapes, layouts, broadcasting, edge cases


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_layouts_broadcasts_and_per_row_shift(backend):
    b, h, n = 2, 3, 9
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(b, n, h, generator=gen)
    v_transposed = base.transpose(1, 2)  # position-major storage, as a mixer's projection produces
    v_contig = v_transposed.contiguous()
    v_strided = torch.randn(b, h, 2 * n, generator=gen)[..., ::2]  # non-contiguous last dim
    z_rows = torch.complex(torch.randn(b, h, generator=gen), 0.2 + torch.rand(b, h, generator=gen))
    k_row = torch.rand(b, h, 1, generator=gen)
    for v in (v_transposed, v_contig, v_strided):
        expected = bk_core(v.contiguous(), k_row.expand(b, h, n - 1).contiguous(), z_rows, backend="reference")
        got = bk_core(v, k_row, z_rows, backend=backend)
        for a, e in zip(got, expected):
            assert a.shape == v.shape
            assert_rel_close(a, e, 1e-5, f"{backend} per-row k, layout strides {v.stride()}")
    # scalar k and scalar z broadcast to every row
    expected = bk_core(v_contig, torch.full((b, h, n - 1), 0.7), torch.full((b, h), 0.1 + 0.3j), backend="reference")
    got = bk_core(v_contig, 0.7, 0.1 + 0.3j, backend=backend)
    for a, e in zip(got, expected):
        assert_rel_close(a, e, 1e-5, f"{backend} scalar k and z")


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_one_dimensional_input_and_small_n(backend):
    for n in (1, 2):
        v = torch.tensor([0.3, -0.2][:n])
        re, im = bk_core(v, torch.tensor([0.5][: n - 1]), 0.1 + 0.4j, backend=backend)
        a = torch.tensor([0.3 - 0.1 - 0.4j, -0.2 - 0.1 - 0.4j][:n], dtype=torch.complex128)
        if n == 1:
            expected = 1 / a
        else:  # causal: y_0 = 1/a_0, y_1 = 1/(a_1 - k/a_0)
            expected = torch.stack([1 / a[0], 1 / (a[1] - 0.5 / a[0])])
        assert_rel_close(pair(re, im), as_real(expected), 1e-6, f"{backend} N={n}")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_empty_batch(backend, mode):
    v = torch.randn(0, 3, 8, requires_grad=True)
    k = torch.rand(0, 3, 7, requires_grad=True)
    re, im = bk_core(v, k, 0.2 + 0.5j, causal=MODES[mode], backend=backend)
    assert re.shape == im.shape == (0, 3, 8)
    (re.sum() + im.sum()).backward()
    assert v.grad is not None and v.grad.shape == v.shape


def test_nonpositive_eps_is_rejected_with_the_value():
    v, k, _ = make_inputs(1, 2, 5)
    for z in (0.5 + 0.0j, 0.5 - 0.1j, 1.0):
        with pytest.raises(ValueError, match=r"Im\(z\) > 0"):
            bk_core(v, k, z)
    z_rows = torch.tensor([[0.1 + 0.2j, 0.3 - 0.05j]], dtype=torch.complex64)
    with pytest.raises(ValueError, match="-0.05"):
        bk_core(v, k, z_rows)
    with pytest.raises(TypeError, match="complex"):
        bk_core(v, k, torch.ones(1, 2))


def test_bad_shapes_and_backend_names_are_rejected():
    v, k, z = make_inputs(1, 2, 5)
    with pytest.raises(ValueError, match="does not broadcast"):
        bk_core(v, torch.rand(1, 2, 5), z)
    with pytest.raises(ValueError, match="does not broadcast"):
        bk_core(v, k, torch.full((3,), z))
    with pytest.raises(ValueError, match="N >= 1"):
        bk_core(torch.zeros(2, 0), torch.zeros(2, 0), z)
    with pytest.raises(ValueError, match="valid: auto, reference, torch"):
        bk_core(v, k, z, backend="cuda")
    with pytest.raises(ValueError, match="valid"):
        resolve_backend("numba", "cpu")


def test_backend_resolution_and_install_hints(monkeypatch, caplog):
    assert set(available_backends("cpu")) >= {"reference", "torch", "torch_autograd"}
    assert resolve_backend("auto", "cpu") == ("cpu" if "cpu" in available_backends("cpu") else "torch")
    assert "triton" not in available_backends("cuda") or backends.module_available("triton")
    with pytest.raises(RuntimeError, match="CPU tensors"):
        resolve_backend("cpu", "cuda")
    if not bk._triton_interpreted():
        with pytest.raises(RuntimeError, match="pip install triton"):
            resolve_backend("triton", "cpu")
    # Without numba, auto falls back to torch and says so; asking for cpu explains how to install it.
    real_available = backends.module_available
    monkeypatch.setattr(backends, "module_available", lambda name: name != "numba" and real_available(name))
    backends._logged.clear()
    with caplog.at_level(logging.WARNING, logger="bkexp.ops.backends"):
        assert resolve_backend("auto", "cpu") == "torch"
    assert "using torch" in caplog.text and "pip install numba" in caplog.text
    with pytest.raises(RuntimeError, match="pip install numba"):
        resolve_backend("cpu", "cpu")
    assert BACKENDS == ("reference", "torch", "torch_autograd", "cpu", "triton")
    from bkexp.ops.selective_scan import resolve_backend as resolve_scan  # the same numba check, one place

    with pytest.raises(RuntimeError, match="selective_scan backend 'cpu' unavailable: .*pip install numba"):
        resolve_scan("cpu", "cpu")


# ----------------------------------------------------------------------------------------------------
# Dtype contract: float32 compute, output in the input's dtype (bf16/fp16 under autocast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_low_precision_inputs_compute_in_float32(backend, dtype):
    v, k, z = make_inputs(2, 2, 33, seed=8)
    v_low = v.to(dtype).requires_grad_()
    re, im = bk_core(v_low, k, z, backend=backend)
    assert re.dtype == im.dtype == dtype
    re32, im32 = bk_core(v_low.detach().float(), k, z, backend="reference")
    # float32 compute then one rounding to the output dtype
    assert_rel_close(re.float(), re32.to(dtype).float(), 1e-2, f"{backend} {dtype} Re")
    assert_rel_close(im.float(), im32.to(dtype).float(), 1e-2, f"{backend} {dtype} Im")
    (re.float().sum() + im.float().sum()).backward()
    assert v_low.grad.dtype == dtype and torch.isfinite(v_low.grad.float()).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_autocast_bf16_linear_feeds_the_operator(backend):
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 4)
    x = torch.randn(2, 12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = proj(x).transpose(1, 2)  # (B, H, N) view of a position-major bf16 tensor
        assert v.dtype == torch.bfloat16
        re, im = bk_core(v, 0.5, 0.2 + 0.5j, backend=backend)
    assert re.dtype == im.dtype == torch.bfloat16
    expected = bk_core(v.detach().float(), 0.5, 0.2 + 0.5j, backend="reference")
    assert_rel_close(re.float(), expected[0], 1e-2, "autocast Re")
    (re.float().square().sum() + im.float().square().sum()).backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()


# ----------------------------------------------------------------------------------------------------
# Triton: on CPU only through the interpreter, which must be switched on before triton is imported,
# so these checks run in a fresh interpreter process at tiny sizes.

_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from bkexp.ops.bk_core import bk_core
    from bkexp.ops.bk_core.reference import bk_core_reference
    from bkexp.ops.testing import as_real, rel_err
    results = {}
    gen = torch.Generator().manual_seed(0)
    for causal in (True, False):
        for n in (1, 2, 5, 37):
            b, h = 2, 3
            v = torch.randn(b, n, h, generator=gen).transpose(1, 2).requires_grad_()
            k = (1.5 * torch.rand(b, h, n - 1, generator=gen)).requires_grad_()
            z = torch.complex(0.3 * torch.randn(b, h, generator=gen), 0.05 + torch.rand(b, h, generator=gen))
            z.requires_grad_()
            w = torch.randn(2, b, h, n, generator=gen, dtype=torch.float64)
            def loss(re, im):
                return (re.double() * w[0]).sum() + (im.double() * w[1]).sum()
            re, im = bk_core(v, k, z, causal=causal, backend="triton")
            got = [re, im, *torch.autograd.grad(loss(re, im), (v, k, z), materialize_grads=True)]
            vd, kd, zd = (t.detach().double().requires_grad_() if not t.is_complex()
                          else t.detach().to(torch.complex128).requires_grad_() for t in (v, k, z))
            rr, ri = bk_core_reference(vd.reshape(b * h, n), kd.reshape(b * h, n - 1), zd.reshape(b * h), causal)
            rr, ri = rr.reshape(b, h, n), ri.reshape(b, h, n)
            exp = [rr, ri, *torch.autograd.grad(loss(rr, ri), (vd, kd, zd), materialize_grads=True)]
            results[f"{'causal' if causal else 'bidir'}-N{n}"] = [rel_err(as_real(a), as_real(e)) for a, e in zip(got, exp)]
    # causality of the chunked kernel: positions before j are bit-identical
    v, k, z = torch.randn(1, 2, 30, generator=gen), torch.rand(1, 2, 29, generator=gen), 0.2 + 0.3j
    re0, im0 = bk_core(v, k, z, backend="triton")
    v2 = v.clone(); v2[..., 20] += 1.0
    re1, im1 = bk_core(v2, k, z, backend="triton")
    results["causal_bit_identical"] = bool(torch.equal(re0[..., :20], re1[..., :20]) and torch.equal(im0[..., :20], im1[..., :20]))
    print("RESULT " + json.dumps(results))
    """
)


@pytest.mark.skipif(not backends.module_available("triton"), reason="triton not installed")
def test_triton_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    assert results.pop("causal_bit_identical") is True
    for case, errs in results.items():
        assert max(errs[:2]) <= 1e-5, f"triton {case} forward rel err {errs[:2]}"
        assert max(errs[2:]) <= 1e-4, f"triton {case} gradient rel err {errs[2:]}"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_triton_on_gpu_matches_reference_and_cpu_at_scale(mode):
    v, k, z = make_inputs(2, 4, 300, seed=9, z=complex(0.2, 0.05), per_row_z=True)
    expected = _grads("reference-dense", v.double(), k.double(), z.to(torch.complex128), MODES[mode])
    actual = _grads("triton", v.cuda(), k.cuda(), z.cuda(), MODES[mode])
    for name, a, e in zip("vkz", actual, expected):
        assert_rel_close(as_real(a.cpu()), as_real(e), 1e-4, f"triton gpu {mode} d/d{name}")
    big = make_inputs(8, 256, 8192, seed=10, z=complex(0.5, 0.05))
    ref = bk_core(*big, causal=MODES[mode], backend="torch")
    got = bk_core(big[0].cuda(), big[1].cuda(), big[2], causal=MODES[mode], backend="triton")
    for a, e in zip(got, ref):
        assert_rel_close(a.cpu(), e, 1e-4, f"triton gpu {mode} N=8192 vs torch")
