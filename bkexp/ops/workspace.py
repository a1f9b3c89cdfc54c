"""Reusable memory for a training step's largest CPU tensors: BK-Core's outputs and gradients, the LM head's
logits (``bkexp.ops.pooled_linear``) and the cross-entropy's logit gradient.

glibc serves large allocations by ``mmap`` (with bkexp's setting, ``bkexp.allocator``, those above 32 MiB,
where this pool starts; by default, those above a few hundred KB), so a fresh output arrives as pages the
kernel has never touched: each is zeroed and mapped on its first write, 4 KB at a time. For a kernel that
writes its output once at memory speed that is most of the call (measured on the 2-core Xeon: the
cross-entropy's backward over 8192 x 8192 float32 logits took 105 ms into ``torch.empty_like``, 56 ms into
a fresh numpy array -- numpy asks Linux for transparent huge pages -- and 24 ms into reused memory; BK-Core's
DRAM-sized call 54 -> 38 ms). ``empty`` hands out an array that nothing references any more when one of the
right shape is pooled, else a fresh numpy one, which it keeps for later within the pool's limits. The price:
pooled arrays stay resident while unused (at size=small, 8192 x 8192 logits and their gradient: 536 MB).
"""

from __future__ import annotations

import sys

import numpy as np

POOL_MIN_BYTES = 32 << 20  # smaller arrays are allocated fresh (glibc's heap, or a few faults, serve them)
POOL_MAX_ARRAYS = 8  # most arrays the pool keeps
POOL_MAX_BYTES = 4 << 30  # most memory the pool keeps, in use or not (the logits of 8192 tokens x 65k vocab: 2 GiB)
_pool: list[np.ndarray] = []


def _free(i: int) -> bool:
    """Whether nothing but the pool refers to ``_pool[i]``: 2 references, the pool's and getrefcount's argument
    (a tensor made by torch.from_numpy, and every view of it through its storage, holds one more, as does any
    array view). Indexed, not passed in: a local name would be one more reference."""
    return sys.getrefcount(_pool[i]) == 2


def empty(shape: tuple[int, ...], dtype: type[np.generic] | np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array: pooled memory that no tensor, view or array still refers to, or a
    fresh array, which is pooled if the pool can make room for it by dropping free arrays (oldest first)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if int(np.prod(shape)) * dtype.itemsize < POOL_MIN_BYTES:
        return np.empty(shape, dtype)
    for i in range(len(_pool)):
        if _pool[i].shape == shape and _pool[i].dtype == dtype and _free(i):
            return _pool[i]
    arr = np.empty(shape, dtype)
    kept = sum(a.nbytes for a in _pool)
    while len(_pool) >= POOL_MAX_ARRAYS or kept + arr.nbytes > POOL_MAX_BYTES:
        free = next((i for i in range(len(_pool)) if _free(i)), None)
        if free is None:  # everything pooled is in use: this one stays out
            return arr
        kept -= _pool.pop(free).nbytes
    _pool.append(arr)
    return arr
