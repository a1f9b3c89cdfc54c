"""bkexp.config_env: the environment variables a run's config reads, recorded and given back."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from bkexp import config_env


def test_referenced_names_every_variable_with_its_value_here(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BKEXP_T_A", "/data/a")
    monkeypatch.delenv("BKEXP_T_B", raising=False)
    cfg = OmegaConf.create({"dataset": {"data_dir": "${oc.env:BKEXP_T_A}/wt2", "files": ["${oc.env:BKEXP_T_B,x}"]},
                            "plain": "${dataset.data_dir}", "n": 3})
    assert config_env.referenced(cfg) == {"BKEXP_T_A": "/data/a", "BKEXP_T_B": None}


def test_pin_gives_the_runs_resolved_values_and_reports_those_that_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"dataset": {"data_dir": "${oc.env:BKEXP_T_A,../shared}/wt2", "files": ["${oc.env:BKEXP_T_B,x}.txt"]},
           "added_later": "${oc.env:BKEXP_T_C,c}", "alias": "${dataset.data_dir}"}
    resolved = {"dataset": {"data_dir": "/data/a/wt2", "files": ["x.txt"]}}  # as the run's summary.json holds it
    monkeypatch.delenv("BKEXP_T_A", raising=False)
    monkeypatch.delenv("BKEXP_T_B", raising=False)
    cfg = OmegaConf.create(raw)
    moved = config_env.pin(cfg, resolved)
    assert moved == {"dataset.data_dir": ("/data/a/wt2", "../shared/wt2")}
    assert cfg.dataset.data_dir == "/data/a/wt2" and cfg.alias == "/data/a/wt2"  # interpolations of it follow
    assert list(cfg.dataset.files) == ["x.txt"]
    assert OmegaConf.to_container(cfg)["added_later"] == "${oc.env:BKEXP_T_C,c}"  # not recorded: left as it is
    assert "dataset.data_dir=/data/a/wt2 (here: ../shared/wt2)" == config_env.describe(moved)


def test_restore_sets_and_unsets_the_recorded_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BKEXP_T_A", "/elsewhere")
    monkeypatch.setenv("BKEXP_T_B", "set here")
    monkeypatch.setenv("BKEXP_T_C", "same")
    summary = {"config_env": {"BKEXP_T_A": "/data/a", "BKEXP_T_B": None, "BKEXP_T_C": "same"}}
    moved = config_env.restore(config_env.recorded(summary))
    assert moved == {"BKEXP_T_A": ("/data/a", "/elsewhere"), "BKEXP_T_B": (None, "set here")}
    assert os.environ["BKEXP_T_A"] == "/data/a" and "BKEXP_T_B" not in os.environ
    assert config_env.recorded({}) == {} and config_env.recorded({"config_env": "junk"}) == {}
