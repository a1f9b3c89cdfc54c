"""Helpers shared by every op test and benchmark: relative error against a float64 reference, and a record of the
PyTorch ops that ran (to tell a compiled kernel from its PyTorch fallback)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def as_real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors as (..., 2) real pairs, so a relative error covers both parts; real ones unchanged."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max-norm relative error ``max|a - e| / max(max|e|, tiny)``, computed in float64."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if e.numel() == 0:
        return 0.0
    denom = e.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((a - e).abs().max() / denom)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Fail with the measured error when ``rel_err(actual, expected) > tol`` or ``actual`` is not finite."""
    if not torch.isfinite(actual.detach()).all():
        raise AssertionError(f"{what}: non-finite values in result")
    err = rel_err(actual, expected)
    if err > tol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds tolerance {tol:.1e}")


class AtenOpRecorder(TorchDispatchMode):
    """Records the name of every aten op that runs under it (a dispatch mode, as FLOP counting and fake tensors
    are, so ops that leave such modes to PyTorch run their PyTorch path under it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
