"""How many CPU threads a stretch of work runs on: torch's intra-op pool and bkexp's numba kernels together.

A decoding step (``LanguageModel.step``: one new token per row) is ~100 small ops. On CPU each op that opens a
parallel region wakes the pool's sleeping workers first (bkexp sets ``OMP_WAIT_POLICY=PASSIVE``: see
``bkexp/__init__.py``), and on the 2-core VMs measured a wake-up costs ~30-80 µs, more than most of these ops'
own work. A step that reads a large decoding state (attention's KV cache at a large batch or context) is bound
by memory bandwidth instead, and more cores read it faster. So by default (``DECODE_THREADS = "auto"``) a step
runs on one thread while its state is at most ``AUTO_STATE_BYTES``, and on the process's threads above.
Measured on the 2-core Xeon VM (``docs/decoding.md``, *Threads*): one thread took 1.5-2.5 ms per step at
batch 1 against 3.9-6.7 ms on two, and was faster for every state up to 55 MB; from 101 MB on, two threads
were 1.16-1.8x faster. The prefill, a forward pass over the whole prompt, always runs on the process's threads.

The thread count can change a step's last bits (a reduction split across threads: Mamba's step differs by
~1e-6 between one and two threads; attention and BK steps were bit-identical). So the choice follows from the
setting and the state's size, never from timing, and is recorded with the results that depend on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

AUTO = "auto"
DECODE_THREADS = AUTO  # threads of a CPU decoding step: "auto", an integer >= 1, or None (the process's count)
AUTO_STATE_BYTES = 64 << 20  # "auto": one thread up to this much decoding state, the process's threads above


def check_threads(threads: int | str | None, what: str = "threads", allow_auto: bool = False) -> int | str | None:
    """``threads`` if it is None, an integer >= 1 (or ``"auto"`` where allowed), else a ValueError naming it."""
    if allow_auto and threads == AUTO:
        return threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        valid = "an integer >= 1, 'auto' or None" if allow_auto else "an integer >= 1 or None"
        raise ValueError(f"{what} must be {valid} (None: the process's thread count), got {threads!r}")
    return threads


def thread_option(value: int | str, what: str) -> int | str | None:
    """A thread setting from a command line or lm-eval's ``model_args`` (strings there): ``auto``, an integer
    >= 1, or 0 for the process's count (returned as None); anything else is a ValueError naming ``what``."""
    if value == AUTO:
        return AUTO
    try:
        threads = -1 if isinstance(value, (bool, float)) else int(value)
    except ValueError:
        threads = -1
    if threads < 0:
        raise ValueError(f"{what} must be 'auto' or an integer >= 0 (0: the process's thread count), got {value!r}")
    return threads or None


def decode_threads_for(setting: int | str | None, state_bytes: int) -> int | None:
    """The threads of the decoding steps over a state of ``state_bytes`` (None: the process's count)."""
    if setting == AUTO:
        return 1 if state_bytes <= AUTO_STATE_BYTES else None
    return setting


@contextmanager
def cpu_threads(threads: int | None, export: bool = False) -> Iterator[None]:
    """Run the block on ``threads`` intra-op threads (torch's, and numba's for bkexp's kernels, which share
    torch's OpenMP pool); both counts are restored on exit, also after an exception. None: leave them.

    ``export`` also sets ``OMP_NUM_THREADS`` for the block: Lightning's distributed launchers set their own count
    unless it is set, and the processes they start read it.
    """
    check_threads(threads)
    if threads is None:
        yield
        return
    try:
        import numba
    except ImportError:
        numba = None
    before = torch.get_num_threads()
    numba_before = numba.get_num_threads() if numba is not None else None
    env_before = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if export:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if numba is not None:
            numba.set_num_threads(numba_before)
        if export:
            if env_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_before


__all__ = ["AUTO", "AUTO_STATE_BYTES", "DECODE_THREADS", "check_threads", "cpu_threads", "decode_threads_for",
           "thread_option"]
