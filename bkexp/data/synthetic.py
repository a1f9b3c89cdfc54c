"""Synthetic token tasks generated from a seed: multi-query associative recall (MQAR) and i.i.d. tokens.

Generators return ``(input_ids, labels)`` LongTensors of shape (num_examples, seq_len) with ``labels``
already aligned to the model's outputs (``labels[:, t]`` is the target for the logits at position t;
``IGNORE_INDEX`` where no loss is taken). Everything is drawn from a ``torch.Generator``, so a seed gives
the same data on every machine and in every process.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
MQAR_BLOCK = 1024  # examples generated per block (see mqar)


def split_seed(seed: int, split: str) -> int:
    """A seed for one split derived from the run seed, different for every (seed, split) pair.

    numpy's SeedSequence hashes ``[seed, split code]`` so that neighbouring run seeds do not give
    overlapping streams (e.g. the validation split of seed 0 is not the training split of seed 1).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLIT_CODES)}")
    return int(np.random.SeedSequence([seed, SPLIT_CODES[split]]).generate_state(1, dtype=np.uint64)[0])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mqar(num_examples: int, seq_len: int, vocab_size: int, num_kv_pairs: int, seed: int,
         power_a: float = 0.01, random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall in the layout of Zoology (Arora et al. 2023, ``multiquery_ar``).

    Keys come from ``[1, vocab_size // 2)`` and values from ``[vocab_size // 2, vocab_size)`` (disjoint), each
    drawn without replacement within an example. An example is::

        k1 v1 k2 v2 ... kK vK | q . . q . q . . . .
          context (2K tokens) | query region (seq_len - 2K tokens)

    Every key of the context is queried exactly once, at an even offset ``2 * gap`` of the query region,
    with the gaps drawn without replacement from a power law ``p(g) ~ (g+1) ** (power_a - 1)`` (small
    ``power_a``: queries cluster near the start of the region, as in Zoology). The label at a query position
    is the value paired with that key in the context; every other label is ``IGNORE_INDEX``, so loss and
    accuracy cover the answers only. Unlike in text, the answer is not written into the input after its
    query. With ``random_non_queries`` the filler positions of the query region hold uniform random tokens
    from the whole vocabulary (Zoology's default), otherwise token 0 (which no key or value uses).

    Differences from Zoology: torch RNG instead of numpy's global seed; one pass over the context
    (no JRT ``num_passes``); no requirement that ``vocab_size > seq_len``.
    """
    for name, value in {"num_examples": num_examples, "seq_len": seq_len, "vocab_size": vocab_size,
                        "num_kv_pairs": num_kv_pairs}.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if power_a <= 0:
        raise ValueError(f"power_a must be > 0, got {power_a!r}")
    key_vocab = vocab_size // 2
    num_keys, num_values = key_vocab - 1, vocab_size - key_vocab
    if num_kv_pairs > min(num_keys, num_values):
        raise ValueError(f"num_kv_pairs={num_kv_pairs} needs that many distinct keys and values, but "
                         f"vocab_size={vocab_size} gives {num_keys} keys [1, {key_vocab}) and "
                         f"{num_values} values [{key_vocab}, {vocab_size}); raise vocab_size or lower num_kv_pairs")
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2  # query slots: the even offsets of the query region
    if space < num_kv_pairs:
        raise ValueError(f"seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: it needs at least "
                         f"4 * num_kv_pairs = {4 * num_kv_pairs} tokens (context plus one query slot per key)")

    g = _generator(seed)
    # Blocks bound the memory of the (block, num_keys) sampling tables for large vocabularies; the block
    # size is fixed, so the data depend only on the seed.
    blocks = [_mqar_block(min(MQAR_BLOCK, num_examples - start), seq_len, vocab_size, num_kv_pairs, g,
                          power_a, random_non_queries)
              for start in range(0, num_examples, MQAR_BLOCK)]
    return torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])


def _mqar_block(n: int, seq_len: int, vocab_size: int, num_kv_pairs: int, g: torch.Generator,
                power_a: float, random_non_queries: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key_vocab = vocab_size // 2
    num_keys, num_values = key_vocab - 1, vocab_size - key_vocab
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2
    keys = torch.rand(n, num_keys, generator=g).argsort(dim=1)[:, :num_kv_pairs] + 1
    values = torch.rand(n, num_values, generator=g).argsort(dim=1)[:, :num_kv_pairs] + key_vocab

    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values

    ranks = torch.arange(1, space + 1, dtype=torch.float64)
    probs = (power_a * ranks ** (power_a - 1)).expand(n, space)
    gaps = torch.multinomial(probs, num_kv_pairs, replacement=False, generator=g)
    query_pos = context + 2 * gaps
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    inputs.scatter_(1, query_pos, keys)
    labels.scatter_(1, query_pos, values)

    if random_non_queries:
        filler = torch.zeros(n, seq_len, dtype=torch.bool)
        filler[:, context:] = True
        filler.scatter_(1, query_pos, False)
        noise = torch.randint(vocab_size, (n, seq_len), generator=g)
        inputs = torch.where(filler, noise, inputs)
    return inputs, labels


def iid_tokens(num_examples: int, seq_len: int, vocab_size: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform i.i.d. tokens with next-token labels: the control task where no model beats ln(vocab_size).

    Each example is ``seq_len + 1`` fresh tokens; inputs are the first ``seq_len``, labels the last
    ``seq_len`` (``labels[:, t] == input_ids[:, t + 1]``), so every position is predicted.
    """
    for name, value in {"num_examples": num_examples, "seq_len": seq_len, "vocab_size": vocab_size}.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    tokens = torch.randint(vocab_size, (num_examples, seq_len + 1), generator=_generator(seed))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
