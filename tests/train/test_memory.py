"""Peak memory is per run: a reset forgets the peaks of earlier jobs in the same process (in-process sweeps)."""

from __future__ import annotations

import sys

import pytest
import torch

from bkexp.train.callbacks import peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_reset_starts_a_new_cpu_peak():
    cpu = torch.device("cpu")
    reset_peak_memory()
    base = peak_memory_mb(cpu)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    block += 1
    high = peak_memory_mb(cpu)
    assert high >= base + 60
    del block
    reset_peak_memory()
    assert peak_memory_mb(cpu) < high - 50
