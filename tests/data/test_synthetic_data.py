"""Synthetic tasks: MQAR answers checked by parsing each sequence, seed determinism, uniform i.i.d. tokens."""

from __future__ import annotations

import math

import pytest
import torch

from bkexp.data import IGNORE_INDEX, IIDDataModule, MQARDataModule, iid_tokens, mqar, split_seed


def check_mqar_example(x: list[int], y: list[int], vocab_size: int, num_kv_pairs: int) -> None:
    """Independent parser: read the context pairs, then every labelled position must be a query for
    which the label is the value stored with that key; every key is asked exactly once."""
    context = 2 * num_kv_pairs
    pairs = dict(zip(x[0:context:2], x[1:context:2], strict=True))
    assert len(pairs) == num_kv_pairs, "keys within an example are distinct"
    assert all(1 <= k < vocab_size // 2 for k in pairs), "keys come from [1, V/2)"
    assert all(vocab_size // 2 <= v < vocab_size for v in pairs.values()), "values come from [V/2, V)"
    assert len(set(pairs.values())) == num_kv_pairs
    answered = [t for t, label in enumerate(y) if label != IGNORE_INDEX]
    assert len(answered) == num_kv_pairs
    assert all(t >= context and (t - context) % 2 == 0 for t in answered), "queries at even query-region offsets"
    assert sorted(x[t] for t in answered) == sorted(pairs)
    for t in answered:
        assert y[t] == pairs[x[t]]


@pytest.mark.parametrize(("vocab_size", "num_kv_pairs", "seq_len", "random_fill"),
                         [(64, 4, 64, True), (128, 8, 128, True), (32, 3, 12, False)],
                         ids=["V64-K4-N64", "V128-K8-N128", "V32-K3-N12-zero-fill"])
def test_mqar_answers_are_the_values_of_the_queried_keys(vocab_size: int, num_kv_pairs: int, seq_len: int,
                                                         random_fill: bool) -> None:
    x, y = mqar(300, seq_len, vocab_size, num_kv_pairs, seed=7, random_non_queries=random_fill)
    assert x.shape == y.shape == (300, seq_len) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < vocab_size
    for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
        check_mqar_example(xi, yi, vocab_size, num_kv_pairs)
    if not random_fill:
        queried = y != IGNORE_INDEX
        assert (x[:, 2 * num_kv_pairs:][~queried[:, 2 * num_kv_pairs:]] == 0).all()
        assert (x[:, 2 * num_kv_pairs:] < vocab_size // 2).all(), "answers never appear after the context"


def test_mqar_is_deterministic_in_the_seed_and_splits_differ() -> None:
    a = mqar(50, 64, 64, 4, seed=split_seed(0, "train"))
    b = mqar(50, 64, 64, 4, seed=split_seed(0, "train"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    seeds = {split_seed(s, split) for s in range(3) for split in ("train", "validation", "test")}
    assert len(seeds) == 9
    dm1, dm2, dm3 = (MQARDataModule("mqar", 64, 8, num_train=40, num_val=10, num_test=10, seed=s) for s in (1, 1, 2))
    for dm in (dm1, dm2, dm3):
        dm.setup("fit")
    assert torch.equal(dm1.datasets["train"].input_ids, dm2.datasets["train"].input_ids)
    assert not torch.equal(dm1.datasets["train"].input_ids, dm3.datasets["train"].input_ids)
    train_rows = {tuple(r) for r in dm1.datasets["train"].input_ids.tolist()}
    assert not train_rows & {tuple(r) for r in dm1.datasets["validation"].input_ids.tolist()}


def test_mqar_query_positions_follow_the_power_law() -> None:
    # power_a = 0.01 puts most queries in the first slots; power_a = 1 spreads them uniformly.
    def mean_answer_position(power_a: float) -> float:
        _, y = mqar(400, 128, 64, 4, seed=0, power_a=power_a)
        return (y != IGNORE_INDEX).nonzero()[:, 1].float().mean().item()

    assert mean_answer_position(0.01) < mean_answer_position(1.0) - 10


def test_mqar_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="too short"):
        mqar(1, 15, 64, 4, seed=0)
    with pytest.raises(ValueError, match="raise vocab_size"):
        mqar(1, 64, 8, 4, seed=0)
    with pytest.raises(ValueError, match="too short"):
        MQARDataModule("mqar", 16, 4, num_kv_pairs=8)


def test_mqar_datamodule_batches_and_describe() -> None:
    dm = MQARDataModule("mqar", seq_len=32, batch_size=8, vocab_size=64, num_kv_pairs=4, num_train=30,
                        num_val=12, num_test=12, eval_batch_size=5, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 32)
    assert [len(b["input_ids"]) for b in dm.val_dataloader()] == [5, 5, 2]
    assert dm.has_answer_mask and dm.autoregressive and dm.vocab_size == 64
    d = dm.describe()
    assert d["splits"]["train"] == {"examples": 30, "tokens": 30 * 32, "predicted_tokens": 30 * 4}
    assert d["source"]["task"] == "mqar" and d["name"] == "mqar"


def test_iid_tokens_are_uniform_with_next_token_labels() -> None:
    vocab = 16
    x, y = iid_tokens(400, 64, vocab, seed=0)
    assert torch.equal(y[:, :-1], x[:, 1:])
    counts = torch.bincount(torch.cat([x[:, :1], y], dim=1).flatten(), minlength=vocab).double()
    expected = counts.sum() / vocab
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50.0, f"chi-square {chi2:.1f} with {vocab - 1} dof: not uniform"  # p < 1e-5 under uniformity
    # The empirical entropy is essentially ln(V): the floor no causal model can beat.
    p = counts / counts.sum()
    assert abs(float(-(p * p.log()).sum()) - math.log(vocab)) < 0.01


def test_iid_datamodule_seeded_and_describe() -> None:
    dm = IIDDataModule("iid", seq_len=16, batch_size=4, vocab_size=32, num_train=20, num_val=8, num_test=8, seed=5)
    dm.setup("fit")
    again = IIDDataModule("iid", seq_len=16, batch_size=4, vocab_size=32, num_train=20, num_val=8, num_test=8, seed=5)
    again.setup("fit")
    assert torch.equal(dm.datasets["test"].input_ids, again.datasets["test"].input_ids)
    assert not torch.equal(dm.datasets["train"].input_ids[:8], dm.datasets["validation"].input_ids)
    assert not dm.has_answer_mask
    assert dm.describe()["splits"]["validation"]["predicted_tokens"] == 8 * 16


@pytest.mark.parametrize("bad", [{"seq_len": 0}, {"batch_size": -1}, {"num_workers": -1}, {"seed": -3},
                                 {"vocab_size": 0}], ids=lambda d: next(iter(d)))
def test_bad_sizes_are_rejected_with_the_name(bad: dict) -> None:
    kwargs = {"name": "iid", "seq_len": 8, "batch_size": 2, "vocab_size": 8, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        IIDDataModule(**kwargs)


def test_a_training_split_smaller_than_one_dropped_batch_is_refused_by_its_values() -> None:
    dm = IIDDataModule("iid", seq_len=8, batch_size=16, vocab_size=8, num_train=10, num_val=4, num_test=4,
                       drop_last=True)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"training split has 10 example\(s\), fewer than one batch \(batch_size=16\)"
                                         r".*valid: batch_size <= 10, or drop_last=false"):
        dm.train_dataloader()
    dm.drop_last = False  # the last, smaller batch is kept: one batch of 10 per epoch
    assert [len(b["input_ids"]) for b in dm.train_dataloader()] == [10]
    dm.drop_last, dm.batch_size = True, 10
    assert [len(b["input_ids"]) for b in dm.train_dataloader()] == [10]
