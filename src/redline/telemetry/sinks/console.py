"""The `console` tracker: one plain line per logging window (`format_record`; the progress
display, telemetry/progress.py, prints the same line when not on a terminal)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from redline.telemetry import schema as K
from redline.telemetry.sinks import SinkContext


def format_record(record: dict[str, Any]) -> str:
    """A metrics record as one line: step, loss, speed, lr, evaluation metrics."""
    parts = [f"step {record[K.STEP]}"]
    for key, fmt in ((K.LOSS, "loss {:.4g}"), (K.SAMPLES_PER_S, "{:.1f} samples/s"),
                     (K.STEP_TIME, "{:.3f} s/step"), (K.LR, "lr {:.3g}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    parts += [f"{k} {v:.4g}" for k, v in record.items()
              if K.is_eval(k) and isinstance(v, float) and k != K.EVAL_TIME]
    if record.get(K.EMULATED):
        parts.append("emulated precision: no speed-up")
    return " | ".join(parts)


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
