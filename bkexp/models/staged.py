"""Staged execution: the plain language model plus the model-side optimization techniques.

:class:`StagedLanguageModel` is :class:`~bkexp.models.backbone.LanguageModel` with ``act`` (adaptive
computation time), ``multi_scale`` (middle layers at half resolution), ``early_exit`` (per-layer exit heads),
``koopman`` (Koopman operator across layers), ``grad_checkpoint`` (activation checkpointing per block) and
``physics_weight`` (energy conservation across BK layers). The techniques in ``bkexp.techniques`` select it
(``model._target_``); with every technique off it computes exactly what the plain model computes.

They act on *stages*: one stage per block, except that with ``multi_scale`` the half-resolution middle blocks
form one stage (per-token depth decisions are made at full resolution, between stages). Their modules are
registered after the head (``LanguageModel._add_modules``), so the plain parameters are initialised exactly
as in the plain model and state_dict keys are those of the plain model plus the techniques' modules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bkexp.models.adaptive import AdaptiveComputationTime, EarlyExitHeads, apply_to_rows, flops_per_call
from bkexp.models.backbone import Block, LanguageModel, make_norm
from bkexp.models.koopman import KoopmanOperator
from bkexp.models.mixers.base import Mixer
from bkexp.models.multiscale import CausalResampler, middle_layers
from bkexp.models.physics import EnergyConservation


@dataclass(frozen=True)
class StagedSettings:
    """The model-side techniques' settings (the keyword arguments of :class:`StagedLanguageModel`)."""

    act: bool = False
    act_threshold: float = 0.99
    ponder_weight: float = 0.01
    multi_scale: bool = False
    early_exit: bool = False
    exit_threshold: float = 0.9
    exit_loss_weight: float = 1.0
    koopman: bool = False
    koopman_dim: int = 64
    koopman_weight: float = 0.1
    grad_checkpoint: bool = False
    physics_weight: float = 0.0


STAGED_KEYS = frozenset(f.name for f in fields(StagedSettings))  # the keyword arguments the plain model lacks


def forward_active(block: Block, x: Tensor, active: Tensor, block_rows: int) -> tuple[Tensor, int]:
    """Early-exit evaluation of one block: the mixer runs over every token (later tokens read every earlier
    token's state), the feed-forward only on ``active`` tokens. Rows of inactive tokens are meaningless (the
    caller keeps their previous state). Returns the new states and the number of feed-forward calls."""
    h = block.norm1(x)
    mixed = block.mixer(h)
    if block.ffn is None:
        return x + block.drop(mixed), 0
    if block.parallel:
        values, calls = apply_to_rows(block.ffn, h, active, block_rows)
        ffn_out = torch.zeros_like(x)
        ffn_out[active] = values.to(x.dtype)
        return x + block.drop(mixed + ffn_out), calls
    x = x + block.drop(mixed)
    values, calls = apply_to_rows(lambda rows: block.ffn(block.norm2(rows)), x, active, block_rows)
    ffn_out = torch.zeros_like(x)
    ffn_out[active] = values.to(x.dtype)
    return x + block.drop(ffn_out), calls


