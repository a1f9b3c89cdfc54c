"""The i.i.d. control: on uniformly random tokens no causal model can beat ln(V); a leaky one does at once."""

from __future__ import annotations

import math

import pytest

from runhelpers import options, read_summary

VOCAB = 16
IID = ["dataset=iid", f"dataset.vocab_size={VOCAB}", "dataset.num_train=256", "dataset.num_val=128",
       "dataset.num_test=16", "dataset.batch_size=16", "seq_len=32", "model.d_model=32", "model.n_layers=2",
       "trainer.max_steps=60", "trainer.val_check_interval=30", "trainer.enable_progress_bar=false",
       "trainer.enable_model_summary=false", "compute_flops=false", "test_after_fit=false"]
# 128 x 32 validation tokens: a model that only fits noise sits above ln(V); 0.05 nats below is far outside
# the sampling noise of the validation mean, and far above what a leak gives (the next token is visible).
MARGIN = 0.05


@pytest.mark.parametrize("model", options("model"))
def test_causal_models_cannot_beat_ln_v(model, train):
    summary = read_summary(train(f"model={model}", *IID))
    assert summary["status"] == "ok"
    assert summary["metrics"]["best/val_loss"] >= math.log(VOCAB) - MARGIN


@pytest.mark.slow
def test_bidirectional_bk_layer_beats_ln_v_by_reading_the_future(train):
    # The original ResNet-BK layer, with the causality guard switched off: it learns to read the next token.
    summary = read_summary(train("model=bk_seed", "model.mixer.causal=false", "check_causality=false", *IID,
                                 "model.n_layers=1", "trainer.max_steps=150", "trainer.val_check_interval=50",
                                 "optimizer.lr=1e-2"))
    assert summary["status"] == "ok"
    assert summary["metrics"]["best/val_loss"] < math.log(VOCAB) - 2 * MARGIN  # ~0.17 nats below in practice
