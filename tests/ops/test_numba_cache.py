"""``numba_cache.from_cache``: a kernel's new signature is compiled in a child process and run from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KERNEL = textwrap.dedent('''
    import numpy as np
    from numba import njit, prange
    from bkexp.ops.numba_cache import from_cache

    @from_cache
    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def total(x):
        s = 0.0
        for i in prange(x.shape[0]):
            s += x[i] * 0.5
        return s
    ''')
RUN = textwrap.dedent('''
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import fc_kernel
    value = fc_kernel.total(np.arange(1000, dtype=np.float32) / 7)
    stats = fc_kernel.total.stats
    print(json.dumps({"value": float(value), "hits": sum(stats.cache_hits.values()),
                      "misses": sum(stats.cache_misses.values())}))
    ''')


def _run(tmp_path: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_first_use_compiles_in_a_child_and_runs_the_cached_code(tmp_path):
    (tmp_path / "fc_kernel.py").write_text(KERNEL)
    first = _run(tmp_path)  # an empty cache: the child compiles and writes it, this process loads it
    assert first["hits"] == 1 and first["misses"] == 0
    second = _run(tmp_path)
    assert second == first


@pytest.mark.slow
def test_scan_gradients_do_not_depend_on_a_warm_cache(tmp_path):
    """The selective scan's backward gave other last bits in the process that compiled it than in one that
    loaded it from numba's cache (the first run after an install against every later one)."""
    script = textwrap.dedent('''
        import sys, torch
        from bkexp.ops.selective_scan import selective_scan
        torch.manual_seed(0)
        b, d, l, n = 2, 64, 48, 16
        u = torch.randn(b, d, l, requires_grad=True); delta = torch.rand(b, d, l, requires_grad=True)
        A = -torch.rand(d, n, requires_grad=True); B = torch.randn(b, n, l, requires_grad=True)
        C = torch.randn(b, n, l, requires_grad=True); D = torch.randn(d, requires_grad=True)
        z = torch.randn(b, d, l, requires_grad=True); bias = torch.randn(d, requires_grad=True)
        out = selective_scan(u, delta, A, B, C, D, z, bias, True, backend="cpu")
        grads = torch.autograd.grad(out.square().sum(), [u, delta, A, B, C, D, z, bias])
        torch.save([out.detach(), *grads], sys.argv[1])
        ''')
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))  # an empty cache, then a warm one
    import torch

    results = []
    for run in ("cold", "warm"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{run}.pt")], env=env, check=True,
                       timeout=900, capture_output=True)
        results.append(torch.load(tmp_path / f"{run}.pt", weights_only=True))
    for cold, warm in zip(*results):
        assert torch.equal(cold, warm)
