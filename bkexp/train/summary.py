"""summary.json: the run's record, accumulated during the run and written atomically at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from bkexp.held_out import record_pairs, short_caveat
from bkexp.utils import atomic_write_text


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars to Python numbers; NaN/inf to strings so the JSON stays standard."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def headline(summary: dict[str, Any]) -> str:
    """The run's result in one console line: what was trained, the test numbers, size, speed and time.

    On MQAR it names the chance level (1 / number of value tokens) so the accuracy can be read at a glance; an
    early stop and splits that are the same data (:mod:`bkexp.held_out`) are named at the end.
    """
    metrics = summary.get("metrics") or {}
    data = summary.get("data") or {}
    parts = [f"{summary.get('model')} on {summary.get('dataset')} (seq_len {summary.get('seq_len')}, "
             f"{summary.get('bits')}-bit)"]
    if isinstance(metrics.get("test/acc"), (int, float)):
        vocab = data.get("vocab_size")
        chance = f" (chance {1 / (vocab - vocab // 2):.3f})" if (data.get("source") or {}).get("task") == "mqar" \
            and vocab else ""
        parts.append(f"test answer accuracy {metrics['test/acc']:.3f}{chance}")
    for key, label in (("test/loss", "test loss"), ("test/ppl", "test ppl")):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{label} {metrics[key]:.4g}")
    params = (summary.get("params") or {}).get("total")
    if params:
        parts.append(f"{params / 1e6:.2f}M params")
    tokens_per_s = (summary.get("throughput") or {}).get("train_tokens_per_sec")
    if isinstance(tokens_per_s, (int, float)):
        parts.append(f"{tokens_per_s:,.0f} train tokens/s")
    if isinstance(summary.get("wall_time_s"), (int, float)):
        parts.append(f"{summary['wall_time_s']:.0f} s")
    stopped = summary.get("stopped_early")
    if stopped:
        parts.append(f"stopped early at step {stopped['step']} ({stopped['monitor']}: "
                     f"{stopped['reason'].replace('_', ' ')})")
    overlap = short_caveat(record_pairs(data))
    if overlap:
        parts.append(f"not held out: {overlap}")
    return "[bkexp] " + " | ".join(parts)


class RunRecord:
    """Accumulates the fields of summary.json during a run; ``write()`` persists them atomically."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "summary.json"
        self.data: dict[str, Any] = {"status": "running", "error": None, "traceback": None}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)

    def write(self) -> Path:
        atomic_write_text(self.path, json.dumps(_jsonable(self.data), indent=2, sort_keys=False) + "\n")
        return self.path
