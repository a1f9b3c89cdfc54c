"""A tiny word-level run on a WikiText-2 slice, trained once per module by the real entry point (train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from evalhelpers import train_run
from runhelpers import TINY


@pytest.fixture(scope="module")
def word_run(tmp_path_factory: pytest.TempPathFactory, wikitext_slice: Path) -> Path:
    """Transformer, word tokenizer fitted on the slice's train.txt, seq_len 32, 4 steps."""
    return train_run(tmp_path_factory.mktemp("word_run"), *TINY, "dataset=text", f"dataset.data_dir={wikitext_slice}",
                     "dataset.eval_batch_size=8")
