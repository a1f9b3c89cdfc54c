"""The run-time causality check: an autoregressive model's logits at t must not depend on tokens after t."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class CausalityError(RuntimeError):
    """Raised when a model that is about to be trained as a language model reads future tokens."""


def check_causality(model: nn.Module, input_ids: Tensor, vocab_size: int, name: str = "model",
                    positions: tuple[float, ...] = (0.0, 0.37, 0.81), seed: int = 0) -> None:
    """Perturb every token after position t and require the logits at positions <= t to stay bit-identical.

    Runs on a float64 CPU copy of ``model`` in eval mode (no dropout), on a real batch, at several t (given
    as fractions of the sequence length). Raises ``CausalityError`` with the first offending position.
    Layers whose rounding depends on the batch's make-up declare a ``row_exact`` switch (the MoE: how many
    tokens its experts get sets the shape of their matmuls); the copy runs with it on, so that every
    token's output is a bit-exact function of that token and only information flow can fail the check.
    """
    declared = getattr(model, "causal", True)
    if not declared:
        raise CausalityError(
            f"{name} declares a non-causal mixer (e.g. model.mixer.causal=false, the original bidirectional "
            "BK layer): every output position reads the whole sequence, including future tokens, so as a "
            "language model it would learn to copy the next token instead of predicting it. Use a causal "
            "mixer, or train it only on a non-autoregressive task (dataset.autoregressive=false)."
        )
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    for module in probe.modules():
        if hasattr(module, "row_exact"):
            module.row_exact = True
    x = input_ids[: min(2, input_ids.shape[0])].detach().to("cpu", torch.long)
    n = x.shape[1]
    if n < 2:
        return
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        reference = probe(x)
        for frac in positions:
            t = min(n - 2, int(frac * (n - 1)))
            perturbed = x.clone()
            shift = torch.randint(1, vocab_size, perturbed[:, t + 1 :].shape, generator=gen)
            perturbed[:, t + 1 :] = (perturbed[:, t + 1 :] + shift) % vocab_size  # every later token differs
            out = probe(perturbed)
            if not torch.equal(out[:, : t + 1], reference[:, : t + 1]):
                diff = (out[:, : t + 1] - reference[:, : t + 1]).abs()
                first = int((diff.flatten(2).amax(dim=(0, 2)) > 0).nonzero()[0])
                raise CausalityError(
                    f"{name} is not causal: changing only the tokens after position {t} changed the logits at "
                    f"position {first} (max abs change {float(diff.max()):.3e}, float64). A language model "
                    "trained like this reads future tokens and its perplexity is meaningless; fix the mixer "
                    "(or set dataset.autoregressive=false for a non-autoregressive task)."
                )
