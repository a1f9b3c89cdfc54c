"""How many CPU threads a stretch of work runs on: torch's intra-op pool and bkexp's numba kernels together.

A decoding step (``LanguageModel.step``: one new token per row) is ~100 small ops. On CPU each op that opens a
parallel region wakes the pool's sleeping workers first (bkexp sets ``OMP_WAIT_POLICY=PASSIVE``: see
``bkexp/__init__.py``), and on a VM a wake-up costs ~70 µs, more than the op's own work. Measured on the 2-core
VM (``docs/decoding.md``, *Threads*), a step at size=small took 1.5-2.5 ms on one thread against 3.9-6.7 ms on
two at batch 1, and one thread was as fast or faster up to batch 64 and context 2048, except for attention at
batch 8 and context 2048 (1.1-1.3x slower). So decoding runs its steps on ``DECODE_THREADS`` by default, and the
prefill, a forward pass over the whole prompt, on the process's threads.

The thread count can change a step's last bits (a reduction split across threads: Mamba's step differs by
~1e-6 between one and two threads; attention and BK steps were bit-identical), so it is a fixed setting, never
chosen by timing, and recorded with the results that depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DECODE_THREADS = 1  # intra-op threads of a CPU decoding step (None anywhere below: the process's count)


def check_threads(threads: int | None, what: str = "threads") -> int | None:
    """``threads`` if it is None or an integer >= 1, else a ValueError naming it."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{what} must be an integer >= 1 or None (the process's thread count), got {threads!r}")
    return threads


def thread_option(value: int | str, what: str) -> int | None:
    """A thread count from a command line or lm-eval's ``model_args`` (strings there): an integer >= 1, or 0 for
    the process's count (returned as None); anything else is a ValueError naming ``what`` and the value."""
    try:
        threads = -1 if isinstance(value, (bool, float)) else int(value)
    except ValueError:
        threads = -1
    if threads < 0:
        raise ValueError(f"{what} must be an integer >= 0 (0: the process's thread count), got {value!r}")
    return threads or None


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` intra-op threads (torch's, and numba's for bkexp's kernels, which share
    torch's OpenMP pool); both counts are restored on exit, also after an exception. None: leave them."""
    check_threads(threads)
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    try:
        import numba
    except ImportError:
        numba = None
    before = torch.get_num_threads()
    numba_before = numba.get_num_threads() if numba is not None else None
    torch.set_num_threads(threads)
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if numba is not None:
            numba.set_num_threads(numba_before)


__all__ = ["DECODE_THREADS", "check_threads", "cpu_threads", "thread_option"]
