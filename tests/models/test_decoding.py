"""Incremental decoding: prefill + step logits equal the parallel forward at every position, for every model."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from bkexp.models import MLP, LanguageModel, MoEFeedForward, StagedLanguageModel
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer
from bkexp.ops.testing import rel_err
from bkexp.quant import QuantSpec

VOCAB, D, LAYERS, LENGTH = 37, 16, 2, 21
MIXERS = {
    "transformer": partial(AttentionMixer, n_heads=4),
    "bk": partial(BKMixer, n_heads=4),
    # input-dependent coupling, half the heads active, bounded potential, original parallel block layout
    "bk-input-sparse": partial(BKMixer, n_heads=4, coupling="input", sparse_heads=0.5, v_bound=3.0),
    "mamba": partial(MambaMixer, d_state=4),
}
FFNS = {"mlp": partial(MLP, expansion=2.0), "moe": partial(MoEFeedForward, n_experts=3, top_k=2, expansion=2.0)}
QUANT = {  # bits 8 also quantizes the embedding/head and Mamba's conv; bits 4 in groups of 8 inputs
    32: None,
    8: QuantSpec(method="qat", bits=8, embeddings=True, conv=True),
    4: QuantSpec(method="qat", bits=4, granularity="per_group", group_size=8),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def build(mixer: str, ffn: str | None, bits: int = 32, dtype: torch.dtype = torch.float64, seed: int = 0,
          **kwargs) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(VOCAB, D, LAYERS, MIXERS[mixer], FFNS[ffn] if ffn else None,
                          parallel_ffn=mixer == "bk-input-sparse", **kwargs)
    with torch.no_grad():  # move every parameter away from its init so each one matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if QUANT[bits] is not None:
        QUANT[bits].validate().prepare(model)
    return model.to(dtype).eval()


def stepped_logits(model: LanguageModel, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits at every position: prefill of the first ``prompt`` tokens, then one step per remaining token."""
    logits, state = model.prefill(ids[:, :prompt])
    out = [logits]
    for t in range(prompt, ids.shape[1]):
        step_logits, state = model.step(ids[:, t], state)
        out.append(step_logits[:, None])
    assert state.position == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bits", list(QUANT), ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("ffn", list(FFNS))
@pytest.mark.parametrize("mixer", list(MIXERS))
def test_step_logits_equal_forward(mixer: str, ffn: str, bits: int, dtype: torch.dtype) -> None:
    model = build(mixer, ffn, bits, dtype)
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        for prompt in (1, 7):  # from the first token on, and continuing a multi-token prefill
            err = rel_err(stepped_logits(model, ids, prompt), full)
            assert err <= TOLERANCE[dtype], f"prompt {prompt}: relative error {err:.2e}"


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_activation_quantization_steps_float64(mixer: str) -> None:
    """Per-token activation quantization is a function of the token alone, so it works step-wise too.

    float64 only: rounding to the activation grid is discontinuous, so in float32 the last-bit differences
    between a step and the parallel forward (e.g. attention's reductions) can move a value across a rounding
    boundary and change the logits by one activation quantization level.
    """
    torch.manual_seed(0)
    model = LanguageModel(VOCAB, D, LAYERS, MIXERS[mixer], FFNS["moe"]).double().eval()
    QuantSpec(method="qat", bits=4, act_bits=8).validate().prepare(model)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(stepped_logits(model, ids, 5), model(ids)) <= 1e-10


def test_mamba_without_ffn_and_short_prompt_conv_window() -> None:
    """Mamba's default block (no FFN); a 2-token prompt leaves a conv window that starts before the sequence."""
    model = build("mamba", None)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(stepped_logits(model, ids, 2), model(ids)) <= 1e-10


def test_state_sizes_and_row_selection() -> None:
    """KV cache grows with the context (doubling its capacity when full); BK and Mamba states do not."""
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for mixer in ("transformer", "bk", "mamba"):
            model = build(mixer, "mlp", dtype=torch.float32)
            _, short = model.prefill(ids[:, :4])
            _, long = model.prefill(ids[:, :32])
            if mixer == "transformer":
                assert long.nbytes() == 8 * short.nbytes() == 2 * 2 * LAYERS * D * 32 * 4  # k and v, float32
                _, grown = model.prefill(ids[:, :4])
                for t in range(4, 9):
                    model.step(ids[:, t], grown)
                assert grown.layers[0]["k"].shape[2] == 16  # 4 -> 8 -> 16
            else:
                assert long.nbytes() == short.nbytes() > 0
            # Two copies of row 1 continue exactly like row 1 alone.
            logits, state = model.prefill(ids[:, :10])
            pair = state.index_select(torch.tensor([1, 1]))
            nxt, _ = model.step(ids[[1, 1], 10], pair)
            ref, _ = model.step(ids[:, 10], state)
            assert torch.equal(nxt[0], nxt[1]) and rel_err(nxt[0], ref[1]) <= 1e-6


def test_bk_state_is_one_complex_pivot_per_running_head() -> None:
    model = build("bk-input-sparse", "mlp")
    _, state = model.prefill(torch.zeros(3, 5, dtype=torch.long))
    assert [tuple(layer["pivot"].shape) for layer in state.layers] == [(3, 2)] * LAYERS
    assert state.layers[0]["pivot"].dtype == torch.complex128


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(mixer="bk", mixer_kwargs=dict(causal=False)), "layer 0: bidirectional BK-Core"),
    (dict(mixer="transformer", mixer_kwargs=dict(causal=False)), "layer 0: bidirectional attention"),
    (dict(mixer="bk", model_kwargs=dict(act=True)), "flag\\(s\\) act run staged execution"),
    (dict(mixer="mamba", model_kwargs=dict(multi_scale=True, n_layers=4)), "flag\\(s\\) multi_scale"),
], ids=["bk-bidirectional", "attention-bidirectional", "act", "multi_scale"])
def test_models_without_incremental_form_are_refused(kwargs: dict, match: str) -> None:
    mixer = partial(MIXERS[kwargs["mixer"]], **kwargs.get("mixer_kwargs", {}))
    model_kwargs = {"n_layers": LAYERS, **kwargs.get("model_kwargs", {})}
    model = StagedLanguageModel(VOCAB, D, mixer=mixer, ffn=FFNS["mlp"], **model_kwargs).eval()  # = plain without flags
    assert model.decode_unsupported is not None
    with pytest.raises(NotImplementedError, match=f"cannot decode incrementally: {match}"):
        model.prefill(torch.zeros(1, 4, dtype=torch.long))


def test_bad_decode_inputs() -> None:
    model = build("bk", "mlp")
    with pytest.raises(ValueError, match="seq >= 1"):
        model.prefill(torch.zeros(2, 0, dtype=torch.long))
    _, state = model.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch = 2"):
        model.step(torch.zeros(3, dtype=torch.long), state)
