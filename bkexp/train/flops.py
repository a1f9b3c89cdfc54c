"""FLOPs per token with fvcore, plus counting rules for the ops fvcore does not know.

fvcore counts one multiply-add as one "flop"; bkexp reports FLOPs = 2 x multiply-adds, the convention of
most papers. The training step is estimated as 3 x forward (backward ~ 2 x forward), and labelled as such.
Ops without a rule are listed under ``unsupported`` so a reader knows what the total leaves out.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# JIT op name -> fvcore handle(inputs, outputs) -> multiply-adds. Op modules register their custom ops here.
EXTRA_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {}


def register_flop_handle(op_name: str, handle: Callable[[list[Any], list[Any]], int]) -> None:
    """Teach the FLOP counter an op (e.g. ``prim::PythonOp.BKCoreFunction``)."""
    EXTRA_HANDLES[op_name] = handle


def _sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape = get_shape(inputs[0]), get_shape(inputs[1])
    *batch, n_q, head_dim = q_shape
    n_k = k_shape[-2]
    batch_size = 1
    for b in batch:
        batch_size *= b
    causal = False
    try:
        causal = bool(inputs[5].toIValue())
    except Exception:  # the flag is not a constant in this trace: count the dense product
        causal = False
    pairs = n_q * (n_k + 1) // 2 if causal and n_q == n_k else n_q * n_k
    return 2 * batch_size * pairs * head_dim  # Q K^T and P V


register_flop_handle("aten::scaled_dot_product_attention", _sdpa_handle)


def count_flops(model: nn.Module, input_ids: Tensor) -> dict[str, Any]:
    """Forward FLOPs per token of ``model`` on ``input_ids`` and the training-step estimate."""
    from fvcore.nn import FlopCountAnalysis

    probe = copy.deepcopy(model).to("cpu", torch.float32).eval()
    x = input_ids[:1].detach().cpu()
    with torch.no_grad():
        analysis = FlopCountAnalysis(probe, (x,))
        analysis.set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        macs = analysis.total()
        unsupported = dict(analysis.unsupported_ops())
    forward = 2.0 * macs / x.numel()
    return {
        "forward_per_token": forward,
        "train_step_per_token": 3.0 * forward,
        "train_step_method": "3 x forward (estimate)",
        "unsupported": unsupported,
    }
