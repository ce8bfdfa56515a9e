"""Read back what W&B wrote offline: the history rows of `run-*.wandb` transaction logs.

W&B (0.31) no longer ships a reader for its own offline files, and the tests (and anyone
checking an offline run before `wandb sync`) need one. The format, confirmed on real files:

* a 7-byte file header: b":W&B", magic 0xBEE1 (little-endian u16), version byte 0;
* then LevelDB's log framing: the file is cut into 32 KiB blocks and a record is split into
  chunks that never cross a block boundary, so a reader can resynchronise at any block after
  a torn write. Each chunk has a 7-byte header: checksum (u32 LE), length (u16 LE),
  type (FULL=1, or FIRST=2 / MIDDLE=3 / LAST=4 for a record spread over several chunks).
  A block tail shorter than a chunk header is zero padding. Unlike LevelDB, W&B's checksum
  is the plain (unmasked) IEEE CRC-32 of the type byte and the data, so `zlib.crc32` checks it;
* each reassembled record is one serialized protobuf `wandb.proto.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_IDENT, _MAGIC, _VERSIONS = b":W&B", 0xBEE1, (0,)
_CHUNK_HEADER = struct.Struct("<IHB")  # checksum, length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_run_files(run_dir: str | Path) -> list[Path]:
    """Every `run-*.wandb` under `run_dir`, oldest first (a resumed run adds one per session).

    Resolved and deduplicated: W&B also links `wandb/latest-run` to the newest run folder.
    """
    files = {p.resolve() for p in Path(run_dir).rglob("run-*.wandb")}
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p))


def iter_record_bytes(path: str | Path) -> Iterator[bytes]:
    """The serialized records of one file, reassembled from their chunks.

    A torn tail (a killed writer) ends the iteration quietly; a bad checksum elsewhere
    raises, because it means corruption rather than an interrupted append.
    """
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        return
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{path}: not a W&B transaction log")
    if version not in _VERSIONS:
        raise ValueError(f"{path}: unknown W&B log version {version}")
    pos, pending = _FILE_HEADER.size, bytearray()
    while pos + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # zero trailer: the next chunk starts a block
            pos += left_in_block
            continue
        checksum, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start, pos = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if kind == 0 or pos > len(data):  # preallocated zeros or a half-written chunk
            return
        chunk = data[start:pos]
        if zlib.crc32(bytes([kind]) + chunk) != checksum:
            if pos + _CHUNK_HEADER.size > len(data):
                return  # the last chunk, torn mid-write
            raise ValueError(f"{path}: checksum mismatch at byte {start - _CHUNK_HEADER.size}")
        if kind in (_FULL, _FIRST):
            pending = bytearray(chunk)
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            yield bytes(pending)


def iter_records(path: str | Path) -> Iterator[Any]:
    """The records of one file as `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2  # W&B's own schema, so fields stay in step

    for raw in iter_record_bytes(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def is_complete(path: str | Path) -> bool:
    """Whether the file ends with the run's exit record, i.e. W&B has finished writing it.

    `run.finish()` in 0.31 offline mode can return before wandb-core has written the last
    rows and the exit record (seen in about 1 run in 15 under load).
    """
    from wandb.proto import wandb_internal_pb2

    last = None
    try:
        for last in iter_record_bytes(path):  # noqa: B007 - only the last one matters
            pass
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return False
    if last is None:
        return False
    record = wandb_internal_pb2.Record()
    record.ParseFromString(last)
    return record.WhichOneof("record_type") == "exit"


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The logged history rows (`_step`, `_timestamp`, `_runtime` and the user's keys).

    `path` is one `.wandb` file, or a directory whose run files are read oldest first.
    Values are JSON-decoded; a nested key (a dict that was logged) is joined with ".".
    """
    files = find_run_files(path) if Path(path).is_dir() else [Path(path)]
    rows = []
    for file in files:
        for record in iter_records(file):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {}
            for item in record.history.item:
                key = item.key or ".".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
