"""How bkexp's entry points configure glibc's allocator for training (no torch import: the ``bkexp`` command calls it
before any subcommand loads its libraries)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ALLOCATOR_ENV = "BKEXP_CPU_ALLOCATOR"  # "keep" (the default) or "system": whether bkexp tunes glibc's malloc
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit: buffers up to 32 MiB come from the heap
_TRIM_THRESHOLD = 2**31 - 1  # give freed heap memory back only past 2 GiB free (malloc_trim still does)
_allocator_state: str | None = None


def libc_handle() -> ctypes.CDLL | None:
    """The C library (Linux), None elsewhere."""
    libc_name = ctypes.util.find_library("c")
    return ctypes.CDLL(libc_name) if sys.platform.startswith("linux") and libc_name else None


def configure_cpu_allocator() -> str:
    """Have glibc keep the memory a training step frees for the next step, instead of giving it back.

    A step allocates and frees the same tensors every time, many of them several MB (at size=small, 8192
    tokens: 8-16 MB activations and gradients). glibc serves blocks above a moving threshold (at most 32 MiB)
    by ``mmap`` and returns freed heap memory to the kernel once more than twice that sits free at the heap's
    top, so steps touch fresh pages again: measured on a 2-core Xeon at size=small, 5,700-11,500 first-touch
    page faults per step for Mamba, 16,000-39,000 for the Transformer, 11,800-21,500 for ResNet-BK, and how
    many depends on the order of earlier allocations, so the same step's time varies from process to process.
    With blocks up to 32 MiB taken from the heap and freed memory kept, Mamba's step faults twice, and steps
    take 0.92-1.02x the time for Mamba, 0.92-0.98x for the Transformer, 0.88-0.96x for ResNet-BK (separate
    processes, alternating, two runs each at N=256 and 1024). Larger tensors still use ``mmap`` (the
    Transformer's 33.5 MB MLP activations); the largest, the logits and their gradient, are reused by
    ``bkexp.ops.workspace``. The cost: the process keeps its peak heap while it lives (Mamba's peak resident
    memory +5-7%; ``release_free_memory`` still trims between a sweep's jobs).

    Called by bkexp's entry points (``train.py``, the ``bkexp`` command), not by ``import bkexp``. Nothing is
    changed when ``BKEXP_CPU_ALLOCATOR=system``, when the user set glibc's own ``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``, or off glibc. Returns the state, which
    ``bkexp.environment`` records: ``keep`` (tuned), ``system``, ``user`` (glibc settings left as set) or
    ``unsupported``.
    """
    global _allocator_state
    if _allocator_state is not None:
        return _allocator_state
    choice = os.environ.get(ALLOCATOR_ENV, "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r}; valid: keep, system")
    libc = libc_handle()
    if choice == "system":
        state = "system"
    elif any(os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        state = "user"
    elif libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        state = "unsupported"
    else:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
        state = "keep" if ok else "unsupported"
    _allocator_state = state
    return state


def cpu_allocator_state() -> str | None:
    """What ``configure_cpu_allocator`` did in this process (None: not called)."""
    return _allocator_state
