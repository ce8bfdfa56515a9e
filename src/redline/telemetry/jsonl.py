"""The run directory's JSON-lines files read back (`read_jsonl`, `truncate_after`), and its
event log, events.jsonl (`EventLog`). The metrics and system files are written by the
`jsonl` tracker (telemetry/sinks/jsonl.py), whose `JsonlWriter` the event log is."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from redline.files import atomic_write_text
from redline.telemetry.sinks.jsonl import JsonlWriter


class EventLog(JsonlWriter):
    """events.jsonl: decisions and incidents (resume, checkpoint, anomaly, interrupt).

    `announces`: whoever records an event here also says it on stderr (rank 0 only)."""

    announces = True

    def __enter__(self) -> EventLog:
        return self

    def event(self, kind: str, **fields: Any) -> None:
        """Record one event; a log that cannot be written (a full disk) says so once and
        stops, since it must never be why a run, or its failure handling, dies."""
        try:
            self.write({"time": round(time.time(), 3), "event": kind, **fields})
        except OSError as e:
            print(f"redline: cannot write {self.path}: {e.strerror or e}; events are no "
                  "longer recorded", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                self.close()
            self._file = None


class SilentEventLog(EventLog):
    """The event log of a rank other than 0 under torchrun: rank 0 writes the run's, and
    says what it records."""

    announces = False

    def __init__(self) -> None:
        self.path = Path(os.devnull)
        self._file = None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file (a torn last line from a kill is ignored)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_after(path: str | Path, step: int) -> int:
    """Drop the records of `path` whose "step" is past `step` (a torn line too), atomically.

    A run resumed from its checkpoint at `step` writes the steps after it again; without
    this, those of the attempt that died after the checkpoint would appear twice. Returns
    how many records were dropped; a file that does not exist is left alone.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) \
                    and record["step"] > step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept), "metrics")
    return dropped
