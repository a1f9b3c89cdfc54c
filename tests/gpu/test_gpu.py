"""GPU checks (``pytest -m gpu``; skipped without CUDA): mamba_ssm's kernels against the reference scan, and
real bf16 and torch.compile training runs of the three models. ``.ci/gpu`` runs these and the GPU benchmarks."""

from __future__ import annotations

import math

import pytest
import torch

from bkexp.ops.selective_scan import available_backends, selective_scan
from bkexp.ops.testing import assert_rel_close
from runhelpers import MQAR_TINY, TINY, read_summary

pytestmark = pytest.mark.gpu


def _scan_inputs(b: int, d: int, n: int, length: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(device)  # noqa: E731
    return {"u": rand(b, d, length), "delta": rand(b, d, length, s=0.5) - 1.0,
            "A": (-torch.rand(d, n, generator=g) * 2 - 0.1).to(device), "B": rand(b, n, length),
            "C": rand(b, n, length), "D": rand(d), "z": rand(b, d, length), "delta_bias": rand(d, s=0.5)}


@pytest.mark.parametrize("length", [256, 2048], ids=["L256", "L2048"])
def test_mamba_ssm_backend_matches_the_reference_with_gradients(length: int) -> None:
    if "cuda" not in available_backends("cuda"):
        pytest.skip("mamba_ssm's CUDA selective scan does not import here (pip install -e '.[gpu]')")
    inputs = _scan_inputs(2, 64, 16, length, "cuda")
    results = []
    for backend in ("cuda", "ref"):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        out = selective_scan(**leaves, delta_softplus=True, backend=backend)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        (out * weights).sum().backward()
        results.append((out.detach(), {k: v.grad for k, v in leaves.items()}))
    (out_cuda, grads_cuda), (out_ref, grads_ref) = results
    assert_rel_close(out_cuda.cpu().double(), out_ref.cpu().double(), 1e-4, "mamba_ssm out")
    for name in grads_ref:
        assert_rel_close(grads_cuda[name].cpu().double(), grads_ref[name].cpu().double(), 1e-3, f"mamba_ssm d/d{name}")


@pytest.mark.parametrize("model", ["transformer", "bk", "mamba"])
def test_bf16_training_run_on_gpu(train, model: str) -> None:
    run_dir = train(*TINY, *MQAR_TINY, f"model={model}", "hardware=gpu_bf16")
    summary = read_summary(run_dir)
    assert summary["status"] == "ok", summary.get("error")
    assert summary["device"].startswith("cuda") and summary["flags"]["effects"]["precision"] == "bf16-mixed"
    assert math.isfinite(summary["metrics"]["val/loss"])
    if model == "mamba":
        assert summary["backends"]["selective_scan"] in {"cuda", "ref"}
    if model == "bk":
        assert summary["backends"]["bk_core"] == "triton"


def test_compiled_training_run_on_gpu(train) -> None:
    run_dir = train(*TINY, *MQAR_TINY, "model=transformer", "hardware=gpu", "flags=compile")
    summary = read_summary(run_dir)
    assert summary["status"] == "ok", summary.get("error")
    assert summary["flags"]["effects"]["compile"] and math.isfinite(summary["metrics"]["val/loss"])
