"""SIMD width per numba kernel: compile chosen kernels for 512-bit vectors, leave the rest as LLVM picks.

On Intel's AVX-512 cores LLVM's x86 backend still prefers 256-bit vectors (wider ones can lower the clock; for
AMD Zen 4 its default is 512-bit already, so there every kernel is wide and this module changes nothing), and
numba compiles every kernel for one target machine, so its only switch (``NUMBA_CPU_FEATURES`` without
``prefer-256-bit``) is process-wide. Kernels differ: measured on a 2-core AVX-512 Xeon, the selective scan's
forward+backward takes 0.86-0.94x its time with 512-bit vectors at 1 thread (0.93x at 2), while the BK-Core
kernels get 6-15% slower. ``wide_vectors`` sets LLVM's per-function ``"prefer-vector-width"="512"``
attribute on every function a chosen kernel compiles (its parallel loop bodies included), so only that
kernel changes. The attribute only lifts a preference: on a machine without 512-bit vectors, or on a
non-x86 target, it has no effect.

Results: elementwise code is the same at any width; a vectorised reduction adds in another order, so
floating-point sums change in their last bits, as they do between an AVX2 and an AVX-512 machine. Every
compile of a wrapped kernel carries the attribute (whichever caller triggers it), so a machine's results do
not depend on what compiled first.
"""

from __future__ import annotations

import functools
import threading

from numba.core import codegen

WIDE_ATTRIBUTE = '"prefer-vector-width"="512"'
_state = threading.local()  # how many wide compiles are open on this thread (numba compiles nest)


def _install() -> bool:
    """Wrap numba's ``CPUCodeLibrary.add_ir_module`` (once) so modules added during a wide compile carry the
    attribute; False where this numba has no such method (then kernels keep LLVM's default width)."""
    library = getattr(codegen, "CPUCodeLibrary", None)
    add = getattr(library, "add_ir_module", None)
    if add is None:
        return False
    if getattr(add, "_bkexp_wide", False):
        return True

    @functools.wraps(add)
    def add_ir_module(self, ir_module):
        if getattr(_state, "depth", 0):
            for function in ir_module.functions:
                if not function.is_declaration:
                    # llvmlite's attribute set accepts only its known enum names; the string attribute is
                    # printed as given, inline in the definition (``define ... "prefer-vector-width"="512"``).
                    set.add(function.attributes, WIDE_ATTRIBUTE)
        return add(self, ir_module)

    add_ir_module._bkexp_wide = True
    library.add_ir_module = add_ir_module
    return True


def wide_vectors(dispatcher):
    """Compile numba ``dispatcher`` (an ``@njit`` function) for 512-bit vectors, on every compile of it
    (loads from numba's cache are untouched: the cache was written by such a compile; the scan kernels also
    run from the cache in the process that compiles them, ``bkexp.ops.numba_cache``)."""
    if not _install():
        return dispatcher
    compile_ = dispatcher.compile

    @functools.wraps(compile_)
    def compile(sig):
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            return compile_(sig)
        finally:
            _state.depth -= 1

    compile._bkexp_wide = True
    dispatcher.compile = compile
    return dispatcher


__all__ = ["WIDE_ATTRIBUTE", "wide_vectors"]
