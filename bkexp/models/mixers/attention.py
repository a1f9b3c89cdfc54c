"""Causal multi-head self-attention mixer (the Transformer baseline), through ``scaled_dot_product_attention``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkexp.models.mixers.base import Mixer
from bkexp.ops.rotary import qkv_heads


class AttentionMixer(Mixer):
    """Multi-head attention with rotary positions; causal (flash/efficient kernels on GPU) unless told not.

    Decoding state (causal only): the KV cache ``{"k", "v"}``, each (batch, heads, capacity, head_dim), keys
    already rotated at their own positions; positions ``0..position-1`` are filled. A step rotates its query
    and key at ``position`` (so rotary positions continue where the prompt ended), writes the key and value
    there and attends to the filled prefix. The cache grows by doubling when full, so its size -- and a step's
    cost -- grow linearly with the context.
    """

    def __init__(self, d_model: int, n_heads: int = 4, causal: bool = True, rotary: bool = True,
                 dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__(d_model)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.rotary = rotary
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, x: Tensor, offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (batch, heads, seq, head_dim), rotated at positions ``offset...``."""
        qkv = self.qkv(x)
        if self.rotary:  # one pass on CPU (bkexp.ops.rotary), PyTorch's ops elsewhere
            return qkv_heads(qkv, self.n_heads, offset=offset)
        b, n, _ = x.shape
        q, k, v = qkv.view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        b, _, n, _ = q.shape
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, n, self.d_model))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._heads(x)
        return self._attend(q, k, v, self.causal)

    @property
    def decode_unsupported(self) -> str | None:
        return None if self.causal else "bidirectional attention (causal=False) reads future tokens"

    def prefill(self, x: Tensor, capacity: int) -> tuple[Tensor, dict[str, Tensor]]:
        q, k, v = self._heads(x)
        n = x.shape[1]
        shape = (k.shape[0], self.n_heads, max(capacity, n), self.head_dim)
        cache = {"k": k.new_empty(shape), "v": v.new_empty(shape)}
        cache["k"][:, :, :n] = k
        cache["v"][:, :, :n] = v
        return self._attend(q, k, v, True), cache

    def step(self, x: Tensor, state: dict[str, Tensor], position: int) -> Tensor:
        q, k, v = self._heads(x, offset=position)
        if position >= state["k"].shape[2]:  # full: double the capacity (amortised O(1) per token)
            for name in ("k", "v"):
                old = state[name]
                state[name] = torch.cat([old, torch.empty_like(old)], dim=2)
        state["k"][:, :, position] = k[:, :, 0]
        state["v"][:, :, position] = v[:, :, 0]
        # One query against every filled position: all of them are in its past, so no mask is needed.
        return self._attend(q, state["k"][:, :, :position + 1], state["v"][:, :, :position + 1], False)

    def state_size(self, seq_len: int) -> int:
        # The KV cache: keys and values for every past token; grows linearly with the sequence.
        return 2 * self.d_model * seq_len

    def backends(self) -> dict[str, str]:
        return {"attention": "sdpa"}
