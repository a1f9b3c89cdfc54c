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

    Dispatch: the ``T * top_k`` assignments are laid out grouped by expert in one buffer, each expert's group
    zero-padded to a whole number of ``block_rows``-row blocks; each expert MLP runs once on its part of the
    buffer, and the gated results are gathered back per token. Both moves are row gathers whose backward is the
    other gather (``_Dispatch``/``_Combine``), so no scatter-add runs forward or backward, and the cost is
    ``top_k`` expert passes per token plus at most ``block_rows - 1`` padding rows per expert.

    Bit-exactness: a BLAS matmul's result for one row can depend on how many rows the call has (MKL picks
    another kernel or edge tile for some shapes; one row alone takes the GEMV path), so with calls of
    arbitrary size a token's output would change in the last bits when *other* tokens -- future ones
    included -- change an expert's load. The run-time causality check demands bit-identical logits, so by
    default every expert call has a multiple of ``block_rows`` rows (zero padded): measured with MKL on
    x86 (float32, float64 and bfloat16, 1 and 2 threads), every row's result is then the same whatever the
    multiple, and a token's output is a bit-exact function of that token (``tests/models/test_moe.py``
    checks it at loads from 1 to 9 blocks). ``block_rows=None`` runs unpadded calls (equal up to round-off).
    Modules are called normally, so quantized, pruned or hooked expert ``nn.Linear`` layers behave as usual.
    ``padding_flops()`` reports what the last forward spent on padding rows, so FLOP counts can show useful
    work and padding apart.
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
        self.padding_rows = 0  # zero rows the last forward ran through the experts (block padding)

    def route(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router probabilities ``(T, E)`` (float32 or float64), top-k gates ``(T, k)`` and expert ids ``(T, k)``."""
        logits = self.router(flat)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        gate, expert_idx = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return probs, gate, expert_idx

    def layout(self, expert_idx: Tensor, block_rows: int | None
               ) -> tuple[Tensor, Tensor, list[tuple[int, int]], list[int], Tensor]:
        """Where each (token, choice) assignment goes in the expert-grouped, block-padded buffer.

        Returns ``slot_of`` (T*k,) the buffer row of assignment ``t*k + j``; ``assign_of_slot`` (P,) the
        assignment of each buffer row (0 for padding); ``pad``, the ``(start, stop)`` row ranges of padding;
        the buffer rows of each expert (a list, summing to P); and the per-expert assignment ``counts``.
        """
        assign_expert = expert_idx.reshape(-1)
        n_assign = assign_expert.numel()
        order = torch.argsort(assign_expert, stable=True)
        counts = torch.bincount(assign_expert, minlength=self.n_experts)
        rows = counts if block_rows is None else (counts + block_rows - 1) // block_rows * block_rows
        count_start = torch.cumsum(counts, 0) - counts
        row_start = torch.cumsum(rows, 0) - rows
        sorted_expert = assign_expert[order]
        slot_sorted = torch.arange(n_assign, device=order.device) - count_start[sorted_expert] + row_start[sorted_expert]
        slot_of = torch.empty_like(slot_sorted).index_copy_(0, order, slot_sorted)
        rows_list = rows.tolist()
        ends = torch.cumsum(rows, 0).tolist()
        pad = [(end - r + c, end) for end, r, c in zip(ends, rows_list, counts.tolist()) if r > c]
        assign_of_slot = torch.zeros(ends[-1] if ends else 0, dtype=torch.long, device=order.device)
        assign_of_slot[slot_sorted] = order
        return slot_of, assign_of_slot, pad, rows_list, counts

    def padding_flops(self) -> float:
        """Forward FLOPs the last call spent on zero padding rows (2 x multiply-adds of an expert per row)."""
        per_row = sum(p.numel() for p in self.experts[0].parameters() if p.ndim == 2)
        return 2.0 * per_row * self.padding_rows

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
        slot_of, assign_of_slot, pad, rows, counts = self.layout(expert_idx, block_rows)
        self.padding_rows = sum(stop - start for start, stop in pad)
        token_of_slot = assign_of_slot if self.top_k == 1 else assign_of_slot // self.top_k

        buffer = _Dispatch.apply(flat, token_of_slot, pad, slot_of, self.top_k)
        outputs = [self.experts[e](part) for e, part in enumerate(buffer.split(rows)) if rows[e] > 0]
        expert_out = torch.cat(outputs) if len(outputs) > 1 else outputs[0] if outputs else buffer
        # Under autocast the experts return bf16/fp16 while x may be float32: gate and combine in x's dtype.
        out = _Combine.apply(expert_out.to(flat.dtype), gate.to(flat.dtype), slot_of, assign_of_slot, pad)

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


def _expand_rows(src: Tensor, index: Tensor, pad: list[tuple[int, int]]) -> Tensor:
    """``out[i] = src[index[i]]``, zero on the padding row ranges: token (or assignment) rows -> buffer rows."""
    out = src.index_select(0, index)
    for start, stop in pad:
        out[start:stop] = 0
    return out


def _sum_rows(src: Tensor, slot_of: Tensor, top_k: int, gate: Tensor | None = None) -> Tensor:
    """``out[t] = sum_j gate[t, j] * src[slot_of[t*k + j]]`` (gate 1 if None), in the order j = 0..k-1."""
    picked = src.index_select(0, slot_of)
    if top_k == 1:
        return picked if gate is None else picked.mul_(gate)
    picked = picked.view(-1, top_k, src.shape[-1])
    if gate is not None:
        picked.mul_(gate.unsqueeze(-1))
    out = picked[:, 0]
    for j in range(1, top_k):  # a fixed elementwise order: each token's sum is independent of the others
        out = out + picked[:, j]
    return out


class _Dispatch(torch.autograd.Function):
    """Token rows -> expert-grouped buffer rows; the backward sums each token's k buffer rows (a gather)."""

    @staticmethod
    def forward(ctx, src: Tensor, token_of_slot: Tensor, pad: list[tuple[int, int]], slot_of: Tensor,
                top_k: int) -> Tensor:
        ctx.save_for_backward(slot_of)
        ctx.top_k = top_k
        return _expand_rows(src, token_of_slot, pad)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (slot_of,) = ctx.saved_tensors
        return _sum_rows(grad.contiguous(), slot_of, ctx.top_k), None, None, None, None


class _Combine(torch.autograd.Function):
    """Gated buffer rows -> token rows, ``out[t] = sum_j gate[t, j] * src[slot_of[t*k + j]]``.

    One gather and an in-place scale forward; backward recomputes the gather for the gate gradient and copies
    each token's scaled gradient back to its buffer rows (gathers only, no scatter-add).
    """

    @staticmethod
    def forward(ctx, src: Tensor, gate: Tensor, slot_of: Tensor, assign_of_slot: Tensor,
                pad: list[tuple[int, int]]) -> Tensor:
        ctx.save_for_backward(src, gate, slot_of, assign_of_slot)
        ctx.pad = pad
        return _sum_rows(src, slot_of, gate.shape[1], gate)

    @staticmethod
    def backward(ctx, grad: Tensor):
        src, gate, slot_of, assign_of_slot = ctx.saved_tensors
        pad = ctx.pad
        grad = grad.contiguous()
        top_k = gate.shape[1]
        grad_gate = None
        if ctx.needs_input_grad[1]:
            picked = src.index_select(0, slot_of).view(-1, top_k, src.shape[-1])
            grad_gate = torch.bmm(picked, grad.unsqueeze(-1)).squeeze(-1)  # row dot products (T, k)
        grad_src = None
        if ctx.needs_input_grad[0]:
            # Buffer row s holds assignment (t, j): its gradient is gate[t, j] * grad[t].
            scaled = (grad.unsqueeze(1) * gate.unsqueeze(-1)).view(-1, src.shape[-1])
            grad_src = _expand_rows(scaled, assign_of_slot, pad)
        return grad_src, grad_gate, None, None, None


__all__ = ["MoEFeedForward"]
