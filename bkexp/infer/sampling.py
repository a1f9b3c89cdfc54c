"""Next-token choice from logits: greedy, temperature, top-k and nucleus (top-p) sampling, seeded.

The filters follow the usual order (Hugging Face ``generate``, litgpt): divide by the temperature, keep the
``top_k`` largest logits, then keep the smallest set of most likely tokens whose probability reaches
``top_p`` (the token that crosses ``top_p`` is kept, so at least one token always survives). Temperature 0
means greedy decoding (argmax; ties go to the lowest id), where top-k/top-p change nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; ``Sampling()`` is plain sampling at temperature 1, ``Sampling(0)`` greedy."""

    temperature: float = 1.0  # 0 = greedy; > 0 divides the logits
    top_k: int | None = None  # keep the k most likely tokens (None = all)
    top_p: float = 1.0  # nucleus: keep the most likely tokens up to this total probability (1 = all)
    seed: int | None = None  # seeds the sampling generator (None: torch's global RNG)

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None (no top-k filter), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device`` (None without a seed: the global RNG is used)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def filter_logits(logits: Tensor, sampling: Sampling) -> Tensor:
    """Temperature-scaled logits (batch, vocab) with the tokens top-k/top-p drop set to ``-inf`` (float32+)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= sampling.top_p  # the token that crosses top_p is kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample_next(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """The next token per row (batch,) from logits (batch, vocab)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, sampling).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


__all__ = ["Sampling", "filter_logits", "sample_next"]
