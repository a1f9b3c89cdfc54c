"""The one quantization policy shared by every model: which layers of a LanguageModel get quantized.

Quantized: every ``nn.Linear`` inside ``model.blocks`` (mixer and feed-forward: attention qkv/out, MLP fc1/fc2,
MoE experts and router, BK w_v/w_k/w_o, Mamba in/x/dt/out projections), found by type, so a new mixer is
covered without being named here. With ``embeddings=True`` also the token embedding and the LM head (by
default the head is tied to the embedding: one matrix, quantized once, rows = tokens = the head's output
channels). With ``conv=True`` also ``nn.Conv1d`` kernels inside the blocks (Mamba's depthwise causal conv);
off by default, because the issue's policy is "Linear layers" and a conv kernel exists in Mamba only.

Never quantized: norms, biases (kept in float32 as in every weight-only scheme), and parameters that are
not layer weights (BK-Core potentials' shift z, couplings and output scale; Mamba's A_log, D), and the modules a
``StagedLanguageModel`` adds outside the blocks (ACT halting units, exit-head norms, the multi-scale resampler,
the Koopman operator). The BK-Core operator itself runs in float32 on the outputs of quantized layers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from bkexp.quant.fake_quant import QUANTIZED_TYPES, latent_weight

KINDS = ("linear", "conv1d", "embedding", "head")


@dataclass
class Target:
    """One module the policy quantizes: its dotted path, the module, and its kind (one of ``KINDS``)."""

    name: str
    module: nn.Module
    kind: str


def _require_backbone(model: nn.Module) -> None:
    missing = [attr for attr in ("blocks", "embed", "head") if not hasattr(model, attr)]
    if missing:
        raise TypeError(f"the quantization policy needs a bkexp LanguageModel (blocks, embed, head); "
                        f"{type(model).__name__} lacks {', '.join(missing)}")


def policy_targets(model: nn.Module, embeddings: bool, conv: bool = False) -> list[Target]:
    """The modules the policy quantizes, in ``named_modules`` order (embedding first, head last)."""
    _require_backbone(model)
    targets: list[Target] = []
    if embeddings:
        targets.append(Target("embed", model.embed, "embedding"))
    for name, module in model.blocks.named_modules(prefix="blocks"):
        if isinstance(module, nn.Linear):
            targets.append(Target(name, module, "linear"))
        elif conv and isinstance(module, nn.Conv1d):
            targets.append(Target(name, module, "conv1d"))
    if embeddings:
        targets.append(Target("head", model.head, "head"))
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The fake-quantized layers a prepared model holds."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)]


def full_precision_in_blocks(model: nn.Module, targets: list[Target]) -> dict[str, int]:
    """Parameters inside the blocks that the policy leaves in full precision, by owning module type.

    Biases of quantized layers count under that layer's type (``Linear (bias)``).
    """
    quantized = {id(latent_weight(t.module)) for t in targets}
    counts: dict[str, int] = defaultdict(int)
    for module in model.blocks.modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in quantized:
                continue
            kind = type(module).__name__
            if isinstance(module, QUANTIZED_TYPES):
                kind = next(c.__name__ for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
            counts[f"{kind} (bias)" if pname == "bias" else kind] += param.numel()
    return dict(sorted(counts.items()))


def layer_names_by_parent(model: nn.Module, targets: list[Target]) -> dict[str, list[str]]:
    """``{"AttentionMixer": ["out_proj", "qkv"], "MLP": ["fc1", "fc2"], ...}``: what the policy picked, readably."""
    by_parent: dict[str, set[str]] = defaultdict(set)
    for target in targets:
        parent_name, _, attr = target.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        by_parent[type(parent).__name__].add(attr)
    return {k: sorted(v) for k, v in sorted(by_parent.items())}
