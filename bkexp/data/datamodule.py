"""Lightning datamodules for every task: text (hub or local files) and the synthetic MQAR and i.i.d. tasks.

All of them yield batches ``{"input_ids": (B, N), "labels": (B, N)}`` (int64) where ``labels[:, t]`` is the
target for the logits at position t and ``IGNORE_INDEX`` (-100) marks positions without loss. After
``prepare_data(); setup(stage)`` they expose ``vocab_size``, ``autoregressive``, ``has_answer_mask``,
``ignore_index``, ``tokenizer`` (saved into the run directory), ``describe()`` (the dataset record in
summary.json) and ``overlapping_splits()`` (pairs of splits that are the same data, :mod:`bkexp.held_out`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from bkexp.data.sources import SPLITS, HubTextSource, LocalTextSource
from bkexp.data.synthetic import IGNORE_INDEX, iid_tokens, mqar, split_seed
from bkexp.data.tokenizers import IdTokenizer, Tokenizer
from bkexp.held_out import OVERLAP_COLUMN, RECORD_KEY, ngram_overlaps, overlapping_pairs


class ChunkedStream(Dataset):
    """One token stream cut into contiguous, non-overlapping chunks of ``seq_len`` next-token pairs.

    Chunk i has inputs ``stream[i*N : i*N+N]`` and labels ``stream[i*N+1 : i*N+N+1]``, so the text
    continues across chunk boundaries. The last chunk is padded (inputs with ``input_pad_id``, labels with
    ``IGNORE_INDEX``), so every token of the stream except the first is a label exactly once.
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, input_pad_id: int = 0) -> None:
        if stream.dim() != 1:
            raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
        self.stream = stream
        self.seq_len = seq_len
        self.input_pad_id = input_pad_id
        self.num_targets = max(len(stream) - 1, 0)

    def __len__(self) -> int:
        return math.ceil(self.num_targets / self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} out of range [0, {len(self)})")
        start = index * self.seq_len
        n = min(self.seq_len, self.num_targets - start)
        input_ids = torch.full((self.seq_len,), self.input_pad_id, dtype=torch.long)
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:n] = self.stream[start : start + n]
        labels[:n] = self.stream[start + 1 : start + n + 1]
        return {"input_ids": input_ids, "labels": labels}


