"""``bkexp doctor``: versions, devices, and which kernel backends this machine can run (and which auto picks)."""

from __future__ import annotations

import importlib
import json

import torch


def backend_report(device: torch.device) -> dict[str, dict[str, object]]:
    report: dict[str, dict[str, object]] = {}
    for op, module in (("bk_core", "bkexp.ops.bk_core"), ("selective_scan", "bkexp.ops.selective_scan"),
                       ("causal_conv1d", "bkexp.ops.causal_conv1d")):
        try:
            mod = importlib.import_module(module)
            report[op] = {"available": mod.available_backends(device), "auto": mod.resolve_backend("auto", device)}
        except Exception as exc:  # report, do not crash: doctor exists to diagnose broken installs
            report[op] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def main(argv: list[str]) -> int:
    from bkexp.environment import environment

    info = {"env": environment(), "backends": {}}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        info["backends"][str(device)] = backend_report(device)
    print(json.dumps(info, indent=2))
    return 0
