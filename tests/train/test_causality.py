"""The causality check accepts causal models and refuses leaky ones with a clear error."""

from __future__ import annotations

import functools

import pytest
import torch

from bkexp.models import LanguageModel
from bkexp.models.ffn import MLP
from bkexp.models.mixers import AttentionMixer
from bkexp.models.moe import MoEFeedForward
from bkexp.train.causality import CausalityError, check_causality
from leaky import LeakyMixer, SubtleLeakMixer

VOCAB = 50


def tiny_lm(mixer) -> LanguageModel:
    return LanguageModel(VOCAB, d_model=16, n_layers=2, mixer=mixer, ffn=functools.partial(MLP, expansion=2))


def batch(n: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))


def test_causal_attention_passes():
    check_causality(tiny_lm(functools.partial(AttentionMixer, n_heads=2)), batch(), VOCAB)


def test_bidirectional_attention_is_refused_by_its_declaration():
    model = tiny_lm(functools.partial(AttentionMixer, n_heads=2, causal=False))
    with pytest.raises(CausalityError, match="non-causal mixer"):
        check_causality(model, batch(), VOCAB)


@pytest.mark.parametrize("mixer", [LeakyMixer, SubtleLeakMixer], ids=["next-token", "pos0-mean"])
def test_leaky_mixer_is_refused(mixer):
    with pytest.raises(CausalityError, match="not causal: changing only the tokens after position"):
        check_causality(tiny_lm(mixer), batch(), VOCAB)


class MislabelledAttention(AttentionMixer):
    """Claims to be causal but attends over the whole sequence."""

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, self.d_model))


def test_a_false_causal_claim_is_caught_empirically():
    model = tiny_lm(functools.partial(MislabelledAttention, n_heads=2))
    assert model.causal  # the declaration lies; only the measurement can tell
    with pytest.raises(CausalityError, match="not causal"):
        check_causality(model, batch(), VOCAB)


def test_moe_model_is_checked_with_row_exact_experts_and_passes_at_one_thread():
    """The check turns on the MoE's ``row_exact`` in its probe copy only. Without it (the experts' buffers padded
    to whole 128-row blocks, one call each) this model failed the check at one thread on the 2-core Xeon: in
    float64, MKL rounds a 128-row call at this shape (256 -> 384 -> 256) differently from a longer one, so
    a token's logits changed in the last bits when future tokens moved its expert's load across a block."""
    torch.manual_seed(0)
    lm = LanguageModel(VOCAB, d_model=256, n_layers=1, mixer=functools.partial(AttentionMixer, n_heads=4),
                       ffn=functools.partial(MoEFeedForward, n_experts=4, expansion=1.5))
    moe = lm.blocks[0].ffn
    with torch.no_grad():  # a router with a real spread of decisions (default init sends nearly all to one)
        moe.router.weight.normal_(std=1.0)
    seen = []
    moe.register_forward_hook(lambda module, args, out: seen.append((module.row_exact, module.padding_rows)))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_causality(lm, torch.randint(0, VOCAB, (2, 256), generator=torch.Generator().manual_seed(0)), VOCAB)
    finally:
        torch.set_num_threads(previous)
    assert len(seen) == 4 and all(flag and padding > 0 for flag, padding in seen)  # 1 reference + 3 perturbed
    assert moe.row_exact is False
    lm(torch.randint(0, VOCAB, (2, 256)))
    assert seen[-1] == (False, 0)  # the model itself runs each expert once on exactly its rows
