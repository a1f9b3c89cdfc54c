"""``torch.compile`` of a whole model (what ``bkexp bench run``'s compile mode and a user's own script do), in a
fresh process: the custom-kernel ops run eagerly, everything else traces without graph breaks."""

from __future__ import annotations

import json
import subprocess
import sys

# Fresh process: the numba kernels are not loaded yet, which is when dynamo used to trace into numba's dispatcher.
SCRIPT = r"""
import json, sys
import bkexp, torch
from torch._dynamo.utils import counters
from bkexp.bench.common import build_model

out = {}
for name in sys.argv[1:]:
    torch.manual_seed(0)
    model = build_model(name, "tiny", 64)
    ids = torch.randint(0, 64, (2, 24))
    eager = model(ids)
    eager.logsumexp(-1).sum().backward()
    eager_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")(ids)
    compiled.logsumexp(-1).sum().backward()
    out[name] = {
        "logits_diff": ((compiled - eager).abs().max() / eager.abs().max()).item(),
        "grads_missing": [(p.grad is None) != (g is None) for p, g in zip(model.parameters(), eager_grads)],
        "grad_diff": max(((p.grad - g).abs().max() / g.abs().max().clamp(min=1e-30)).item()
                         for p, g in zip(model.parameters(), eager_grads) if g is not None and p.grad is not None),
        "breaks": [reason.splitlines()[0] for reason in counters["graph_break"]],
    }
print(json.dumps(out))
"""


def test_whole_model_compiles_with_custom_kernels_eager_and_no_other_graph_break() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "transformer", "bk", "mamba"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        # dynamo's eager backend runs PyTorch's ops where eager mode ran bkexp's numba norm and rotary kernels:
        # the same values up to float32 rounding (relative to each tensor's largest entry)
        assert result["logits_diff"] <= 1e-5 and result["grad_diff"] <= 1e-5, (name, result)
        assert not any(result["grads_missing"]), name
        # the only breaks: around the ops and layers that run eagerly on purpose (torch.compiler.disable)
        assert all("torch.compiler.disable" in reason for reason in result["breaks"]), (name, result["breaks"])
    assert results["transformer"]["breaks"] == []  # its norms and rotary take PyTorch's ops under compile
