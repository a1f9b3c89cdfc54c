"""The staged-model techniques select StagedLanguageModel; the plain backbone holds no staged or timing code."""

from __future__ import annotations

import ast
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from runhelpers import compose_train
from testpaths import REPO_ROOT

from bkexp.models import MLP, LanguageModel, StagedLanguageModel
from bkexp.models.mixers import AttentionMixer
from bkexp.techniques import TECHNIQUES, FlagError, Techniques
from bkexp.techniques.base import STAGED_MODEL, StagedTechnique
from bkexp.techniques.multi_scale import measure_speedup

STAGED = [t.name for t in TECHNIQUES if issubclass(t, StagedTechnique)]
VOCAB = 16


def _built(overrides: list[str], tmp_path: Path):
    cfg = compose_train(overrides, tmp_path)
    changes = Techniques.from_config(cfg).configure(cfg)
    return cfg, changes, instantiate(cfg.model, vocab_size=VOCAB)


def test_the_staged_techniques_are_the_model_side_ones() -> None:
    assert sorted(STAGED) == ["act", "early_exit", "grad_checkpoint", "koopman", "multi_scale", "physics_informed"]


@pytest.mark.parametrize("name", STAGED)
def test_a_staged_technique_builds_the_staged_model(name: str, tmp_path: Path) -> None:
    model = "bk" if name == "physics_informed" else "transformer"  # the energy term needs BK mixers
    cfg, changes, built = _built([f"model={model}", f"flags.{name}=true"], tmp_path)
    assert changes["model._target_"] == STAGED_MODEL == cfg.model._target_
    assert type(built) is StagedLanguageModel


def test_without_flags_the_model_is_the_plain_backbone(tmp_path: Path) -> None:
    cfg, changes, built = _built([], tmp_path)
    assert changes == {} and type(built) is LanguageModel


def test_a_staged_technique_refuses_a_model_class_it_cannot_select(tmp_path: Path) -> None:
    cfg = compose_train(["flags.act=true", "model._target_=my.pkg.OtherModel"], tmp_path)
    with pytest.raises(FlagError, match=r"flags\.act .*'my\.pkg\.OtherModel'.*valid: bkexp\.models\.LanguageModel"):
        Techniques.from_config(cfg).configure(cfg)


def test_multi_scale_speedup_is_measured_outside_the_model() -> None:
    torch.manual_seed(0)
    model = StagedLanguageModel(VOCAB, 16, 4, partial(AttentionMixer, n_heads=2), partial(MLP), multi_scale=True)
    x = torch.randint(0, VOCAB, (2, 32))
    speedup = measure_speedup(model, x, repeats=1)
    assert speedup > 0 and model.flag_stats()["multi_scale_speedup"] == speedup
    assert model.flag_stats()["multi_scale_layers"] == 2.0
    assert model.training and model._multi_scale_on  # mode and path restored
    plain = StagedLanguageModel(VOCAB, 16, 4, partial(AttentionMixer, n_heads=2), partial(MLP))
    with pytest.raises(ValueError, match="multi_scale=True"):
        measure_speedup(plain, x)


def test_the_plain_backbone_imports_no_staged_or_timing_code() -> None:
    tree = ast.parse((REPO_ROOT / "bkexp" / "models" / "backbone.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    forbidden = {"time", "torch.utils.checkpoint", "bkexp.models.adaptive", "bkexp.models.koopman",
                 "bkexp.models.multiscale", "bkexp.models.physics", "bkexp.models.staged"}
    assert not imported & forbidden, sorted(imported & forbidden)
