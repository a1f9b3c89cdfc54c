"""The one LM backbone shared by every architecture: embedding, pre-norm residual blocks, norm, LM head.

Architectures differ only in the mixer (and optionally the feed-forward) that each block is built with,
so parameter accounting, initialisation, the causality check and the training loop are identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from bkexp.models.mixers.base import Mixer

NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def make_norm(kind: str, d_model: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; valid: {sorted(NORMS)}")
    return NORMS[kind](d_model)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``.

    With ``parallel=True`` the mixer and feed-forward branches read the same normalised input and are
    added together (the original ResNet-BK layout, where the BK branch runs beside the FFN).
    """

    def __init__(self, d_model: int, mixer: Mixer, ffn: nn.Module | None, norm: str = "rmsnorm",
                 parallel: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.mixer = mixer
        self.ffn = ffn
        self.parallel = parallel
        self.norm1 = make_norm(norm, d_model)
        self.norm2 = make_norm(norm, d_model) if ffn is not None and not parallel else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        if self.parallel:
            out = self.mixer(h)
            if self.ffn is not None:
                out = out + self.ffn(h)
            return x + self.drop(out)
        x = x + self.drop(self.mixer(h))
        if self.ffn is not None:
            x = x + self.drop(self.ffn(self.norm2(x)))
        return x


class LanguageModel(nn.Module):
    """Causal LM: ``logits = head(norm(blocks(embed(tokens))))``.

    ``mixer`` and ``ffn`` are factories called as ``mixer(d_model=...)`` once per layer (Hydra builds them
    from configs with ``_partial_: true``), so every layer gets fresh parameters.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, mixer: Callable[..., Mixer],
                 ffn: Callable[..., nn.Module] | None = None, name: str = "lm", tie_embeddings: bool = True,
                 norm: str = "rmsnorm", parallel_ffn: bool = False, dropout: float = 0.0,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.name = name
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.tie_embeddings = tie_embeddings
        self.init_std = init_std
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, mixer(d_model=d_model), ffn(d_model=d_model) if ffn is not None else None,
                  norm=norm, parallel=parallel_ffn, dropout=dropout)
            for _ in range(n_layers)
        )
        self.norm_f = make_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-style init; parameters flagged ``_no_reinit`` (e.g. Mamba's dt bias) keep their own init."""
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.init_std)
        elif isinstance(module, nn.Linear):
            if not getattr(module.weight, "_no_reinit", False):
                std = self.init_std
                if getattr(module.weight, "_residual_out", False):
                    std /= math.sqrt(2 * self.n_layers)
                nn.init.normal_(module.weight, std=std)
            if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.drop(self.embed(input_ids))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))

    @property
    def causal(self) -> bool:
        return all(block.mixer.causal for block in self.blocks)

    def aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary losses set by submodules in the last forward (e.g. MoE load balancing), by module name."""
        return {name: m.aux_loss for name, m in self.named_modules()
                if m is not self and getattr(m, "aux_loss", None) is not None}

    def param_counts(self) -> dict[str, int]:
        """Total and non-embedding parameter counts (a tied head is counted once, as the embedding)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        embedding = self.embed.weight.numel()
        if not self.tie_embeddings:
            embedding += self.head.weight.numel()
        return {"total": total, "non_embedding": total - embedding, "embedding": embedding}

    def state_size(self, seq_len: int) -> int:
        """Scalars a decoder keeps per sequence after ``seq_len`` tokens, summed over layers."""
        return sum(block.mixer.state_size(seq_len) for block in self.blocks)

    def backends(self) -> dict[str, str]:
        """Op -> implementation actually used, merged over layers (e.g. ``{"bk_core": "cpu"}``)."""
        merged: dict[str, str] = {}
        for block in self.blocks:
            merged.update(block.mixer.backends())
        return merged
