"""One environment record for runs, benchmarks and doctor: versions as the libraries report them."""

from __future__ import annotations

import hydra
import lightning
import numpy
import torch

from bkexp.environment import cpu_model, environment, library_version


def test_the_record_holds_what_runs_and_benchmarks_depend_on() -> None:
    env = environment()
    assert env["torch"] == torch.__version__
    assert env["lightning"] == lightning.__version__ and env["hydra"] == hydra.__version__
    assert env["numpy"] == numpy.__version__
    assert env["threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert environment(device="H200")["device"] == "H200"
    assert library_version("bkexp-no-such-distribution") is None  # absent libraries are recorded as None
    # which CPU, vector ISA and BLAS the numbers were measured on
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["blas"] is not None and f"BLAS_INFO={env['blas']}" in torch.__config__.show()
    assert env["cpu"] and env["cpu_arch"]


def test_the_cpu_is_named_by_its_model_and_by_platform_where_no_cpuinfo_names_it(tmp_path) -> None:
    import platform

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9454 48-Core Processor\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9454 48-Core Processor\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 9454 48-Core Processor"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert cpu_model(cpuinfo) == (platform.processor() or platform.machine())
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())


def _record_in_child(**env: str) -> dict:
    """The environment record of a fresh process that imports bkexp before torch, as train.py does."""
    import json
    import os
    import subprocess
    import sys

    child_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import bkexp, json; from bkexp.environment import environment; print(json.dumps(environment()))"
    done = subprocess.run([sys.executable, "-c", code], env={**child_env, **env}, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_the_record_says_how_openmp_workers_wait_and_how_busy_the_machine_was() -> None:
    """bkexp's default (PASSIVE, no spin count) and a user's own settings, which bkexp leaves as they are."""
    default = _record_in_child()
    assert default["omp_wait_policy"] == "PASSIVE" and default["gomp_spincount"] is None
    assert isinstance(default["load_average_1m"], float) and default["load_average_1m"] >= 0
    own = _record_in_child(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="10000")
    assert own["omp_wait_policy"] == "ACTIVE" and own["gomp_spincount"] == "10000"
