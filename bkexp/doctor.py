"""``bkexp doctor``: versions, devices, and which kernel backends this machine can run (and which auto picks)."""

from __future__ import annotations

import importlib
import json
import pkgutil

import torch


def backend_report(device: torch.device) -> dict[str, dict[str, object]]:
    """Every op package under ``bkexp.ops`` (the ones that choose among backends): what can run on ``device``
    and what ``auto`` picks. Found by walking the package, so a new op is listed without touching this file."""
    import bkexp.ops

    report: dict[str, dict[str, object]] = {}
    for info in pkgutil.iter_modules(bkexp.ops.__path__):
        if not info.ispkg:
            continue
        try:
            mod = importlib.import_module(f"bkexp.ops.{info.name}")
            if not hasattr(mod, "resolve_backend"):
                continue
            report[info.name] = {"available": mod.available_backends(device),
                                 "auto": mod.resolve_backend("auto", device)}
        except Exception as exc:  # report, do not crash: doctor exists to diagnose broken installs
            report[info.name] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def main(argv: list[str]) -> int:
    from bkexp.environment import environment

    info = {"env": environment(), "backends": {}}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        info["backends"][str(device)] = backend_report(device)
    print(json.dumps(info, indent=2))
    return 0
