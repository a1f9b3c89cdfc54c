"""Per-token depth: adaptive computation time (``act``) and early-exit heads (``early_exit``) over the backbone's stages."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from bkexp.models.auxloss import AuxLossModule

IGNORE_INDEX = -100


class AdaptiveComputationTime(AuxLossModule):
    """Graves (2016) halting over layers, one halting unit ``p^l_t = sigmoid(w_l . h^l_t + b_l)`` per stage.

    Token ``t`` halts at the first stage ``n_t`` where ``sum_{l <= n} p^l_t >= threshold`` (the last stage at
    the latest). Its output is ``sum_{l < n_t} p^l_t h^l_t + R_t h^{n_t}_t`` with the remainder
    ``R_t = 1 - sum_{l < n_t} p^l_t``; the ponder cost ``weight * mean_t (n_t + R_t)`` (``n_t`` counted from 1)
    is ``aux_loss``. Gradients reach the halting units through ``p`` and ``R`` (``n_t`` is discrete).

    Keeping later tokens valid: every stage is computed for every token (the sequence mixers of deeper
    layers read the ordinary, un-frozen states of earlier tokens), and only the mix per token stops at
    ``n_t``, so training and evaluation compute the same function and no sequence-mixer work is saved;
    the measured effect is the mean depth that the output uses. Halting depends only on the token's own
    states, which are causal, so the model stays causal.

    Biases start at ``logit(1 / (n_stages + 1))``: the cumulative probability stays below 1 until the last
    stage, so an untrained model uses every layer and the ponder cost teaches it to halt earlier.
    """

    def __init__(self, d_model: int, n_stages: int, threshold: float = 0.99, ponder_weight: float = 0.01) -> None:
        super().__init__()
        if not 0 < threshold <= 1:
            raise ValueError(f"act_threshold must be in (0, 1], got {threshold}")
        if ponder_weight < 0:
            raise ValueError(f"ponder_weight must be >= 0, got {ponder_weight}")
        self.threshold = threshold
        self.ponder_weight = ponder_weight
        self.halt = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(n_stages))
        bias = -math.log(n_stages)  # logit(1 / (n_stages + 1))
        for unit in self.halt:
            nn.init.constant_(unit.bias, bias)
            unit.bias._no_reinit = True  # type: ignore[attr-defined]
        self.aux_loss: Tensor | None = None

    def halting_probability(self, stage: int, h: Tensor) -> Tensor:
        return torch.sigmoid(self.halt[stage](h)).squeeze(-1)

    def combine(self, states: list[Tensor], probs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Halting-weighted mix of the stage outputs (B, N, D) and the halting stage ``n_t - 1`` (B, N)."""
        p = torch.stack(probs)  # (S, B, N)
        cum = p.cumsum(0)
        reached = cum >= self.threshold
        reached[-1] = True
        halt = reached.to(torch.uint8).argmax(0)  # first stage that reaches the threshold
        stage = torch.arange(p.shape[0], device=p.device).view(-1, 1, 1)
        before_sum = cum - p  # sum of p over earlier stages
        remainder = (1 - before_sum).gather(0, halt.unsqueeze(0)).squeeze(0)
        weights = torch.where(stage < halt, p, torch.where(stage == halt, 1 - before_sum, torch.zeros_like(p)))
        out = (weights.unsqueeze(-1).to(states[0].dtype) * torch.stack(states)).sum(0)
        self.aux_loss = self.ponder_weight * (halt.to(p.dtype) + 1 + remainder).mean()
        return out, halt

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, ponder_weight={self.ponder_weight}"


class EarlyExitHeads(nn.Module):
    """One norm per intermediate stage in front of the shared (tied) LM head: ``logits_l = head(norm_l(h_l))``.

    Training: ``exit_loss`` is ``weight * mean_l CE(logits_l, labels)`` over the intermediate stages (the
    final stage is the ordinary LM loss). Evaluation (in the backbone): a token exits at the first stage
    whose max softmax probability reaches ``threshold`` and keeps those logits.
    """

    def __init__(self, n_exits: int, make_norm: Callable[[], nn.Module], threshold: float = 0.9,
                 loss_weight: float = 1.0) -> None:
        super().__init__()
        if not 0 < threshold <= 1:
            raise ValueError(f"exit_threshold must be in (0, 1], got {threshold}")
        if loss_weight < 0:
            raise ValueError(f"exit_loss_weight must be >= 0, got {loss_weight}")
        self.threshold = threshold
        self.loss_weight = loss_weight
        self.norms = nn.ModuleList(make_norm() for _ in range(n_exits))

    def exit_loss(self, states: list[Tensor], head: nn.Module, labels: Tensor) -> Tensor:
        losses = []
        for norm, h in zip(self.norms, states):
            logits = head(norm(h))
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> f32, f64 stays
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX))
        return self.loss_weight * torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, loss_weight={self.loss_weight}"


def apply_to_rows(fn: Callable[[Tensor], Tensor], x: Tensor, active: Tensor, block_rows: int) -> tuple[Tensor, int]:
    """``fn`` on the rows ``x[active]`` only, in calls of exactly ``block_rows`` rows; returns (values, n_calls).

    ``x`` is (B, N, D) and ``active`` (B, N) bool; the values come back in ``x[active]`` order. A matmul's
    last bits depend on the call's shape and on where a row sits in it, so each sequence's active tokens are
    packed from the start of their own block (zero-padded to a multiple of ``block_rows``): a token's slot
    depends only on earlier tokens of its own sequence, never on later ones or on other sequences, which
    keeps the model bit-exactly causal. Padding rows are real work and are counted in ``n_calls``.
    """
    b, n, d = x.shape
    counts = active.sum(1)
    padded = (counts + block_rows - 1) // block_rows * block_rows
    total = int(padded.sum())
    if total == 0:  # every token has exited: an empty result with fn's output width
        return fn(x.new_zeros(1, 0, d)).squeeze(0), 0
    offset = padded.cumsum(0) - padded
    rank = active.cumsum(1) - 1
    slot = (offset.unsqueeze(1) + rank)[active]
    buffer = x.new_zeros(total, d)
    buffer[slot] = x[active]
    out = torch.cat([fn(chunk.unsqueeze(0)).squeeze(0) for chunk in buffer.split(block_rows)])
    return out[slot], total // block_rows


def flops_per_call(fn: Callable[[], object]) -> float:
    """FLOPs (matmul/conv/sdpa, torch's dispatch-level counter) of one call of ``fn``."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())
