"""Sampling filters and batched generation: greedy decoding through step == greedy by re-running forward."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from bkexp.infer import Sampling, filter_logits, generate, generate_text, sample_next
from bkexp.models import MLP, LanguageModel, MoEFeedForward
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer

VOCAB = 29
MIXERS = {"transformer": partial(AttentionMixer, n_heads=2), "bk": partial(BKMixer, n_heads=2),
          "mamba": partial(MambaMixer, d_state=4)}


def build(mixer: str, ffn=partial(MLP, expansion=2.0)) -> LanguageModel:
    torch.manual_seed(0)
    model = LanguageModel(VOCAB, 16, 2, MIXERS[mixer], ffn)
    with torch.no_grad():  # a larger logit scale than the init, so greedy choices are not near-ties
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def greedy_by_recomputing(model: LanguageModel, prompt: list[int], n: int) -> list[int]:
    """The reference: re-run the full forward on the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_greedy_generation_equals_recomputing_forward(mixer: str) -> None:
    ffn = partial(MoEFeedForward, n_experts=3, expansion=2.0) if mixer == "bk" else partial(MLP, expansion=2.0)
    model = build(mixer, ffn).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8], [9, 7, 9, 3, 2]]  # two lengths: grouped into batches
    outs = generate(model, prompts, 12, Sampling(temperature=0), batch_size=2)
    assert outs == [greedy_by_recomputing(model, p, 12) for p in prompts]
    assert len({tuple(o) for o in outs}) > 1  # the prompts matter (not a constant continuation)


def test_stop_sequences_and_stop_callback() -> None:
    model = build("bk").eval()
    prompt = [1, 2, 3]
    free = generate(model, [prompt], 10, Sampling(temperature=0))[0]
    stop = free[3:5]
    first = next(i for i in range(len(free) - 1) if free[i:i + 2] == stop)
    assert generate(model, [prompt], 10, Sampling(temperature=0), stop_sequences=[[VOCAB + 5], stop])[0] == \
        free[:first]
    calls: list[int] = []
    out = generate(model, [prompt], 10, Sampling(temperature=0), stop=lambda toks: calls.append(len(toks)) or len(toks) == 4)
    assert out[0] == free[:4] and calls == [1, 2, 3, 4]
    assert generate(model, [prompt], 0) == [[]]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    model = build("mamba")
    prompts = [[1, 2, 3]] * 4
    a = generate(model, prompts, 15, Sampling(temperature=1.5, top_k=10, seed=7))
    assert a == generate(model, prompts, 15, Sampling(temperature=1.5, top_k=10, seed=7))
    assert a != generate(model, prompts, 15, Sampling(temperature=1.5, top_k=10, seed=8))
    assert len({tuple(row) for row in a}) > 1  # the rows of one batch draw independently
    assert model.training  # generate restores the mode it found


def test_filters_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = lambda s: torch.isfinite(filter_logits(logits, s))  # noqa: E731
    assert kept(Sampling(top_k=2)).tolist() == [[True, True, False, False], [False, False, True, True]]
    # top-p 0.7: 0.5 < 0.7 so the next token (crossing it) is kept too; 0.8 keeps three
    assert kept(Sampling(top_p=0.7)).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert kept(Sampling(top_p=0.81)).tolist() == [[True, True, True, False], [False, True, True, True]]
    assert kept(Sampling(top_p=0.1)).sum().item() == 2  # always at least the most likely token
    scaled = filter_logits(logits, Sampling(temperature=2.0))
    assert torch.allclose(scaled, logits / 2)
    # sampling follows the filtered distribution: with top_k=1 it is greedy
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, Sampling(top_k=1), gen).tolist() == [0, 3]
    draws = torch.stack([sample_next(logits, Sampling(top_p=0.7), gen) for _ in range(400)])
    freq0 = (draws[:, 0] == 0).float().mean().item()
    assert set(draws[:, 0].tolist()) == {0, 1} and abs(freq0 - 0.5 / 0.8) < 0.08


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be a positive integer or None"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (dict(seed="x"), "seed must be an integer or None"),
])
def test_bad_sampling_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_bad_generate_inputs() -> None:
    model = build("transformer")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="outside \\[0, 29\\)"):
        generate(model, [[1, 99]], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        generate(model, [[1]], -1)
    bidirectional = LanguageModel(VOCAB, 16, 1, partial(BKMixer, causal=False))
    with pytest.raises(NotImplementedError, match="cannot generate with 'lm': layer 0: bidirectional BK-Core"):
        generate(bidirectional, [[1]], 3)


class CharTokenizer:
    """Characters a..z as ids 0..25 (encode/decode are all generate_text needs)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 97 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + int(i)) if 0 <= int(i) < 26 else "?" for i in ids)


def test_generate_text_cuts_at_until() -> None:
    model = build("bk").eval()
    tok = CharTokenizer()
    free = generate_text(model, tok, ["abc", "zz"], 12, Sampling(temperature=0))
    assert [len(t) for t in free] == [12, 12]
    until = free[0][4:6]
    cut = generate_text(model, tok, ["abc", "zz"], 12, Sampling(temperature=0), until=[until])
    assert cut[0] == free[0].split(until, 1)[0] and cut[1] == free[1].split(until, 1)[0]
