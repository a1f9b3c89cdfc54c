"""The technique registry is the only list of flags: config files, the ablation sweep and run() follow it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from runhelpers import CONF, compose_train, options
from testpaths import REPO_ROOT

from bkexp.techniques import FLAG_NAMES, TECHNIQUES, Flags, ablation_variants
from bkexp.techniques.base import STAGED_MODEL


def test_every_technique_has_its_module_config_file_and_settings() -> None:
    none = yaml.safe_load((CONF / "flags" / "none.yaml").read_text())
    for technique in TECHNIQUES:
        module = technique.__module__.rsplit(".", 1)[-1]
        assert module == technique.name, f"{technique.__name__} lives in {module}.py, not {technique.name}.py"
        assert technique.variant() in options("flags"), f"conf/flags/{technique.variant()}.yaml is missing"
        for field in dataclasses.fields(technique.settings):  # defaults in one place: YAML == dataclass
            assert none[field.name] == field.default, field.name
    presets = {"none", "all", "analytic_gradient"}  # analytic_gradient.yaml spells out the default
    assert set(options("flags")) - presets == {t.variant() for t in TECHNIQUES}
    assert [f.name for f in dataclasses.fields(Flags)] == ["strict"] + [
        f.name for t in TECHNIQUES for f in dataclasses.fields(t.settings)]
    assert FLAG_NAMES == tuple(t.name for t in TECHNIQUES)


def test_the_ablation_sweep_is_read_from_the_registry(tmp_path: Path) -> None:
    sweep = yaml.safe_load((CONF / "sweep" / "flags_ablation.yaml").read_text())
    assert sweep["hydra"]["sweeper"]["params"]["flags"] == "${bkexp.flags_ablation:}"
    resolved = OmegaConf.create({"flags": sweep["hydra"]["sweeper"]["params"]["flags"]}).flags
    assert resolved.split(",") == ablation_variants() == ["none", *(t.variant() for t in TECHNIQUES)]
    assert set(ablation_variants()) <= set(options("flags"))
    assert ablation_variants()[:2] == ["none", "no_analytic_gradient"]


@pytest.mark.parametrize("option", ["act", "multi_scale", "early_exit", "koopman", "grad_checkpoint"])
def test_flag_files_state_their_model_changes_as_config(option: str, tmp_path: Path) -> None:
    cfg = compose_train([f"flags={option}", f"flags.{option}=false"], tmp_path)
    assert cfg.model[option] is False  # the model key follows the flag (interpolation), also when switched off
    cfg = compose_train([f"flags={option}"], tmp_path)
    assert cfg.model[option] is True
    assert cfg.model._target_ == STAGED_MODEL  # the file names the model class the flag needs


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return names


def test_run_and_the_lightning_module_know_no_technique_by_name() -> None:
    for rel in ("bkexp/train/run.py", "bkexp/train/module.py"):
        used = _names_used(REPO_ROOT / rel) & set(FLAG_NAMES)
        assert not used, f"{rel} branches on techniques {sorted(used)}: go through bkexp.techniques.Techniques"


def test_no_layer_above_models_asks_isinstance_about_a_mixer() -> None:
    offenders = []
    for path in sorted((REPO_ROOT / "bkexp").rglob("*.py")):
        if "models" in path.relative_to(REPO_ROOT / "bkexp").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                if "Mixer" in ast.unparse(node.args[1]):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"ask the mixer's capability attributes instead: {offenders}"
