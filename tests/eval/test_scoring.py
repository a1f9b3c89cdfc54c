"""The scoring loop against independent per-target references, and the window plan's coverage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bkexp.eval.scoring import plan_windows, score_stream
from bkexp.models import LanguageModel
from bkexp.models.mixers import AttentionMixer

V = 50


def tiny_lm(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    mixer = lambda d_model: AttentionMixer(d_model=d_model, n_heads=2)  # noqa: E731
    return LanguageModel(vocab_size=V, d_model=16, n_layers=1, mixer=mixer).eval()


def target_loss(model: nn.Module, stream: torch.Tensor, j: int, context: int) -> float:
    """Loss of target j (stream[j + 1]) given exactly the last `context` tokens up to stream[j]."""
    x = stream[max(0, j + 1 - context) : j + 1][None]
    with torch.no_grad():
        return float(F.cross_entropy(model(x)[0, -1].double(), stream[j + 1]))


@pytest.mark.parametrize("n,length,stride", [(10, 4, None), (12, 4, None), (10, 4, 1), (10, 4, 3), (7, 16, None),
                                             (23, 8, 8), (23, 8, 5)])
def test_window_plan_scores_every_target_once_with_the_promised_context(n: int, length: int, stride: int | None):
    windows = plan_windows(n, length, stride)
    seen = [j for w in windows for j in range(w.score_from, w.end)]
    assert seen == list(range(n))
    for w in windows:
        assert 0 < w.end - w.start <= length and w.start <= w.score_from < w.end
        if stride is not None and w.start > 0:  # sliding: a target sees at least L - S + 1 tokens
            assert w.score_from - w.start + 1 >= length - stride + 1


def test_window_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stride must be in"):
        plan_windows(10, 4, 5)
    with pytest.raises(ValueError, match="nothing to score"):
        plan_windows(0, 4)


def test_non_overlapping_scores_match_per_target_references():
    model = tiny_lm()
    stream = torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(1))
    score = score_stream(model, stream, 8, batch_size=3, measure_memory=False)
    assert score.targets == 29 and score.status == "ok"
    expected = [target_loss(model, stream, j, j % 8 + 1) for j in range(29)]  # window position + 1 tokens
    assert score.loss == pytest.approx(sum(expected) / 29, rel=1e-5)
    bins = score.loss_by_position()
    assert sum(b["targets"] for b in bins) == 29
    assert bins[0] == {"first": 0, "last": 0, "targets": 4, "loss": pytest.approx(
        sum(expected[j] for j in range(0, 29, 8)) / 4, rel=1e-5)}


def test_sliding_window_with_stride_one_gives_every_target_the_full_context():
    model = tiny_lm(1)
    stream = torch.randint(0, V, (26,), generator=torch.Generator().manual_seed(2))
    score = score_stream(model, stream, 6, stride=1, measure_memory=False)
    expected = [target_loss(model, stream, j, min(j + 1, 6)) for j in range(25)]
    assert score.loss == pytest.approx(sum(expected) / 25, rel=1e-5)


def test_every_length_scores_the_same_targets_and_is_timed():
    model = tiny_lm(2)
    stream = torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(3))
    scores = [score_stream(model, stream, n, n_targets=192) for n in (8, 16, 64)]
    assert [s.targets for s in scores] == [192] * 3
    assert [s.windows for s in scores] == [24, 12, 3]
    assert all(int(s.position_count.sum()) == 192 for s in scores)
    assert all(s.tokens_per_sec > 0 and s.peak_mb > 0 for s in scores)
    # the first target of the stream has context 1 at every L: same loss in every bin 0 (only its own window)
    assert all(math.isfinite(s.ppl) for s in scores)


class OOMAbove(nn.Module):
    """Stands in for a GPU running out of memory (no GPU here): raises CUDA's OOM error beyond `limit` tokens."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[1]} units")
        return self.inner(x)


def test_out_of_memory_is_reported_not_raised_and_other_errors_still_raise():
    model = OOMAbove(tiny_lm(), 16)
    stream = torch.randint(0, V, (70,), generator=torch.Generator().manual_seed(4))
    ok = score_stream(model, stream, 16, n_targets=64, measure_memory=False)
    oom = score_stream(model, stream, 32, n_targets=64, measure_memory=False)
    assert ok.status == "ok" and oom.status == "oom" and "OutOfMemoryError" in oom.error
    assert math.isnan(oom.loss) and oom.to_dict()["loss_by_position"] == []
    with pytest.raises(IndexError):
        score_stream(model, torch.tensor([0, V + 5, 1]), 2, measure_memory=False)
