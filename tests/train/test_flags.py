"""Optimization flags through the real train.py entry: each training-side flag changes what it claims."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
from runhelpers import MQAR_TINY, TINY, compose_train, options, read_summary

from bkexp.techniques import FLAG_NAMES, FlagError, FlagNotApplicableError, Flags
from bkexp.techniques.pruning import cubic_sparsity_schedule

IID_TINY = ["dataset=iid", "dataset.num_train=64", "dataset.num_val=16", "dataset.num_test=16"]
NO_TEST = ["test_after_fit=false"]


def _metric_column(run_dir, column):
    rows = list(csv.DictReader((run_dir / "csv/metrics.csv").open()))
    return [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]


@pytest.mark.parametrize("option", options("flags"))
def test_every_flag_file_composes_validates_and_turns_its_flag_on(option, tmp_path):
    from hydra.utils import instantiate

    from bkexp.train.config import validate_config

    cfg = compose_train([f"flags={option}"], tmp_path)
    validate_config(cfg)
    flags = instantiate(cfg.flags).validate()
    defaults = Flags()
    changed = {f.name for f in dataclasses.fields(Flags) if getattr(flags, f.name) != getattr(defaults, f.name)}
    expected = {"none": set(), "analytic_gradient": set(), "no_analytic_gradient": {"analytic_gradient"},
                "all": changed}.get(option, {option})
    assert changed == expected
    if option == "all":
        assert not flags.strict and len(flags.enabled()) == len(FLAG_NAMES) - 3  # not: adjoint, exit, quantization
    if option == "quantization":
        assert cfg.bits == 8


def test_flags_none_matches_the_dataclass_defaults(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_train([], tmp_path)
    assert instantiate(cfg.flags) == Flags()
    assert set(cfg.flags) - {"_target_"} == {f.name for f in dataclasses.fields(Flags)}


def test_flags_none_is_recorded_and_changes_nothing(train):
    summary = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST))
    flags = summary["flags"]
    assert summary["status"] == "ok" and flags["enabled"] == [] and flags["config_changes"] == {}
    assert flags["effects"]["precision"] == "32-true" and flags["effects"]["compile"] is False
    assert "act" not in summary["config"]["model"]  # the model config is exactly as composed


def test_pruning_reaches_the_asked_sparsity(train):
    run_dir = train(*TINY, *MQAR_TINY, "flags=pruning", "flags.pruning_amount=0.6", "flags.pruning_end=0.5")
    summary = read_summary(run_dir)
    pruning = summary["flags"]["effects"]["pruning"]
    assert summary["causality_checked"]
    # Every attention/MLP Linear in the blocks, counted on the trained weights (exact zeros), not the masks.
    assert sorted(pruning["layers"]) == ["blocks.0.ffn.fc1", "blocks.0.ffn.fc2", "blocks.0.mixer.out_proj",
                                         "blocks.0.mixer.qkv"]
    assert pruning["sparsity"] == pytest.approx(0.6, abs=1e-3) and pruning["min_layer_sparsity"] >= 0.599
    assert [step for step, _ in pruning["schedule"]] == [1, 2]  # ramp over the first half of 4 steps
    assert pruning["schedule"][-1][1] == pytest.approx(0.6)
    assert summary["metrics"]["test/checkpoint"] == "final weights"
    # The saved checkpoint holds the pruned weights under the plain parameter names.
    state = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    weight = state["model.blocks.0.ffn.fc1.weight"]
    assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=1e-3)


def test_pruning_leaves_directly_read_weights_dense_on_mamba(train):
    summary = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST, "model=mamba", "flags=pruning",
                                 "flags.pruning_amount=0.5"))
    pruning = summary["flags"]["effects"]["pruning"]
    assert pruning["left_dense"] == ["blocks.0.mixer.dt_proj"]  # applied with F.linear(x, dt_proj.weight)
    assert "blocks.0.mixer.in_proj" in pruning["layers"]
    assert pruning["sparsity"] == pytest.approx(0.5, abs=2e-3)


def test_cubic_schedule_ramps_to_the_target():
    schedule = cubic_sparsity_schedule(0.8, total_steps=100, end_fraction=0.5, events=5)
    assert [s for s, _ in schedule] == [10, 20, 30, 40, 50]
    values = [v for _, v in schedule]
    assert values == sorted(values) and values[-1] == pytest.approx(0.8)
    assert values[0] == pytest.approx(0.8 * (1 - 0.8 ** 3))


def test_curriculum_first_batches_are_shorter(train):
    run_dir = train(*TINY, *IID_TINY, *NO_TEST, "trainer.max_steps=6", "flags=curriculum",
                    "flags.curriculum_fraction=0.5", "flags.curriculum_multiple=4")
    summary = read_summary(run_dir)
    curriculum = summary["flags"]["effects"]["curriculum"]
    # seq_len 32: start at 32/8 = 4, grow linearly over the first 3 of 6 steps, full length from step 3 on.
    lengths = [int(v) for _, v in _metric_column(run_dir, "curriculum/seq_len")]
    assert lengths == [4, 12, 20, 32, 32, 32] and curriculum["first_batch_lengths"] == lengths[:5]
    # The tokens actually trained on (not the loader's full batches) are counted.
    assert summary["tokens"]["train"] == 4 * sum(lengths)
    assert summary["causality_checked"]


def test_curriculum_refuses_answer_only_labels(train):
    with pytest.raises(FlagNotApplicableError, match="labels only answer positions"):
        train(*TINY, *MQAR_TINY, "flags=curriculum")


def test_active_learning_backpropagates_the_asked_fraction(train):
    run_dir = train(*TINY, *MQAR_TINY, *NO_TEST, "dataset.batch_size=8", "flags=active_learning",
                    "flags.active_fraction=0.25")
    summary = read_summary(run_dir)
    stats = summary["flags"]["effects"]["active_learning"]
    assert stats["seen_sequences"] == 4 * 8 and stats["selected_sequences"] == 4 * 2
    assert stats["trained_fraction"] == 0.25
    assert [v for _, v in _metric_column(run_dir, "train/active_fraction")] == [0.25] * 4
    assert summary["tokens"]["train"] == 4 * 8 * 32  # every token read is counted


def test_active_learning_gradient_comes_only_from_the_highest_loss_sequences():
    from functools import partial

    from bkexp.models import LanguageModel
    from bkexp.models.ffn import MLP
    from bkexp.models.mixers import AttentionMixer
    from bkexp.train.module import LMTask

    torch.manual_seed(0)
    model = LanguageModel(17, 16, 1, mixer=partial(AttentionMixer, n_heads=2), ffn=partial(MLP))
    task = LMTask(model, optimizer=partial(torch.optim.SGD, lr=0.1), active_fraction=0.5)
    task.log = lambda *args, **kwargs: None  # no Trainer attached
    input_ids = torch.randint(0, 17, (6, 12))
    labels = torch.randint(0, 17, (6, 12))
    labels[4] = -100  # a sequence without labels is never selected
    batch = {"input_ids": input_ids, "labels": labels}

    with torch.no_grad():
        logits = model(input_ids)
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                                                       ignore_index=-100).view(6, 12)
        per_row = token_loss.sum(1) / (labels != -100).sum(1).clamp(min=1)
    per_row[4] = -math.inf
    expected = sorted(per_row.topk(3).indices.tolist())

    sub = task.select_active(batch)
    assert sub["input_ids"].shape == (3, 12)
    chosen = [next(i for i in range(6) if torch.equal(input_ids[i], row)) for row in sub["input_ids"]]
    assert chosen == expected

    # Gradient check: the embedding rows of tokens that occur only in dropped sequences get no gradient.
    _, losses, mask = task.token_losses(sub)
    (losses.sum() / mask.sum()).backward()
    grad_rows = model.embed.weight.grad.abs().sum(1) > 0
    in_kept = torch.zeros(17, dtype=torch.bool)
    in_kept[sub["input_ids"].unique()] = True
    in_kept[sub["labels"][sub["labels"] >= 0].unique()] = True  # tied head: label rows get gradient too
    assert not grad_rows[~in_kept].any()


def test_mixed_precision_trains_in_bf16(train):
    # model=bk with its default MoE feed-forward: bf16 expert outputs are added into the float32 accumulator.
    summary = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST, "model=bk", "flags=mixed_precision"))
    assert summary["status"] == "ok" and summary["causality_checked"]
    assert summary["flags"]["effects"]["precision"] == "bf16-mixed"
    assert summary["config"]["trainer"]["precision"] == "bf16-mixed"
    assert math.isfinite(summary["metrics"]["val/loss"])


def test_quantization_flag_is_qat_at_the_top_level_bits(train):
    summary = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST, "flags=quantization", "bits=4"))
    assert summary["bits"] == 4 and summary["quant"]["method"] == "qat" and summary["quant"]["active"]
    assert summary["flags"]["effects"]["quantization"] == {"method": "qat", "bits": 4}
    assert summary["quant"]["quantized_layers"] == 4


def test_quantization_preset_defaults_to_8_bits(tmp_path):
    assert compose_train(["flags=quantization"], tmp_path).bits == 8
    assert compose_train(["flags=quantization", "bits=2"], tmp_path).bits == 2


def test_analytic_and_autograd_backward_give_the_same_bk_gradients():
    from functools import partial

    from bkexp.models import LanguageModel
    from bkexp.models.mixers.bk import BKMixer
    from bkexp.ops.testing import assert_rel_close

    grads = {}
    for backend in ("auto", "torch_autograd"):  # what flags.analytic_gradient=true / false select
        torch.manual_seed(0)
        model = LanguageModel(23, 16, 2, mixer=partial(BKMixer, n_heads=2, backend=backend))
        x = torch.randint(0, 23, (2, 24))
        model(x).logsumexp(-1).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads["auto"].items():
        assert_rel_close(grads["torch_autograd"][name], grad, 1e-4, name)


def test_no_analytic_gradient_selects_the_autograd_backends(train):
    bk = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST, "model=bk", "flags=no_analytic_gradient"))
    assert bk["backends"] == {"bk_core": "torch_autograd"} and bk["causality_checked"]
    assert bk["flags"]["effects"]["gradient"]["bk_core"].startswith("autograd")
    mamba = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST, "model=mamba", "flags.analytic_gradient=false"))
    assert mamba["backends"] == {"selective_scan": "ref", "causal_conv1d": "ref"}


@pytest.mark.slow  # inductor compilation: about a minute on 2 cores
def test_compiled_transformer_matches_eager():
    from functools import partial

    from bkexp.models import LanguageModel
    from bkexp.models.ffn import MLP
    from bkexp.models.mixers import AttentionMixer
    from bkexp.ops.testing import assert_rel_close
    from bkexp.techniques.compile import compile_blocks

    torch.manual_seed(0)
    model = LanguageModel(31, 32, 1, mixer=partial(AttentionMixer, n_heads=2), ffn=partial(MLP))
    x = torch.randint(0, 31, (2, 16))
    eager = model(x)
    eager.logsumexp(-1).sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    info = compile_blocks(model, backend="inductor")
    assert info["compiled_blocks"] == 1 and info["eager_mixers"] == []
    compiled = model(x)
    compiled.logsumexp(-1).sum().backward()
    assert_rel_close(compiled, eager, 1e-5, "logits")
    for name, grad in eager_grads.items():
        assert_rel_close(model.get_parameter(name).grad, grad, 1e-4, name)
    assert not any("_orig_mod" in key for key in model.state_dict())  # compiled in place: checkpoints unchanged


@pytest.mark.slow  # inductor compilation: about a minute on 2 cores
def test_compile_runs_a_bk_model_with_its_kernel_kept_eager(train):
    summary = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST, "model=bk", "flags=compile",
                                 "flags.compile_backend=aot_eager"))
    compile_info = summary["flags"]["effects"]["compile"]
    assert summary["status"] == "ok" and summary["causality_checked"]
    assert compile_info["compiled_blocks"] == 1 and compile_info["eager_mixers"] == ["blocks.0.mixer (bk_core)"]
    assert summary["backends"] == {"bk_core": "cpu"}


@pytest.mark.parametrize("overrides,error,message", [
    (["model=mamba", "flags=sparse_bk"], FlagNotApplicableError, "flags.sparse_bk applies to BK mixers; model 'mamba'"),
    (["flags=physics_informed"], FlagNotApplicableError, "model 'transformer' has none"),
    (["flags.analytic_gradient=false"], FlagNotApplicableError, "has neither"),
    (["flags.quantization=true"], FlagNotApplicableError, "bits=32 means no quantization; set bits=8"),
    (["flags=mixed_precision", "flags.mixed_precision_dtype=fp16"], FlagNotApplicableError, "needs a GPU"),
    (["flags=pruning", "flags.quantization=true", "bits=8"], FlagError, "cannot be combined"),
    (["flags=pruning", "bits=8"], FlagError, "cannot be combined with quantization"),
    (["flags=act", "flags.early_exit=true"], FlagError, "both choose a per-token depth"),
    (["flags=pruning", "flags.pruning_amount=1.5"], FlagError, r"pruning_amount must be a number in \(0, 1\)"),
    (["flags=quantization", "quant=ptq"], FlagError, "quant=ptq was chosen"),
    (["model=bk", "flags.analytic_gradient=false", "model.mixer.backend=torch"], FlagError, "was forced"),
    (["model=bk", "model.mixer.backend=torch_autograd"], FlagError, "does not differentiate with the exact adjoint"),
    (["flags=mixed_precision", "trainer.precision=64-true"], FlagError, "sets trainer.precision=64-true"),
    (["+flags.prunning=true"], Exception, "flags.prunning is not a parameter"),
], ids=["sparse_bk-mamba", "physics-transformer", "adjoint-transformer", "quant-32bit", "fp16-cpu",
        "prune+quant-flag", "prune+bits", "act+exit", "bad-amount", "quant-ptq", "forced-backend",
        "autograd-backend-with-adjoint", "precision-conflict", "typo"])
def test_invalid_or_mismatched_flags_fail_clearly(train, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        train(*TINY, *MQAR_TINY, *overrides)
    (run_dir,) = list((tmp_path / "outputs").iterdir())
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "flags" in summary


def test_strict_false_switches_inapplicable_flags_off_and_records_why(train):
    summary = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST, "model=mamba", "flags=sparse_bk",
                                 "flags.strict=false", "flags.active_learning=true"))
    flags = summary["flags"]
    assert flags["sparse_bk"] is False and "applies to BK mixers" in flags["skipped"]["sparse_bk"]
    assert flags["enabled"] == ["active_learning"]


@pytest.mark.parametrize("model,flags,expected", [
    ("bk", ["flags=early_exit", "flags.sparse_bk=true", "flags.physics_informed=true"],
     {"mean_exit_layer", "compute_saved", "active_heads_fraction", "energy_drift"}),
    ("transformer", ["flags=act", "flags.koopman=true", "flags.koopman_dim=8"],
     {"mean_layers", "max_layers", "koopman_prediction_error"}),
    ("mamba", ["flags=multi_scale", "flags.grad_checkpoint=true"], {"multi_scale_layers", "multi_scale_speedup"}),
], ids=["bk-exit-sparse-physics", "transformer-act-koopman", "mamba-multiscale-checkpoint"])
def test_model_flags_reach_the_model_and_keep_it_causal(train, model, flags, expected):
    summary = read_summary(train(*TINY, *MQAR_TINY, *NO_TEST, f"model={model}", "model.n_layers=3", *flags))
    assert summary["status"] == "ok" and summary["causality_checked"]
    assert set(summary["flags"]["effects"]["model"]) >= expected
    changes = summary["flags"]["config_changes"]
    built = summary["config"]["model"]
    for key, value in changes.items():  # the recorded config is the one that was built
        node = summary["config"]
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    if model == "bk":
        assert built["mixer"]["sparse_heads"] == 0.5 and built["early_exit"] and built["physics_weight"] == 0.01
        assert summary["flags"]["effects"]["model"]["active_heads_fraction"] == 0.5
        assert 1 <= summary["flags"]["effects"]["model"]["mean_exit_layer"] <= 3


def test_all_preset_runs_and_records_what_it_skipped(train):
    # compile is covered above; here it would recompile at every curriculum length (slow on 2 cores).
    summary = read_summary(train(*TINY, *IID_TINY, *NO_TEST, "model.n_layers=3", "flags=all", "flags.compile=false"))
    flags = summary["flags"]
    assert summary["status"] == "ok" and summary["causality_checked"]
    assert set(flags["skipped"]) == {"sparse_bk", "physics_informed"}  # transformer: no BK mixer
    assert {"pruning", "curriculum", "active_learning", "act", "multi_scale", "koopman", "mixed_precision",
            "grad_checkpoint"} <= set(flags["enabled"])
    assert flags["effects"]["precision"] == "bf16-mixed" and flags["effects"]["pruning"]["sparsity"] > 0.49
