"""MoEFeedForward: dispatch equals a dense compute-everything reference, top-k, aux loss, causality, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bkexp.models.moe import MoEFeedForward


def dense_reference(moe: MoEFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Route independently of the module, run every expert on every token, keep the selected ones.

    Returns the output and the (tokens, experts) gate matrix (zero for unselected experts).
    """
    flat = x.reshape(-1, moe.d_model)
    probs = torch.softmax(flat @ moe.router.weight.T, dim=-1)
    top_p, top_i = probs.topk(moe.top_k, dim=-1)
    if moe.renormalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(1, top_i, top_p)
    every = torch.stack(
        [F.gelu(flat @ ex.fc1.weight.T) @ ex.fc2.weight.T for ex in moe.experts], dim=1
    )  # (T, E, D)
    return (gates.unsqueeze(-1) * every).sum(1).reshape(x.shape), gates


def make_moe(n_experts: int, top_k: int, d_model: int = 16, **kw) -> MoEFeedForward:
    torch.manual_seed(0)
    moe = MoEFeedForward(d_model, n_experts=n_experts, top_k=top_k, expansion=2.0, **kw).double()
    with torch.no_grad():  # a router with a real spread of decisions (default init is nearly uniform)
        moe.router.weight.normal_(std=1.0)
    return moe


ROW_EXACT = [{}, {"row_exact": True, "block_rows": 4}]  # whole-buffer expert calls; fixed 4-row calls
ROW_EXACT_IDS = ["whole", "blocks4"]


@pytest.mark.parametrize("mode", [*ROW_EXACT, {"row_exact": True}], ids=[*ROW_EXACT_IDS, "blocks128"])
@pytest.mark.parametrize(("n_experts", "top_k"), [(4, 1), (4, 2), (3, 3), (1, 1)],
                         ids=["E4-k1", "E4-k2", "E3-k3", "E1-k1"])
def test_matches_dense_reference(n_experts: int, top_k: int, mode: dict) -> None:
    moe = make_moe(n_experts, top_k, **mode)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    out = moe(x)
    ref, gates = dense_reference(moe, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # exactly top_k experts per token carry weight, and every expert the reference selects was used
    assert ((gates > 0).sum(-1) == top_k).all()
    if top_k > 1:
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[0], dtype=gates.dtype))


@pytest.mark.parametrize("mode", ROW_EXACT, ids=ROW_EXACT_IDS)
def test_top1_gate_is_router_probability_and_experts_get_only_their_tokens(mode: dict) -> None:
    moe = make_moe(4, 1, **mode)
    block_rows = mode.get("block_rows")
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    flat = x.reshape(-1, 16)
    probs = torch.softmax(flat @ moe.router.weight.T, -1)
    chosen = probs.argmax(-1)
    seen: dict[int, int] = {}

    def record(e: int, rows: int) -> None:
        seen[e] = seen.get(e, 0) + rows
        assert block_rows is None or rows == block_rows  # row-exact: every call is one fixed-shape block

    hooks = [ex.register_forward_hook(lambda m, inp, out, e=e: record(e, inp[0].shape[0]))
             for e, ex in enumerate(moe.experts)]
    out = moe(x)
    for h in hooks:
        h.remove()
    # sparse dispatch: each expert ran on the tokens routed to it (padded up to whole blocks), not on all
    block = block_rows or 1
    assert seen == {e: -(-int((chosen == e).sum()) // block) * block for e in range(4) if (chosen == e).any()}
    expected = torch.stack([probs[t, chosen[t]] * moe.experts[int(chosen[t])](flat[t:t + 1])[0]
                            for t in range(flat.shape[0])])
    torch.testing.assert_close(out.reshape(-1, 16), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2], ids=["k1", "k2"])
def test_aux_loss_matches_formula(top_k: int) -> None:
    moe = make_moe(4, top_k, aux_loss_weight=0.25)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    moe(x)
    probs = torch.softmax(x.reshape(-1, 16) @ moe.router.weight.T, -1)
    chosen = probs.topk(top_k, -1).indices
    counts = torch.stack([(chosen == e).sum() for e in range(4)]).double()
    f = counts / (26 * top_k)
    p = probs.mean(0)
    expected = 0.25 * 4 * (f * p).sum()
    torch.testing.assert_close(moe.aux_loss, expected)
    torch.testing.assert_close(moe.router_stats["fraction"], f)
    torch.testing.assert_close(moe.router_stats["prob_mean"], p)
    assert abs(float(moe.router_stats["fraction"].sum()) - 1.0) < 1e-12


def test_uniform_router_balance_loss_is_one() -> None:
    moe = make_moe(4, 1)
    with torch.no_grad():
        moe.router.weight.zero_()  # every probability 1/E, so E * sum f_e / E = 1 whatever f is
    moe(torch.randn(2, 8, 16, dtype=torch.float64))
    assert abs(float(moe.router_stats["balance_loss"]) - 1.0) < 1e-12
    assert moe.router_stats["fraction"].tolist() == [1.0, 0.0, 0.0, 0.0]  # top-1 ties go to the lowest index


def test_dropless_routing_is_causal() -> None:
    """Changing tokens after t changes nothing at or before t, even when they crowd one expert."""
    moe = make_moe(4, 1, row_exact=True)
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    t = 9
    y = moe(x)
    x2 = x.clone()
    # send every future token to the expert that token 0 uses: a capacity limit would now drop tokens <= t
    e0 = int(torch.softmax(x[0, 0] @ moe.router.weight.T, -1).argmax())
    x2[:, t + 1:] = 5.0 * moe.router.weight[e0] + 0.01 * torch.randn_like(x2[:, t + 1:])
    y2 = moe(x2)
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])
    # bit-identical although every expert's load changed (row_exact: fixed-shape expert calls)
    assert torch.equal(y2[:, : t + 1], y[:, : t + 1])


