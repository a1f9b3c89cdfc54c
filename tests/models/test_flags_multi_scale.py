"""Flag ``multi_scale``: middle layers see half-length sequences, causal resampling, speedup measurement."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from bkexp.models import MLP, StagedLanguageModel
from bkexp.models.mixers import AttentionMixer, BKMixer, MambaMixer
from bkexp.models.multiscale import CausalResampler, middle_layers
from bkexp.train.causality import check_causality

MIXERS = {"transformer": partial(AttentionMixer, n_heads=2), "bk": partial(BKMixer, n_heads=4),
          "mamba": partial(MambaMixer, d_state=4)}
VOCAB = 16


def build(kind: str = "transformer", n_layers: int = 4, **flags) -> StagedLanguageModel:
    torch.manual_seed(0)
    return StagedLanguageModel(VOCAB, 16, n_layers, MIXERS[kind], partial(MLP, expansion=2), multi_scale=True, **flags)


@pytest.mark.parametrize(("n_layers", "span"), [(1, (0, 1)), (2, (0, 1)), (4, (1, 3)), (8, (2, 6))])
def test_middle_layers(n_layers: int, span: tuple[int, int]) -> None:
    assert middle_layers(n_layers) == span


def test_under_autocast_every_block_reads_a_float32_residual_stream() -> None:
    # As in the plain model, where a bf16 block output added to the float32 stream stays float32: the coarse
    # blocks too (the down-projection's bf16 output made their whole stream bf16).
    model = build(n_layers=4)
    dtypes = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda module, inputs, i=i: dtypes.__setitem__(i, inputs[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, VOCAB, (2, 15)))
    assert dtypes == dict.fromkeys(range(4), torch.float32)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("n", [15, 16])
def test_middle_blocks_see_half_length_sequences(n: int) -> None:
    model = build(n_layers=4)
    lengths = {}

    def record(i: int):
        def hook(module, inputs, output) -> None:
            lengths[i] = inputs[0].shape[1]
        return hook

    for i, blk in enumerate(model.blocks):
        blk.mixer.register_forward_hook(record(i))
    model(torch.randint(0, VOCAB, (2, n)))
    assert lengths == {0: n, 1: (n + 1) // 2, 2: (n + 1) // 2, 3: n}


def test_resampler_reads_only_the_past() -> None:
    torch.manual_seed(0)
    res = CausalResampler(4).double()
    x = torch.randn(1, 7, 4, dtype=torch.float64)
    coarse = res.downsample(x)
    assert torch.allclose(coarse[0, 1], (x[0, 2] + x[0, 3]) / 2)  # starts as pair averaging
    assert torch.allclose(coarse[0, 3], x[0, 6] / 2)  # odd tail paired with zeros
    delta = torch.arange(1, 5, dtype=torch.float64).view(1, 4, 1)
    up = CausalResampler.upsample(delta, 7)[0, :, 0]
    # fine t reads coarse (t-1)//2 (nothing at t=0): coarse i covers fine 2i, 2i+1, complete at t = 2i+1
    assert up.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("kind", sorted(MIXERS))
@pytest.mark.parametrize("n", [19, 20])
def test_causal(kind: str, n: int) -> None:
    check_causality(build(kind, n_layers=3), torch.randint(0, VOCAB, (2, n)), VOCAB)


def test_full_resolution_runs_every_block_on_the_whole_sequence() -> None:
    model = build(n_layers=4).eval()
    x = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        h = model.embed(x)
        for block in model.blocks:  # independent reference: the plain backbone's forward
            h = block(h)
        reference = model.head(model.norm_f(h))
        with model.full_resolution():
            full = model(x)
        half = model(x)
    assert torch.equal(full, reference)
    assert not torch.allclose(half, reference)  # outside the with: the middle blocks are resampled again
