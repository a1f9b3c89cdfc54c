"""Peak memory is per run: a reset forgets the peaks of earlier jobs in the same process (in-process sweeps)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter: the test process holds freed-but-resident memory from earlier tests, which an
# allocation may reuse without raising the resident peak.
_PROBE = textwrap.dedent("""
    import json, torch
    from bkexp.memory import peak_memory_mb, reset_peak_memory
    cpu = torch.device("cpu")
    reset_peak_memory()
    base = peak_memory_mb(cpu)
    block = torch.empty(512 * 2**20 // 4).fill_(1.0)  # 512 MiB, written so it is resident
    high = peak_memory_mb(cpu)
    del block
    reset_peak_memory()
    print(json.dumps({"base": base, "high": high, "after_reset": peak_memory_mb(cpu)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_reset_starts_a_new_cpu_peak():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["high"] >= peaks["base"] + 400
    assert peaks["after_reset"] < peaks["high"] - 400


_TRIM_PROBE = textwrap.dedent("""
    import json, numpy as np
    from bkexp.memory import release_free_memory, resident_memory_mb
    blocks = [np.ones(8192) for _ in range(4000)]  # 4000 heap blocks of 64 KiB (below glibc's mmap threshold)
    pinned = blocks[::500]  # a few survivors keep the freed heap fragmented, so glibc holds it resident
    del blocks
    held = resident_memory_mb()
    release_free_memory()
    print(json.dumps({"held": held, "released": resident_memory_mb()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap trimming is Linux-only")
def test_freed_heap_memory_is_released_before_a_new_peak_window():
    # What an earlier job of an in-process sweep freed must not count towards the next job's peak.
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert rss["held"] - rss["released"] > 200  # of the ~250 MiB freed
