"""``bkexp doctor``: the environment record and, for every op package, the backends this machine can run."""

from __future__ import annotations

import json

from bkexp.cli import main as bkexp_main


def test_doctor_lists_every_op_with_the_backend_auto_picks(capsys) -> None:
    assert bkexp_main(["doctor"]) == 0
    info = json.loads(capsys.readouterr().out)
    ops = info["backends"]["cpu"]
    assert {"bk_core", "selective_scan", "causal_conv1d", "rms_norm", "rotary"} <= set(ops)
    for name, entry in ops.items():
        assert "error" not in entry, (name, entry)
        assert entry["auto"] in entry["available"], (name, entry)
    assert info["env"]["cpu_allocator"] in {"keep", "system", "user", "unsupported"}


def test_doctor_measures_what_a_parallel_region_costs(capsys) -> None:
    assert bkexp_main(["doctor"]) == 0
    cost = json.loads(capsys.readouterr().out)["cpu_parallel_region"]
    assert cost["threads"] >= 1 and cost["add_65536_us"] > 0 and cost["add_65536_one_thread_us"] > 0