def test_expert_blocks_make_outputs_independent_of_the_load() -> None:
    """The same token gives bit-identical output whatever else is routed with it (float32 and float64)."""
    for dtype in (torch.float32, torch.float64):
        moe = make_moe(2, 1, d_model=32, row_exact=True).to(dtype)
        token = torch.randn(1, 1, 32, dtype=dtype)
        outs = [moe(torch.cat([torch.randn(1, n, 32, dtype=dtype), token], dim=1))[0, -1]
                for n in (0, 1, 2, 6, 50, 300, 1100)]  # 1 to 9 blocks of 128 rows for the token's expert
        assert all(torch.equal(o, outs[0]) for o in outs), dtype


@pytest.mark.parametrize("threads", [1, 2])
def test_row_exact_holds_where_padding_to_whole_blocks_did_not(threads: int) -> None:
    """At size=small's expert shape (256 -> 384 -> 256) in float64 -- the causality check's dtype -- MKL at one
    thread rounds a 128-row call differently from a 256-row one, so padding each expert's buffer to whole
    blocks and calling it once made a token's output depend on its expert's load. Fixed-shape block calls
    (``row_exact``) do not: loads of 1, 2 and 3 blocks give the same bits."""
    torch.manual_seed(0)
    moe = MoEFeedForward(256, n_experts=2, top_k=1, expansion=1.5, row_exact=True).double()
    token = torch.randn(1, 1, 256, dtype=torch.float64)
    expert = int(moe.route(token.view(1, 256))[2])
    others = torch.randn(1, 400, 256, dtype=torch.float64)
    with torch.no_grad():
        others += (20.0 if expert == 0 else -20.0) * (moe.router.weight[0] - moe.router.weight[1])  # all to `expert`
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            outs = [moe(torch.cat([others[:, :n], token], dim=1))[0, -1] for n in (0, 100, 130, 300)]
    finally:
        torch.set_num_threads(previous)
    assert moe.router_stats["fraction"][expert] == 1.0  # the crowd went to the token's expert: 3 blocks at the end
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("mode", ROW_EXACT, ids=ROW_EXACT_IDS)
@pytest.mark.parametrize(("n_experts", "top_k"), [(4, 1), (4, 2), (3, 3)], ids=["E4-k1", "E4-k2", "E3-k3"])
def test_gradients_match_the_dense_reference(n_experts: int, top_k: int, mode: dict) -> None:
    """The gather-based dispatch and combine have the exact adjoint: input, expert and router gradients."""
    moe = make_moe(n_experts, top_k, aux_loss_weight=0.0, **mode)
    x = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 13, 16, dtype=torch.float64)
    params = [x, *moe.parameters()]
    got = torch.autograd.grad((moe(x) * weight).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((dense_reference(moe, x)[0] * weight).sum(), params, allow_unused=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(e), e, rtol=1e-10, atol=1e-12)


def per_token_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """A plain loop: each token alone through its top-k experts (called as modules), gated and summed."""
    flat = x.reshape(-1, moe.d_model)
    rows = []
    for t in range(flat.shape[0]):
        probs = torch.softmax(flat[t] @ moe.router.weight.T, -1)
        top_p, top_i = probs.topk(moe.top_k)
        if moe.renormalize:
            top_p = top_p / top_p.sum()
        rows.append(sum(top_p[j] * moe.experts[int(top_i[j])](flat[t:t + 1])[0] for j in range(moe.top_k)))
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("mode", ROW_EXACT, ids=ROW_EXACT_IDS)
@pytest.mark.parametrize(("n_experts", "top_k"), [(4, 1), (4, 2), (5, 3)], ids=["E4-k1", "E4-k2", "E5-k3"])
def test_outputs_and_gradients_match_a_per_token_loop(n_experts: int, top_k: int, mode: dict) -> None:
    """Per-expert buffers, copies back and in-place gating equal a token-by-token loop, forward and backward,
    with one expert crowded (several blocks) and one left without tokens."""
    moe = make_moe(n_experts, top_k, aux_loss_weight=0.0, **mode)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    with torch.no_grad():  # crowd expert 0 with a third of the tokens; expert n-1 (logit 0) gets none
        moe.router.weight[-1] = 0.0
        lift = torch.linalg.lstsq(moe.router.weight[:-1], torch.full((n_experts - 1, 1), 20.0, dtype=x.dtype)).solution
        x += lift.view(16)  # every other expert's logit is about 20
        x[0] += 3.0 * moe.router.weight[0]
    x.requires_grad_()
    weight = torch.randn(3, 7, 16, dtype=torch.float64)
    chosen = torch.softmax(x.detach().reshape(-1, 16) @ moe.router.weight.T, -1).topk(top_k, -1).indices
    assert (chosen == 0).sum() > 4 and not (chosen == n_experts - 1).any()
    params = [x, *moe.parameters()]
    out = moe(x)
    ref = per_token_reference(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((ref * weight).sum(), params, allow_unused=True)
    for g, e in zip(got, expected):
        if e is None:  # the expert without tokens: no gradient either way
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2], ids=["k1", "k2"])
def test_gradients_reach_router_through_output_and_aux(top_k: int) -> None:
    moe = make_moe(4, top_k, aux_loss_weight=0.0)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    moe(x).pow(2).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    used = torch.softmax(x.reshape(-1, 16) @ moe.router.weight.T, -1).topk(top_k, -1).indices.unique()
    for e in used.tolist():
        assert moe.experts[e].fc1.weight.grad.abs().sum() > 0
    moe.zero_grad()
    moe.aux_loss_weight = 1.0
    moe(x)
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(8, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="n_experts"):
        MoEFeedForward(8, n_experts=0)
    for bad in (0, None, 2.5):
        with pytest.raises(ValueError, match=f"block_rows must be an integer >= 1.*got {bad}"):
            MoEFeedForward(8, block_rows=bad)
    moe = MoEFeedForward(8)
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(2, 3, 7))


