"""The one LM backbone shared by every architecture: embedding, pre-norm residual blocks, norm, LM head.

Architectures differ only in the mixer (and optionally the feed-forward) that each block is built with,
so parameter accounting, initialisation, the causality check and the training loop are identical.

Model-side optimization flags (all off by default; off, the model is exactly the plain backbone):
``act`` (adaptive computation time), ``multi_scale`` (middle layers at half resolution), ``early_exit``
(per-layer exit heads), ``koopman`` (Koopman operator across layers), ``grad_checkpoint`` (activation
checkpointing per block) and ``physics_weight`` (energy conservation across BK layers). They act on
*stages*: one stage per block, except that with ``multi_scale`` the half-resolution middle blocks form
one stage (per-token depth decisions are made at full resolution, between stages).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bkexp.models.adaptive import (
    AdaptiveComputationTime,
    EarlyExitHeads,
    apply_to_rows,
    flops_per_call,
)
from bkexp.models.koopman import KoopmanOperator
from bkexp.models.decoding import DecodeState
from bkexp.models.mixers.base import DecodeLayerState, Mixer
from bkexp.models.multiscale import CausalResampler, middle_layers
from bkexp.models.physics import EnergyConservation

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

    def forward_active(self, x: Tensor, active: Tensor, block_rows: int) -> tuple[Tensor, int]:
        """Early-exit evaluation: the mixer runs over every token (later tokens read every earlier token's
        state), the feed-forward only on ``active`` tokens. Rows of inactive tokens are meaningless (the caller
        keeps their previous state). Returns the new states and the number of feed-forward calls."""
        h = self.norm1(x)
        mixed = self.mixer(h)
        if self.ffn is None:
            return x + self.drop(mixed), 0
        if self.parallel:
            values, calls = apply_to_rows(self.ffn, h, active, block_rows)
            ffn_out = torch.zeros_like(x)
            ffn_out[active] = values.to(x.dtype)
            return x + self.drop(mixed + ffn_out), calls
        x = x + self.drop(mixed)
        values, calls = apply_to_rows(lambda rows: self.ffn(self.norm2(rows)), x, active, block_rows)
        ffn_out = torch.zeros_like(x)
        ffn_out[active] = values.to(x.dtype)
        return x + self.drop(ffn_out), calls


class LanguageModel(nn.Module):
    """Causal LM: ``logits = head(norm(blocks(embed(tokens))))``.

    ``mixer`` and ``ffn`` are factories called as ``mixer(d_model=...)`` once per layer (Hydra builds them
    from configs with ``_partial_: true``), so every layer gets fresh parameters.

    Flags (see the module docstring and each helper module for the exact technique):

    * ``act``: ``AdaptiveComputationTime`` over the stages; ponder cost ``aux_losses()["act_halting"]``.
    * ``multi_scale``: blocks ``middle_layers(n_layers)`` (``[n//4, 3n//4)``, at least one) run on the pair-
      downsampled sequence through ``CausalResampler``; ``measure_multi_scale_speedup(input_ids)`` times it.
    * ``early_exit``: ``EarlyExitHeads`` (a norm per intermediate stage + the shared LM head). Training: call
      ``aux_losses(labels=...)`` after the forward to get the exit loss. Evaluation (``model.eval()``): a
      token exits at the first stage whose max softmax probability is ``>= exit_threshold`` and its logits
      come from that exit; its state is copied forward unchanged through the deeper stages, whose mixers still
      run over every token (so later tokens read a valid state), while its feed-forward and head work is
      skipped (``apply_to_rows``).
    * ``koopman``: ``KoopmanOperator``; the next stage's output gets ``psi(K phi(h_l))`` added.
    * ``grad_checkpoint``: ``torch.utils.checkpoint`` (non-reentrant) around every block while training.
    * ``physics_weight > 0``: ``EnergyConservation`` over the BK mixers (needs at least two).

    ``flag_stats()`` returns the flags' measured effects (see there).
    """

    exit_block_rows: int = 32  # rows per feed-forward/head call on the surviving tokens during early exit

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, mixer: Callable[..., Mixer],
                 ffn: Callable[..., nn.Module] | None = None, name: str = "lm", tie_embeddings: bool = True,
                 norm: str = "rmsnorm", parallel_ffn: bool = False, dropout: float = 0.0,
                 init_std: float = 0.02, act: bool = False, act_threshold: float = 0.99,
                 ponder_weight: float = 0.01, multi_scale: bool = False, early_exit: bool = False,
                 exit_threshold: float = 0.9, exit_loss_weight: float = 1.0, koopman: bool = False,
                 koopman_dim: int = 64, koopman_weight: float = 0.1, grad_checkpoint: bool = False,
                 physics_weight: float = 0.0) -> None:
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

        # Optimization flags. Their modules are registered after the head, so with every flag off the
        # parameters (and the random init below) are exactly the plain backbone's.
        self.multi_scale_span = middle_layers(n_layers) if multi_scale else None
        self.stage_spans = self._stage_spans()
        n_stages = len(self.stage_spans)
        if act and early_exit:
            raise ValueError("flags act and early_exit both choose a per-token depth; enable at most one of them")
        for flag, on in (("act", act), ("early_exit", early_exit), ("koopman", koopman)):
            if on and n_stages < 2:
                raise ValueError(f"flag {flag} needs at least 2 layer stages; model {name!r} has {n_layers} "
                                 f"layer(s) and {n_stages} stage(s)" + (" (multi_scale merges the middle "
                                                                        "layers into one)" if multi_scale else ""))
        if physics_weight < 0:
            raise ValueError(f"physics_weight must be >= 0, got {physics_weight}")
        self.bk_mixers = [block.mixer for block in self.blocks if block.mixer.has_energy]
        if physics_weight > 0 and len(self.bk_mixers) < 2:
            raise ValueError(
                f"flag physics_informed (physics_weight={physics_weight}) conserves the Hamiltonian's energy "
                f"across BK layers, but model {name!r} has {len(self.bk_mixers)} BK mixer(s) "
                f"({type(self.blocks[0].mixer).__name__ if n_layers else 'no layers'}); it needs at least 2")
        self.grad_checkpoint = grad_checkpoint
        self.resampler = CausalResampler(d_model) if multi_scale else None
        self.act_halting = (AdaptiveComputationTime(d_model, n_stages, act_threshold, ponder_weight)
                            if act else None)
        self.exit_heads = (EarlyExitHeads(n_stages - 1, lambda: make_norm(norm, d_model), exit_threshold,
                                          exit_loss_weight) if early_exit else None)
        self.koopman = KoopmanOperator(d_model, koopman_dim, koopman_weight) if koopman else None
        self.energy_conservation = EnergyConservation(physics_weight) if physics_weight > 0 else None
        for bk in self.bk_mixers:
            bk.record_energy = self.energy_conservation is not None

        self.apply(self._init_weights)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self._multi_scale_on = True  # switched off only while timing the full-resolution baseline
        self._multi_scale_speedup: float | None = None
        self._exit_states: list[Tensor] | None = None
        self._exit_costs: dict[tuple, dict[str, list[float] | float]] = {}
        self._eval_sums: dict[str, float] = defaultdict(float)
        self._last_sums: dict[str, float] = {}

    def __getstate__(self) -> dict:
        # The exit states of the last training forward are graph nodes, which deepcopy/pickle refuse.
        state = super().__getstate__()
        state["_exit_states"] = None
        return state

    def _stage_spans(self) -> list[tuple[int, int]]:
        """Block ranges ``[lo, hi)`` run as one stage: single blocks, and the half-resolution middle range."""
        if self.multi_scale_span is None:
            return [(i, i + 1) for i in range(self.n_layers)]
        lo, hi = self.multi_scale_span
        return [(i, i + 1) for i in range(lo)] + [(lo, hi)] + [(i, i + 1) for i in range(hi, self.n_layers)]

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

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.drop(self.embed(input_ids))
        self._last_sums = {}
        self._exit_states = None
        if self.exit_heads is not None and not self.training:
            logits = self._forward_early_exit(x)
        else:
            logits = self.head(self.norm_f(self._forward_stages(x)))
        if self.energy_conservation is not None:
            self.energy_conservation.update([m.energy for m in self.bk_mixers])
        return logits

    def _call_block(self, block: Block, x: Tensor) -> Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _is_coarse(self, stage: int) -> bool:
        return self.resampler is not None and self.stage_spans[stage] == self.multi_scale_span

    def _run_stage(self, stage: int, x: Tensor) -> Tensor:
        lo, hi = self.stage_spans[stage]
        if self._is_coarse(stage) and self._multi_scale_on:
            coarse_in = self.resampler.downsample(x)
            coarse = coarse_in
            for i in range(lo, hi):
                coarse = self._call_block(self.blocks[i], coarse)
            return x + self.resampler.upsample(coarse - coarse_in, x.shape[1])
        for i in range(lo, hi):
            x = self._call_block(self.blocks[i], x)
        return x

    def _forward_stages(self, x: Tensor) -> Tensor:
        states: list[Tensor] = []
        halting: list[Tensor] = []
        lifted: list[Tensor] = []
        for stage in range(len(self.stage_spans)):
            out = self._run_stage(stage, x)
            if self.koopman is not None:
                if lifted:
                    out = out + self.koopman.correction(lifted[-1])
                lifted.append(self.koopman.lift(out))
            x = out
            states.append(x)
            if self.act_halting is not None:
                halting.append(self.act_halting.halting_probability(stage, x))
        if self.koopman is not None:
            self.koopman.prediction_loss(lifted)
            self._record(koopman_prediction_error=self.koopman.prediction_error)
        if self.act_halting is not None:
            x, halt = self.act_halting.combine(states, halting)
            depth = self._stage_depth(halt)
            self._record(act_layers=float(depth.sum()), act_tokens=float(depth.numel()),
                         act_max_used=float(depth.max()) if depth.numel() else 0.0)
        if self.exit_heads is not None:
            self._exit_states = states[:-1]
        return x

    def _stage_depth(self, stage_index: Tensor) -> Tensor:
        """Number of blocks a token went through when it stopped at ``stage_index`` (0-based stage)."""
        ends = torch.tensor([hi for _, hi in self.stage_spans], device=stage_index.device)
        return ends[stage_index]

    def _forward_early_exit(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        rows = self.exit_block_rows
        n_stages = len(self.stage_spans)
        costs = self._early_exit_costs(x)
        tokens = b * n
        active = torch.ones(b, n, dtype=torch.bool, device=x.device)
        exit_stage = torch.full((b, n), n_stages - 1, dtype=torch.long, device=x.device)
        logits = x.new_zeros(b, n, self.vocab_size)
        executed = full = 0.0
        ffn_calls = 0
        lifted: Tensor | None = None
        for stage in range(n_stages):
            full += costs["stage_full"][stage] * tokens
            if self._is_coarse(stage) or self.blocks[self.stage_spans[stage][0]].ffn is None:
                new = self._run_stage(stage, x)  # no per-token saving inside the half-resolution stage
                executed += costs["stage_full"][stage] * tokens
            else:
                new, calls = self.blocks[self.stage_spans[stage][0]].forward_active(x, active, rows)
                executed += costs["mixer"][stage] * tokens + costs["ffn_call"][stage] * calls
                ffn_calls += calls
            if self.koopman is not None and lifted is not None:
                new = new + self.koopman.correction(lifted)
            x = torch.where(active.unsqueeze(-1), new, x)  # exited tokens keep their state (copied forward)
            if self.koopman is not None:
                lifted = self.koopman.lift(x)
            if stage == n_stages - 1:
                break
            norm = self.exit_heads.norms[stage]
            values, calls = apply_to_rows(lambda r, norm=norm: self.head(norm(r)), x, active, rows)
            executed += costs["head_call"] * calls
            confidence = torch.softmax(values.float(), dim=-1).amax(-1)
            exiting = confidence >= self.exit_heads.threshold
            where_b, where_t = active.nonzero(as_tuple=True)  # row-major, the order of x[active]
            where_b, where_t = where_b[exiting], where_t[exiting]
            logits[where_b, where_t] = values[exiting].to(logits.dtype)
            exit_stage[where_b, where_t] = stage
            active[where_b, where_t] = False
        values, calls = apply_to_rows(lambda r: self.head(self.norm_f(r)), x, active, rows)
        logits[active] = values.to(logits.dtype)
        executed += costs["head_call"] * calls
        full += costs["head_token"] * tokens
        depth = self._stage_depth(exit_stage)
        self._record(exit_layers=float(depth.sum()), exit_tokens=float(tokens), exit_executed_flops=executed,
                     exit_full_flops=full)
        return logits

    def _early_exit_costs(self, x: Tensor) -> dict:
        """FLOPs (torch's counter + mixers' ``core_flops``) of the pieces early exit skips or keeps, cached per
        sequence length: per token for the mixers, the full stages and the final head; per call of
        ``exit_block_rows`` rows for the feed-forward and exit heads (padding rows are work done)."""
        n = x.shape[1]
        key = (n, x.dtype, x.device)
        if key in self._exit_costs:
            return self._exit_costs[key]
        gen = torch.Generator(device="cpu").manual_seed(0)
        seq = torch.randn(1, n, self.d_model, generator=gen).to(x)
        rows = torch.randn(1, self.exit_block_rows, self.d_model, generator=gen).to(x)
        mixer, ffn_call, stage_full = [], [], []
        for stage, (lo, hi) in enumerate(self.stage_spans):
            blocks = self.blocks[lo:hi]
            length = (n + 1) // 2 if self._is_coarse(stage) else n
            custom = sum(blk.mixer.core_flops(1, length) for blk in blocks) / n
            stage_full.append(flops_per_call(lambda s=stage: self._run_stage(s, seq)) / n + custom)
            blk = blocks[0]
            mixer.append(flops_per_call(lambda b=blk: b.mixer(b.norm1(seq))) / n + custom)
            ffn_call.append(flops_per_call(lambda b=blk: b.ffn(rows)) if blk.ffn is not None else 0.0)
        head_call = flops_per_call(lambda: self.head(self.norm_f(rows)))
        costs = {"mixer": mixer, "ffn_call": ffn_call, "stage_full": stage_full, "head_call": head_call,
                 "head_token": head_call / self.exit_block_rows}
        self._exit_costs[key] = costs
        return costs

    # ------------------------------------------------------------------ measured effects

    def _record(self, **values: float) -> None:
        """Keep per-forward measurements: the last forward's, and sums over evaluation forwards."""
        self._last_sums.update(values)
        if not self.training:
            for key, value in values.items():
                if key.endswith("_max_used"):
                    self._eval_sums[key] = max(self._eval_sums[key], value)
                elif key.endswith("_error"):
                    self._eval_sums[key] = value
                else:
                    self._eval_sums[key] += value

    def reset_flag_stats(self) -> None:
        """Forget the evaluation measurements (call at the start of an evaluation epoch)."""
        self._eval_sums = defaultdict(float)

    def flag_stats(self) -> dict[str, float]:
        """The flags' measured effects.

        Per-token depth (``act``, ``early_exit``) is averaged over every evaluation-mode forward since the last
        ``reset_flag_stats()`` (or taken from the last forward if there was none since):
        ``mean_layers`` / ``max_layers_used`` (ACT: blocks whose output a token's mix uses), ``max_layers``
        (the model's depth, the ceiling), ``mean_exit_layer`` (blocks run before the exit) and
        ``compute_saved`` (``1 - executed / full-depth FLOPs`` of the early-exit evaluations, counting the exit
        heads' extra work; negative when the checks cost more than the skipped work). ``multi_scale``:
        ``multi_scale_layers`` and ``multi_scale_speedup`` (after ``measure_multi_scale_speedup``). Mixer
        flags: ``active_heads_fraction`` (mean over BK mixers). ``koopman_prediction_error`` and
        ``energy_drift`` are the unweighted auxiliary terms of the last forward.
        """
        sums = self._eval_sums if self._eval_sums else self._last_sums
        stats: dict[str, float] = {}
        if self.act_halting is not None and sums.get("act_tokens"):
            stats.update(mean_layers=sums["act_layers"] / sums["act_tokens"],
                         max_layers_used=sums["act_max_used"], max_layers=float(self.n_layers))
        if self.exit_heads is not None and sums.get("exit_tokens"):
            stats.update(mean_exit_layer=sums["exit_layers"] / sums["exit_tokens"],
                         compute_saved=1 - sums["exit_executed_flops"] / sums["exit_full_flops"],
                         max_layers=float(self.n_layers))
        if self.multi_scale_span is not None:
            lo, hi = self.multi_scale_span
            stats["multi_scale_layers"] = float(hi - lo)
            if self._multi_scale_speedup is not None:
                stats["multi_scale_speedup"] = self._multi_scale_speedup
        mixer_stats = [blk.mixer.flag_stats() for blk in self.blocks if hasattr(blk.mixer, "flag_stats")]
        for key in sorted({k for st in mixer_stats for k in st}):
            values = [st[key] for st in mixer_stats if key in st]
            stats[key] = sum(values) / len(values)
        if self.koopman is not None and self.koopman.prediction_error is not None:
            stats["koopman_prediction_error"] = self.koopman.prediction_error
        if self.energy_conservation is not None and self.energy_conservation.energy_drift is not None:
            stats["energy_drift"] = self.energy_conservation.energy_drift
        return stats

    def measure_multi_scale_speedup(self, input_ids: Tensor, repeats: int = 3) -> float:
        """Forward time with the middle layers at full resolution / at half resolution (eval, no grad).

        Same parameters and batch; the best of ``repeats`` timed runs after one warm-up each. Stored for
        ``flag_stats()["multi_scale_speedup"]``.
        """
        if self.resampler is None:
            raise ValueError(f"measure_multi_scale_speedup needs multi_scale=True (model {self.name!r})")
        was_training = self.training
        self.eval()

        def best_time(on: bool) -> float:
            self._multi_scale_on = on
            times = []
            with torch.no_grad():
                for i in range(repeats + 1):
                    if input_ids.is_cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    self(input_ids)
                    if input_ids.is_cuda:
                        torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - start)
            return min(times)

        try:
            full, half = best_time(False), best_time(True)
        finally:
            self._multi_scale_on = True
            self.train(was_training)
        self._multi_scale_speedup = full / half
        return self._multi_scale_speedup

    # ------------------------------------------------------------------ incremental decoding

    @property
    def decode_unsupported(self) -> str | None:
        """None when ``prefill``/``step`` work for this model, else why not (flags or a mixer's reason)."""
        staged = [flag for flag, module in (("multi_scale", self.resampler), ("act", self.act_halting),
                                            ("early_exit", self.exit_heads), ("koopman", self.koopman))
                  if module is not None]
        if staged:
            return (f"flag(s) {', '.join(staged)} run staged execution over the whole sequence and have no "
                    "incremental form; decode a model trained without them")
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
        return self.head(self.norm_f(x)), DecodeState(position=n, layers=layers)

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

    @property
    def causal(self) -> bool:
        return all(block.mixer.causal for block in self.blocks)

    def aux_losses(self, labels: Tensor | None = None) -> dict[str, Tensor]:
        """Auxiliary losses set by submodules in the last forward (e.g. MoE load balancing), by module name.

        With ``early_exit`` the intermediate exits' loss needs the labels of the batch just forwarded
        (``labels``, ignore index -100), under the key ``"exit_heads"``; omitting them after a training
        forward of an early-exit model is an error rather than silently training without the exits.
        """
        losses = {name: m.aux_loss for name, m in self.named_modules()
                  if m is not self and getattr(m, "aux_loss", None) is not None}
        if self._exit_states is not None:
            if labels is None:
                raise ValueError(f"model {self.name!r} has early_exit=True: its exit heads' loss needs the "
                                 "labels; call aux_losses(labels=batch['labels']) after the forward")
            losses["exit_heads"] = self.exit_heads.exit_loss(self._exit_states, self.head, labels)
        return losses

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
