"""Run chosen numba kernels from numba's on-disk cache in every process, compiling new signatures in a child.

A ``parallel=True`` kernel compiled in this process and the same kernel loaded from numba's cache do not run
the same code: the cached object holds the parfor body linked into the kernel and optimised once more, while
the compiling process keeps calling the body's own first compilation (measured for the selective scan's
backward: gradients differ in the last bits between the first run after a fresh install and every later
one, ``docs/kernels.md``). ``from_cache`` makes a kernel's first compile of a signature happen in a short-lived
child process that writes the cache; this process then loads it, as every later process will, so results do
not depend on whether the cache was warm. The child costs a Python start-up once per signature and install;
if it fails (no writable cache, no ``sys.executable``), the kernel compiles here as before.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings

from numba.core import sigutils, types

CHILD_ENV = "BKEXP_NUMBA_CACHE_CHILD"  # set in the child: it compiles in-process (and so writes the cache)


def _compile_in_child(dispatcher, args: tuple) -> None:
    module, name = dispatcher.py_func.__module__, dispatcher.py_func.__name__
    code = ("import importlib\nfrom numba.core import types\n"
            f"kernel = getattr(importlib.import_module({module!r}), {name!r})\n"
            f"kernel.compile(eval({repr(tuple(args))!r}, dict(vars(types))))\n")
    # the child imports the kernel's module from where this process found it
    env = dict(os.environ, **{CHILD_ENV: "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(f"compiling {module}.{name} in a child process failed ({err}); compiling it here", stacklevel=3)
        return
    if done.returncode != 0:
        warnings.warn(f"compiling {module}.{name} in a child process failed (exit {done.returncode}: "
                      f"{done.stderr.strip()[-500:]}); compiling it here", stacklevel=3)


def _cached(dispatcher, sig) -> bool:
    """Whether numba's cache holds ``sig`` for ``dispatcher`` (read from its index, nothing loaded); True where
    this numba's cache cannot be asked, so that the kernel then compiles here as it always did."""
    cache = dispatcher._cache
    try:
        if not cache._enabled:
            return True
        key = cache._index_key(sig, dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except (AttributeError, OSError, TypeError, ValueError):
        return True


def from_cache(dispatcher):
    """Make ``dispatcher`` (an ``@njit(cache=True)`` function at module level) load every signature from numba's
    cache, having a child process compile and cache the signatures the cache lacks."""
    compile_ = dispatcher.compile

    @functools.wraps(compile_)
    def compile(sig):
        args, _ = sigutils.normalize_signature(sig)
        if tuple(args) not in dispatcher.overloads and not os.environ.get(CHILD_ENV) and not _cached(dispatcher, sig):
            _compile_in_child(dispatcher, args)
        return compile_(sig)

    dispatcher.compile = compile
    return dispatcher


__all__ = ["CHILD_ENV", "from_cache"]
