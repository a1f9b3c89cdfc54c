"""Memory probes shared by training, evaluation and benchmarks: resident and peak memory, and a fresh peak window.

CPU figures come from /proc/self/status (Linux; ``getrusage`` elsewhere), GPU figures from the CUDA allocator.
No Lightning here, so evaluation and benchmarks measure memory without importing the training layer.
"""

from __future__ import annotations

import gc
import os
import resource
import sys

import torch

from bkexp.allocator import libc_handle


def release_free_memory() -> None:
    """Return memory that earlier work freed but the process still holds: collect cycles, trim the C heap.

    In an in-process sweep the objects of the previous job (trainer, model, data) live in reference cycles
    until collected, and glibc keeps freed heap pages resident; a new peak window starting there would count
    them, so later jobs of a sweep would report more memory than the same run alone.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc = libc_handle()
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc; musl and others have no trim and hold less
        libc.malloc_trim(0)


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB; None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def resident_memory_mb() -> float | None:
    """Current resident set size (VmRSS) in MiB, None where /proc is unavailable."""
    return _proc_status_mb("VmRSS")


def reset_peak_memory() -> None:
    """Start a new peak-memory window for this run (CPU and, when present, the current CUDA device).

    First releases what earlier jobs freed (``release_free_memory``). CUDA: the allocator's peak. CPU
    (Linux): writing 5 to /proc/self/clear_refs resets the process's peak resident set size (VmHWM) to the
    current one, so runs of an in-process sweep each report their own peak, not the largest peak of every
    job before them (``getrusage``'s ru_maxrss can never be reset).
    """
    release_free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if os.path.exists("/proc/self/clear_refs"):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:  # not permitted here: the process-lifetime peak is reported instead
            pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA allocator peak on GPU, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
