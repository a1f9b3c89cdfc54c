"""Causal multi-head self-attention mixer (the Transformer baseline), through ``scaled_dot_product_attention``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkexp.models.mixers.base import Mixer


def rotary_embedding(x: Tensor, base: float = 10000.0) -> Tensor:
    """Apply rotary position embeddings to ``x`` of shape (batch, heads, seq, head_dim)."""
    _, _, n, hd = x.shape
    half = hd // 2
    inv_freq = base ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1)


class AttentionMixer(Mixer):
    """Multi-head attention with rotary positions; causal (flash/efficient kernels on GPU) unless told not."""

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

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            q, k = rotary_embedding(q), rotary_embedding(k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, n, self.d_model))

    def state_size(self, seq_len: int) -> int:
        # The KV cache: keys and values for every past token; grows linearly with the sequence.
        return 2 * self.d_model * seq_len

    def backends(self) -> dict[str, str]:
        return {"attention": "sdpa"}
