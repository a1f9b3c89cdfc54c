"""PTQ and QAT on a tiny Transformer trained on real text (WikiText-2 bytes): 8 bits keeps, 2 bits hurts."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from testpaths import WIKITEXT2_DIR

from bkexp.models import LanguageModel
from bkexp.models.ffn import MLP
from bkexp.models.mixers import AttentionMixer
from bkexp.quant import EVAL_BITS, QuantSpec

SEQ = 64
STEPS = 150


@pytest.fixture(scope="module")
def text_bytes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training bytes and held-out (inputs, labels) chunks from the shared WikiText-2 validation file."""
    raw = (WIKITEXT2_DIR / "valid.txt").read_bytes()[:120_000]
    data = torch.tensor(list(raw), dtype=torch.long)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    n = (len(held) - 1) // SEQ * SEQ
    return train, held[:n].view(-1, SEQ), held[1:n + 1].view(-1, SEQ)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads fighting other processes are ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_transformer() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(256, 64, 2, mixer=partial(AttentionMixer, n_heads=4), ffn=partial(MLP, expansion=4.0))


def fit(model: LanguageModel, train: torch.Tensor, steps: int = STEPS) -> LanguageModel:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train) - SEQ - 1, (16,), generator=gen)
        x = torch.stack([train[i:i + SEQ] for i in idx])
        y = torch.stack([train[i + 1:i + SEQ + 1] for i in idx])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def perplexity(model: LanguageModel, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return math.exp(F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten()).item())


def ptq(model: LanguageModel, bits: int) -> LanguageModel:
    quantized = copy.deepcopy(model)
    spec = QuantSpec(method="ptq", bits=bits).validate(EVAL_BITS)
    spec.prepare(quantized)
    spec.finalize(quantized)
    return quantized


def test_ptq_8_bits_matches_float_and_2_bits_is_clearly_worse(text_bytes, one_thread) -> None:
    train, inputs, labels = text_bytes
    model = fit(tiny_transformer(), train)
    full = perplexity(model, inputs, labels)
    assert full < 20  # it learned something (bytes: uniform would be 256)
    ppl = {bits: perplexity(ptq(model, bits), inputs, labels) for bits in (16, 8, 2)}
    assert abs(ppl[16] / full - 1) < 0.005
    assert abs(ppl[8] / full - 1) < 0.01, ppl
    assert ppl[2] > 1.05 * full, ppl  # ternary per-channel weights: clearly worse
    assert perplexity(model, inputs, labels) == full  # PTQ worked on copies


def test_qat_learns_through_the_quantizer(text_bytes, one_thread) -> None:
    train, inputs, labels = text_bytes
    model = tiny_transformer()
    spec = QuantSpec(method="qat", bits=2).validate()
    spec.prepare(model)
    before = perplexity(model, inputs, labels)
    fit(model, train, steps=60)
    spec.finalize(model)
    after = perplexity(model, inputs, labels)
    assert after < 0.25 * before, (before, after)  # straight-through gradients train the 2-bit model
    # Evaluation uses exactly the quantized weights: the same as a float model holding them.
    plain = tiny_transformer()
    with torch.no_grad():
        for (name, param), (_, target) in zip(model.named_parameters(), plain.named_parameters()):
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            value = owner.weight if name.endswith(".weight") and hasattr(owner, "latent_weight") else param
            target.copy_(value)
    assert perplexity(plain, inputs, labels) == pytest.approx(after, rel=1e-6)
