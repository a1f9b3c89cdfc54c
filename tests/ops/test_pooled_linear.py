"""``pooled_linear.linear``: the LM head's logits in reusable memory, bit-identical to ``nn.Linear``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bkexp.ops import pooled_linear, workspace


@pytest.fixture
def pool_everything(monkeypatch):
    monkeypatch.setattr(workspace, "POOL_MIN_BYTES", 0)  # pool the outputs of these small cases
    monkeypatch.setattr(workspace, "_pool", [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_values_and_gradients_equal_nn_linear_bit_for_bit(pool_everything, dtype):
    torch.manual_seed(0)
    head = nn.Linear(48, 700, bias=False).to(dtype)
    x = torch.randn(3, 50, 48, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 50, 700, dtype=dtype)
    results = []
    for fn in (lambda: pooled_linear.linear(head, x), lambda: head(x)):
        out = fn()
        out.backward(grad)
        results.append((out.detach().clone(), x.grad, head.weight.grad))
        x.grad = head.weight.grad = None
    assert workspace._pool  # the first call did go to the pool
    for got, want in zip(*results):
        assert got.shape == want.shape and torch.equal(got, want)


def test_output_memory_is_reused_only_once_nothing_holds_it(pool_everything):
    torch.manual_seed(0)
    head = nn.Linear(16, 300, bias=False)
    x = torch.randn(40, 16)
    with torch.no_grad():
        first = pooled_linear.linear(head, x)
        kept = first.clone()
        second = pooled_linear.linear(head, x)
        assert second.data_ptr() != first.data_ptr()
        freed = second.data_ptr()
        del second
        third = pooled_linear.linear(head, x)
    assert third.data_ptr() == freed and torch.equal(first, kept) and torch.equal(third, kept)


def test_other_heads_and_modes_are_called_as_modules(pool_everything):
    """A biased or hooked head, and runs under a dispatch mode (FLOP counting, fake tensors), take ``module(x)``:
    the hook fires, and nothing is written to the pool."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    biased = nn.Linear(16, 30)
    assert torch.equal(pooled_linear.linear(biased, x), biased(x))
    hooked = nn.Linear(16, 30, bias=False)
    calls = []
    hooked.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    pooled_linear.linear(hooked, x)
    assert calls == [(4, 30)]
    plain = nn.Linear(16, 30, bias=False)
    with FlopCounterMode(display=False) as counter:
        pooled_linear.linear(plain, x)
    assert counter.get_total_flops() == 2 * 4 * 16 * 30
    assert workspace._pool == []


def test_the_pool_stays_within_its_array_and_byte_limits(monkeypatch):
    """New shapes replace free pooled arrays (oldest first) instead of piling up; arrays in use are never
    dropped, and an array that does not fit beside them is handed out unpooled."""
    monkeypatch.setattr(workspace, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(workspace, "POOL_MAX_ARRAYS", 3)
    monkeypatch.setattr(workspace, "POOL_MAX_BYTES", 3 * 800)
    monkeypatch.setattr(workspace, "_pool", [])
    held = [workspace.empty((100,), "float64") for _ in range(3)]  # 800 bytes each: the pool is full
    extra = workspace.empty((100,), "float64")
    assert len(workspace._pool) == 3 and all(a is not extra for a in workspace._pool)  # all in use: not pooled
    del held[0]
    other = workspace.empty((50,), "float64")  # a free array makes room for a new shape
    assert len(workspace._pool) == 3 and any(a is other for a in workspace._pool)
    assert all(any(a is h for a in workspace._pool) for h in held)
    big = workspace.empty((250,), "float64")  # 2000 bytes: room only if everything else were free
    assert not any(a is big for a in workspace._pool) and sum(a.nbytes for a in workspace._pool) <= 3 * 800
    del held, other, extra
    big = workspace.empty((250,), "float64")  # now the free arrays make room
    assert any(a is big for a in workspace._pool) and sum(a.nbytes for a in workspace._pool) <= 3 * 800


def test_a_torchao_quantized_head_is_called_as_a_module(pool_everything):
    """torchao's weight-only quantization keeps the ``nn.Linear`` and wraps its weight in a tensor subclass with
    its own matmul; pooling it ran ``mm`` on that subclass and failed (``bkexp bench run``'s int8 mode)."""
    quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    head = nn.Linear(64, 96, bias=False)
    quantization.quantize_(head, quantization.Int8WeightOnlyConfig())
    assert type(head) is nn.Linear and type(head.weight) not in (nn.Parameter, torch.Tensor)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(pooled_linear.linear(head, x), head(x))
    assert workspace._pool == []
