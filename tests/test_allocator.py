"""``bkexp.allocator``: glibc keeps the memory a step frees (no first-touch page faults when the same buffers come
back), only where the user did not choose otherwise; the state is recorded. Real processes, real page faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bkexp.cli import main as bkexp_main
from bkexp.environment import environment

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux-only")

# A step's pattern: three 16 MiB buffers allocated, written and freed, six times; the page faults of each round.
CHILD = """
import resource
from bkexp.allocator import configure_cpu_allocator
state = configure_cpu_allocator()
import numpy as np
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [np.ones(4 * 2**20, np.float32) for _ in range(3)]
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(state, *faults)
"""


def run_child(**env: str) -> tuple[str, list[int]]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("BKEXP_CPU_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, check=True)
    state, *faults = done.stdout.split()
    return state, [int(f) for f in faults]


@glibc_only
def test_freed_buffers_come_back_without_page_faults_and_system_opts_out() -> None:
    state, faults = run_child()
    assert state == "keep"
    assert max(faults[2:]) < 50, faults  # the same 48 MiB again: warm pages (the first round faults them in)
    state, faults = run_child(BKEXP_CPU_ALLOCATOR="system")
    assert state == "system"
    assert min(faults[2:]) > 500, faults  # glibc's default gives them back: fresh pages every round


@glibc_only
def test_the_users_own_glibc_settings_win() -> None:
    assert run_child(MALLOC_TRIM_THRESHOLD_="1000000000")[0] == "user"
    assert run_child(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")[0] == "user"


def test_a_bad_choice_is_refused_before_any_command_runs(monkeypatch, capsys) -> None:
    monkeypatch.setenv("BKEXP_CPU_ALLOCATOR", "jemalloc")
    monkeypatch.setattr("bkexp.allocator._allocator_state", None)
    assert bkexp_main(["doctor"]) == 2
    assert "BKEXP_CPU_ALLOCATOR='jemalloc'; valid: keep, system" in capsys.readouterr().err


def test_the_state_is_recorded_in_the_environment_record(monkeypatch) -> None:
    monkeypatch.setattr("bkexp.allocator._allocator_state", "system")
    assert environment()["cpu_allocator"] == "system"
