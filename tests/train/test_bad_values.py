"""Bad values are refused before anything is built, with the key, the value and what is valid."""

from __future__ import annotations

import pytest

from bkexp.train.config import ConfigError
from bkexp.train.resume import expand_argv
from runhelpers import MQAR_TINY, TINY, compose_train, data_overrides, read_summary


@pytest.mark.parametrize("override,message", [
    ("model.d_model=0", r"model.d_model=0 is not valid; valid: a positive integer"),
    ("model.mixer.n_heads=-2", r"model.mixer.n_heads=-2 is not valid; valid: a positive integer"),
    ("optimizer.lr=-1", r"optimizer.lr=-1 is not valid; valid: a finite number > 0"),
    ("optimizer.lr=abc", r"optimizer.lr='abc' is not valid; valid: a finite number > 0"),
    ("optimizer.betas=[0.9,1.5]", r"optimizer.betas\[1\]=1.5 is not valid; valid: a number in \[0, 1\)"),
    ("checkpoint_every_n_steps=0", r"checkpoint_every_n_steps=0 is not valid; valid: a positive integer or null"),
    ("divergence.margin=-1", r"divergence.margin=-1 must be a positive number of nats or null"),
    ("threads=0", r"threads=0 is not valid; valid: a positive integer or null \(torch's default, one per core\)"),
    ("trainer.max_steps=0", r"trainer.max_steps=0 is not valid; valid: a positive integer \(the training budget"),
    ("trainer.max_steps=-5", r"trainer.max_steps=-5 is not valid; valid: a positive integer .*or -1 with"),
    ("trainer.val_check_interval=0", r"trainer.val_check_interval=0 is not valid; valid: a positive integer"),
    ("trainer.val_check_interval=-3", r"trainer.val_check_interval=-3 is not valid; .*or a duration 'DD:HH:MM:SS'"),
], ids=["d_model", "n_heads", "lr-negative", "lr-text", "betas", "checkpoint-every", "divergence-margin", "threads",
        "max-steps-0", "max-steps-negative", "val-interval-0", "val-interval-negative"])
def test_bad_value_is_refused_before_building(train, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train(*TINY, *MQAR_TINY, override)
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "params" not in summary  # refused before the model was built
    assert summary["config"]["seq_len"] == 32  # the composed config is kept for the diagnosis


def _text_dir(tmp_path, train_text: bytes):
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "train.txt").write_bytes(train_text)
    for name in ("valid.txt", "test.txt"):
        (folder / name).write_text("the cat sat on the mat\n" * 20, encoding="utf-8")
    return ["dataset=text", *data_overrides("text", folder)]


def test_non_utf8_text_file_is_named(train, tmp_path):
    overrides = _text_dir(tmp_path, "caf\u00e9 au lait\n".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=r"dataset.files.train: .*train.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        train(*TINY, *overrides)


def test_training_split_shorter_than_one_sequence_is_refused(train, tmp_path):
    overrides = _text_dir(tmp_path, b"only a few words here\n")
    with pytest.raises(ValueError, match=r"training split has 5 next-token targets, fewer than one sequence "
                                         r"\(seq_len=32\); valid: seq_len <= 5"):
        train(*TINY, *overrides)


@pytest.mark.parametrize("path", ["/runs/0_model=bk,seq_len=256/checkpoints/last.ckpt", "/a b/it's=here/last.ckpt"])
def test_ckpt_path_with_equals_and_commas_is_accepted(tmp_path, path):
    """Sweep job directories contain '=' and ','; the entry point quotes such paths for Hydra's grammar."""
    argv = expand_argv(["train.py", f"ckpt_path={path}", "seq_len=64"])
    cfg = compose_train(argv[1:], tmp_path)  # the real Hydra parser
    assert cfg.ckpt_path == path and cfg.seq_len == 64
    assert expand_argv(["train.py", "ckpt_path='/x=1/last.ckpt'"])[1] == "ckpt_path='/x=1/last.ckpt'"
