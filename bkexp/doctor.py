"""``bkexp doctor``: versions, devices, which kernel backends this machine can run (and which auto picks), and
what a parallel region costs here."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import statistics
import time

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


def parallel_region_cost(repeat: int = 200) -> dict[str, float | int]:
    """Median µs of one small op that runs as a parallel region (adding two vectors of 65,536 floats into a third:
    above PyTorch's grain size, and ~6 µs of work on one core), on the process's threads and on one thread.
    Where the first is several times the second, the wake-up of sleeping workers dominates small work: fewer
    threads (``threads=1`` for a small model; decoding does it by itself, ``bkexp/threads.py``) or a short spin
    (``GOMP_SPINCOUNT``, docs/kernels.md) pay off. The op's own work must be small: with an ``exp`` (54 µs on one
    core of an AMD EPYC, 9.9 on a Xeon) the probe read 62 against 54 µs there, where adding reads 37 against 6."""
    from bkexp.threads import cpu_threads

    x = torch.randn(1 << 16)
    out = torch.empty_like(x)

    def median_us() -> float:
        for _ in range(10):
            torch.add(x, x, out=out)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            torch.add(x, x, out=out)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    threads = torch.get_num_threads()
    on_all = median_us()
    with cpu_threads(1):
        on_one = median_us()
    return {"threads": threads, "add_65536_us": round(on_all, 1), "add_65536_one_thread_us": round(on_one, 1)}


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="bkexp doctor", description="Print, as JSON: library versions and the machine (what every run records "
        "as `env`), what a parallel region costs on this CPU, and per device which kernel backends each op can run "
        "and which one `auto` picks.")


def main(argv: list[str]) -> int:
    from bkexp.environment import environment

    build_parser().parse_args(argv)

    info = {"env": environment(), "cpu_parallel_region": parallel_region_cost(), "backends": {}}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        info["backends"][str(device)] = backend_report(device)
    print(json.dumps(info, indent=2))
    return 0
