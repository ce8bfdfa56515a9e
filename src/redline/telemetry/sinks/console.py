"""The `console` tracker: one plain line per logging window."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from redline.telemetry.console import format_record
from redline.telemetry.sinks import SinkContext


class ConsoleSink:
    """Prints `format_record(record)` for each metrics record; hardware samples are not shown
    (they would drown the loss lines; they are in system.jsonl and the other trackers)."""

    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, stream: str, records: list[dict[str, Any]]) -> None:
        if stream != "metrics" or not records:
            return
        out = self._stream or sys.stderr  # looked up late so pytest's capture sees it
        print("\n".join(format_record(r) for r in records), file=out, flush=True)

    def close(self) -> None:
        pass


def from_context(context: SinkContext) -> ConsoleSink:
    return ConsoleSink()
