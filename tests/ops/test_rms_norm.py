"""RMSNorm: the numba CPU path and PyTorch's against a float64 oracle (values, gradients), per-row exactness,
the fallbacks, and the models' norm module against ``nn.RMSNorm``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bkexp.models.backbone import RMSNorm, make_norm
from bkexp.ops.backends import compiled_cpu_path_applies
from bkexp.ops.rms_norm import rms_norm, resolve_backend
from bkexp.ops.testing import AtenOpRecorder, assert_rel_close

numba_only = pytest.mark.skipif(resolve_backend("auto", "cpu") != "cpu", reason="numba is not installed")

SHAPES = [(2, 37, 10), (300, 240), (1, 1, 256), (7,), (3, 5, 129, 3)]  # 300 rows: two 128-row items and a ragged one


def oracle(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight in float64, written out."""
    x = x.double()
    out = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return out * weight.double() if weight is not None else out


def with_grads(fn, x, weight, dtype, seed=1):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, weight)]
    out = fn(*leaves)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * probe).sum().backward()
    return out.detach(), [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=numba_only), "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_float64_oracle(shape, dtype, backend, affine) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    weight = torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5 if affine else None
    eps = 1e-5
    out, grads = with_grads(lambda a, w: rms_norm(a, w, eps, backend=backend), x, weight, dtype)
    ref_out, ref_grads = with_grads(lambda a, w: oracle(a, w, eps), x, weight, torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert out.dtype == dtype and out.shape == x.shape
    assert_rel_close(out, ref_out, tol, "output")
    for name, got, want in zip(("dx", "dweight"), grads, ref_grads):
        assert_rel_close(got, want, tol * 4, name)


@numba_only
def test_cpu_path_is_the_compiled_kernel_and_agrees_with_pytorch() -> None:
    x = torch.randn(64, 48, requires_grad=True)
    weight = torch.rand(48) + 0.5
    compiled = rms_norm(x, weight, backend="cpu")
    assert type(compiled.grad_fn.next_functions[0][0]).__name__ == "_RMSNormFunctionBackward"
    assert type(rms_norm(x, weight, backend="ref").grad_fn).__name__ != "ViewBackward0"
    assert_rel_close(compiled, rms_norm(x, weight, backend="ref"), 2e-6, "cpu vs ref")


@numba_only
def test_a_row_is_bit_identical_alone_or_in_any_batch() -> None:
    """Rows are independent by construction: a token's output cannot depend on the other tokens."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(517, 240, generator=g)
    weight = torch.rand(240, generator=g) + 0.5
    full = rms_norm(x, weight)
    for rows in (slice(0, 1), slice(100, 101), slice(3, 300), slice(516, 517)):
        assert torch.equal(rms_norm(x[rows].clone(), weight), full[rows])


@numba_only
def test_non_contiguous_input_and_eps_default() -> None:
    x = torch.randn(40, 2 * 33)[:, ::2]  # a strided view
    weight = torch.rand(33) + 0.5
    eps = torch.finfo(torch.float32).eps
    assert_rel_close(rms_norm(x, weight), oracle(x, weight, eps), 2e-6, "strided, eps=None")


def test_fallbacks_run_pytorch() -> None:
    """bf16, autocast and dispatch modes take PyTorch's op, so its casting rules and aten ops apply."""
    x = torch.randn(8, 16)
    weight = torch.rand(16) + 0.5
    assert rms_norm(x.bfloat16(), weight.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(rms_norm(x, weight), nn.functional.rms_norm(x, (16,), weight))
    with AtenOpRecorder() as mode:
        out = rms_norm(x, weight)
    assert "aten.rsqrt" in mode.ops  # PyTorch's composite ran under the mode, not a numba call
    assert_rel_close(out, oracle(x, weight, torch.finfo(torch.float32).eps), 2e-6, "under a dispatch mode")
    assert not compiled_cpu_path_applies(x.double(), weight)  # weight dtype differs from x's
    assert compiled_cpu_path_applies(x, weight) and compiled_cpu_path_applies(x, None)


def test_under_torch_compile_the_backend_choice_is_a_constant_without_a_warning() -> None:
    """Dynamo evaluates the import check once per graph instead of tracing its cache (which it warned about)."""
    x = torch.randn(8, 16)
    weight = torch.rand(16) + 0.5
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(rms_norm, backend="eager", fullgraph=True)(x, weight)
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    assert_rel_close(out, oracle(x, weight, torch.finfo(torch.float32).eps), 2e-6, "compiled")


def test_bad_input_is_refused() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must be None or a \(8,\) tensor, got \(7,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="eps must be None or >= 0, got -1"):
        rms_norm(x, None, -1.0)
    with pytest.raises(ValueError, match="x must be a real floating tensor"):
        rms_norm(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown rms_norm backend 'gpu'; valid: auto, cpu, ref"):
        rms_norm(x, backend="gpu")


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_model_norm_is_nn_rmsnorm_with_the_same_state_and_values(eps) -> None:
    norm = make_norm("rmsnorm", 24)
    assert isinstance(norm, RMSNorm) and isinstance(norm, nn.RMSNorm)
    plain = nn.RMSNorm(24, eps=eps)
    norm.eps = eps
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
    norm.load_state_dict(plain.state_dict())  # the same keys: checkpoints and exports are unchanged
    x = torch.randn(3, 11, 24, requires_grad=True)
    assert_rel_close(norm(x), plain(x), 2e-6, "module output")
    norm(x).square().sum().backward()
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad = None
    plain(x).square().sum().backward()
    assert_rel_close(gx, x.grad, 1e-5, "dx")
    assert_rel_close(gw, plain.weight.grad, 1e-5, "dweight")
