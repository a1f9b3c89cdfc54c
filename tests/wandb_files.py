"""Read the records of a W&B offline run file (``run-<id>.wandb``) so tests can check what W&B stored.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by
LevelDB-log framed records (32 KiB blocks; each chunk has a 4-byte checksum, 2-byte length and 1-byte type:
1 full, 2 first, 3 middle, 4 last) whose payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:4]!r})")
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        block_left = BLOCK - (pos % BLOCK)
        if block_left < 7:  # block trailer padding
            pos += block_left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def closed_records(path: Path, timeout: float = 60.0) -> list[Any]:
    """The records of a finished run: W&B's service writes the file after ``finish()`` returns, so wait for the
    closing ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        out = records(path) if Path(path).stat().st_size > HEADER else []
        if any(r.WhichOneof("record_type") == "exit" for r in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def run_info(path: Path) -> dict[str, Any]:
    """Group, name, job type, tags, config, history rows and final summary that an offline W&B run recorded."""
    info: dict[str, Any] = {"group": None, "name": None, "job_type": None, "tags": [], "config": {}, "summary": {},
                            "history": []}
    for record in closed_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info["group"], info["name"] = record.run.run_group, record.run.display_name
            info["job_type"], info["tags"] = record.run.job_type, list(record.run.tags)
            for item in record.run.config.update:
                info["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                info["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            info["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                info["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return info


def flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Nested summary values ({"throughput": {"train_tokens_per_sec": x}}) as W&B shows them: dotted keys."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict) and not value.get("_type"):
            out.update({f"{key}.{k}": v for k, v in flat_summary(value).items()})
        else:
            out[key] = value
    return out
