"""A bias-free ``nn.Linear`` whose large CPU outputs go to reusable memory: the LM head.

A language model's logits are the largest tensor of a training step (tokens x vocabulary: 268 MB at
8192 x 8192 float32), written once per step into memory that glibc hands out fresh each time, so the
matmul spends much of its time on first-touch page faults (measured on the 2-core Xeon: the head's forward
138 ms into fresh memory, 83 ms into reused memory). ``linear`` writes them into ``bkexp.ops.workspace``
memory instead, by the same ``mm`` that ``nn.Linear`` runs, so the values are the module's bit for bit; its
backward is ``nn.Linear``'s (``grad @ W``, ``grad.T @ x``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bkexp.ops import workspace
from bkexp.ops.backends import compiled_cpu_path_applies


class _PooledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        out = torch.from_numpy(workspace.empty((x.shape[0], weight.shape[0]), x.detach().numpy().dtype))
        torch.mm(x, weight.t(), out=out)
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def _poolable(module: nn.Module, x: Tensor) -> bool:
    """A plain bias-free ``nn.Linear`` without hooks (quantized or hooked heads are called as modules), input and
    weight fit for a compiled CPU path (``compiled_cpu_path_applies``: plain CPU float32/float64 tensors -- torchao
    keeps the ``nn.Linear`` and wraps its weight --, no autocast, dispatch mode or compilation), and an output
    large enough for the pool (decoding steps and small batches take the module)."""
    if type(module) is not nn.Linear or module.bias is not None or module._forward_hooks or module._forward_pre_hooks:
        return False
    weight = module.weight
    if not compiled_cpu_path_applies(x, weight):  # a tensor-subclass weight (torchao's int8) has its own mm
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return rows * weight.shape[0] * x.element_size() >= workspace.POOL_MIN_BYTES


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``, with the output in reusable memory where ``module`` is a plain bias-free ``nn.Linear`` on CPU."""
    if not _poolable(module, x):
        return module(x)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return _PooledLinear.apply(flat, module.weight).view(*x.shape[:-1], module.weight.shape[0])


__all__ = ["linear"]
