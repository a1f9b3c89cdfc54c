"""FLOPs per token, measured by PyTorch's dispatch-level FLOP counter plus each mixer's custom-op count.

Why not fvcore: fvcore counts from a JIT trace, and tracing cannot pass through the numba-backed custom
autograd ops (BK-Core, selective scan). ``torch.utils.flop_counter.FlopCounterMode`` counts at the
dispatcher instead (matmuls, convolutions and scaled_dot_product_attention, forward and backward, in
FLOPs = 2 x multiply-adds), so the model runs normally; ops outside PyTorch report their own count
through ``Mixer.core_flops`` (e.g. the selective scan's 9 x B x L x D x N of mamba_ssm's reference).
The training step is measured (forward + backward under the counter), not estimated; custom-op backward
is counted as 2 x its forward. Elementwise ops and norms are not counted, as in fvcore and the papers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


# PyTorch counts scaled_dot_product_attention through its CUDA kernels' formulas; the CPU flash kernel has
# none, so attention would count as zero on CPU. Same dense formula as the GPU ops (causal masking not
# subtracted, as PyTorch does there), so CPU and GPU runs report the same FLOPs.
@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu, get_raw=False)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=False)
def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def core_flops(model: nn.Module, batch: int, seq_len: int) -> float:
    """Sum of ``core_flops(batch, seq_len)`` over the modules that declare custom-op FLOPs."""
    return float(sum(m.core_flops(batch, seq_len) for m in model.modules() if hasattr(m, "core_flops")))


def count_flops(model: nn.Module, input_ids: Tensor) -> dict[str, Any]:
    """Forward and training-step FLOPs per token of ``model`` on one sequence of ``input_ids``."""
    probe = copy.deepcopy(model).to("cpu", torch.float32).train()
    x = input_ids[:1].detach().cpu()
    tokens = x.numel()
    custom = core_flops(probe, x.shape[0], x.shape[1])
    with FlopCounterMode(display=False) as forward_counter, torch.no_grad():
        probe(x)
    with FlopCounterMode(display=False) as step_counter:
        probe(x).float().logsumexp(-1).sum().backward()
    by_op = {str(op): int(n) for op, n in forward_counter.get_flop_counts().get("Global", {}).items()}
    return {
        "forward_per_token": (forward_counter.get_total_flops() + custom) / tokens,
        "train_step_per_token": (step_counter.get_total_flops() + 3 * custom) / tokens,
        "custom_ops_forward_per_token": custom / tokens,
        "forward_by_op": by_op,
        "method": "torch FlopCounterMode (matmul/conv/sdpa) + Mixer.core_flops; elementwise ops not counted",
    }
