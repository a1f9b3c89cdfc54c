"""What tests that run the real entry point share: tiny overrides and reading a run's summary."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from testpaths import REPO_ROOT

CONF = REPO_ROOT / "conf"

# Small enough for a 2-core CPU, big enough to exercise validation, checkpointing and test. ``~recipe``: the plain
# tiny models (with their feed-forward layers), not the default experiment's MQAR recipe (conf/recipe/).
TINY = [
    "~recipe",
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "seq_len=32", "model.d_model=32", "model.n_layers=1", "dataset.batch_size=4",
    "compute_flops=false",
]
MQAR_TINY = ["dataset.num_train=64", "dataset.num_val=16", "dataset.num_test=16"]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str], output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


STREAMING_DATASETS = {"c4", "pile"}  # hub streams; offline they stream the same local files (tokenizer byte or gpt2)
TEXT_DATASETS = {"wikitext2", "wikitext103", "ptb", "text"} | STREAMING_DATASETS


def data_overrides(dataset: str, data_dir: Path) -> list[str]:
    if dataset not in TEXT_DATASETS:
        return []
    return [f"dataset.data_dir={data_dir}", "dataset.files.train=train.txt",
            "dataset.files.validation=valid.txt", "dataset.files.test=test.txt"]


def load_train_entry() -> ModuleType:
    """The real entry point (train.py) as a module, so tests call its Hydra ``main()`` in-process."""
    spec = importlib.util.spec_from_file_location("bkexp_train_entry", REPO_ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_run(run_dir: Path, *, flags: dict | None = None, **fields) -> Path:
    """summary.json of a synthetic run, written by the real ``RunRecord`` (what ``run()`` writes with) and with
    its ``flags`` section from the real technique registry: a flag that does not exist is a TypeError."""
    from bkexp.techniques import Flags, Techniques
    from bkexp.train.summary import RunRecord

    record = RunRecord(run_dir)
    techniques = Techniques(Flags(**(flags or {})))
    record.update(run_dir=str(run_dir), flags={**techniques.record(), "config_changes": {}, "effects": {}}, **fields)
    return record.write()


# A text run whose data folder is the relative path `data`: see `launch_and_decoy`.
RELATIVE_DATA = ["dataset=text", "tokenizer=word", "dataset.data_dir=data", "dataset.files.train=train.txt",
                 "dataset.files.validation=valid.txt", "dataset.files.test=test.txt"]

# The same run reading its data folder through an environment variable: `${oc.env:BKEXP_TEST_RUN_DATA}/data`.
ENV_DATA = [o if not o.startswith("dataset.data_dir=") else "dataset.data_dir=${oc.env:BKEXP_TEST_RUN_DATA}/data"
            for o in RELATIVE_DATA]


def launch_and_decoy(root: Path, text_dir: Path) -> tuple[Path, Path]:
    """``root/launch/data`` holding ``text_dir``'s splits (where a RELATIVE_DATA run is launched) and
    ``root/elsewhere/data`` holding other text: reading the run's relative path from the second directory would
    read the wrong data."""
    import shutil

    launch, elsewhere = root / "launch", root / "elsewhere"
    shutil.copytree(text_dir, launch / "data")
    (elsewhere / "data").mkdir(parents=True)
    for name in ("train.txt", "valid.txt", "test.txt"):
        (elsewhere / "data" / name).write_text("other words entirely\n" * 50)
    return launch, elsewhere
