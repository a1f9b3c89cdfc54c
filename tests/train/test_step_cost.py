"""Per-step costs of the training loop: the optimizer's kernel choice and how often step metrics are logged."""

from __future__ import annotations

import csv
import functools

import pytest
import torch
from hydra.utils import instantiate

from bkexp.train.module import build_optimizer, split_weight_decay
from runhelpers import MQAR_TINY, TINY, compose_train, read_summary


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))


def test_config_optimizer_resolves_to_the_fused_kernel_on_cpu(tmp_path):
    factory = instantiate(compose_train([], tmp_path).optimizer)
    optimizer = build_optimizer(factory, split_weight_decay(_model()))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["fused"] is True for group in optimizer.param_groups)


def test_explicit_choices_pass_through_and_clipping_under_amp_falls_back_to_foreach():
    model = _model()

    def groups():  # fresh dicts: an optimizer writes its defaults into the group dicts it is given
        return split_weight_decay(model)

    loop = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3, fused=False), groups())
    assert loop.param_groups[0]["fused"] is False and loop.param_groups[0]["foreach"] is None
    unset = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3), groups())  # no fused key: untouched
    assert not unset.param_groups[0]["fused"]
    amp = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3, fused=None), groups(), fused_allowed=False)
    assert not amp.param_groups[0]["fused"] and amp.param_groups[0]["foreach"] is True
    sgd = build_optimizer(functools.partial(torch.optim.SGD, lr=1e-3, fused=None), groups())
    assert sgd.param_groups[0]["fused"] is True


def test_fused_adamw_matches_the_for_loop_within_round_off():
    """Same updates as PyTorch's default CPU AdamW over 20 steps (round-off only), run to run identical."""
    results = []
    for fused in (False, True, True):
        model = _model()
        opt = torch.optim.AdamW(split_weight_decay(model), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            x = torch.randn(32, 16, generator=gen)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    loop, fused, fused_again = results
    assert torch.equal(fused, fused_again)
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)


def test_step_metrics_are_logged_every_n_steps_and_on_the_last_step(train):
    overrides = [o for o in TINY if not o.startswith(("trainer.log_every_n_steps", "trainer.max_steps",
                                                       "trainer.val_check_interval"))]
    run_dir = train(*overrides, *MQAR_TINY, "trainer.max_steps=7", "trainer.val_check_interval=7",
                    "trainer.log_every_n_steps=3")
    rows = list(csv.DictReader((run_dir / "csv/metrics.csv").open()))
    logged = {name: sorted(int(r["step"]) for r in rows if r.get(name)) for name in
              ("train/loss", "lr", "grad_norm", "train/tokens", "time/step_ms", "throughput/tokens_per_sec")}
    # Lightning writes step metrics at steps 3 and 6 (log_every_n_steps=3, counted from 1): CSV steps 2 and 5.
    for name, steps in logged.items():
        assert steps == [2, 5], (name, steps)
    tokens = {int(r["step"]): float(r["train/tokens"]) for r in rows if r.get("train/tokens")}
    assert tokens == {2: 3 * 4 * 32, 5: 6 * 4 * 32}
    summary = read_summary(run_dir)
    # The last step's values still reach the run's record (callback_metrics), though no logger was due.
    assert summary["steps"] == 7 and summary["tokens"]["train"] == 7 * 4 * 32
    assert summary["metrics"]["train/tokens"] == pytest.approx(7 * 4 * 32)
    assert summary["size"] == {"name": "tiny", "matched": "parameters"}  # what the size preset equalises
