"""Size presets give every architecture the same non-embedding parameters, or the same training FLOPs per token."""

from __future__ import annotations

import pytest
import yaml
from hydra.utils import instantiate

from runhelpers import CONF, compose_train, options

MATCHED = ["transformer", "bk", "mamba"]


def _presets(matched: str) -> list[str]:
    """Size presets whose ``size.matched`` is ``matched`` (parameters or flops)."""
    return [name for name in options("size")
            if yaml.safe_load((CONF / "size" / f"{name}.yaml").read_text())["size"]["matched"] == matched]


RANGES = {"tiny": (0.2e6, 1e6), "small": (1e6, 3e6), "medium": (20e6, 40e6)}


@pytest.mark.parametrize("size", _presets("parameters"))
def test_size_presets_match_non_embedding_parameters(size, tmp_path):
    counts = {}
    for model in MATCHED:
        cfg = compose_train(["~recipe", f"model={model}", f"size={size}"], tmp_path)  # the preset, not a recipe
        counts[model] = instantiate(cfg.model, vocab_size=1000).param_counts()["non_embedding"]
    low, high = RANGES[size]
    assert all(low <= c <= high for c in counts.values()), counts
    assert max(counts.values()) <= 1.10 * min(counts.values()), counts


@pytest.mark.parametrize("size", _presets("flops"))
def test_flops_presets_match_training_flops_per_token(size, tmp_path):
    """Training FLOPs per token of the body (vocabulary 2: no head cost) within 10% at the stated length."""
    import torch

    from bkexp.train.flops import count_flops

    flops, params = {}, {}
    for model in MATCHED:
        cfg = compose_train(["~recipe", f"model={model}", f"size={size}"], tmp_path)
        lm = instantiate(cfg.model, vocab_size=2)
        flops[model] = count_flops(lm, torch.randint(0, 2, (1, cfg.size.reference_seq_len)))["train_step_per_token"]
        params[model] = lm.param_counts()["non_embedding"]
    assert max(flops.values()) <= 1.10 * min(flops.values()), flops
    assert params["bk"] > 2 * params["transformer"], params  # matched compute is not matched parameters
