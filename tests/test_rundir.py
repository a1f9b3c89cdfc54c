"""bkexp.rundir: finding runs, loading config / tokenizer / checkpoint safely, rebuilding the model, atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from runhelpers import ENV_DATA, MQAR_TINY, RELATIVE_DATA, TINY, compose_train, launch_and_decoy, read_summary
from testpaths import WIKITEXT2_DIR

from bkexp.data import ByteTokenizer, IdTokenizer, PretrainedTokenizer, WordTokenizer, load_tokenizer
from bkexp.rundir import (
    RunDir,
    RunDirError,
    atomic_save_figure,
    atomic_write_json,
    atomic_write_text,
    build_run_model,
    find_run_dirs,
    load_checkpoint_file,
)


def _fake_run(path: Path, summary: bool = True) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    if summary:
        (path / "summary.json").write_text('{"status": "ok"}\n')
    return path


def test_find_run_dirs_expands_sweeps_in_job_order_and_names_bad_paths(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "stamp"
    jobs = [_fake_run(sweep / name) for name in ("10_model=bk", "2_model=mamba", "0_model=transformer")]
    (sweep / "10_model=bk" / "checkpoints" / "nested").mkdir(parents=True)  # not searched: inside a run
    single = _fake_run(tmp_path / "outputs" / "one", summary=False)  # killed: .hydra only, still a run
    assert find_run_dirs([sweep]) == [jobs[2], jobs[1], jobs[0]]
    assert find_run_dirs([single, sweep, jobs[0]]) == [single, jobs[2], jobs[1], jobs[0]]  # each run once
    assert find_run_dirs([tmp_path]) == [jobs[2], jobs[1], jobs[0], single]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match=f"{empty} is neither a run directory"):
        find_run_dirs([empty])
    with pytest.raises(RunDirError, match="is not a directory"):
        find_run_dirs([tmp_path / "missing"])
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir(empty)


class _Payload:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run")
    marker = tmp_path / "payload_ran"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "evil": _Payload(marker)}, ckpt)
    with pytest.raises(RunDirError) as info:
        RunDir(run).load_checkpoint("last")
    message = str(info.value)
    assert str(ckpt) in message and "weights_only=True" in message and "refused" in message
    assert not marker.exists()  # the payload never ran (no unsafe retry)
    # The same pickle loaded unsafely does run it: the test would notice a fallback to weights_only=False.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_a_truncated_checkpoint_gives_one_line_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "best-4.ckpt"
    torch.save({"state_dict": {"model.w": torch.arange(1000.0)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(RunDirError) as info:
        load_checkpoint_file(path)
    assert str(info.value).startswith(f"{path}: truncated or corrupt checkpoint")
    assert "\n" not in str(info.value)


def _test_loss(model: torch.nn.Module, datamodule) -> float:
    losses, count = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            logits = model(batch["input_ids"])
            mask = batch["labels"] != -100
            losses += float(torch.nn.functional.cross_entropy(logits[mask], batch["labels"][mask], reduction="sum"))
            count += int(mask.sum())
    return losses / count


def test_a_trained_run_is_rebuilt_exactly(train, tmp_path: Path) -> None:
    run_dir = train(*TINY, *MQAR_TINY)
    summary = read_summary(run_dir)
    run = RunDir(run_dir)
    cfg = run.config()
    assert cfg.paths.output_dir == str(run_dir) and cfg.seq_len == 32
    assert run.summary()["status"] == "ok"
    best = run.checkpoint_path("best")
    assert best.name == summary["metrics"]["test/checkpoint"]
    assert run.checkpoint_path("last") == run_dir / "checkpoints" / "last.ckpt"
    assert run.checkpoint_path(best) == best
    with pytest.raises(RunDirError, match="valid: best, last, or a path"):
        run.checkpoint_path("newest")
    # Synthetic data: the tokenizer is the ids, saved with the run.
    tok = run.tokenizer()
    assert isinstance(tok, IdTokenizer) and tok.vocab_size == summary["data"]["vocab_size"]
    # The rebuilt model and data reproduce the test loss training recorded (an independent evaluation).
    model = run.build_model("best")
    assert not model.training
    dm = run.build_datamodule(stage="test")
    assert _test_loss(model, dm) == pytest.approx(summary["metrics"]["test/loss"], rel=1e-5)
    # Overrides: an existing key changes, a mistyped one is an error naming it, +key adds one.
    assert run.config(["dataset.batch_size=7"]).dataset.batch_size == 7
    with pytest.raises(RunDirError, match="no key 'dataset.batchsize'"):
        run.config(["dataset.batchsize=7"])
    assert run.config(["+extra.note=hi"]).extra.note == "hi"
    # A run recorded before the techniques package (flags target bkexp.train.flags.Flags) still loads.
    config_file = run_dir / ".hydra" / "config.yaml"
    config_file.write_text(config_file.read_text().replace("bkexp.techniques.Flags", "bkexp.train.flags.Flags"))
    assert "bkexp.train.flags.Flags" in config_file.read_text()
    assert run.config().flags._target_ == "bkexp.techniques.Flags"


@pytest.mark.parametrize("flag", ["act", "koopman"])
def test_a_flag_run_recorded_before_the_staged_model_builds_it(flag: str, tmp_path: Path) -> None:
    """Runs recorded before bkexp/models/staged.py: conf/flags/<flag>.yaml put the staged keys on the plain class."""
    from omegaconf import OmegaConf

    from bkexp.models import StagedLanguageModel

    cfg = compose_train([f"flags={flag}", "model.d_model=16", "model.n_layers=2", "flags.koopman_dim=4"], tmp_path)
    current = build_run_model(cfg.model, None, 16)
    cfg.model._target_ = "bkexp.models.LanguageModel"  # as those runs' .hydra/config.yaml has it
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    model = build_run_model(RunDir(tmp_path).config().model, None, 16)
    assert type(model) is StagedLanguageModel and getattr(model.settings, flag) is True
    model.load_state_dict(current.state_dict(), strict=True)  # the staged model's parameters, names unchanged


@pytest.mark.parametrize("method", ["qat", "ptq"])
def test_a_quantized_run_loads_as_its_test_evaluated_it_everywhere(train, tmp_path: Path, method: str) -> None:
    """RunDir (eval, generate, bench), the export and the Lightning checkpoint give one model: the tested one."""
    from hydra.utils import instantiate

    from bkexp.export import export_run, from_pretrained
    from bkexp.infer.run import load_run

    run_dir = train(*TINY, *MQAR_TINY, "bits=8", f"quant={method}")
    summary = read_summary(run_dir)
    assert summary["status"] == "ok" and summary["quant"]["method"] == method
    run = RunDir(run_dir)
    cfg = run.config()
    # The reference, built as bkexp.train.run builds and tests it: model, quantization layers, the best
    # checkpoint's Lightning state_dict, then the layers switched on for the test.
    reference = instantiate(cfg.model, vocab_size=run.vocab_size(cfg))
    spec = instantiate(cfg.quant)
    spec.prepare(reference)
    state = torch.load(run.checkpoint_path("best"), map_location="cpu", weights_only=True)["state_dict"]
    reference.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    spec.finalize(reference).eval()

    loaded = run.build_model("best")
    exported = from_pretrained(export_run(run_dir, tmp_path / "export"))
    generating, _ = load_run(run_dir)
    float_weights = run.build_model("best", quantized=False)
    dm = run.build_datamodule(stage="test")
    ids = next(iter(dm.test_dataloader()))["input_ids"]
    with torch.no_grad():
        expected = reference(ids)
        for model in (loaded, exported, generating):
            assert torch.equal(model(ids), expected)
        assert not torch.allclose(float_weights(ids), expected)  # 8 bits change the logits: the check can fail
    # The loaded model is the one the run tested: it reproduces the recorded test loss.
    assert _test_loss(loaded, dm) == pytest.approx(summary["metrics"]["test/loss"], rel=1e-5)


def test_tokenizers_save_and_load_exactly(tmp_path: Path) -> None:
    lines = (WIKITEXT2_DIR / "valid.txt").read_text(encoding="utf-8").splitlines()[:200]
    word = WordTokenizer(min_freq=2)
    word.fit(lines)
    loaded = load_tokenizer(word.save(tmp_path / "word"))
    assert isinstance(loaded, WordTokenizer) and loaded.itos == word.itos and loaded.min_freq == 2
    loaded.fit(["entirely different words"])  # a saved vocabulary is never refitted
    assert torch.equal(loaded.encode_lines(lines), word.encode_lines(lines))
    assert isinstance(load_tokenizer(ByteTokenizer().save(tmp_path / "byte")), ByteTokenizer)
    assert load_tokenizer(IdTokenizer(64).save(tmp_path / "ids")).decode([3, 63]) == "3 63"

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    built = Tokenizer(models.BPE(unk_token="[UNK]"))
    built.pre_tokenizer = pre_tokenizers.Whitespace()
    built.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    built.save(str(tmp_path / "source.json"))
    bpe = PretrainedTokenizer(name="local-bpe", path=str(tmp_path / "source.json"), revision="abc123")
    saved = bpe.save(tmp_path / "bpe")
    (tmp_path / "source.json").unlink()  # the saved copy does not depend on the original file
    again = load_tokenizer(saved)
    assert (again.name, again.revision) == ("local-bpe", "abc123")
    assert torch.equal(again.encode_lines(lines[:20]), bpe.encode_lines(lines[:20]))
    with pytest.raises(ValueError, match="not a saved bkexp tokenizer"):
        load_tokenizer(tmp_path / "nothing")


def test_atomic_writers_share_mode_0644_and_leave_no_temporary_files(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([1, 2], [3, 4])
    paths = [atomic_write_text(tmp_path / "a.md", "x\n"), atomic_write_json(tmp_path / "b.json", {"k": 1}),
             atomic_save_figure(fig, tmp_path / "c.png", dpi=50)]
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o644] * 3
    assert (tmp_path / "b.json").read_text() == '{\n  "k": 1\n}\n'
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "d.json", {"k": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.json", "c.png"]


def test_checkpoint_step_reads_the_step_and_names_unusable_files(tmp_path: Path) -> None:
    import torch

    from bkexp.rundir import checkpoint_step

    torch.save({"global_step": 7, "state_dict": {"model.w": torch.zeros(3)}}, tmp_path / "ok.ckpt")
    assert checkpoint_step(tmp_path / "ok.ckpt") == 7
    torch.save({"state_dict": {}}, tmp_path / "nostep.ckpt")
    with pytest.raises(RunDirError, match="nostep.ckpt: no global_step"):
        checkpoint_step(tmp_path / "nostep.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "ok.ckpt").read_bytes()[:40])
    with pytest.raises(RunDirError, match="cut.ckpt: truncated or corrupt"):
        checkpoint_step(tmp_path / "cut.ckpt")


def test_a_config_whose_flags_cannot_be_applied_is_a_run_dir_error_naming_the_file(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    cfg = compose_train([*TINY, *MQAR_TINY], run)
    cfg.flags.act = "maybe"  # an edited config.yaml: not a boolean
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    with pytest.raises(RunDirError, match=r"config\.yaml: its optimization flags cannot be applied: "
                                          r"flags\.act must be true or false, got 'maybe'"):
        RunDir(run).config()


def test_relative_data_paths_are_read_from_where_the_run_was_launched(train, tmp_path: Path, wikitext_slice: Path,
                                                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import json

    from bkexp.cli import main as bkexp_main

    # the same relative path from elsewhere names other text: reading it would score the wrong data silently
    launch, elsewhere = launch_and_decoy(tmp_path, wikitext_slice)
    monkeypatch.chdir(launch)
    run_dir = train(*TINY, *RELATIVE_DATA)
    test_ppl = read_summary(run_dir)["metrics"]["test/ppl"]

    monkeypatch.chdir(elsewhere)
    run = RunDir(run_dir)
    assert run.launch_dir() == launch
    assert run.config().dataset.data_dir == str((launch / "data").resolve())
    assert bkexp_main(["eval", str(run_dir), "--device", "cpu", "--out", "by_launch"]) == 0
    (row,) = json.loads((elsewhere / "by_launch" / "perplexity.json").read_text())["datasets"]
    assert row["source"]["path"] == str((launch / "data" / "test.txt").resolve())
    assert row["ppl"] == pytest.approx(test_ppl, rel=1e-6)
    # an override is the user's, typed here: relative to this directory
    assert run.config(["dataset.data_dir=data"]).dataset.data_dir == "data"
    assert bkexp_main(["eval", str(run_dir), "--device", "cpu", "--override", "dataset.data_dir=data",
                       "--out", "by_override"]) == 0
    (row,) = json.loads((elsewhere / "by_override" / "perplexity.json").read_text())["datasets"]
    assert row["source"]["path"] == str((elsewhere / "data" / "test.txt").resolve())
    # the data gone: one line naming the folder and the fix, no traceback
    (launch / "data").rename(launch / "moved")
    capsys.readouterr()
    assert bkexp_main(["eval", str(run_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--datasets run: no such file {launch / 'data' / 'test.txt'}" in err
    assert "--override dataset.data_dir=DIR" in err and "Traceback" not in err
    # other text needs only the saved tokenizer: scored, without the overlap with the (unreadable) training text
    other = launch / "moved" / "valid.txt"
    assert bkexp_main(["eval", str(run_dir), "--device", "cpu", "--datasets", f"text:{other}", "--out", "other"]) == 0
    record = json.loads((elsewhere / "other" / "perplexity.json").read_text())
    assert record["datasets"][0]["train_13gram_overlap"] is None and record["datasets"][0]["ppl"] > 1
    assert "the run's data cannot be read here" in record["train_data_error"]
    assert "Not computed here: " in (elsewhere / "other" / "perplexity.md").read_text()


def test_values_read_from_environment_variables_are_the_runs_wherever_the_run_is_read(
        train, tmp_path: Path, wikitext_slice: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """`dataset.data_dir=${oc.env:VAR}/data`: evaluated where VAR names another copy of other text (or is unset),
    the run's own folder is read, and the difference is said."""
    import json
    import logging

    from bkexp.cli import main as bkexp_main

    launch, elsewhere = launch_and_decoy(tmp_path, wikitext_slice)
    monkeypatch.setenv("BKEXP_TEST_RUN_DATA", str(launch))
    run_dir = train(*TINY, *ENV_DATA)
    summary = read_summary(run_dir)
    assert summary["config_env"] == {"BKEXP_TEST_RUN_DATA": str(launch)}
    assert summary["config"]["dataset"]["data_dir"] == f"{launch}/data"

    monkeypatch.setenv("BKEXP_TEST_RUN_DATA", str(elsewhere))
    rundir_log = logging.getLogger("bkexp.rundir")
    rundir_log.addHandler(caplog.handler)  # training configured logging (Hydra) without pytest's root handler
    try:
        assert RunDir(run_dir).config().dataset.data_dir == f"{launch}/data"
    finally:
        rundir_log.removeHandler(caplog.handler)
    assert f"dataset.data_dir={launch}/data (here: {elsewhere}/data)" in caplog.text
    monkeypatch.chdir(tmp_path)
    assert bkexp_main(["eval", str(run_dir), "--device", "cpu", "--out", "pinned"]) == 0
    (row,) = json.loads((tmp_path / "pinned" / "perplexity.json").read_text())["datasets"]
    assert row["source"]["path"] == str(launch / "data" / "test.txt")
    assert row["ppl"] == pytest.approx(summary["metrics"]["test/ppl"], rel=1e-6)
    # the variable unset (the interpolation has no default: it would not resolve at all), and an override
    monkeypatch.delenv("BKEXP_TEST_RUN_DATA")
    assert RunDir(run_dir).config().dataset.data_dir == f"{launch}/data"
    assert RunDir(run_dir).config([f"dataset.data_dir={elsewhere}/data"]).dataset.data_dir == f"{elsewhere}/data"
    # an export records the folder the run read, and its card's command sets the variable as the run had it
    from bkexp.export import export_run

    folder = export_run(run_dir, tmp_path / "export")
    assert json.loads((folder / "config.json").read_text())["dataset"]["data_dir"] == f"{launch}/data"
    assert f"BKEXP_TEST_RUN_DATA={launch} python train.py " in (folder / "README.md").read_text()
