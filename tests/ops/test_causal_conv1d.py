"""Causal depthwise conv1d: the numba CPU path and the PyTorch path against ``F.conv1d`` in float64 (values, gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bkexp.ops.causal_conv1d import causal_conv1d, resolve_backend
from bkexp.ops.testing import assert_rel_close

numba_only = pytest.mark.skipif(resolve_backend("auto", "cpu") != "cpu", reason="numba is not installed")

CASES = [  # (batch, d, l, width, activation, bias)
    (2, 10, 37, 4, "silu", True),
    (1, 136, 130, 4, "silu", False),  # 130 positions: two full 64-position work items and a ragged one
    (3, 7, 5, 3, None, True),
    (2, 16, 2, 4, "swish", True),  # fewer positions than taps
    (2, 9, 70, 1, "silu", True),  # a single tap
]


def conv_oracle(x, weight, bias, activation):
    """``Conv1d(d, d, w, groups=d, padding=w - 1)`` cut to l, in float64."""
    out = F.conv1d(x.double(), weight.double()[:, None, :], None if bias is None else bias.double(),
                   padding=weight.shape[1] - 1, groups=x.shape[1])[..., :x.shape[2]]
    return F.silu(out) if activation else out


def inputs(b, d, l, width, bias, seed=0):
    """x as the Mamba mixer passes it: the (b, d, l) view of one half of a position-major projection."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(b, l, 2 * d, generator=g, dtype=torch.float64)
    return (xz[..., :d].transpose(1, 2), torch.randn(d, width, generator=g, dtype=torch.float64),
            torch.randn(d, generator=g, dtype=torch.float64) if bias else None)


def with_grads(fn, tensors, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    return out.detach(), [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=numba_only), "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-D{}-L{}-W{}-{}-{}".format(*c))
def test_matches_conv1d(case, dtype, backend) -> None:
    b, d, l, width, activation, bias = case
    tensors = inputs(b, d, l, width, bias)
    out, grads = with_grads(lambda x, w, bb: causal_conv1d(x, w, bb, activation, backend=backend), tensors, dtype)
    ref_out, ref_grads = with_grads(lambda x, w, bb: conv_oracle(x, w, bb, activation), tensors, torch.float64)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert out.dtype == dtype and out.shape == (b, d, l)
    assert_rel_close(out, ref_out, tol, "out")
    for name, grad, ref in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert_rel_close(grad, ref, tol, name)


@numba_only
def test_cpu_is_causal_bit_exact() -> None:
    x, weight, bias = inputs(2, 12, 150, 4, True)
    base = causal_conv1d(x, weight, bias, "silu", backend="cpu")
    for j in (0, 63, 64, 149):
        changed = x.clone()
        changed[..., j:] += 1.0
        out = causal_conv1d(changed, weight, bias, "silu", backend="cpu")
        assert torch.equal(out[..., :j], base[..., :j]), f"position < {j} changed"
        assert not torch.equal(out[..., j], base[..., j])


@numba_only
def test_cpu_kernels_compile_one_signature_per_dtype_whatever_the_layout() -> None:
    """The mixer's strided half, a channel-major and a position-major input all reach the kernels as contiguous
    position-major arrays: one compiled signature per dtype (numba's any-layout code also ran 3x slower)."""
    import numba

    from bkexp.ops.causal_conv1d import cpu

    half, weight, bias = inputs(2, 12, 40, 4, True)
    for x in (half, half.contiguous(), half.transpose(1, 2).contiguous().transpose(1, 2)):
        out, grads = with_grads(lambda x, w, bb: causal_conv1d(x, w, bb, "silu", backend="cpu"), (x, weight, bias),
                                torch.float64)
        ref_out, ref_grads = with_grads(lambda x, w, bb: conv_oracle(x, w, bb, "silu"), (x, weight, bias),
                                        torch.float64)
        assert_rel_close(out, ref_out, 1e-13, "out")
        for name, grad, ref in zip(("dx", "dweight", "dbias"), grads, ref_grads):
            assert_rel_close(grad, ref, 1e-13, name)
    for kernel in (cpu._conv_forward, cpu._conv_backward):
        float64 = {sig for sig in kernel.overloads if sig[0].dtype == numba.float64}
        assert len(float64) == 1, f"{kernel.py_func.__name__}: {sorted(map(str, float64))}"


def test_backend_resolution_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown causal_conv1d backend 'triton'; valid: auto, cpu, ref"):
        resolve_backend("triton", "cpu")
    x, weight, bias = inputs(1, 4, 6, 3, True)
    with pytest.raises(ValueError, match=r"weight must be \(d, width\) = \(4, width\), got \(5, 3\)"):
        causal_conv1d(x, torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"bias must be None or a \(4,\) tensor, got \(3,\)"):
        causal_conv1d(x, weight, torch.zeros(3))
    with pytest.raises(ValueError, match="unknown activation 'relu'; valid: None, silu, swish"):
        causal_conv1d(x, weight, bias, "relu")
    with pytest.raises(ValueError, match=r"x must be a real floating tensor \(batch, d, l\)"):
        causal_conv1d(x[0], weight)
