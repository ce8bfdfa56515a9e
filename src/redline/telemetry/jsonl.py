"""Append-only JSON-lines files: the run directory's source of truth."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any


def _clean(value: Any) -> Any:
    # JSON has no NaN/Infinity; write them as strings so every line stays standard JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlWriter:
    """One JSON object per line, flushed per write so a killed run keeps what it logged."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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


class EventLog(JsonlWriter):
    """events.jsonl: decisions and incidents (resume, checkpoint, anomaly, interrupt)."""

    def event(self, kind: str, **fields: Any) -> None:
        self.write({"time": round(time.time(), 3), "event": kind, **fields})


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
