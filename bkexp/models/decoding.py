"""The decoding state of a language model: what ``LanguageModel.prefill`` returns and ``step`` advances.

One entry per layer, owned by that layer's mixer, which documents it (``Mixer.prefill``/``step``): the KV
cache for attention, the last BK-Core pivot for causal BK, the conv window and SSM state for Mamba. Every
tensor has the batch first, so rows can be selected, repeated or reordered for sampling several
continuations of one prompt or for beam search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bkexp.models.mixers.base import DecodeLayerState


@dataclass
class DecodeState:
    """``position``: tokens consumed so far (the 0-based position of the next token); ``layers``: per layer."""

    position: int
    layers: list[DecodeLayerState]

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            for tensor in layer.values():
                return tensor.shape[0]
        raise ValueError("the decoding state holds no tensors, so it has no batch size")

    def nbytes(self) -> int:
        """Bytes of the state's tensors (their elements, including a KV cache's unfilled capacity)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def index_select(self, rows: Tensor) -> DecodeState:
        """A new state holding rows ``rows`` of this one (e.g. ``torch.zeros(n, dtype=long)`` repeats row 0)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return DecodeState(self.position, [{name: t.index_select(0, rows.to(t.device)) for name, t in layer.items()}
                                           for layer in self.layers])


__all__ = ["DecodeState"]