def test_float32_and_empty_batch() -> None:
    moe = MoEFeedForward(8, n_experts=4, top_k=2)
    assert moe(torch.randn(2, 5, 8)).dtype == torch.float32
    out = moe(torch.randn(0, 5, 8))
    assert out.shape == (0, 5, 8)
    assert torch.isfinite(moe.aux_loss)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("n_experts", "top_k", "block_rows"), [(4, 1, None), (4, 2, None), (5, 3, 4), (4, 2, 128)],
                         ids=["E4-k1", "E4-k2", "E5-k3-blocks4", "E4-k2-blocks128"])
def test_compiled_row_moves_are_bit_identical_to_the_pytorch_ops(n_experts: int, top_k: int, block_rows: int | None,
                                                                 dtype: torch.dtype, threads: int) -> None:
    """Outputs, aux loss and every gradient of the compiled dispatch/combine equal the PyTorch ops bit for bit,
    serial and threaded (1100 tokens x 64 is above the threaded kernels' threshold), with one expert crowded and
    one left without tokens."""
    moe = make_moe(n_experts, top_k, d_model=64, row_exact=block_rows is not None, block_rows=block_rows or 128)
    moe.to(dtype)
    x = torch.randn(2, 550, 64, dtype=dtype)
    with torch.no_grad():  # the last expert (logit 0, the others about 60) gets no token, the first a crowd
        moe.router.weight[-1] = 0.0
        lift = torch.linalg.lstsq(moe.router.weight[:-1], torch.full((n_experts - 1, 1), 60.0, dtype=dtype)).solution
        x += lift.view(64)
        x[0, :300] += moe.router.weight[0]
    weight = torch.randn_like(x)
    results = []
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for compiled in (True, False):
            moe.compiled_moves = compiled
            moe.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            out = moe(xx)
            ((out * weight).sum() + moe.aux_loss).backward()
            results.append([out, moe.aux_loss, xx.grad, *(p.grad for p in moe.parameters())])
    finally:
        torch.set_num_threads(previous)
    counts = moe.router_stats["fraction"]
    assert counts[-1] == 0 and counts[0] > counts[1:-1].min()  # the routing the docstring promises
    for got, ref in zip(*results):
        assert (got is None and ref is None) or torch.equal(got, ref)


