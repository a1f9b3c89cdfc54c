"""``--device``: one resolution for every command; a device this machine lacks is a usage error naming the valid ones,
raised while parsing the command line, before any run, model or data is loaded."""

from __future__ import annotations

import pytest
import torch

from bkexp.cli import main as bkexp_main
from bkexp.devices import available_devices, resolve_device

HAS_CUDA = torch.cuda.is_available()


def test_auto_and_cpu_resolve_to_what_the_machine_has() -> None:
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert available_devices()[:2] == ["auto", "cpu"] and ("cuda" in available_devices()) == HAS_CUDA


def test_unknown_or_missing_devices_are_refused_with_the_valid_ones() -> None:
    valid = ", ".join(available_devices())
    with pytest.raises(ValueError, match=rf"device 'gpu0' is not a torch device; valid: {valid}$"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match=r"device 'cuda:99': .*; valid here: auto, cpu"):
        resolve_device("cuda:99")
    with pytest.raises(ValueError, match=r"bkexp runs on cpu, cuda or mps, not meta"):
        resolve_device("meta")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_says_why() -> None:
    with pytest.raises(ValueError, match=rf"device 'cuda': no CUDA device is available \(.*\); valid here: auto, cpu$"):
        resolve_device("cuda")


@pytest.mark.parametrize("command", [
    ["eval", "no/such/run"], ["eval-quant", "no/such/run"], ["generate", "no/such/run", "--prompt", "the"],
    ["bench", "train-step"], ["bench", "decode"], ["bench", "mamba"], ["bench", "quant"],
])
def test_every_command_refuses_a_missing_device_before_doing_anything(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as done:
        bkexp_main([*command, "--device", "cuda:99"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --device: device 'cuda:99': " in err and "valid here: auto, cpu" in err
    assert "no/such/run" not in err  # refused while parsing, before the run directory is looked at
