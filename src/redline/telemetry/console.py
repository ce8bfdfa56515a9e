"""What a person watching the run sees: a progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from redline.events import Callback, State


def format_record(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, fmt in (("loss", "loss {:.4g}"), ("samples_per_s", "{:.1f} samples/s"),
                     ("step_time_s", "{:.3f} s/step"), ("lr", "lr {:.3g}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    parts += [f"{k} {v:.4g}" for k, v in record.items()
              if k.startswith("eval/") and isinstance(v, float) and k != "eval/time_s"]
    return " | ".join(parts)


class Progress(Callback):
    """A rich progress bar (samples/s, ETA, loss, MFU, memory) on a terminal; plain lines
    otherwise.

    A callback: a clock read per step, and the bar redrawn at most once a second, on
    the training thread. rich's own refresh thread is off: a thread drawing ten times a
    second would take the GIL from training between its ops (see telemetry/hub.py). The
    loss, samples/s, MFU and memory shown are the last window's, given to `log_metrics`
    as the window closes.
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

    def on_fit_start(self, state: State) -> None:
        self._start, self._start_step = time.perf_counter(), state.step
        if not self.interactive:
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
        self._task = self._bar.add_task("train", total=self.total, completed=state.step,
                                        info="")

    def on_step_end(self, state: State, loss: Any) -> None:
        if self._bar is not None:
            now = time.perf_counter()
            if now >= self._next_draw or state.step >= self.total:
                self._next_draw = now + self.redraw_every_s
                self._bar.update(self._task, completed=state.step, refresh=True)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self._bar is not None:
            info = []
            if record.get("loss") is not None:
                info.append(f"loss {record['loss']:.4g}")
            if record.get("samples_per_s") is not None:
                info.append(f"{record['samples_per_s']:.1f} samples/s")
            if record.get("mfu") is not None:
                info.append(f"MFU {100 * record['mfu']:.1f}%")
            if record.get("mem_pct") is not None:
                info.append(f"mem {record['mem_pct']:.0f}%")
            if info:
                self._bar.update(self._task, info=" | ".join(info))
            else:
                self._bar.console.print(format_record(record))
            return
        line = format_record(record)
        if "loss" in record:
            line = f"{line} | {self._eta(record['step'])}"
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

    def on_fit_end(self, state: State) -> None:
        self.close()


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
