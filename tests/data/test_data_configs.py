"""Every conf/dataset and conf/tokenizer file instantiates (OmegaConf + hydra.utils.instantiate) and works."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from testpaths import REPO_ROOT, WIKITEXT2_DIR

from bkexp.data import IGNORE_INDEX, ByteTokenizer, TokenDataModule, WordTokenizer

DATASET_DIR = REPO_ROOT / "conf" / "dataset"
TOKENIZER_DIR = REPO_ROOT / "conf" / "tokenizer"
LOCAL_WIKI = {"data_dir": str(WIKITEXT2_DIR), "files": {"train": "valid.txt", "validation": "test.txt",
                                                         "test": "test.txt"}}


def compose(dataset: str, tokenizer: str = "word", **dataset_overrides) -> TokenDataModule:
    """What the top-level config provides to conf/dataset/<dataset>.yaml: seq_len, seed, tokenizer and paths."""
    root = OmegaConf.create({
        "seq_len": 32, "seed": 0, "paths": {"root_dir": "."},
        "tokenizer": OmegaConf.load(TOKENIZER_DIR / f"{tokenizer}.yaml"),
        "dataset": OmegaConf.load(DATASET_DIR / f"{dataset}.yaml"),
    })
    for key, value in dataset_overrides.items():
        OmegaConf.update(root, f"dataset.{key}", value, merge=False)
    return instantiate(root.dataset)


def test_every_key_has_a_comment() -> None:
    for path in sorted(DATASET_DIR.glob("*.yaml")) + sorted(TOKENIZER_DIR.glob("*.yaml")):
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                assert " # " in line, f"{path.name}: key without a comment: {line!r}"


@pytest.mark.parametrize("dataset", ["mqar", "iid"])
def test_synthetic_configs_build_and_load(dataset: str) -> None:
    dm = compose(dataset, num_train=16, num_val=4, num_test=4)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] == 32 and dm.name == dataset
    assert int(batch["input_ids"].max()) < dm.vocab_size


@pytest.mark.parametrize("dataset", ["wikitext2", "wikitext103", "ptb", "text"])
@pytest.mark.parametrize("tokenizer", ["word", "byte"])
def test_text_configs_build_on_local_files(dataset: str, tokenizer: str) -> None:
    dm = compose(dataset, tokenizer, **LOCAL_WIKI)
    assert isinstance(dm.tokenizer, {"word": WordTokenizer, "byte": ByteTokenizer}[tokenizer])
    assert dm.name == dataset and dm.seq_len == 32


def test_text_config_end_to_end_labels() -> None:
    dm = compose("text", "word", **LOCAL_WIKI)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert (batch["labels"][0, :-1] == batch["input_ids"][0, 1:]).all()
    assert (batch["labels"] != IGNORE_INDEX).all()


@pytest.mark.parametrize("dataset", ["wikitext2", "wikitext103"])
def test_hub_configs_offline_fail_at_once_with_overrides(dataset: str) -> None:
    # Hydra wraps the datamodule's RuntimeError; the message (with the overrides) is kept.
    with pytest.raises(InstantiationException, match=r"dataset\.data_dir=DIR dataset\.files\.train=wiki\.train\.tokens"):
        compose(dataset)


@pytest.mark.parametrize("dataset", ["ptb", "text"])
def test_local_configs_without_data_dir_fail(dataset: str) -> None:
    with pytest.raises(InstantiationException, match=r"needs a folder: dataset\.data_dir=DIR"):
        compose(dataset)


def test_gpt2_config_with_a_local_tokenizer_file(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    built = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    built.pre_tokenizer = pre_tokenizers.Whitespace()
    built.save(str(tmp_path / "tokenizer.json"))
    tok = instantiate(OmegaConf.merge(OmegaConf.load(TOKENIZER_DIR / "gpt2.yaml"),
                                      {"path": str(tmp_path / "tokenizer.json")}))
    assert tok.encode_lines(["a b c"]).tolist() == [1, 2, 0]  # c is unknown; the pre-tokenizer drops "\n"
