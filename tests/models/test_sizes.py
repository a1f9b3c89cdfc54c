"""Size presets give every architecture the same non-embedding parameter count (within 10%)."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from runhelpers import compose_train, options

MATCHED = ["transformer", "bk", "mamba"]
RANGES = {"tiny": (0.2e6, 1e6), "small": (1e6, 3e6), "medium": (20e6, 40e6)}


@pytest.mark.parametrize("size", options("size"))
def test_size_presets_match_non_embedding_parameters(size, tmp_path):
    counts = {}
    for model in MATCHED:
        cfg = compose_train([f"model={model}", f"size={size}"], tmp_path)
        counts[model] = instantiate(cfg.model, vocab_size=1000).param_counts()["non_embedding"]
    low, high = RANGES[size]
    assert all(low <= c <= high for c in counts.values()), counts
    assert max(counts.values()) <= 1.10 * min(counts.values()), counts
