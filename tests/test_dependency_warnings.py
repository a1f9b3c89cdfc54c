"""Importing bkexp hides the two deprecation warnings its dependencies print on every run, and nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

# What every training run does: iterate torchdata's StatefulDataLoader, and flatten a batch with Lightning's
# pytree helper; then one warning of the same kind that must still be shown.
RUN = """
import warnings, torch
from torchdata.stateful_dataloader import StatefulDataLoader
from lightning.pytorch.utilities._pytree import _tree_flatten
list(StatefulDataLoader(list(range(4)), batch_size=2))
_tree_flatten(torch.zeros(2))
warnings.warn("'set_vital' is a word this test makes up")
"""


def _stderr(prefix: str) -> str:
    done = subprocess.run([sys.executable, "-W", "default", "-c", prefix + RUN], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_importing_bkexp_hides_the_dependencies_deprecations_only() -> None:
    without = _stderr("")
    if "'set_vital' is deprecated" not in without and "LeafSpec" not in without:
        pytest.skip("these dependency versions no longer print the two warnings")
    with_bkexp = _stderr("import bkexp\n")
    assert "'set_vital' is deprecated" not in with_bkexp and "LeafSpec" not in with_bkexp
    assert "'set_vital' is a word this test makes up" in with_bkexp  # other warnings are still shown
