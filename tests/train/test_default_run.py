"""The README's first command: ``python train.py`` with no argument trains a model that solves its task.

The default experiment is MQAR at the tiny size with conf/recipe/mqar_tiny_transformer.yaml (two attention layers
without MLP, 16 tokens, 1,500 steps). The recipe must apply to that default only, so text runs and other sizes
keep their own settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runhelpers import CONF, MQAR_TINY, TINY, compose_train, read_summary
from testpaths import REPO_ROOT


def test_the_recipe_applies_to_mqar_at_the_tiny_size_only(tmp_path: Path) -> None:
    default = compose_train([], tmp_path)
    assert default.dataset.name == "mqar" and default.seq_len == 16 and default.model.ffn is None
    assert default.dataset.vocab_size == 32 and default.trainer.max_steps == 1500
    assert (default.model.d_model, default.model.n_layers, default.model.mixer.n_heads) == (64, 2, 4)
    # the three models of sweep=models get the same data, budget, width and depth; only the Transformer drops its
    # feed-forward (ResNet-BK keeps its MoE, Mamba has none)
    for model, ffn in (("bk", "MoEFeedForward"), ("mamba", None)):
        cfg = compose_train([f"model={model}"], tmp_path)
        assert cfg.seq_len == 16 and cfg.trainer.max_steps == 1500 and cfg.dataset.batch_size == 128, model
        assert (cfg.model.d_model, cfg.model.n_layers) == (64, 2), model
        assert (cfg.model.get("ffn") or {}).get("_target_", "").rsplit(".", 1)[-1] == (ffn or ""), model
    assert compose_train(["model=bk_seed"], tmp_path).seq_len == 128  # no recipe for it: its own settings
    # anything else keeps the plain settings: another size, another dataset, a named experiment, ~recipe
    plain = compose_train(["~recipe"], tmp_path)
    assert plain.seq_len == 128 and plain.model.ffn is not None and plain.model.d_model == 128
    assert plain.dataset.vocab_size == 64 and plain.trainer.max_steps == 300
    small = compose_train(["size=small"], tmp_path)
    assert small.seq_len == 128 and small.model.ffn is not None and small.model.d_model == 256
    text = compose_train(["dataset=wikitext2"], tmp_path)
    assert text.seq_len == 128 and text.model.ffn is not None and text.trainer.max_steps == 300
    experiment = compose_train(["experiment=wikitext2_local"], tmp_path)
    assert experiment.seq_len == 256 and experiment.model.ffn is not None


@pytest.mark.parametrize("overrides,recipe", [
    ([], "mqar_tiny_transformer"), (["model=mamba"], "mqar_tiny_mamba"), (["~recipe"], None),
    # Hydra records these choices although conf/recipe/ has no such file: nothing was applied
    (["dataset=wikitext2"], None), (["size=small"], None), (["model=bk_seed"], None),
])
def test_the_applied_recipe_is_the_one_whose_file_exists(overrides: list[str], recipe: str | None) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bkexp.train.run import applied_recipe

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.runtime.choices.get("recipe") is not None or overrides == ["~recipe"]
    assert applied_recipe(cfg.hydra.runtime) == recipe


def test_summary_json_names_the_recipe_the_run_applied(train) -> None:
    applied = train(*[o for o in TINY if o != "~recipe"], *MQAR_TINY)  # the recipe, shrunk by the overrides
    summary = read_summary(applied)
    assert summary["status"] == "ok" and summary["recipe"] == "mqar_tiny_transformer"
    assert summary["config"]["model"]["ffn"] is None  # what the recipe changed is in the resolved config
    plain = train(*TINY, *MQAR_TINY)
    assert read_summary(plain)["recipe"] is None and read_summary(plain)["config"]["model"]["ffn"] is not None


@pytest.mark.slow  # the whole default experiment: about a minute on 2 cores
def test_python_train_py_learns_the_default_task(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "train.py", f"paths.root_dir={tmp_path}"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "outputs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["status"] == "ok" and summary["model"] == "transformer" and summary["dataset"] == "mqar"
    assert summary["recipe"] == "mqar_tiny_transformer"
    chance = 1 / 16  # one of the 16 value tokens
    assert metrics["test/acc"] >= 0.9, metrics  # recall: the induction circuit formed (the plateau is 0.25-0.37)
    assert metrics["test/loss"] < 0.5, metrics  # ln(4) = 1.39 is "one of the 4 values in the context"
    assert f"test answer accuracy {metrics['test/acc']:.3f} (chance {chance:.3f})" in done.stdout + done.stderr
