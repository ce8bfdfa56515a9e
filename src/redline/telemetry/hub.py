"""The telemetry hub: the training thread appends, a writer thread talks to the sinks.

Nothing a sink does (a file write, a W&B call, a TensorBoard flush) runs on the training
thread. `publish` appends one record to a deque (an atomic C call, no lock) and, at a
window boundary, wakes the writer; the writer drains the deque, groups records by stream
("metrics", "system") and hands each sink one batch per stream. A sink that raises is
reported once (stderr and events.jsonl), disabled, and training goes on.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

STREAMS = ("metrics", "system")


def report_sink_failure(name: str, why: str) -> None:
    """The one sentence a failed sink gets on stderr (once: the sink is then disabled)."""
    print(f"redline: telemetry sink {name!r} failed and is disabled ({why})",
          file=sys.stderr, flush=True)


class Sink(Protocol):
    """Where telemetry goes. `write` runs on the hub's writer thread, never on training's."""

    name: str

    def write(self, stream: str, records: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class Hub:
    """Queue and writer thread between the training loop and the sinks."""

    def __init__(self, sinks: list[Sink], *, flush_every_s: float = 1.0,
                 on_sink_failure: Callable[[str, str], None] | None = None) -> None:
        self.sinks = list(sinks)
        self.failed: dict[str, str] = {}
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._flush_every_s = flush_every_s
        self._on_failure = on_sink_failure or report_sink_failure
        self._idle = threading.Condition()
        self._requested = 0  # flush tickets handed out
        self._done = 0  # tickets whose records have been written
        self._thread = threading.Thread(target=self._run, name="redline-telemetry", daemon=True)
        self._thread.start()

    def publish(self, stream: str, record: dict[str, Any], *, wake: bool = False) -> None:
        """Append a record (any thread). `wake` asks the writer to write now."""
        self._queue.append((stream, record))
        if wake:
            self._wake.set()

    def flush(self, timeout: float = 30.0) -> None:
        """Block until everything published so far has reached the sinks."""
        with self._idle:
            self._requested += 1
            ticket = self._requested
        self._wake.set()
        with self._idle:
            self._idle.wait_for(lambda: self._done >= ticket or not self._thread.is_alive(),
                                timeout=timeout)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=60)
        for sink in self.sinks:
            self._guard(sink, sink.close)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_every_s)
            self._wake.clear()
            with self._idle:
                ticket = self._requested  # everything published before this is queued
            self._drain()
            with self._idle:
                self._done = ticket
                self._idle.notify_all()
            if self._stop:
                self._drain()
                return

    def _drain(self) -> None:
        batches: dict[str, list[dict[str, Any]]] = {}
        while self._queue:
            stream, record = self._queue.popleft()
            batches.setdefault(stream, []).append(record)
        for stream, records in batches.items():
            for sink in self.sinks:
                if sink.name not in self.failed:
                    self._guard(sink, lambda s=sink, st=stream, r=records: s.write(st, r))

    def _guard(self, sink: Sink, call: Callable[[], None]) -> None:
        if sink.name in self.failed:
            return
        try:
            call()
        except Exception as e:  # a broken sink must never stop training
            reason = f"{type(e).__name__}: {e}"
            self.failed[sink.name] = reason
            self._on_failure(sink.name, reason)
