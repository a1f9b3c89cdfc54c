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
    # 512 MiB, written: more than any free memory the process may still hold resident from earlier tests.
    block = torch.empty(512 * 2**20 // 4).fill_(1.0)
    high = peak_memory_mb(cpu)
    assert high >= base + 400
    del block
    reset_peak_memory()
    assert peak_memory_mb(cpu) < high - 400
