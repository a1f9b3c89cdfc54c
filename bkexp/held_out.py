"""Which splits of a run's data are the same data, and what that does to the numbers reported on them.

A "test" number is only held out if the test data took no part in training or in choosing the checkpoint. Local
data often has two files for three splits (WikiText-2's valid.txt and test.txt; a streamed split cannot be cut out
of a file), and a typo can point two splits at one file. The datamodules record the pairs of splits that share
data in summary.json (``data.overlapping_splits``); the run's log, its console headline, ``bkexp report`` and the
exported model card all state the consequence next to the numbers. Text copied rather than shared is measured by
n-gram overlap (:func:`ngram_overlaps`): how much of the validation and test text, or of a corpus ``bkexp eval``
scores, also occurs in the training tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

RECORD_KEY = "overlapping_splits"  # key of the pairs in the dataset record (summary.json "data")
OVERLAP_N = 13  # n-gram length of the training-data overlap (13-grams, as in GPT-3's contamination study)
OVERLAP_COLUMN = f"train_{OVERLAP_N}gram_overlap"  # its name in summary.json's splits, eval/*.json and the report


def overlapping_pairs(splits: Iterable[str], overlap: Callable[[str, str], bool]) -> list[list[str]]:
    """``[[a, b], ...]`` for every pair of ``splits`` (in the given order) for which ``overlap(a, b)``."""
    return [[a, b] for a, b in combinations(list(splits), 2) if overlap(a, b)]


_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: windows hash as base-M numbers mod 2^64


def _ngram_hashes(ids: Any, n: int) -> np.ndarray:
    """A 64-bit hash of every window of ``n`` consecutive token ids (wrapping uint64 arithmetic)."""
    tokens = np.asarray(ids).astype(np.uint64)
    windows = len(tokens) - n + 1
    hashes = np.zeros(windows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n):
            hashes = hashes * _HASH_MULTIPLIER + tokens[offset:offset + windows] + np.uint64(1)
    return hashes


def ngram_overlaps(corpora: Sequence[Any], reference: Any, n: int = OVERLAP_N) -> list[float | None]:
    """Per corpus (token ids), the share of its ``n``-token windows that occur anywhere in ``reference`` (e.g. the
    training tokens): 0 for text the model never saw, 1 for a copy of its training data; None when the corpus or the
    reference is shorter than ``n`` tokens. Windows are compared by 64-bit hashes (a false match has probability
    about len(reference) / 2^64); the reference is hashed once for all corpora."""
    if len(reference) < n:
        return [None] * len(corpora)
    seen = np.sort(_ngram_hashes(reference, n))  # sorted and searched: np.unique / np.isin took 20x longer
    return [_share_in(_ngram_hashes(corpus, n), seen) if len(corpus) >= n else None for corpus in corpora]


def _share_in(values: np.ndarray, sorted_reference: np.ndarray) -> float:
    """The share of ``values`` present in ``sorted_reference``."""
    index = np.minimum(np.searchsorted(sorted_reference, values), len(sorted_reference) - 1)
    return float((sorted_reference[index] == values).mean())


def ngram_overlap(corpus: Any, reference: Any, n: int = OVERLAP_N) -> float | None:
    """:func:`ngram_overlaps` of one corpus."""
    return ngram_overlaps([corpus], reference, n)[0]


def caveats(pairs: Sequence[Sequence[str]] | None) -> list[str]:
    """One sentence per consequence of the overlapping ``pairs`` for the metrics measured on them."""
    shared = {frozenset(pair) for pair in pairs or ()}
    found = []
    if frozenset(("validation", "test")) in shared:
        found.append("validation and test are the same data: the best checkpoint was chosen on the test data, so "
                     "test metrics are not held out")
    for split in ("validation", "test"):
        if frozenset(("train", split)) in shared:
            found.append(f"{split} data is also training data: {split} metrics measure fit to the training data, "
                         "not generalisation")
    return found


def corpus_caveat(run_splits: Sequence[str]) -> str | None:
    """What scoring a corpus that holds these splits of a run (``train``, ``validation``) measures, or None."""
    what = {"train": "training data (its perplexity measures fit, not generalisation)",
            "validation": "validation data (the best checkpoint was chosen on it)"}
    return "holds the run's " + " and ".join(what[s] for s in run_splits) if run_splits else None


def short_caveat(pairs: Sequence[Sequence[str]] | None) -> str | None:
    """The overlapping pairs in a few words for a headline or a table (``validation = test data``), or None."""
    if not pairs:
        return None
    return ", ".join(f"{a} = {b} data" for a, b in pairs)


def record_pairs(data: Mapping[str, Any] | None) -> list[list[str]]:
    """The overlapping pairs of a summary.json ``data`` record (none when the record predates them)."""
    return [list(pair) for pair in (data or {}).get(RECORD_KEY) or ()]
