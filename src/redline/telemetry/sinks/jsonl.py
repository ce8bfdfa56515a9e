"""The `jsonl` tracker: the run directory's source of truth, one file per stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from redline.telemetry.jsonl import JsonlWriter
from redline.telemetry.sinks import SinkContext

STREAMS = ("metrics", "system", "ranks")  # the streams this sink keeps as files


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
