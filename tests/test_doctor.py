"""``bkexp doctor``: the environment record and, for every op package, the backends this machine can run; the
help of ``bkexp doctor`` and ``bkexp bench``."""

from __future__ import annotations

import json

import pytest

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


def test_doctor_help_and_bad_arguments_run_no_probe(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        bkexp_main(["doctor", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bkexp doctor") and '"env"' not in out
    with pytest.raises(SystemExit) as done:
        bkexp_main(["doctor", "--json-out", "x"])
    assert done.value.code == 2 and "unrecognized arguments: --json-out x" in capsys.readouterr().err


def test_bench_help_names_every_benchmark_with_a_line_on_what_it_measures(capsys) -> None:
    import importlib

    from bkexp.bench import BENCHMARKS

    assert bkexp_main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name, (module, help_) in BENCHMARKS.items():
        assert f"  {name:<11} {help_}" in out
        assert callable(importlib.import_module(module).main), module
    assert bkexp_main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'; valid: bk-core, mamba" in capsys.readouterr().err
