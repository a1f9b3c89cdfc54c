"""``token_cross_entropy``: the compiled CPU loss against a float64 ``F.cross_entropy`` reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bkexp.ops.cross_entropy import token_cross_entropy


def _case(tokens=300, classes=1037, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(tokens, classes, generator=gen, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, classes, (tokens,), generator=gen)
    labels[::5] = -100
    return logits, labels


def _loss_and_grad(fn, logits, labels, **kwargs):
    x = logits.detach().clone().requires_grad_()
    losses = fn(x, labels, **kwargs)
    weights = torch.linspace(0.5, 2.0, losses.numel(), dtype=losses.dtype)  # a non-uniform incoming gradient
    (losses * weights).sum().backward()
    return losses.detach(), x.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_matches_float64_reference(dtype, tol):
    logits, labels = _case(dtype=dtype)
    losses, grad = _loss_and_grad(token_cross_entropy, logits, labels)
    ref_losses, ref_grad = _loss_and_grad(
        lambda x, y: F.cross_entropy(x, y, reduction="none"), logits.double(), labels)
    assert losses.dtype == grad.dtype == dtype
    torch.testing.assert_close(losses.double(), ref_losses, rtol=0, atol=tol * ref_losses.abs().max())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=tol)
    ignored = labels == -100
    assert torch.all(losses[ignored] == 0) and torch.all(grad[ignored] == 0)
    assert torch.all(losses[~ignored] > 0)


def test_custom_ignore_index_and_all_rows_ignored():
    logits, labels = _case()
    labels = labels.clamp(min=0)
    labels[1::2] = 7  # class 7 ignored, as F.cross_entropy(ignore_index=7) ignores it
    losses, grad = _loss_and_grad(token_cross_entropy, logits, labels, ignore_index=7)
    ref_losses, ref_grad = _loss_and_grad(
        lambda x, y: F.cross_entropy(x, y, ignore_index=7, reduction="none"), logits.double(), labels)
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=2e-6)
    losses, grad = _loss_and_grad(token_cross_entropy, logits, torch.full((300,), -100))
    assert torch.all(losses == 0) and torch.all(grad == 0)


def test_each_row_is_a_function_of_that_row_alone():
    """A token's loss and gradient are bit-identical whatever the other rows hold and however many threads run
    (one row is one thread's work), which the run-time causality check relies on."""
    logits, labels = _case()
    losses, grad = _loss_and_grad(token_cross_entropy, logits, labels)
    changed = logits.clone()
    changed[150:] = changed[150:].flip(0) * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        losses_1, grad_1 = _loss_and_grad(token_cross_entropy, changed, labels)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(losses_1[:150], losses[:150])
    assert torch.equal(grad_1[:150], grad[:150])  # same incoming gradient on those rows, same bits out
    assert not torch.equal(losses_1[150:], losses[150:])


def test_nan_logits_give_nan_loss_for_their_row_only():
    logits, labels = _case(tokens=8)
    labels[:] = 3
    logits[2, 100] = float("nan")
    losses, grad = _loss_and_grad(token_cross_entropy, logits, labels)
    assert torch.isnan(losses[2]) and torch.isnan(grad[2]).all()
    assert torch.isfinite(losses[torch.arange(8) != 2]).all()


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e30, -1e30, -1e30], [80.0, 88.5, -200.0]])
    labels = torch.tensor([1, 0, 2])
    losses, grad = _loss_and_grad(token_cross_entropy, logits, labels)
    ref_losses, ref_grad = _loss_and_grad(lambda x, y: F.cross_entropy(x, y, reduction="none"), logits.double(), labels)
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)
    # Logits far from zero but close to each other: every difference to the max must be taken before the
    # exp's range reduction (regrouped, 3e5 - k ln 2 would round away the small differences).
    far = (torch.tensor([3e5, -5e4])[:, None] + torch.tensor([0.0, -1.0, -2.0, -0.5, -3.75]).repeat(20)).float()
    labels = torch.tensor([3, 4])
    torch.testing.assert_close(token_cross_entropy(far, labels).double(),
                               F.cross_entropy(far.double(), labels, reduction="none"), rtol=1e-6, atol=0)


def test_bad_labels_and_shapes_raise_before_any_work():
    logits, labels = _case(tokens=4, classes=10)
    labels[2] = 10
    with pytest.raises(IndexError, match=r"label 10 is out of range: valid labels are 0\.\.9 or ignore_index=-100"):
        token_cross_entropy(logits, labels)
    labels[2] = -3
    with pytest.raises(IndexError, match="label -3"):
        token_cross_entropy(logits, labels)
    with pytest.raises(ValueError, match=r"expected logits \(tokens, classes\) and labels \(tokens,\)"):
        token_cross_entropy(logits.view(2, 2, 10), labels)
    with pytest.raises(ValueError, match="got \\(4, 10\\) and \\(3,\\)"):
        token_cross_entropy(logits, labels[:3])


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_under_a_dispatch_mode_and_in_bfloat16_it_is_f_cross_entropy():
    logits, labels = _case(tokens=16, classes=50)
    with _RecordOps() as mode:  # e.g. FlopCounterMode: the mode must see PyTorch's ops, and gets PyTorch's bits
        losses = token_cross_entropy(logits, labels)
    assert "aten._log_softmax.default" in mode.ops and "aten.nll_loss_forward.default" in mode.ops
    assert torch.equal(losses, F.cross_entropy(logits, labels, reduction="none"))
    half = logits.bfloat16()
    assert torch.equal(token_cross_entropy(half, labels), F.cross_entropy(half, labels, reduction="none"))


def test_backward_reuses_gradient_memory_only_once_nothing_holds_it(monkeypatch):
    """The logit gradient goes to reusable memory (``bkexp.ops.workspace``: fresh pages were ~3/4 of the
    backward at 8192 x 8192): a gradient still held is never overwritten, a dropped one is reused, same values."""
    from bkexp.ops import workspace

    monkeypatch.setattr(workspace, "POOL_MIN_BYTES", 0)  # pool this small case
    monkeypatch.setattr(workspace, "_pool", [])
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 50, generator=gen)
    labels = torch.randint(0, 50, (64,), generator=gen)

    def run() -> torch.Tensor:
        x = base.clone().requires_grad_()
        token_cross_entropy(x, labels).sum().backward()
        return x.grad

    first = run()
    kept = first.clone()
    second = run()
    assert second.data_ptr() != first.data_ptr()
    freed = second.data_ptr()
    del second
    third = run()
    assert third.data_ptr() == freed
    assert torch.equal(first, kept) and torch.equal(third, kept)
    expected = torch.softmax(base.double(), -1) - F.one_hot(labels, 50).double()
    torch.testing.assert_close(third.double(), expected, rtol=1e-5, atol=1e-6)
