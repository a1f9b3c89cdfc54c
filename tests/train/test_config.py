"""Every config file composes (with a real Hydra compose) and what it composes instantiates."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from bkexp.train.config import ConfigError, validate_config
from runhelpers import CONF, STREAMING_DATASETS, TEXT_DATASETS, compose_train, data_overrides, options


def _documented_choices() -> dict[str, tuple[str, list[str]]]:
    """train.yaml's defaults list: group -> (its default, the options its comment names as ``a | b | c``)."""
    choices = {}
    for line in (CONF / "train.yaml").read_text().splitlines():
        match = re.match(r"\s*- (\w+): (\w+)\s*#(.*)", line)
        if not match or "|" not in match.group(3):
            continue
        group, default, comment = match.groups()
        head, _, rest = comment.partition("|")
        head = head.rsplit(":", 1)[-1]  # drop the description before the options ("architecture: transformer")
        parts = [head, *rest.split("|")]
        listed = [m.group(1) for p in parts if (m := re.fullmatch(r"\s*(\w+)\s*(\(.*\))?\s*", p))]
        choices[group] = (default, listed)
    return choices


def test_the_options_train_yaml_names_exist():
    choices = _documented_choices()
    assert {"model", "dataset", "tokenizer", "hardware", "logger", "quant", "debug", "sweep"} <= set(choices)
    for group, (default, listed) in choices.items():
        assert len(listed) >= 2, (group, listed)  # the comment's list was read
        assert default == "null" or default in options(group), (group, default)
        missing = set(listed) - set(options(group))
        assert not missing, f"conf/train.yaml names {group} option(s) {sorted(missing)} that conf/{group}/ lacks"


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("dataset", options("dataset"))
def test_model_dataset_tokenizer_product_composes_and_instantiates(model, dataset, tmp_path, wikitext_slice):
    tokenizers = options("tokenizer") if dataset in TEXT_DATASETS else ["word"]
    if dataset in STREAMING_DATASETS:  # streaming needs a fixed vocabulary (word is refused: tests/data)
        tokenizers = [t for t in tokenizers if t != "word"]
    built_model = False
    for tokenizer in tokenizers:
        cfg = compose_train([f"model={model}", f"dataset={dataset}", f"tokenizer={tokenizer}",
                             *data_overrides(dataset, wikitext_slice)], tmp_path)
        validate_config(cfg)
        assert (cfg.model.name, cfg.dataset.name) == (model, dataset)  # the name summary.json records
        if tokenizer == "gpt2":
            continue  # needs the hub or a cached/local tokenizer.json; its offline error is tested in tests/data
        datamodule = instantiate(cfg.dataset)
        assert datamodule.seq_len == cfg.seq_len
        if not built_model:
            lm = instantiate(cfg.model, vocab_size=37)
            assert type(lm).__name__ == cfg.model._target_.rsplit(".", 1)[1] and lm.vocab_size == 37
            assert len(lm.blocks) == cfg.model.n_layers
            assert {type(b.mixer).__name__ for b in lm.blocks} == {cfg.model.mixer._target_.rsplit(".", 1)[1]}
            built_model = True


@pytest.mark.parametrize("group", ["hardware", "logger", "debug", "optimizer", "scheduler", "callbacks",
                                   "experiment", "sweep"])
def test_every_other_group_option_composes(group, tmp_path):
    for option in options(group):
        cfg = compose_train([f"{group}={option}"], tmp_path)
        OmegaConf.to_container(cfg, resolve=True)  # raises on an interpolation that does not resolve
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            # refused before any data or model is built, with the options that run here
            with pytest.raises(ConfigError, match=r"trainer.accelerator='gpu' .*: no CUDA device is available .*; "
                                                  r"valid on this machine: hardware=cpu or hardware=ddp_cpu"):
                validate_config(cfg)
            continue
        validate_config(cfg)  # raises on a key its _target_ does not take or a bad value


@pytest.mark.parametrize("hardware,logger", list(itertools.product(["cpu", "ddp_cpu"], options("logger"))))
def test_trainer_and_loggers_instantiate(hardware, logger, tmp_path):
    from bkexp.train.loggers import build_loggers

    cfg = compose_train([f"hardware={hardware}", f"logger={logger}"], tmp_path)
    loggers, _ = build_loggers(cfg, {"overrides": [], "override_dirname": "", "sweep": None, "multirun": False})
    assert any(isinstance(lg, CSVLogger) for lg in loggers)  # bkexp's appending subclass
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=[instantiate(c) for c in cfg.callbacks.values()])
    assert trainer.num_devices == (2 if hardware == "ddp_cpu" else 1)
    for lg in loggers:
        lg.finalize("success")
    import wandb

    wandb.finish()