class StagedLanguageModel(LanguageModel):
    """The plain LM run stage by stage, with the model-side techniques (see the module docstring).

    * ``act``: ``AdaptiveComputationTime`` over the stages; ponder cost ``aux_losses()["act_halting"]``.
    * ``multi_scale``: blocks ``middle_layers(n_layers)`` (``[n//4, 3n//4)``, at least one) run on the pair-
      downsampled sequence through ``CausalResampler``; ``full_resolution()`` switches that off (the baseline
      ``bkexp.techniques.multi_scale`` times it against, reported as ``multi_scale_speedup``).
    * ``early_exit``: ``EarlyExitHeads`` (a norm per intermediate stage + the shared LM head). Training: call
      ``aux_losses(labels=...)`` after the forward to get the exit loss. Evaluation (``model.eval()``): a
      token exits at the first stage whose max softmax probability is ``>= exit_threshold`` and its logits
      come from that exit; its state is copied forward unchanged through the deeper stages, whose mixers still
      run over every token (so later tokens read a valid state), while its feed-forward and head work is
      skipped (``apply_to_rows``).
    * ``koopman``: ``KoopmanOperator``; the next stage's output gets ``psi(K phi(h_l))`` added.
    * ``grad_checkpoint``: ``torch.utils.checkpoint`` (non-reentrant) around every block while training.
    * ``physics_weight > 0``: ``EnergyConservation`` over the mixers that record an energy (needs at least two).

    ``flag_stats()`` returns the techniques' measured effects (see there).
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
        # Read by _add_modules, which the backbone's __init__ calls between the head and the initialisation.
        self.settings = StagedSettings(act, act_threshold, ponder_weight, multi_scale, early_exit, exit_threshold,
                                       exit_loss_weight, koopman, koopman_dim, koopman_weight, grad_checkpoint,
                                       physics_weight)
        super().__init__(vocab_size, d_model, n_layers, mixer, ffn, name=name, tie_embeddings=tie_embeddings,
                         norm=norm, parallel_ffn=parallel_ffn, dropout=dropout, init_std=init_std)
        self._multi_scale_on = True  # switched off only by full_resolution()
        self.multi_scale_speedup: float | None = None  # set by bkexp.techniques.multi_scale after timing
        self._exit_states: list[Tensor] | None = None
        self._exit_costs: dict[tuple, dict[str, list[float] | float]] = {}
        self._eval_sums: dict[str, float] = defaultdict(float)
        self._last_sums: dict[str, float] = {}

    def _add_modules(self) -> None:
        s, name, n_layers, d_model = self.settings, self.name, self.n_layers, self.d_model
        self.multi_scale_span = middle_layers(n_layers) if s.multi_scale else None
        self.stage_spans = self._stage_spans()
        n_stages = len(self.stage_spans)
        if s.act and s.early_exit:
            raise ValueError("flags act and early_exit both choose a per-token depth; enable at most one of them")
        for flag, on in (("act", s.act), ("early_exit", s.early_exit), ("koopman", s.koopman)):
            if on and n_stages < 2:
                raise ValueError(f"flag {flag} needs at least 2 layer stages; model {name!r} has {n_layers} "
                                 f"layer(s) and {n_stages} stage(s)" + (" (multi_scale merges the middle "
                                                                        "layers into one)" if s.multi_scale else ""))
        if s.physics_weight < 0:
            raise ValueError(f"physics_weight must be >= 0, got {s.physics_weight}")
        self.bk_mixers = [block.mixer for block in self.blocks if block.mixer.has_energy]
        if s.physics_weight > 0 and len(self.bk_mixers) < 2:
            raise ValueError(
                f"flag physics_informed (physics_weight={s.physics_weight}) conserves the Hamiltonian's energy "
                f"across BK layers, but model {name!r} has {len(self.bk_mixers)} BK mixer(s) "
                f"({type(self.blocks[0].mixer).__name__ if n_layers else 'no layers'}); it needs at least 2")
        self.grad_checkpoint = s.grad_checkpoint
        self.resampler = CausalResampler(d_model) if s.multi_scale else None
        self.act_halting = (AdaptiveComputationTime(d_model, n_stages, s.act_threshold, s.ponder_weight)
                            if s.act else None)
        self.exit_heads = (EarlyExitHeads(n_stages - 1, lambda: make_norm(self.norm_kind, d_model),
                                          s.exit_threshold, s.exit_loss_weight) if s.early_exit else None)
        self.koopman = KoopmanOperator(d_model, s.koopman_dim, s.koopman_weight) if s.koopman else None
        self.energy_conservation = EnergyConservation(s.physics_weight) if s.physics_weight > 0 else None
        for bk in self.bk_mixers:
            bk.record_energy = self.energy_conservation is not None

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

    @contextmanager
    def full_resolution(self) -> Iterator[None]:
        """Run the multi-scale middle blocks at full resolution inside the ``with`` (the speedup's baseline)."""
        self._multi_scale_on = False
        try:
            yield
        finally:
            self._multi_scale_on = True

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
                new, calls = forward_active(self.blocks[self.stage_spans[stage][0]], x, active, rows)
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
        """The techniques' measured effects.

        Per-token depth (``act``, ``early_exit``) is averaged over every evaluation-mode forward since the last
        ``reset_flag_stats()`` (or taken from the last forward if there was none since):
        ``mean_layers`` / ``max_layers_used`` (ACT: blocks whose output a token's mix uses), ``max_layers``
        (the model's depth, the ceiling), ``mean_exit_layer`` (blocks run before the exit) and
        ``compute_saved`` (``1 - executed / full-depth FLOPs`` of the early-exit evaluations, counting the exit
        heads' extra work; negative when the checks cost more than the skipped work). ``multi_scale``:
        ``multi_scale_layers`` and ``multi_scale_speedup`` (once measured). Then the mixers' stats (the plain
        model's ``flag_stats``). ``koopman_prediction_error`` and ``energy_drift`` are the unweighted
        auxiliary terms of the last forward.
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
            if self.multi_scale_speedup is not None:
                stats["multi_scale_speedup"] = self.multi_scale_speedup
        stats.update(super().flag_stats())
        if self.koopman is not None and self.koopman.prediction_error is not None:
            stats["koopman_prediction_error"] = self.koopman.prediction_error
        if self.energy_conservation is not None and self.energy_conservation.energy_drift is not None:
            stats["energy_drift"] = self.energy_conservation.energy_drift
        return stats

    # ------------------------------------------------------------------ decoding and loss terms

    @property
    def decode_unsupported(self) -> str | None:
        staged = [flag for flag, module in (("multi_scale", self.resampler), ("act", self.act_halting),
                                            ("early_exit", self.exit_heads), ("koopman", self.koopman))
                  if module is not None]
        if staged:
            return (f"flag(s) {', '.join(staged)} run staged execution over the whole sequence and have no "
                    "incremental form; decode a model trained without them")
        return super().decode_unsupported

    def aux_losses(self, labels: Tensor | None = None) -> dict[str, Tensor]:
        """The submodules' auxiliary losses, and with ``early_exit`` the intermediate exits' loss under
        ``"exit_heads"``; that one needs the labels of the batch just forwarded (``labels``, ignore index
        -100), and omitting them after a training forward of an early-exit model is an error rather than
        silently training without the exits.
        """
        losses = super().aux_losses()
        if self._exit_states is not None:
            if labels is None:
                raise ValueError(f"model {self.name!r} has early_exit=True: its exit heads' loss needs the "
                                 "labels; call aux_losses(labels=batch['labels']) after the forward")
            losses["exit_heads"] = self.exit_heads.exit_loss(self._exit_states, self.head, labels)
        return losses
