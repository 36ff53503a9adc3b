"""Read what W&B wrote offline: the records of a run's ``.wandb`` file (config, summary, run id).

wandb 0.31 no longer ships a Python reader for the file (its datastore moved into the Go core), so
this is one: a 7-byte header (``:W&B``, magic, version), then LevelDB's log format (32 KiB blocks
of records, each with a checksum, a length, and a full/first/middle/last type) around
``wandb_internal_pb2.Record`` protobufs, which wandb still ships."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

BLOCK, HEADER = 32768, 7


def records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's zero-filled tail
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
        elif kind == 0:  # padding
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0


def read_run(run_dir: Path) -> dict[str, Any]:
    """``{"id": ..., "config": {...}, "summary": {...}}`` of an offline run folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("*.wandb")
    out: dict[str, Any] = {"id": None, "config": {}, "summary": {}}
    for data in records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            for item in record.run.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
