"""Small helpers shared by training and reporting (no torch import): atomic writes and dict flattening."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and os.replace, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}. Lists become JSON text so every value is a CSV-able scalar."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping):  # an empty mapping (a failed run's metrics: {}) adds no column
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{sep}{key}" if prefix else str(key), sep))
    elif isinstance(tree, (list, tuple)):
        out[prefix] = json.dumps(tree, default=str)
    else:
        out[prefix] = tree
    return out
