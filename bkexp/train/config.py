"""Validation of a composed config before anything is built: allowed values and mistyped keys."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig

from bkexp.devices import unavailable
from bkexp.errors import ConfigError  # noqa: F401  (re-exported: raised by the checks below)
from bkexp.quant.spec import TRAIN_BITS as VALID_BITS  # one list of training bit widths
from bkexp.threads import check_threads


def validate_top_level(cfg: DictConfig) -> None:
    """Check the top-level keys that sweeps target (``bits``, ``seq_len``, ``seed``, ``threads``)."""
    bits = cfg.get("bits")
    if isinstance(bits, bool) or bits not in VALID_BITS:
        raise ConfigError(f"bits={bits!r} is not supported; valid: {', '.join(map(str, VALID_BITS))}")
    seq_len = cfg.get("seq_len")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    run_threads(cfg)


def run_threads(cfg: DictConfig) -> int | None:
    """The run's ``threads`` (None: torch's default), or a ConfigError naming the value."""
    threads = cfg.get("threads")
    try:
        return check_threads(threads)
    except ValueError:
        raise ConfigError(f"threads={threads!r} is not valid; valid: a positive integer or null (torch's default, "
                          f"one per core)") from None


def _accepted_keys(target: str) -> tuple[set[str] | None, str]:
    obj = get_object(target)
    fn = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None, target  # accepts **kwargs: cannot know its keys
    return {p.name for p in params if p.name != "self"}, target


def validate_keys(node: Any, path: str) -> None:
    """Every key of a ``_target_`` node must be a parameter of the target (recursively).

    This is what makes ``+model.d_modle=64`` or a typo in a config file an error naming the valid keys,
    instead of a key that is silently carried along (Hydra already refuses ``model.d_modle=64`` without +).
    """
    if isinstance(node, DictConfig):
        target = node.get("_target_") if "_target_" in node else None
        if target is not None:
            accepted, name = _accepted_keys(str(target))
            if accepted is not None:
                for key in node.keys():
                    if str(key).startswith("_") and str(key).endswith("_"):
                        continue
                    if key not in accepted:
                        valid = ", ".join(sorted(accepted))
                        raise ConfigError(f"{path}.{key} is not a parameter of {name}; valid keys: {valid}")
        for key in node.keys():
            if not (str(key).startswith("_") and str(key).endswith("_")):
                validate_keys(node._get_node(key), f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            validate_keys(item, f"{path}[{i}]")


# Model sizes that must be positive integers wherever they appear in the model subtree.
POSITIVE_INT_KEYS = ("d_model", "n_layers", "n_heads", "d_state", "d_conv", "expand", "d_ff", "n_experts",
                     "top_k", "head_dim")


def _number(path: str, value: Any, low: float, low_open: bool, high: float | None = None,
            high_open: bool = True, valid: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise ConfigError(f"{path}={value!r} is not valid; valid: {valid}")


def validate_values(cfg: DictConfig) -> None:
    """Values that would otherwise fail deep inside torch (or train on nonsense): sizes, optimizer settings."""
    def walk(node: Any, path: str) -> None:
        if isinstance(node, DictConfig):
            for key in node.keys():
                child = node._get_node(key)
                if key in POSITIVE_INT_KEYS and not isinstance(child, (DictConfig, ListConfig)):
                    value = node.get(key)
                    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                        raise ConfigError(f"{path}.{key}={value!r} is not valid; valid: a positive integer")
                walk(child, f"{path}.{key}")

    if cfg.get("model") is not None:
        walk(cfg.model, "model")
    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        if "lr" in optimizer:
            _number("optimizer.lr", optimizer.get("lr"), 0, True, valid="a finite number > 0 (e.g. 3e-4)")
        if optimizer.get("weight_decay") is not None:
            _number("optimizer.weight_decay", optimizer.get("weight_decay"), 0, False, valid="a number >= 0")
        if optimizer.get("eps") is not None:
            _number("optimizer.eps", optimizer.get("eps"), 0, True, valid="a number > 0")
        for i, beta in enumerate(optimizer.get("betas") or []):
            _number(f"optimizer.betas[{i}]", beta, 0, False, 1, valid="a number in [0, 1)")
    trainer = cfg.get("trainer")
    if trainer is not None:
        steps = trainer.get("max_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or not (steps >= 1 or steps == -1):
            raise ConfigError(f"trainer.max_steps={steps!r} is not valid; valid: a positive integer (the training "
                              "budget in optimizer steps), or -1 with +trainer.max_epochs=N (no step limit)")
        accelerator = trainer.get("accelerator")
        device = {"gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(str(accelerator))
        why = unavailable(torch.device(device)) if device else None
        if why:  # Lightning would say so only when it builds the Trainer, after the data and the model
            raise ConfigError(f"trainer.accelerator={accelerator!r} (hardware=gpu, gpu_bf16, ddp or fsdp): {why}; "
                              "valid on this machine: hardware=cpu or hardware=ddp_cpu")
        interval = trainer.get("val_check_interval")  # Lightning checks its other forms; 0 divides by zero there
        if isinstance(interval, int) and not isinstance(interval, bool) and interval < 1:
            raise ConfigError(f"trainer.val_check_interval={interval!r} is not valid; valid: a positive integer "
                              "(training batches between validations), or a duration 'DD:HH:MM:SS'")
    every = cfg.get("checkpoint_every_n_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"checkpoint_every_n_steps={every!r} is not valid; valid: a positive integer or null")


def validate_config(cfg: DictConfig) -> None:
    """All checks that must pass before data or models are built."""
    validate_top_level(cfg)
    validate_values(cfg)
    for group in ("model", "dataset", "optimizer", "scheduler", "trainer", "quant", "flags"):
        if group in cfg and cfg[group] is not None:
            validate_keys(cfg._get_node(group), group)
