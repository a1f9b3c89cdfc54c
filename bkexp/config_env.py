"""The environment variables a run's config reads (``${oc.env:VAR,default}``): given back wherever the run is read.

OmegaConf resolves ``oc.env`` when a value is read, and ``.hydra/config.yaml`` keeps the interpolation, not its
value. So a run trained with ``BKEXP_SHARED_DATA=/data/a`` and evaluated or resumed in a shell where the variable
is unset, or names another copy, would read other files than it trained on -- silently where they exist
(``experiment=wikitext2_local`` falls back to ``../shared/data``).

- :func:`pin` gives such values the run's resolved value (``summary.json``'s ``config``); every command that reads
  a run (``bkexp eval``, ``eval-quant``, ``export``, ``generate``, ``bench run``) does, through
  ``bkexp.rundir.RunDir.config``.
- ``python train.py`` records the variables themselves (``summary.json``'s ``config_env``: name -> value, null
  where unset; :func:`referenced`), and ``resume=`` sets them again (:func:`restore`) before its config is composed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

SUMMARY_KEY = "config_env"
ENV_REFERENCE = re.compile(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)")


def _strings(tree: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, raw string)`` for every string leaf of a container (interpolations unresolved)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _strings(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _strings(value, f"{prefix}{index}.")
    elif isinstance(tree, str):
        yield prefix[:-1], tree


def _references(cfg: DictConfig) -> dict[str, list[str]]:
    """Config key -> the variables its value reads, for every value that reads one."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    return {key: ENV_REFERENCE.findall(text) for key, text in _strings(raw) if ENV_REFERENCE.search(text)}


def referenced(cfg: DictConfig) -> dict[str, str | None]:
    """The variables ``cfg`` reads, with their values in this process (None: unset, the default applies)."""
    names = sorted({name for names in _references(cfg).values() for name in names})
    return {name: os.environ.get(name) for name in names}


def recorded(summary: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The variables a run's ``summary.json`` recorded (empty for runs from before the record)."""
    values = (summary or {}).get(SUMMARY_KEY)
    if not isinstance(values, Mapping):
        return {}
    return {str(k): v for k, v in values.items() if v is None or isinstance(v, str)}


def pin(cfg: DictConfig, resolved: Mapping[str, Any] | None) -> dict[str, tuple[Any, Any]]:
    """Give every ``cfg`` value that reads an environment variable the value the run resolved it to (``resolved``:
    the run's resolved config, ``summary.json``'s ``config``), in place, as a literal; returns key -> (the run's
    value, what this process's environment gives) where the two differ."""
    run_cfg = OmegaConf.create(dict(resolved or {}))
    moved = {}
    for key in _references(cfg):
        run_value = OmegaConf.select(run_cfg, key, default=None, throw_on_resolution_failure=False)
        if run_value is None or isinstance(run_value, (DictConfig, ListConfig)):
            continue  # not recorded (a summary from before the key existed): resolved in this environment
        here = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        OmegaConf.update(cfg, key, run_value, merge=False)
        if here != run_value:
            moved[key] = (run_value, here)
    return moved


def restore(values: Mapping[str, str | None]) -> dict[str, tuple[str | None, str | None]]:
    """Set the recorded variables in this process, so that a resumed run composes its config as the run did; returns
    name -> (the run's value, the value it replaced) for those that differed."""
    moved = {name: (value, os.environ.get(name)) for name, value in values.items() if os.environ.get(name) != value}
    for name, (value, _) in moved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return moved


def describe(moved: Mapping[str, tuple[Any, Any]]) -> str:
    """``name=/a (here: unset)`` for each variable or config key whose value differs."""
    def show(value: Any) -> str:
        return "unset" if value is None else str(value)

    return ", ".join(f"{name}={show(run)} (here: {show(now)})" for name, (run, now) in moved.items())