class ExampleDataset(Dataset):
    """Independent fixed-length examples (synthetic tasks): row i of ``input_ids`` and ``labels``."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if input_ids.shape != labels.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must be "
                             "the same (num_examples, seq_len) shape")
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


class EpochShuffleSampler(Sampler[int]):
    """Shuffled indices whose order depends only on ``(seed, epoch)``; its state is ``(epoch, position)``.

    A ``StatefulDataLoader`` stores this state in every checkpoint (Lightning saves the loader's state_dict),
    so a run resumed mid-epoch continues with the next example of the same permutation, and later epochs
    get the same permutations as in the uninterrupted run. (torchdata's own RandomSampler restores the
    current epoch but not the generator state the next epochs start from.)
    """

    def __init__(self, num_examples: int, seed: int) -> None:
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0
        self.position = 0  # examples of this epoch's permutation already handed out

    def __len__(self) -> int:
        return self.num_examples

    def permutation(self, epoch: int) -> list[int]:
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0])
        return torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(seed)).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.permutation(self.epoch)
        while self.position < self.num_examples:  # read at the first next(): load_state_dict may come first
            self.position += 1
            yield order[self.position - 1]
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_shard_sampler(dataset: Dataset, split: str) -> Sampler[int] | None:
    """Under DDP, this rank's share of an evaluation split, every example on exactly one rank (None otherwise).

    Lightning would give evaluation loaders a ``DistributedSampler``, which pads every rank to the same number of
    examples by repeating the first ones: with 1919 test chunks on two ranks, chunk 0 was scored twice, and the
    DDP-synced mean loss in summary.json was no longer the split's. Here rank r takes examples r, r + W, ...
    (Lightning's ``UnrepeatedDistributedSampler``, a ``DistributedSampler``, so Lightning leaves it in place);
    ranks may run one batch apart, which evaluation allows (no gradient sync; the metrics sync once, at the end).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    if world == 1 or not isinstance(dataset, Sized):
        return None  # a streamed split is split by its source
    if len(dataset) < world:
        # a rank without a batch would leave the others waiting (DDP syncs buffers at a validation's first forward)
        raise ValueError(f"split {split!r} has {len(dataset)} example(s), fewer than the {world} DDP processes, "
                         f"so some process would evaluate nothing; valid: at least {world} examples, or fewer "
                         f"processes (trainer.devices)")
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=torch.distributed.get_rank(),
                                        shuffle=False)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _same_examples(a: Dataset, b: Dataset) -> bool:
    """Whether two in-memory splits hold the same tokens (False for anything else, e.g. streams)."""
    if isinstance(a, ChunkedStream) and isinstance(b, ChunkedStream):
        return (isinstance(a.stream, torch.Tensor) and isinstance(b.stream, torch.Tensor)
                and torch.equal(a.stream, b.stream))
    if isinstance(a, ExampleDataset) and isinstance(b, ExampleDataset):
        return torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    return False


class TokenDataModule(L.LightningDataModule):
    """Shared loaders and attributes; subclasses fill ``self.datasets[split]`` in ``setup``.

    The training loader (a torchdata ``StatefulDataLoader``: its position is checkpointed) shuffles with a
    ``torch.Generator`` seeded from ``seed`` (a new order every epoch, the same sequence of orders for the
    same seed) and keeps the last, smaller batch (``drop_last=False``)
    so an epoch trains on every token once. Evaluation loaders keep the data order; under DDP every example of an
    evaluation split is scored by exactly one process (:func:`eval_shard_sampler`).
    """

    autoregressive: bool = True
    has_answer_mask: bool = False
    ignore_index: int = IGNORE_INDEX
    pad_id: int = IGNORE_INDEX  # alias of ignore_index: the label value that takes no loss
    input_pad_id: int = 0  # token id used to pad the inputs of a final partial chunk (never a label)

    def __init__(self, name: str, seq_len: int, batch_size: int, eval_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__()
        self.name = name
        self.seq_len = _positive_int("seq_len", seq_len)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.eval_batch_size = _positive_int("eval_batch_size", eval_batch_size or batch_size)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_workers = num_workers
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__}: split {split!r} is not set up; call setup() first")
        # Every loader draws from its own seeded generator, never from the global RNG, so evaluating does
        # not change what the model's dropout draws next (a resumed run must see the same random numbers).
        # The training loader is stateful: Lightning stores its position (epoch and place in the epoch's
        # permutation) in every checkpoint and resumes mid-epoch from there.
        dataset = self.datasets[split]
        sampler = EpochShuffleSampler(len(dataset), self.seed) if train else eval_shard_sampler(dataset, split)
        return (StatefulDataLoader if train else DataLoader)(
            dataset, batch_size=batch_size, sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=self.drop_last if train else False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        train = self.datasets.get("train")
        examples = len(train) if isinstance(train, Sized) else None  # a streamed split has no length
        if self.drop_last and examples is not None and examples < self.batch_size:
            # else every epoch would be empty: the first batch is a bare StopIteration, and Lightning skips training
            raise ValueError(f"dataset {self.name!r}: the training split has {examples} example(s), fewer than one "
                             f"batch (batch_size={self.batch_size}), and drop_last=true drops it, so no epoch has a "
                             f"batch; valid: batch_size <= {examples}, or drop_last=false")
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, train=False)

    def overlapping_splits(self) -> list[list[str]]:
        """Pairs of set-up splits that hold the same examples (e.g. validation and test read one file)."""
        return overlapping_pairs(self.datasets, lambda a, b: _same_examples(self.datasets[a], self.datasets[b]))

    def _split_counts(self) -> dict[str, dict[str, int]]:
        """Per split: examples (chunks), input tokens and labelled (predicted) tokens."""
        counts = {}
        for split, ds in self.datasets.items():
            labels = ds.labels if isinstance(ds, ExampleDataset) else None
            if isinstance(ds, ChunkedStream):
                counts[split] = {"examples": len(ds), "tokens": len(ds.stream), "predicted_tokens": ds.num_targets}
            elif labels is not None:
                counts[split] = {"examples": len(ds), "tokens": labels.numel(),
                                 "predicted_tokens": int((labels != IGNORE_INDEX).sum())}
        return counts


class TextDataModule(TokenDataModule):
    """Language modelling on text splits from the hub (``hub``) or a local folder (``data_dir`` + ``files``).

    ``data_dir`` wins over ``hub`` when both are set; with neither usable (``hub`` null and no
    ``data_dir``, or offline without ``data_dir``) construction fails with the overrides that fix it.
    Splits are tokenised in memory in ``setup`` (the word vocabulary is fitted on the training split) and
    cut into next-token chunks by :class:`ChunkedStream`: evaluation covers every token of a split but
    the first exactly once; training uses the same chunks in a shuffled order.

    Args:
        name: dataset name recorded in summary.json.
        tokenizer: a :class:`~bkexp.data.tokenizers.Tokenizer` (Hydra builds it from ``conf/tokenizer``).
        hub: ``{path, name, text_field, splits}`` for ``datasets.load_dataset(path, name)``, or None.
        data_dir: folder with one plain-text file per split; relative to the launch directory.
        files: file name per split, keys ``train``, ``validation``, ``test``.
    """

    def __init__(self, name: str, seq_len: int, batch_size: int, tokenizer: Tokenizer,
                 eval_batch_size: int | None = None, hub: Mapping[str, Any] | None = None,
                 data_dir: str | None = None, files: Mapping[str, str] | None = None,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(name, seq_len, batch_size, eval_batch_size, num_workers, seed, drop_last)
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a bkexp.data Tokenizer (e.g. from conf/tokenizer: word, byte, "
                            f"gpt2), got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        files = {s: str(f) for s, f in dict(files or {}).items()}
        if data_dir is not None or hub is None:
            self.source: LocalTextSource | HubTextSource = LocalTextSource.build(name, data_dir, files)
        else:
            self.source = HubTextSource.build(name, hub, files)
        self.streams: dict[str, torch.Tensor] = {}

    def overlapping_splits(self) -> list[list[str]]:
        """Pairs of splits that read overlapping source data or hold the same tokens."""
        return overlapping_pairs(self.datasets, lambda a, b: self.source.shares_data(a, b)
                                 or _same_examples(self.datasets[a], self.datasets[b]))

    def prepare_data(self) -> None:
        if isinstance(self.source, HubTextSource):
            self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.streams:
            return  # all splits are tokenised at the first call, whatever the stage
        lines = {split: self.source.load(split) for split in SPLITS}
        self.tokenizer.fit(lines["train"])
        for split in SPLITS:
            stream = self.tokenizer.encode_lines(lines[split])
            if len(stream) < 2:
                raise ValueError(f"dataset {self.name!r}: split {split!r} has {len(stream)} token(s); "
                                 "at least 2 are needed for one next-token target")
            if split == "train" and len(stream) - 1 < self.seq_len:
                raise ValueError(f"dataset {self.name!r}: the training split has {len(stream) - 1} next-token "
                                 f"targets, fewer than one sequence (seq_len={self.seq_len}); valid: seq_len <= "
                                 f"{max(len(stream) - 1, 1)}, or a longer training file")
            self.streams[split] = stream
            self.datasets[split] = ChunkedStream(stream, self.seq_len, self.input_pad_id)

    @property
    def vocab_size(self) -> int:
        if not self.streams:
            raise RuntimeError(f"{self.name}: vocab_size is known after setup() (the vocabulary may come from "
                               "the training split)")
        return self.tokenizer.vocab_size

    def describe(self) -> dict[str, Any]:
        splits = self._split_counts()
        if "train" in self.streams:  # how much of the evaluation text also occurs in training, by 13-grams
            held = [s for s in ("validation", "test") if s in self.streams]
            for split, share in zip(held, ngram_overlaps([self.streams[s] for s in held], self.streams["train"])):
                splits[split][OVERLAP_COLUMN] = share
        return {"name": self.name, "source": self.source.describe(), "tokenizer": self.tokenizer.describe(),
                "vocab_size": self.vocab_size if self.streams else None, "seq_len": self.seq_len,
                "splits": splits, RECORD_KEY: self.overlapping_splits()}


class _SyntheticDataModule(TokenDataModule):
    """Fixed-size examples generated in ``setup`` from per-split seeds derived from ``seed``."""

    task: str = "synthetic"

    def __init__(self, name: str, seq_len: int, batch_size: int, vocab_size: int, num_train: int,
                 num_val: int, num_test: int, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(name, seq_len, batch_size, eval_batch_size, num_workers, seed, drop_last)
        self._vocab_size = _positive_int("vocab_size", vocab_size)
        self.num_examples = {"train": _positive_int("num_train", num_train),
                             "validation": _positive_int("num_val", num_val),
                             "test": _positive_int("num_test", num_test)}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        """Synthetic examples are token ids; this writes and reads them as numbers (saved with the run)."""
        return IdTokenizer(self._vocab_size)

    def _generate(self, num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, n in self.num_examples.items():
            self.datasets[split] = ExampleDataset(*self._generate(n, split_seed(self.seed, split)))

    def _task_params(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": {"kind": "synthetic", "task": self.task, "seed": self.seed,
                                              **self._task_params()},
                "tokenizer": None, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "splits": self._split_counts(), RECORD_KEY: self.overlapping_splits()}


class MQARDataModule(_SyntheticDataModule):
    """Multi-query associative recall (Zoology layout, see :func:`bkexp.data.synthetic.mqar`).

    Labels are the values at the query positions only, so loss and accuracy measure recall
    (``has_answer_mask``). Chance accuracy is about ``1 / (vocab_size - vocab_size // 2)`` once a model has
    learnt which tokens are values.
    """

    task = "mqar"
    has_answer_mask = True

    def __init__(self, name: str, seq_len: int, batch_size: int, vocab_size: int = 64, num_kv_pairs: int = 4,
                 num_train: int = 20_000, num_val: int = 500, num_test: int = 500, power_a: float = 0.01,
                 random_non_queries: bool = True, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(name, seq_len, batch_size, vocab_size, num_train, num_val, num_test, eval_batch_size,
                         num_workers, seed, drop_last)
        self.num_kv_pairs = num_kv_pairs
        self.power_a = float(power_a)
        self.random_non_queries = bool(random_non_queries)
        mqar(1, seq_len, vocab_size, num_kv_pairs, 0, self.power_a, self.random_non_queries)  # validate now

    def _generate(self, num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return mqar(num_examples, self.seq_len, self.vocab_size, self.num_kv_pairs, seed, self.power_a,
                    self.random_non_queries)

    def _task_params(self) -> dict[str, Any]:
        return {"num_kv_pairs": self.num_kv_pairs, "power_a": self.power_a,
                "random_non_queries": self.random_non_queries}


class IIDDataModule(_SyntheticDataModule):
    """Uniform i.i.d. tokens with next-token labels: the best possible loss is ln(vocab_size)."""

    task = "iid"

    def __init__(self, name: str, seq_len: int, batch_size: int, vocab_size: int = 64, num_train: int = 2_000,
                 num_val: int = 200, num_test: int = 200, eval_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = False) -> None:
        super().__init__(name, seq_len, batch_size, vocab_size, num_train, num_val, num_test, eval_batch_size,
                         num_workers, seed, drop_last)

    def _generate(self, num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return iid_tokens(num_examples, self.seq_len, self.vocab_size, seed)
