"""conf/quant/*.yaml compose into a QuantSpec, and invalid combinations fail naming what is allowed."""

from __future__ import annotations

import re

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from testpaths import REPO_ROOT

from bkexp.quant import QuantConfigError, QuantSpec

QUANT_DIR = REPO_ROOT / "conf" / "quant"
QUANT_FILES = sorted(p.stem for p in QUANT_DIR.glob("*.yaml"))


def _settings_table() -> dict[str, list[str]]:
    """docs/quantization.md's settings table: key -> its cells (key, default, meaning)."""
    doc = (REPO_ROOT / "docs" / "quantization.md").read_text()
    section = doc.split("## Settings (`conf/quant/*.yaml`)\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip("`"): cells for cells in rows}


def test_quant_group_has_the_documented_options() -> None:
    table = _settings_table()
    _, default, meaning = table["method"]
    documented = set(re.findall(r"`(\w+)`", meaning.split("(select with", 1)[0]))
    assert documented == set(QUANT_FILES), "docs/quantization.md's methods are the files of conf/quant"
    train_yaml = (REPO_ROOT / "conf" / "train.yaml").read_text()
    line = next(ln for ln in train_yaml.splitlines() if ln.strip().startswith("- quant:"))
    chosen, comment = line.split("- quant:", 1)[1].split("#", 1)
    listed = {re.match(r"\s*(\w+)", part).group(1) for part in comment.split(":", 1)[1].split("|")}
    assert listed == set(QUANT_FILES), "train.yaml's comment lists the options of the quant group"
    assert chosen.strip() == default.strip("`") == yaml.safe_load((QUANT_DIR / "auto.yaml").read_text())["method"]
    keys = set().union(*((yaml.safe_load(p.read_text()) or {}).keys() for p in QUANT_DIR.glob("*.yaml")))
    assert set(table) == keys - {"_target_", "defaults"}, "every quant key is documented, and only those"


def compose_quant(name: str, bits: int) -> QuantSpec:
    train_yaml = yaml.safe_load((REPO_ROOT / "conf" / "train.yaml").read_text())
    wired = any(isinstance(d, dict) and "quant" in d for d in train_yaml["defaults"])
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"{'' if wired else '+'}quant={name}", f"bits={bits}"])
    assert OmegaConf.is_interpolation(cfg.quant, "bits")  # reads the top-level bits
    return instantiate(cfg.quant)


@pytest.mark.parametrize("name", QUANT_FILES)
def test_every_quant_file_composes_and_has_commented_keys(name: str) -> None:
    spec = compose_quant(name, 32 if name == "none" else 8)
    assert isinstance(spec, QuantSpec)
    assert spec.bits == (32 if name == "none" else 8)
    assert spec.method == name
    spec.validate()
    for line in (QUANT_DIR / f"{name}.yaml").read_text().splitlines():
        if re.match(r"^\s*[\w_]+:\s*\S", line) or re.match(r"^\s*-\s", line):
            assert "#" in line, f"quant/{name}.yaml: key without a one-line comment: {line!r}"


@pytest.mark.parametrize(("bits", "method"), [(32, "none"), (16, "qat"), (8, "qat"), (4, "qat"), (2, "qat")])
def test_auto_quantizes_below_32_bits(bits: int, method: str) -> None:
    spec = compose_quant("auto", bits).validate()
    assert spec.resolved_method == method


INVALID = [
    ({"method": "qat", "bits": 32}, r"quant=qat needs bits in 16, 8, 4, 2; bits=32 means no quantization"),
    ({"method": "ptq", "bits": 32}, r"quant=ptq needs bits in 16, 8, 4, 2"),
    ({"method": "none", "bits": 8}, r"quant=none keeps full precision.*bits=8.*quant=auto.*quant=qat or quant=ptq"),
    ({"method": "auto", "bits": 5}, r"bits=5 is not supported; valid: 32, 16, 8, 4, 2"),
    ({"method": "auto", "bits": 3}, r"bits=3 is not supported; valid: 32, 16, 8, 4, 2"),  # eval-quant only
    ({"method": "gptq", "bits": 4}, r"quant method 'gptq' is not supported; valid: auto, none, qat, ptq"),
    ({"bits": 4, "act_bits": 5}, r"act_bits=5 is not supported; valid: null \(off\), 16, 8, 4, 2"),
    ({"bits": 32, "act_bits": 8}, r"act_bits quantizes the inputs of quantized layers.*bits=32"),
    ({"bits": 4, "granularity": "per_row"}, r"granularity='per_row'; valid: per_channel, per_group, per_tensor"),
    ({"bits": 4, "granularity": "per_group"}, r"per_group needs quant.group_size = a positive integer, got None"),
    ({"bits": 4, "group_size": 32}, r"group_size=32 is used only with quant.granularity=per_group"),
    ({"bits": 4, "clip": "mse"}, r"clip='mse'; valid: none, percentile"),
    ({"bits": 4, "clip": "percentile"}, r"clip=percentile calibrates post-training quantization only.*quant=ptq"),
    ({"method": "ptq", "bits": 16, "clip": "percentile"}, r"not to bits=16"),
    ({"method": "ptq", "bits": 4, "clip": "percentile", "percentile": 0}, r"percentile must be in \(0, 100\]"),
    ({"bits": 4, "embeddings": "yes"}, r"quant.embeddings must be true or false"),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID, ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items())
                         if isinstance(v, dict) else None)
def test_invalid_combinations_name_what_is_allowed(kwargs: dict, message: str) -> None:
    with pytest.raises(QuantConfigError, match=message):
        QuantSpec(**kwargs).validate()
    assert issubclass(QuantConfigError, ValueError)


def test_composed_invalid_combination_fails() -> None:
    with pytest.raises(QuantConfigError, match=r"quant=qat needs bits in"):
        compose_quant("qat", 32).validate()
    with pytest.raises(QuantConfigError, match=r"quant=none keeps full precision"):
        compose_quant("none", 4).validate()
