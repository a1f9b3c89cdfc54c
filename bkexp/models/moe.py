"""Dropless top-k mixture-of-experts feed-forward (the ResNet-BK FFN) with a Switch-style load-balancing loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bkexp.models.auxloss import AuxLossModule
from bkexp.ops import moe_dispatch
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

    Dispatch: each expert's (token, choice) assignments are gathered into an input buffer of its own; each expert
    MLP runs once on its buffer, and the results are copied back into assignment order and gated per token.
    Forward and backward are row gathers and row copies (``_Dispatch``/``_Combine``; the experts' groups
    partition the assignments, so no scatter-add), with no concatenated buffer in between; the cost is
    ``top_k`` expert passes per token. Modules are called normally, so quantized, pruned or hooked expert
    ``nn.Linear`` layers behave as usual.

    Bit-exactness (``row_exact``): a BLAS matmul's result for one row can depend on how many rows the call has
    (MKL picks another kernel, blocking or thread split for some shapes: in float64 at one thread a 128-row
    call with ``K >= 384`` rounds differently from any longer call), so a token's output changes in the last
    bits when *other* tokens -- future ones included -- change its expert's load. Training does not care, but
    the run-time causality check demands bit-identical logits. With ``row_exact = True`` (which the check sets
    on its probe copy) every expert buffer is zero padded to whole ``block_rows`` blocks and the expert is
    called once per block: every call has the same shape, so a token's output is a bit-exact function of that
    token whatever the loads, by construction rather than by what a BLAS does with a shape
    (``tests/models/test_moe.py`` checks loads of 1 to 9 blocks at the shape where the blocking alone breaks).
    It costs the padding rows (reported by ``padding_flops()``, so FLOP counts can show useful work and
    padding apart) and one call per block; the default forward runs each expert once on exactly its rows.

    Row moves: on CPU float32/float64 (no autocast) the dispatch and combine run as compiled passes
    (``bkexp.ops.moe_dispatch``: one parallel pass per direction for all experts, the gating, the gate
    gradient, the padding zeros and the sum over choices fused into them), bit-identical to the PyTorch
    ops used elsewhere (other dtypes and devices, autocast, under a dispatch mode such as FLOP counting:
    ``_Dispatch``/``_Combine``), which ``compiled_moves = False`` selects.
    """

    compiled_moves = True  # CPU float32/float64: the compiled row moves; False: the PyTorch ops (the reference)

    def __init__(self, d_model: int, n_experts: int = 4, top_k: int = 1, expansion: float = 4.0,
                 aux_loss_weight: float = 0.01, bias: bool = False, renormalize: bool | None = None,
                 block_rows: int = 128, row_exact: bool = False) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {aux_loss_weight}")
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows must be an integer >= 1 (the rows of every expert call when row_exact), "
                             f"got {block_rows!r}")
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k = top_k
        self.aux_loss_weight = aux_loss_weight
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.block_rows = block_rows
        self.row_exact = row_exact  # the causality check sets it on its probe copy
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(d_model, expansion=expansion, bias=bias) for _ in range(n_experts))
        self.aux_loss: Tensor | None = None
        self.router_stats: dict[str, Tensor] = {}
        self.padding_rows = 0  # zero rows the last forward ran through the experts (block padding)

    def route(self, flat: Tensor, logits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities ``(T, E)`` (float32 or float64), top-k gates ``(T, k)`` and expert ids ``(T, k)``
        (from ``logits`` when the caller computed the router's output itself)."""
        if logits is None:
            logits = self.router(flat)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        # top-1 by max: the same values as topk(1), 5x faster over a few columns; ties go to the lowest index
        gate, expert_idx = probs.max(dim=-1, keepdim=True) if self.top_k == 1 else probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return probs, gate, expert_idx

    def layout(self, expert_idx: Tensor, block_rows: int | None) -> tuple[list[Tensor], list[int], Tensor]:
        """Which assignments each expert runs, and on how many buffer rows.

        Returns ``groups``, for every expert with work, the indices ``t*k + j`` of its (token, choice)
        assignments in ascending order; ``rows``, each of those experts' buffer rows (its count rounded up
        to whole ``block_rows`` blocks; the count itself when ``block_rows`` is None); and the per-expert
        assignment ``counts`` (all experts).
        """
        assign_expert = expert_idx.reshape(-1)
        order = torch.argsort(assign_expert, stable=True)
        counts = torch.bincount(assign_expert, minlength=self.n_experts)
        groups, rows = [], []
        for group, count in zip(order.split(counts.tolist()), counts.tolist()):
            if count:
                groups.append(group)
                rows.append(count if block_rows is None else -(-count // block_rows) * block_rows)
        return groups, rows, counts

    def _router_joinable(self, flat: Tensor) -> bool:
        """A plain bias-free ``nn.Linear`` router without hooks, in x's dtype, with an input gradient to compute,
        on a machine where the fused router term is bit-identical to ``mm`` (anything else is called as a module)."""
        router = self.router
        return (type(router) is nn.Linear and router.bias is None and not router._forward_hooks
                and not router._forward_pre_hooks and not router._backward_hooks and router.weight.dtype == flat.dtype
                and torch.is_grad_enabled() and flat.requires_grad
                and moe_dispatch.router_fusion_exact(self.n_experts, self.d_model, flat.dtype))

    def padding_flops(self) -> float:
        """Forward FLOPs the last call spent on zero padding rows (2 x multiply-adds of an expert per row)."""
        per_row = sum(p.numel() for p in self.experts[0].parameters() if p.ndim == 2)
        return 2.0 * per_row * self.padding_rows

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, self.block_rows if self.row_exact else None)

    def step(self, x: Tensor) -> Tensor:
        """The layer on one decoding position per row: the experts run on exactly their tokens.

        Even with ``row_exact`` set: the fixed-shape blocks buy bit-exactness across calls whose routing
        differs, which the causality check needs but decoding does not (the result equals ``forward``'s up to
        round-off, tested); on a handful of rows they would multiply the expert work by up to ``block_rows``.
        """
        return self._forward(x, None)

    def _run_expert(self, expert: int, rows: Tensor, block_rows: int | None, dtype: torch.dtype) -> Tensor:
        """Expert ``expert`` on its buffer: one call, or one call per ``block_rows``-row block (row-exact)."""
        module = self.experts[expert]
        out = module(rows) if block_rows is None else torch.cat([module(block) for block in rows.split(block_rows)])
        return out.to(dtype)  # under autocast the experts return bf16/fp16: gate and combine in x's dtype

    # torch.compile runs the layer eagerly: its buffer sizes are data (per-expert token counts, so dynamo would
    # recompile per routing until its limit) and the compiled row moves are numba; the rest of a model compiles.
    @torch.compiler.disable
    def _forward(self, x: Tensor, block_rows: int | None) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"expected last dim d_model={self.d_model}, got input of shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)
        n_tokens = flat.shape[0]
        compiled = self.compiled_moves and moe_dispatch.supported(flat) and n_tokens > 0
        join = None
        if compiled and self._router_joinable(flat):
            # The router's input gradient is added in the dispatch's backward pass (see RouterJoin).
            join = moe_dispatch.RouterJoinState()
            logits, token = moe_dispatch.RouterJoin.apply(flat, self.router.weight, join)
            probs, gate, expert_idx = self.route(flat, logits)
        else:
            probs, gate, expert_idx = self.route(flat)
        if compiled:
            # CPU float32/float64: the compiled row moves, one pass per direction (bit-identical to the below).
            lay = moe_dispatch.Layout(expert_idx, self.n_experts, block_rows)
            counts, rows = lay.counts, lay.rows
            self.padding_rows = sum(rows) - n_tokens * self.top_k
            if join is None:
                buffers = moe_dispatch.Dispatch.apply(flat, lay)
            else:
                buffers = moe_dispatch.Dispatch.apply(token, lay, flat.detach(), join)
            outputs = [self._run_expert(e, part, block_rows, flat.dtype) for e, part in zip(lay.expert_ids, buffers)]
            out = moe_dispatch.Combine.apply(gate.to(flat.dtype), lay, *outputs)
        else:
            groups, rows, counts = self.layout(expert_idx, block_rows)
            self.padding_rows = sum(rows) - n_tokens * self.top_k
            buffers = _Dispatch.apply(flat, groups, rows, self.top_k)
            expert_ids = [e for e, c in enumerate(counts.tolist()) if c]
            outputs = [self._run_expert(e, part, block_rows, flat.dtype) for e, part in zip(expert_ids, buffers)]
            out = _Combine.apply(gate.to(flat.dtype), groups, *outputs) if outputs else flat * 0

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
                f"aux_loss_weight={self.aux_loss_weight}, block_rows={self.block_rows}, row_exact={self.row_exact}")


def _sum_choices(src: Tensor, top_k: int) -> Tensor:
    """``out[t] = sum_j src[t*k + j]`` in the order j = 0..k-1: each token's sum is independent of the others."""
    if top_k == 1:
        return src
    picked = src.view(-1, top_k, src.shape[-1])
    out = picked[:, 0]
    for j in range(1, top_k):
        out = out + picked[:, j]
    return out


def _gather_blocks(src: Tensor, index: Tensor, rows: int) -> Tensor:
    """``out[i] = src[index[i]]`` for i < len(index), zero on the rows after it, up to ``rows`` rows."""
    out = src.new_empty(rows, src.shape[-1])
    torch.index_select(src, 0, index, out=out[: index.numel()])
    out[index.numel():] = 0
    return out


def _scatter_groups(parts: tuple[Tensor | None, ...], groups: list[Tensor], n_rows: int, like: Tensor) -> Tensor:
    """``out[groups[e][i]] = parts[e][i]`` (padding rows of ``parts`` dropped); the groups partition the rows."""
    out = like.new_empty(n_rows, like.shape[-1])
    for group, part in zip(groups, parts):
        if part is None:
            out[group] = 0
        else:
            out.index_copy_(0, group, part[: group.numel()])
    return out


class _Dispatch(torch.autograd.Function):
    """Token rows -> one zero-padded input buffer per expert (a gather each); the backward copies each buffer's
    gradient back to its assignment rows (the groups partition them: a copy, no scatter-add) and sums each
    token's k rows in a fixed order."""

    @staticmethod
    def forward(ctx, src: Tensor, groups: list[Tensor], rows: list[int], top_k: int) -> tuple[Tensor, ...]:
        ctx.groups = groups
        ctx.top_k = top_k
        ctx.n_tokens = src.shape[0]
        return tuple(_gather_blocks(src, group if top_k == 1 else group // top_k, r) for group, r in zip(groups, rows))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        like = next(g for g in grads if g is not None)
        per_assign = _scatter_groups(grads, ctx.groups, ctx.n_tokens * ctx.top_k, like)
        return _sum_choices(per_assign, ctx.top_k), None, None, None


class _Combine(torch.autograd.Function):
    """Expert outputs -> token rows, ``out[t] = sum_j gate[t, j] * y[t*k + j]``, where ``y`` holds every
    assignment's expert output in assignment order (copied out of the experts' buffers, padding dropped).

    Backward, per expert: the token gradients of its assignments gathered onto its buffer rows (zero on
    padding); their row dot products with its saved outputs give the gate gradient, and scaling them in place
    by the gates gives the output gradient. Gathers and copies only, and no (T, d) temporary.
    """

    @staticmethod
    def forward(ctx, gate: Tensor, groups: list[Tensor], *outputs: Tensor) -> Tensor:
        top_k = gate.shape[1]
        y = _scatter_groups(outputs, groups, gate.numel(), outputs[0])
        ctx.save_for_backward(gate, *outputs)
        ctx.groups = groups
        if top_k == 1:
            return y.mul_(gate)
        return _sum_choices(y.view(-1, top_k, y.shape[-1]).mul_(gate.unsqueeze(-1)).view_as(y), top_k)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, *outputs = ctx.saved_tensors
        top_k = gate.shape[1]
        grad = grad.contiguous()
        flat_gate = gate.reshape(-1, 1)
        grad_gate = gate.new_empty(gate.numel()) if ctx.needs_input_grad[0] else None
        grads = []
        for group, out in zip(ctx.groups, outputs):
            n = group.numel()
            g = _gather_blocks(grad, group if top_k == 1 else group // top_k, out.shape[0])
            if grad_gate is not None:  # dL/dgate[t, j] = <grad[t], y[t*k + j]>
                grad_gate[group] = torch.bmm(g[:n].unsqueeze(1), out[:n].unsqueeze(-1)).view(-1)
            g[:n].mul_(flat_gate[group])  # assignment t*k + j gets gate[t, j] * grad[t]
            grads.append(g)
        return (None if grad_gate is None else grad_gate.view_as(gate), None, *grads)


__all__ = ["MoEFeedForward"]
