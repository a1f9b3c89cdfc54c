"""``wide_vectors``: chosen numba kernels compile for 512-bit vectors, the others keep LLVM's default width."""

from __future__ import annotations

import functools
import subprocess
import sys

import llvmlite.binding as llvm
import numpy as np
import pytest
from numba import njit, prange

from bkexp.ops.vector_width import wide_vectors

AVX512 = "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


def _axpy(a, x, y):
    for i in prange(x.shape[0]):
        y[i] = y[i] + a * x[i]


def _dot(x, y):
    total = x[0] * 0
    for i in range(x.shape[0]):
        total += x[i] * y[i]
    return total


def _kernel(fn, parallel=False, wide=False):
    """A fresh, uncached dispatcher of ``fn`` (so every test compiles it and its assembly can be read)."""
    dispatcher = njit(parallel=parallel, fastmath={"reassoc"}, cache=False)(fn)
    return wide_vectors(dispatcher) if wide else dispatcher


def _asm(dispatcher) -> str:
    (asm,) = dispatcher.inspect_asm().values()
    return asm


@functools.cache
def _llvm_default_is_512_bit() -> bool:
    """Whether LLVM picks 512-bit vectors for this CPU by itself (AMD Zen 4 does; Intel's AVX-512 cores prefer
    256), asked of a fresh process that never compiled a wrapped kernel."""
    code = ("import numpy as np; from numba import njit\n"
            "def axpy(a, x, y):\n    for i in range(x.shape[0]):\n        y[i] = y[i] + a * x[i]\n"
            "k = njit(fastmath={'reassoc'})(axpy); x = np.ones(64, np.float32); k(np.float32(2), x, x.copy())\n"
            "(asm,) = k.inspect_asm().values(); print('zmm' in asm)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return done.stdout.strip() == "True"


@pytest.mark.skipif(not AVX512, reason="needs a CPU with AVX-512")
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_only_wrapped_kernels_use_512_bit_vectors(parallel):
    x = np.arange(1000, dtype=np.float32)
    y_wide, y_default = np.ones(1000, np.float32), np.ones(1000, np.float32)
    wide, default = _kernel(_axpy, parallel, wide=True), _kernel(_axpy, parallel)
    wide(np.float32(2), x, y_wide)  # the wide compile first: nothing of it may leak into the next compile
    default(np.float32(2), x, y_default)
    assert "zmm" in _asm(wide)  # the loop body (for prange, numba's outlined parallel function) is 512-bit
    if not _llvm_default_is_512_bit():  # where LLVM's own default is 512-bit, the wrapper changes nothing
        assert "zmm" not in _asm(default)
    np.testing.assert_array_equal(y_wide, 1 + 2 * x)  # elementwise results are the same at any width
    np.testing.assert_array_equal(y_default, y_wide)


@pytest.mark.skipif(not AVX512, reason="needs a CPU with AVX-512")
def test_wide_reduction_is_correct_and_every_compile_is_wide():
    rng = np.random.default_rng(0)
    wide = _kernel(_dot, wide=True)
    for dtype in (np.float32, np.float64):  # one compile per signature, each must carry the attribute
        x, y = rng.standard_normal(4099).astype(dtype), rng.standard_normal(4099).astype(dtype)
        assert wide(x, y) == pytest.approx(float(np.dot(x.astype(np.float64), y)), rel=1e-4)
    assert all("zmm" in asm for asm in wide.inspect_asm().values())


def test_kernels_of_the_mamba_ops_are_wide():
    from bkexp.ops.causal_conv1d import cpu as conv
    from bkexp.ops.selective_scan import cpu as scan

    for kernel in (scan._scan_forward, scan._scan_backward, conv._conv_forward, conv._conv_backward):
        wrappers, compile_ = [], kernel.compile
        while hasattr(compile_, "__wrapped__"):  # the wrappers around the dispatcher's own compile
            wrappers.append(compile_)
            compile_ = compile_.__wrapped__
        assert compile_.__self__ is kernel and any(getattr(w, "_bkexp_wide", False) for w in wrappers)
