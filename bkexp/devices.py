"""The torch device a command runs on: ``--device`` values resolved and checked before anything is loaded.

Every command line that takes ``--device`` (``bkexp eval``, ``eval-quant``, ``generate``, the benchmarks) and the
lm-eval model resolve it here, so ``auto`` means the same everywhere and a device this machine lacks is a usage
error naming the devices it has, instead of a traceback from deep inside the first ``.to(device)``.
"""

from __future__ import annotations

import argparse

import torch


def available_devices() -> list[str]:
    """The ``--device`` values this machine accepts: auto, cpu, and each CUDA / MPS device present."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def unavailable(device: torch.device) -> str | None:
    """Why this machine cannot run ``device``, or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__} has no CUDA support" if torch.version.cuda is None \
                else "no CUDA device is visible"
            return f"no CUDA device is available ({build})"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"there are {torch.cuda.device_count()} CUDA device(s)"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else "MPS is not available"
    return f"bkexp runs on cpu, cuda or mps, not {device.type}"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` or None (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``; an unknown name
    or a device this machine lacks is a ValueError naming it and the valid ones."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a torch device; valid: {', '.join(available_devices())}") from None
    why = unavailable(device)
    if why is not None:
        raise ValueError(f"device {str(name)!r}: {why}; valid here: {', '.join(available_devices())}")
    return device


def device_argument(name: str) -> torch.device:
    """:func:`resolve_device` as an argparse ``type``: a bad value is a usage error (exit 2) with the reason."""
    try:
        return resolve_device(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
