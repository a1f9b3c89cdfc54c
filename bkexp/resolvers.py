"""``${bkexp.dirname:...}``, the sweep-job directory resolver of conf/hydra, and the two a resumed sweep uses
(``bkexp.train.resume``): ``${bkexp.resume_job_dir:...}`` and ``${bkexp.resume_output_subdir:...}``. Registered on
import (by ``bkexp.train`` and ``bkexp.rundir``). The config tree's other resolver, ``${bkexp.flags_ablation:}``,
is the technique registry's (``bkexp.techniques``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

MAX_DIRNAME = 120


def short_dirname(override_dirname: str, max_len: int = MAX_DIRNAME) -> str:
    """A sweep job's directory name: its overrides, cut to ``max_len`` with a hash of the whole when longer.

    File systems refuse names over 255 bytes, and a sweep with many fixed overrides easily exceeds that; the
    hash keeps cut names unique, and the full overrides are always in the job's .hydra/overrides.yaml.
    """
    name = override_dirname.replace("/", "-") or "default"
    if len(name) <= max_len:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: max_len - 9]}-{digest}"


def _override_key(override: str) -> str:
    return str(override).partition("=")[0].lstrip("+~")


def resume_job_dir(sweep_dir: str, num: Any, override_dirname: str, task: Any, changed: str) -> str:
    """A resumed sweep's job directory: the earlier job of ``sweep_dir`` whose overrides equal this job's ``task``
    overrides apart from the keys the resume command sets (``changed``, space-separated), so that a resume that
    changes e.g. ``trainer.max_steps`` (part of every job's name) continues the jobs in their own directories.
    Without exactly one such job (the resume added a sweep value), the job gets the usual new name."""
    import yaml

    ignored = set(changed.split())

    def identity(overrides: Any) -> frozenset[str]:
        return frozenset(str(o) for o in overrides if _override_key(str(o)) not in ignored)

    mine = identity(task)
    matches = []
    for job in sorted(Path(sweep_dir).iterdir()) if Path(sweep_dir).is_dir() else []:
        recorded = job / ".hydra" / "overrides.yaml"
        if recorded.is_file() and identity(yaml.safe_load(recorded.read_text()) or []) == mine:
            matches.append(job.name)
    return matches[0] if len(matches) == 1 else f"{num}_{short_dirname(override_dirname)}"


def resume_output_subdir(output_dir: str) -> str | None:
    """A resumed sweep's ``hydra.output_subdir``: None (write nothing) for a job that has its ``.hydra/`` already, which
    stays the record of how it was launched, as a resumed run's does; ``.hydra`` for a job that never started."""
    return None if (Path(output_dir) / ".hydra" / "config.yaml").is_file() else ".hydra"


def register() -> None:
    if not OmegaConf.has_resolver("bkexp.dirname"):
        OmegaConf.register_new_resolver("bkexp.dirname", short_dirname)
    if not OmegaConf.has_resolver("bkexp.resume_job_dir"):
        OmegaConf.register_new_resolver("bkexp.resume_job_dir", resume_job_dir)
    if not OmegaConf.has_resolver("bkexp.resume_output_subdir"):
        OmegaConf.register_new_resolver("bkexp.resume_output_subdir", resume_output_subdir)


register()
