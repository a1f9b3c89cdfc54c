"""What a run's or a benchmark's numbers depend on: library versions, device, CPU, threads, host and git commit.

One record for ``summary.json`` (``env``), every ``bkexp bench`` result and ``bkexp doctor``. Library versions
are read from the installed distributions' metadata, so recording them imports nothing (mamba_ssm's CUDA
extension, triton) that the run itself does not use.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from bkexp.allocator import cpu_allocator_state

# key in the record -> distribution name
LIBRARIES = {"lightning": "lightning", "hydra": "hydra-core", "numpy": "numpy", "numba": "numba", "triton": "triton",
             "mamba_ssm": "mamba-ssm"}


def git_commit(cwd: Path | None = None) -> str | None:
    """The current commit (with ``-dirty`` when the tree has changes), or None outside a git checkout.

    Outside a checkout (a Docker image is built without .git) the commit the image was built from is read
    from ``BKEXP_GIT_COMMIT`` (the Dockerfile's GIT_COMMIT build argument).
    """
    cwd = cwd or Path(__file__).resolve().parent
    baked = os.environ.get("BKEXP_GIT_COMMIT") or None
    baked = None if baked == "unknown" else baked
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return baked
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return baked


def library_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's name (Linux: ``model name`` in /proc/cpuinfo), else what ``platform`` knows.

    CPU results depend on it more than on anything else in the record: the same code measured the MoE at about
    1.15x its dense reference on a 2-core AMD EPYC and 1.34-1.39x on a 2-core Xeon, where the dense MLP itself
    took about half the time (``docs/benchmarks.md``).
    """
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_library() -> str | None:
    """The BLAS that torch's CPU matmuls call (``BLAS_INFO`` of its build: mkl, openblas, ...)."""
    import torch
    found = re.search(r"\bBLAS_INFO=([^,\s]+)", torch.__config__.show())
    return found.group(1) if found else None


def environment(device: str | None = None) -> dict[str, Any]:
    """Library versions (None: not installed), device, the CPU (model, vector ISA, BLAS), threads, the CPU runtime
    settings and load, host and git commit."""
    import torch  # here, not at the top: ``bkexp report`` reads records with ``machine_label`` without torch

    if device is None:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{key: library_version(dist) for key, dist in LIBRARIES.items()},
        "device": device,
        "cpu": cpu_model(),
        "cpu_arch": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA torch's kernels run (AVX512, ...)
        "blas": blas_library(),
        "threads": torch.get_num_threads(),
        "cpu_allocator": cpu_allocator_state(),  # bkexp.allocator.configure_cpu_allocator's setting (None: untouched)
        # How long idle OpenMP workers spin before they sleep (read when torch loads; see bkexp/__init__.py):
        # CPU step times differ by 3-70% between settings, depending on what else the machine runs.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work on the machine
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "hostname": platform.node(),
        "git_commit": git_commit(),
    }


def machine_label(env: Any) -> str | None:
    """Where a run's or a benchmark's speed and memory were measured, from its record: the accelerator by name, or
    the CPU by name and core count (None for a record without a device)."""
    if not isinstance(env, Mapping) or not env.get("device"):
        return None
    if env["device"] != "cpu":
        return str(env["device"])
    details = [str(env["cpu"])] if env.get("cpu") else []
    if isinstance(env.get("cpu_count"), int):
        details.append(f"{env['cpu_count']} cores")
    return f"cpu ({', '.join(details)})" if details else "cpu"


def describe_machine(env: Mapping[str, Any]) -> str:
    """One line for a results table: the machine, torch's vector ISA and BLAS, torch, threads and commit."""
    parts = [machine_label(env) or "unknown machine"]
    parts += [f"{key} {env[key]}" for key in ("cpu_capability", "blas") if env.get(key)]
    parts += [f"torch {env['torch']}"] if env.get("torch") else []
    parts += [f"{env['threads']} threads"] if env.get("threads") else []
    parts += [f"commit {str(env['git_commit'])[:12]}"] if env.get("git_commit") else []
    return "; ".join(parts)
