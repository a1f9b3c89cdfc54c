"""Rotary embedding on the joint projection: the numba CPU path and PyTorch's against a float64 oracle written as
complex rotations (values, gradients), position-local results, the fallbacks and bad input."""

from __future__ import annotations

import pytest
import torch

from bkexp.ops.rotary import qkv_heads, resolve_backend
from bkexp.ops.testing import AtenOpRecorder, assert_rel_close

numba_only = pytest.mark.skipif(resolve_backend("auto", "cpu") != "cpu", reason="numba is not installed")
BACKENDS = [pytest.param("cpu", marks=numba_only), "ref"]
CASES = [(2, 33, 4, 64, 0), (1, 5, 2, 7, 9), (3, 17, 1, 16, 3)]  # (batch, n, heads, head_dim, offset); 7: odd


def oracle(qkv, n_heads, offset, base=10000.0):
    """Each pair (x_i, x_{i + hd/2}) as the complex number x_i + j x_{i + hd/2}, times exp(j pos base^(-i/half))."""
    b, n, width = qkv.shape
    hd = width // (3 * n_heads)
    half = hd // 2
    q, k, v = qkv.double().view(b, n, 3, n_heads, hd).permute(2, 0, 3, 1, 4)
    pos = torch.arange(offset, offset + n, dtype=torch.float64)[:, None]
    angle = pos * torch.tensor([base ** (-i / half) for i in range(half)], dtype=torch.float64)
    turn = torch.polar(torch.ones_like(angle), angle)

    def rotate(x):
        z = torch.complex(x[..., :half], x[..., half:2 * half]) * turn
        return torch.cat([z.real, z.imag, x[..., 2 * half:]], dim=-1)

    return rotate(q), rotate(k), v


def run(fn, qkv, dtype):
    leaf = qkv.detach().to(dtype).requires_grad_()
    outs = fn(leaf)
    g = torch.Generator().manual_seed(1)
    (sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)).backward()
    return [o.detach() for o in outs], leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_complex_rotation_oracle(case, dtype, backend) -> None:
    b, n, heads, hd, offset = case
    qkv = torch.randn(b, n, 3 * heads * hd, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs, grad = run(lambda x: qkv_heads(x, heads, offset=offset, backend=backend), qkv, dtype)
    want, want_grad = run(lambda x: oracle(x, heads, offset), qkv, torch.float64)
    # float32 angles (as the model computes them) at positions up to ~40: errors ~ position * 4e-8
    tol = 1e-5 if dtype == torch.float32 else 1e-6
    for name, got, ref in zip("qkv", outs, want):
        assert got.shape == (b, heads, n, hd) and got.dtype == dtype
        assert_rel_close(got, ref, tol, name)
    assert_rel_close(grad, want_grad, tol, "d qkv")


@numba_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_agrees_with_pytorch_to_rounding_and_returns_contiguous_heads(dtype) -> None:
    qkv = torch.randn(2, 40, 3 * 4 * 32, dtype=dtype, requires_grad=True)
    fast = qkv_heads(qkv, 4, offset=3, backend="cpu")
    slow = qkv_heads(qkv, 4, offset=3, backend="ref")
    assert type(fast[0].grad_fn).__name__ == "_QKVHeadsBackward"
    for a, b in zip(fast, slow):
        assert a.is_contiguous()
        assert_rel_close(a, b, 1e-6 if dtype == torch.float32 else 1e-14, "cpu vs ref")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_position_alone_at_its_offset_equals_it_in_the_sequence(backend) -> None:
    """What a decoding step computes (one position, ``offset`` = its index) is bit for bit the full pass's."""
    qkv = torch.randn(3, 24, 3 * 2 * 16)
    full = qkv_heads(qkv, 2, backend=backend)
    for t in (0, 7, 23):
        one = qkv_heads(qkv[:, t:t + 1].clone(), 2, offset=t, backend=backend)
        for a, b in zip(one, full):
            assert torch.equal(a, b[:, :, t:t + 1])


def test_dispatch_modes_bf16_and_autocast_take_pytorch() -> None:
    qkv = torch.randn(2, 6, 3 * 2 * 8, requires_grad=True)
    with AtenOpRecorder() as mode:
        qkv_heads(qkv, 2)
    assert "aten.cat" in mode.ops  # PyTorch's ops ran under the mode, not a numba call
    q16 = qkv_heads(qkv.bfloat16(), 2)[0]
    assert q16.dtype == torch.bfloat16 and type(q16.grad_fn).__name__ == "CatBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(qkv_heads(qkv, 2)[0].grad_fn).__name__ == "CatBackward0"
    assert type(qkv_heads(qkv, 2)[0].grad_fn).__name__ != "CatBackward0" or resolve_backend("auto", "cpu") == "ref"


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"last dimension 30 must be 3 \* n_heads \* head_dim \(n_heads=4\)"):
        qkv_heads(torch.randn(1, 2, 30), 4)
    with pytest.raises(ValueError, match="offset must be an integer >= 0, got -1"):
        qkv_heads(torch.randn(1, 2, 24), 2, offset=-1)
    with pytest.raises(ValueError, match="qkv must be a real floating tensor"):
        qkv_heads(torch.randn(2, 24), 2)
    with pytest.raises(ValueError, match="unknown rotary backend 'gpu'; valid: auto, cpu, ref"):
        qkv_heads(torch.randn(1, 2, 24), 2, backend="gpu")
