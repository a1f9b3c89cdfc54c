"""``${bkexp.dirname:...}``, the sweep-job directory resolver of conf/hydra; registered on import (by ``bkexp.train``
and ``bkexp.rundir``). The config tree's other resolver, ``${bkexp.flags_ablation:}``, is the technique registry's
(``bkexp.techniques``)."""

from __future__ import annotations

import hashlib

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


def register() -> None:
    if not OmegaConf.has_resolver("bkexp.dirname"):
        OmegaConf.register_new_resolver("bkexp.dirname", short_dirname)


register()
