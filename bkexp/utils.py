"""Small helpers shared by every layer (no torch import): atomic file writes and dict flattening.

The writers are re-exported by :mod:`bkexp.rundir`, where commands above training find them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


FILE_MODE = 0o644  # results are meant to be shared (mkstemp would leave 0600)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write via a temporary file in the same directory and os.replace, so readers never see half a file.

    The one writer behind every result file bkexp writes (text, JSON, PNG): mode 0644, fsynced, and no
    temporary file is left behind when writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, written atomically (newlines as given)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int = 2, **dumps_kwargs: Any) -> Path:
    """``json.dumps(value)`` plus a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(value, indent=indent, **dumps_kwargs) + "\n")


def atomic_save_figure(fig: Any, path: str | os.PathLike, *, format: str = "png", **savefig_kwargs: Any) -> Path:
    """Render a matplotlib figure in memory (Agg, no display needed) and write it atomically."""
    import io

    from matplotlib.backend_bases import FigureCanvasBase
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if type(fig.canvas) is FigureCanvasBase:  # a bare Figure(): give it a renderer without pyplot
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=format, **savefig_kwargs)
    return atomic_write_bytes(path, buffer.getvalue())


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
