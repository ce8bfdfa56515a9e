"""What a person watching the run sees: a progress bar on a terminal, plain lines otherwise.

A plain line is the console tracker's (telemetry/sinks/console.py: format_record), with the
ETA added.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from redline.telemetry import schema as K
from redline.telemetry.sinks.console import format_record


class Progress:
    """A rich progress bar (samples/s, ETA, loss, MFU, memory) on a terminal; plain lines
    otherwise.

    Driven by Telemetry: `start(step)`, `step(step)` after each optimizer step (a clock
    read; the bar is redrawn at most once a second, on the training thread), `show(record)`
    for each published record, `close()`. rich's own refresh thread is off: a thread drawing
    ten times a second would take the GIL from training between its ops (see
    telemetry/hub.py). The loss, samples/s, MFU and memory shown are the last window's.
    """

    redraw_every_s = 1.0

    def __init__(self, total_steps: int, stream: TextIO | None = None,
                 interactive: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total_steps
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self._bar: Any = None
        self._task: Any = None
        self._start = time.perf_counter()
        self._start_step = 0
        self._next_draw = 0.0

    def start(self, step: int = 0) -> None:
        self._start, self._start_step = time.perf_counter(), step
        if not self.interactive or self._bar is not None:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(file=self.stream), transient=False, auto_refresh=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=step, info="")

    def step(self, step: int) -> None:
        if self._bar is not None:
            now = time.perf_counter()
            if now >= self._next_draw or step >= self.total:
                self._next_draw = now + self.redraw_every_s
                self._bar.update(self._task, completed=step, refresh=True)

    def show(self, record: dict[str, Any]) -> None:
        if self._bar is not None:
            info = []
            if record.get(K.LOSS) is not None:
                info.append(f"loss {record[K.LOSS]:.4g}")
            if record.get(K.SAMPLES_PER_S) is not None:
                info.append(f"{record[K.SAMPLES_PER_S]:.1f} samples/s")
            if record.get(K.MFU) is not None:
                info.append(f"MFU {100 * record[K.MFU]:.1f}%")
                if record.get(K.HFU) is not None:
                    info.append(f"HFU {100 * record[K.HFU]:.1f}%")
            if record.get(K.MEM_PCT) is not None:
                info.append(f"mem {record[K.MEM_PCT]:.0f}%")
            if record.get(K.EMULATED):
                info.append("emulated: no speed-up")
            if info:
                self._bar.update(self._task, info=" | ".join(info))
            else:
                self._bar.console.print(format_record(record))
            return
        line = format_record(record)
        if K.LOSS in record:
            line = f"{line} | {self._eta(record[K.STEP])}"
        print(line, file=self.stream, flush=True)

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0:
            return "ETA ?"
        left = (time.perf_counter() - self._start) / done * (self.total - step)
        return f"ETA {int(left) // 60}:{int(left) % 60:02d}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextlib.contextmanager
def status(prefix: str, stream: TextIO | None = None,
           interactive: bool | None = None) -> Iterator[Callable[[str], None]]:
    """`say(message)` for long set-up work: a spinner line on a terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    if not (stream.isatty() if interactive is None else interactive):
        yield lambda msg: print(f"{prefix}: {msg}", file=stream, flush=True)
        return
    from rich.console import Console

    with Console(file=stream).status(f"{prefix}: starting") as spinner:
        yield lambda msg: spinner.update(f"{prefix}: {msg}")