def test_compiled_row_moves_compile_one_signature_for_up_to_eight_experts() -> None:
    """The experts' buffers reach the kernels as a tuple padded to a whole SLOT_QUANTUM of arrays, so MoE layers of
    2 to 8 experts share one compiled signature per kernel (a sweep over n_experts compiles nothing new)."""
    from numba.core.types import BaseTuple

    from bkexp.ops import moe_dispatch

    for n_experts in (2, 3, 5, 8):
        moe = make_moe(n_experts, 1, d_model=32).float()
        x = torch.randn(2, 40, 32, requires_grad=True)
        out = moe(x)
        (out.sum() + moe.aux_loss).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    lengths = {len(arg) for variants in moe_dispatch.KERNELS.values() for kernel in variants.values()
               for sig in kernel.overloads for arg in sig if isinstance(arg, BaseTuple)}
    assert lengths == {moe_dispatch.SLOT_QUANTUM}


def test_compiled_path_aux_only_gradient_and_hooked_router() -> None:
    """Differentiating only the auxiliary loss (the dispatch gets no gradient) gives the PyTorch path's router
    and input gradients bit for bit; a router with a forward hook is still called as a module."""
    moe = make_moe(4, 2, d_model=32).float()
    x = torch.randn(3, 40, 32)
    grads = []
    for compiled in (True, False):
        moe.compiled_moves = compiled
        xx = x.clone().requires_grad_()
        moe(xx)
        grads.append(torch.autograd.grad(moe.aux_loss, [xx, moe.router.weight]))
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and grads[0][0].abs().sum() > 0
    moe.compiled_moves = True
    calls = []
    moe.router.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    moe(x.requires_grad_()).sum().backward()
    assert calls == [(120, 4)]


def test_under_torch_compile_the_layer_runs_eagerly_with_the_same_bits() -> None:
    """``torch.compile`` of a model with MoE layers: the layer is left to eager mode (its buffer sizes are the
    routing's data; dynamo crashed on the compiled row moves), so outputs and gradients equal eager bit for bit
    across batches with different routings, and no graph is recompiled per routing."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: graphs compiled by earlier tests would count
    torch.manual_seed(0)
    moe = MoEFeedForward(32, n_experts=4, top_k=2, expansion=1.5)
    compiled = torch.compile(moe)
    for seed in range(4):
        torch.manual_seed(seed)
        x = torch.randn(2, 40, 32, requires_grad=True)
        y = compiled(x)
        y.square().sum().backward()
        x_eager = x.detach().clone().requires_grad_()
        y_eager = moe(x_eager)
        y_eager.square().sum().backward()
        assert torch.equal(y, y_eager) and torch.equal(x.grad, x_eager.grad)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
