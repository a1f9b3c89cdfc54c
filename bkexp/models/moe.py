"""Dropless top-k mixture-of-experts feed-forward (the ResNet-BK FFN) with a Switch-style load-balancing loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bkexp.models.aux import AuxLossModule
from bkexp.models.ffn import MLP


class MoEFeedForward(AuxLossModule):
    """``y = sum_{e in topk(p)} g_e * expert_e(x)`` per token, with router probabilities ``p = softmax(W_r x)``.

    Routing is **dropless**: every token is processed by all of its top-k experts, however many tokens pick
    the same expert. Capacity-based dropping (Switch/GShard) would make a token's output depend on which
    *other* tokens of the batch compete for the same expert -- including tokens later in the sequence --
    and so break causality of a language model. Here each token's output is a function of that token alone.

    Gates: with ``top_k > 1`` the selected probabilities are renormalised to sum to one. With ``top_k == 1``
    renormalising would make the gate the constant 1 and the router would learn only from the auxiliary
    loss, so by default (``renormalize=None``) the raw probability is used as the gate (as in the Switch
    Transformer), which keeps the output differentiable with respect to the router.

    Load balancing: ``aux = E * sum_e f_e * P_e``, where ``f_e`` is the fraction of the ``T * top_k`` token
    assignments that went to expert ``e`` and ``P_e`` the mean router probability of ``e`` over the ``T``
    tokens (equal to 1 when routing is uniform). ``self.aux_loss = aux_loss_weight * aux`` is set on every
    forward; the backbone adds it to the training loss. ``self.router_stats`` keeps the detached
    ``fraction`` (f), ``prob_mean`` (P) and unweighted ``balance_loss`` of the last forward for logging.

    Dispatch gathers each expert's tokens with an index-select and scatters the weighted results back with
    ``index_add_``, so the cost is ``top_k`` expert MLP passes per token, not ``n_experts``.

    Bit-exactness: a BLAS matmul's result for one row depends on how many rows the call has and where the
    row sits (MKL picks different kernels and edge tiles by shape), so with one call per expert a token's
    output would change in the last bits when *other* tokens -- future ones included -- change the expert's
    load. The run-time causality check demands bit-identical logits, so by default each expert runs on
    zero-padded blocks of exactly ``block_rows`` rows: every matmul has the same shape whatever the
    routing, and a token's output is a bit-exact function of that token. The padding costs at most
    ``block_rows - 1`` wasted rows per expert per call; ``block_rows=None`` makes one call per expert
    (equal up to round-off only).
    """

    def __init__(self, d_model: int, n_experts: int = 4, top_k: int = 1, expansion: float = 4.0,
                 aux_loss_weight: float = 0.01, bias: bool = False, renormalize: bool | None = None,
                 block_rows: int | None = 128) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight}")
        if block_rows is not None and block_rows < 1:
            raise ValueError(f"block_rows must be >= 1 or None, got {block_rows}")
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k = top_k
        self.aux_loss_weight = aux_loss_weight
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.block_rows = block_rows
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(d_model, expansion=expansion, bias=bias) for _ in range(n_experts))
        self.aux_loss: Tensor | None = None
        self.router_stats: dict[str, Tensor] = {}

    def route(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities ``(T, E)`` (float32 or float64), top-k gates ``(T, k)`` and expert ids ``(T, k)``."""
        logits = self.router(flat)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        gate, expert_idx = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return probs, gate, expert_idx

    def run_expert(self, e: int, inputs: Tensor, block_rows: int | None = None) -> Tensor:
        """Expert ``e`` on ``inputs`` (rows, D), in zero-padded blocks of exactly ``block_rows`` rows (None: one call)."""
        if block_rows is None or inputs.shape[0] == 0:
            return self.experts[e](inputs)
        n = inputs.shape[0]
        padded = -(-n // block_rows) * block_rows
        if padded != n:
            inputs = torch.cat([inputs, inputs.new_zeros(padded - n, inputs.shape[1])])
        return torch.cat([self.experts[e](block) for block in inputs.split(block_rows)])[:n]

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, self.block_rows)

    def step(self, x: Tensor) -> Tensor:
        """The layer on one decoding position per row: the experts run on exactly their tokens.

        Padding to ``block_rows`` buys bit-exactness across calls whose routing differs, which the causality
        check needs but decoding does not (the result equals ``forward``'s up to round-off, tested); on a
        handful of rows it would multiply the expert work by up to ``block_rows``.
        """
        return self._forward(x, None)

    def _forward(self, x: Tensor, block_rows: int | None) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"expected last dim d_model={self.d_model}, got input of shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)
        n_tokens = flat.shape[0]
        probs, gate, expert_idx = self.route(flat)

        # One row per (token, choice) assignment, grouped by expert.
        assign_expert = expert_idx.reshape(-1)
        assign_token = torch.arange(n_tokens, device=x.device).repeat_interleave(self.top_k)
        assign_gate = gate.reshape(-1)
        order = torch.argsort(assign_expert, stable=True)
        counts = torch.bincount(assign_expert, minlength=self.n_experts)

        out = torch.zeros_like(flat)
        start = 0
        for e, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            rows = order[start:start + count]
            start += count
            tokens = assign_token[rows]
            expert_out = self.run_expert(e, flat.index_select(0, tokens), block_rows)
            # Under autocast the experts return bf16/fp16 while `out` holds x's dtype: add in out's dtype.
            out.index_add_(0, tokens, (expert_out * assign_gate[rows].unsqueeze(-1).to(expert_out.dtype)).to(out.dtype))

        # Switch-Transformer load balancing; f is not differentiable, P carries the gradient to the router.
        fraction = counts.to(probs.dtype) / max(n_tokens * self.top_k, 1)
        prob_mean = probs.mean(dim=0) if n_tokens > 0 else torch.zeros_like(fraction)
        balance = self.n_experts * (fraction * prob_mean).sum()
        self.aux_loss = self.aux_loss_weight * balance
        self.router_stats = {"fraction": fraction.detach(), "prob_mean": prob_mean.detach(),
                             "balance_loss": balance.detach()}
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"aux_loss_weight={self.aux_loss_weight}, block_rows={self.block_rows}")


__all__ = ["MoEFeedForward"]
