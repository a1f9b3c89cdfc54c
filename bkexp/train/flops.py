"""FLOPs per token, measured by PyTorch's dispatch-level FLOP counter plus each mixer's custom-op count.

Why not fvcore: fvcore counts from a JIT trace, and tracing cannot pass through the numba-backed custom
autograd ops (BK-Core, selective scan). ``torch.utils.flop_counter.FlopCounterMode`` counts at the
dispatcher instead (matmuls, convolutions and scaled_dot_product_attention, forward and backward, in
FLOPs = 2 x multiply-adds), so the model runs normally; ops outside PyTorch report their own count
through ``Mixer.core_flops`` (e.g. the selective scan's 9 x B x L x D x N of mamba_ssm's reference).
The training step is measured (forward + backward under the counter), not estimated; custom-op backward
is counted as 2 x its forward. Elementwise ops and norms are not counted, as in fvcore and the papers.

Counted on a training batch, and useful work apart from padding: a module that pads its inputs to fixed
shapes (the MoE's 128-row expert blocks, with ``row_exact``) reports the FLOPs it spent on padding rows through
``padding_flops()``; ``forward_per_token`` and ``train_step_per_token`` exclude them (so models compare on
the work their architecture needs), ``padding_*_per_token`` says what the padding cost on this batch.
Counting on one short sequence would make padding dominate (a few tokens per expert in a 128-row block).
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


class _CustomOpCounter:
    """Forward hooks that add ``core_flops(batch, seq)`` for the shape each module actually saw, and each
    padding module's ``padding_flops()`` of that call.

    Counting per call (not per model and nominal length) keeps the count right when a layer runs at another
    resolution (multi-scale middle layers) or is called several times.
    """

    def __init__(self, model: nn.Module) -> None:
        self.flops = 0.0
        self.padding = 0.0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if hasattr(m, "core_flops") or hasattr(m, "padding_flops")]

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if hasattr(module, "core_flops"):
            batch, seq = args[0].shape[:2]
            self.flops += float(module.core_flops(batch, seq))
        if hasattr(module, "padding_flops"):
            self.padding += float(module.padding_flops())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def count_flops(model: nn.Module, input_ids: Tensor) -> dict[str, Any]:
    """Forward and training-step FLOPs per token of ``model`` on the batch ``input_ids`` (pass a training batch).

    ``forward_per_token`` / ``train_step_per_token``: useful FLOPs (padding excluded);
    ``padding_forward_per_token`` / ``padding_train_step_per_token``: what padding rows cost on this batch
    (their backward is 2 x forward, like any matmul); ``forward_by_op``: per-op totals as executed.
    """
    probe = copy.deepcopy(model).to("cpu", torch.float32).train()
    x = input_ids.detach().cpu()
    if x.ndim == 1:
        x = x.unsqueeze(0)
    tokens = x.numel()
    counter = _CustomOpCounter(probe)
    with FlopCounterMode(display=False) as forward_counter, torch.no_grad():
        probe(x)
    custom, padding = counter.flops, counter.padding
    counter.flops = counter.padding = 0.0
    with FlopCounterMode(display=False) as step_counter:
        probe(x).float().logsumexp(-1).sum().backward()
    step_padding = counter.padding  # the step's own forward may route differently from the first (training mode)
    counter.close()
    by_op = {str(op): int(n) for op, n in forward_counter.get_flop_counts().get("Global", {}).items()}
    return {
        "forward_per_token": (forward_counter.get_total_flops() - padding + custom) / tokens,
        "train_step_per_token": (step_counter.get_total_flops() - 3 * step_padding + 3 * custom) / tokens,
        "custom_ops_forward_per_token": custom / tokens,
        "padding_forward_per_token": padding / tokens,
        "padding_train_step_per_token": 3 * step_padding / tokens,
        "batch_shape": list(x.shape),
        "forward_by_op": by_op,
        "method": "torch FlopCounterMode (matmul/conv/sdpa) + Mixer.core_flops, on a training batch; padding "
                  "rows reported apart (padding_*); elementwise ops not counted",
    }
