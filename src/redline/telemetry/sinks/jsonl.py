"""The `jsonl` tracker: the run directory's source of truth, one append-only JSON-lines file
per stream (telemetry/jsonl.py reads them back)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

from redline.errors import writing
from redline.telemetry.sinks import SinkContext

STREAMS = ("metrics", "system", "ranks")  # the streams this sink keeps as files


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; write them as strings so every line stays standard JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlWriter:
    """One JSON object per line, flushed per write so a killed run keeps what it logged."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with writing("log", self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()}, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlSink:
    """metrics.jsonl and system.jsonl in the run directory, one JSON object per record.

    A file is opened on its stream's first record, so a run without system samples
    leaves no empty system.jsonl behind.
    """

    name = "jsonl"

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._writers: dict[str, JsonlWriter] = {}

    def path(self, stream: str) -> Path:
        return self.run_dir / f"{stream}.jsonl"

    def write(self, stream: str, records: list[dict[str, Any]]) -> None:
        if stream not in STREAMS:
            return  # e.g. "samples": the run directory's samples/ folder is their record
        writer = self._writers.get(stream)
        if writer is None:
            writer = self._writers[stream] = JsonlWriter(self.path(stream))
        for record in records:
            writer.write(record)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def from_context(context: SinkContext) -> JsonlSink:
    return JsonlSink(context.run_dir)
