"""One environment record for runs, benchmarks and doctor: versions as the libraries report them."""

from __future__ import annotations

import hydra
import lightning
import numpy
import torch

from bkexp.environment import environment, library_version


def test_the_record_holds_what_runs_and_benchmarks_depend_on() -> None:
    env = environment()
    assert env["torch"] == torch.__version__
    assert env["lightning"] == lightning.__version__ and env["hydra"] == hydra.__version__
    assert env["numpy"] == numpy.__version__
    assert env["threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert environment(device="H200")["device"] == "H200"
    assert library_version("bkexp-no-such-distribution") is None  # absent libraries are recorded as None
