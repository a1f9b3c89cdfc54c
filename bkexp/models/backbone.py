"""The plain language model shared by every architecture: embedding, pre-norm residual blocks, norm, LM head.

Architectures differ only in the mixer (and optionally the feed-forward) that each block is built with,
so parameter accounting, initialisation, the causality check and the training loop are identical.
Staged execution (the model-side optimization techniques: ACT, early exit, multi-scale, Koopman, gradient
checkpointing, the physics term) is :class:`bkexp.models.staged.StagedLanguageModel`, a subclass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from bkexp.models.decoding import DecodeState
from bkexp.models.mixers.base import DecodeLayerState, Mixer
from bkexp.ops import pooled_linear
from bkexp.ops.rms_norm import rms_norm


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters, same state dict) computed by ``bkexp.ops.rms_norm``: one compiled pass on
    CPU instead of PyTorch's composite of elementwise ops (``rms_norm`` falls back to PyTorch's where needed)."""

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)


NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}


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
        return self._residual(x, self.mixer)

    def _residual(self, x: Tensor, mix: Callable[[Tensor], Tensor], ffn: Callable[[Tensor], Tensor] | None = None
                  ) -> Tensor:
        ffn = self.ffn if ffn is None else ffn
        h = self.norm1(x)
        if self.parallel:
            out = mix(h)
            if ffn is not None:
                out = out + ffn(h)
            return x + self.drop(out)
        x = x + self.drop(mix(h))
        if ffn is not None:
            x = x + self.drop(ffn(self.norm2(x)))
        return x

    def prefill(self, x: Tensor, capacity: int) -> tuple[Tensor, DecodeLayerState]:
        """``forward(x)`` and the mixer's decoding state (the feed-forward is per token and keeps none)."""
        states: list[DecodeLayerState] = []

        def mix(h: Tensor) -> Tensor:
            out, state = self.mixer.prefill(h, capacity)
            states.append(state)
            return out

        return self._residual(x, mix), states[0]

    def step(self, x: Tensor, state: DecodeLayerState, position: int) -> Tensor:
        """One new position ``x`` (batch, 1, d_model); updates the mixer's ``state`` in place. A feed-forward
        with a ``step`` method (MoE: no padded expert blocks) uses it."""
        return self._residual(x, lambda h: self.mixer.step(h, state, position), getattr(self.ffn, "step", None))


class LanguageModel(nn.Module):
    """Causal LM: ``logits = head(norm(blocks(embed(tokens))))``.

    ``mixer`` and ``ffn`` are factories called as ``mixer(d_model=...)`` once per layer (Hydra builds them
    from configs with ``_partial_: true``), so every layer gets fresh parameters.

    Subclasses that add modules (``StagedLanguageModel``) register them in ``_add_modules``, which runs after
    the head and before the one initialisation pass, so the plain parameters draw the same random numbers
    whatever is added after them.
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
        self.norm_kind = norm
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
        self._add_modules()
        self.apply(self._init_weights)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def _add_modules(self) -> None:
        """Hook for subclasses: register further modules (after the head, before the initialisation)."""

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
        return pooled_linear.linear(self.head, self.norm_f(x))  # the logits in reusable memory (plain CPU head)

    # ------------------------------------------------------------------ incremental decoding

    @property
    def decode_unsupported(self) -> str | None:
        """None when ``prefill``/``step`` work for this model, else why not (a mixer's reason)."""
        for i, block in enumerate(self.blocks):
            reason = block.mixer.decode_unsupported
            if reason is not None:
                return f"layer {i}: {reason}"
        return None

    def prefill(self, input_ids: Tensor, capacity: int | None = None) -> tuple[Tensor, DecodeState]:
        """Logits (batch, seq, vocab) of the prompt ``input_ids`` (batch, seq >= 1), equal to ``forward``'s,
        and the decoding state after its last token. ``capacity``: total tokens (prompt + generated) the
        state should hold without growing (a hint for caches that grow with the context)."""
        reason = self.decode_unsupported
        if reason is not None:
            raise NotImplementedError(f"model {self.name!r} cannot decode incrementally: {reason}")
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, seq) with seq >= 1, got shape {tuple(input_ids.shape)}")
        n = input_ids.shape[1]
        x = self.drop(self.embed(input_ids))
        layers = []
        for block in self.blocks:
            x, state = block.prefill(x, max(capacity or n, n))
            layers.append(state)
        return pooled_linear.linear(self.head, self.norm_f(x)), DecodeState(position=n, layers=layers)

    def step(self, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Logits (batch, vocab) of the next position after feeding ``tokens`` (batch,) or (batch, 1); equal to
        ``forward``'s logits at that position over the whole sequence. ``state`` is updated in place (like
        mamba_ssm's inference params) and returned."""
        if tokens.dim() == 2 and tokens.shape[1] == 1:
            tokens = tokens[:, 0]
        if tokens.dim() != 1 or tokens.shape[0] != state.batch_size:
            raise ValueError(f"tokens must be (batch,) or (batch, 1) with batch = {state.batch_size} (the state's), "
                             f"got shape {tuple(tokens.shape)}")
        x = self.drop(self.embed(tokens[:, None]))
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            x = block.step(x, layer_state, state.position)
        state.position += 1
        return self.head(self.norm_f(x))[:, 0], state

    # ------------------------------------------------------------------ what the model reports

    @property
    def causal(self) -> bool:
        return all(block.mixer.causal for block in self.blocks)

    def aux_losses(self, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Auxiliary losses set by submodules in the last forward (e.g. MoE load balancing), by module name.

        ``labels`` (the batch just forwarded, ignore index -100) is for subclasses whose loss terms need them
        (early-exit heads); the plain model's submodules do not.
        """
        return {name: m.aux_loss for name, m in self.named_modules()
                if m is not self and getattr(m, "aux_loss", None) is not None}

    def flag_stats(self) -> dict[str, float]:
        """Measured effects of mixer-side techniques (e.g. ``active_heads_fraction``), averaged over the mixers
        that report them (``Mixer.flag_stats``)."""
        mixer_stats = [blk.mixer.flag_stats() for blk in self.blocks if hasattr(blk.mixer, "flag_stats")]
        stats: dict[str, float] = {}
        for key in sorted({k for st in mixer_stats for k in st}):
            values = [st[key] for st in mixer_stats if key in st]
            stats[key] = sum(values) / len(values)
        return stats

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
