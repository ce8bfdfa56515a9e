"""The telemetry writer process: every sink and the hardware sampler, off the training process.

The hub (hub.py, which explains why this is a process) starts it as
`python -m redline.telemetry.writer SPEC`, a fresh interpreter that imports neither torch
nor the user's script (multiprocessing's spawn would re-import the parent's __main__: an
unguarded training script would run twice). SPEC is JSON: {"trackers", "run_dir",
"run_name", "run_id", "start_step", "options" (the SinkContext every sink is made from),
"sampler"
(null, or {"kind", "index", "uuid", "pid", "every_s", "slow_every_s"})}. A tracker named
`package.module:Class` or `file.py:Class` is imported here (sinks/__init__.py).

Protocol, one JSON value per line. In, on stdin: `["metrics" | "system", record]`, then
`{"flush": n}` (answered once everything before it is written) and `null` (stop). Out, on
stdout: {"ready": {sink: run_id}} (the sinks made at once), {"started": {sink: run_id}}
(one made later), {"failed": [sink, why]}, {"note": text},
{"flushed": n}, {"closed": true}. Stdout carries only the protocol: anything a library
prints goes to stderr, where the console tracker writes too.

Four threads: one reads stdin into a queue as fast as the parent writes (so the
parent's non-blocking pipe never fills while a sink is slow, e.g. W&B online), one makes
the slow sinks (TensorBoard, W&B, yours) while the JSONL and console sinks already write,
the sampler adds its records to the same queue, and the main thread writes the queue to
the sinks in batches: everything queued at once goes to each sink as one call per stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from redline.telemetry.sampler import Sampler
from redline.telemetry.sinks import BUILTIN_SINKS, LOCAL_SINKS, Sink, SinkContext, make_sink

Say = Callable[[dict[str, Any]], None]
LATE_SINK_WAIT_S = 60.0  # after training ends, how long a still-starting tracker may take


@dataclass
class _Device:
    """The training device as the sampler needs it (the writer has no torch to ask)."""

    kind: str
    index: int | None

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def _sayer(outbox: IO[str]) -> Say:
    lock = threading.Lock()

    def say(message: dict[str, Any]) -> None:
        with lock, contextlib.suppress(BrokenPipeError, ValueError):  # the parent is gone
            outbox.write(json.dumps(message) + "\n")
            outbox.flush()

    return say


def _context(spec: dict[str, Any]) -> SinkContext:
    return SinkContext(Path(spec["run_dir"]), spec.get("run_name"), spec.get("run_id"),
                       spec.get("start_step", 0), spec.get("options") or {})


def _make(names: list[str], context: SinkContext, say: Say) -> list[Sink]:
    sinks: list[Sink] = []
    for name in names:
        try:
            sinks.append(make_sink(name, context))
        except Exception as e:  # cannot start: reported once, the others go on
            _failed(name, e, say)
    return sinks


@dataclass
class _Late:
    """A sink that started after the loop did (None: it could not start)."""

    name: str
    sink: Sink | None


def _make_late(names: list[str], context: SinkContext, say: Say,
               inbox: queue.SimpleQueue[Any]) -> None:
    for name in names:
        made = _make([name], context, say)
        inbox.put(_Late(name, made[0] if made else None))


def _write(sinks: list[Sink], stream: str, records: list[dict[str, Any]], say: Say) -> None:
    for sink in list(sinks):
        try:
            sink.write(stream, records)
        except Exception as e:  # a broken sink is dropped; the others go on
            _failed(sink.name, e, say)
            sinks.remove(sink)


def _failed(name: str, error: Exception, say: Say) -> None:
    """One line through the trainer; a user's own sink also gets its traceback here."""
    if name not in BUILTIN_SINKS:
        traceback.print_exception(error, file=sys.stderr)
    say({"failed": [name, f"{type(error).__name__}: {error}"]})


def _sampler(spec: dict[str, Any] | None, inbox: queue.SimpleQueue[Any]) -> Sampler | None:
    if not spec:
        return None
    return Sampler(_Device(spec["kind"], spec.get("index")),
                   lambda record: inbox.put(["system", record]), every_s=spec["every_s"],
                   slow_every_s=spec.get("slow_every_s", 5 * spec["every_s"]),
                   pid=spec.get("pid"), gpu_uuid=spec.get("uuid")).start()


def serve(spec: dict[str, Any], inbox: IO[str], outbox: IO[str],
          make: Callable[[dict[str, Any], Say], list[Sink]] | None = None) -> None:
    """Run the writer until `null` or end of input; then close every sink.

    The JSONL and console sinks are made before the loop starts; the others (TensorBoard,
    W&B, your own) are made in a thread meanwhile, and each receives everything written so
    far when it is ready: a tracker that takes a minute to connect delays nothing, and
    one that cannot is reported once. `make` (tests) makes all sinks at once instead.
    """
    say = _sayer(outbox)
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    # reading first: the parent's pipe must never fill while sinks start
    threading.Thread(target=_read, args=(inbox, items), name="redline-writer-stdin",
                     daemon=True).start()
    sinks, waiting = _start_sinks(spec, say, items, make)
    say({"ready": {s.name: getattr(s, "run_id", None) for s in sinks}})
    loop = _Loop(say, items, sinks, waiting, _sampler(spec.get("sampler"), items))
    loop.run()
    loop.shutdown()


def _read(inbox: IO[str], items: queue.SimpleQueue[Any]) -> None:
    """Stdin into the queue as fast as the parent writes, up to `null` or end of input."""
    for line in inbox:
        item = json.loads(line)
        items.put(item)
        if item is None:
            return
    items.put(None)  # end of input: the parent is gone; write what came and stop


def _start_sinks(spec: dict[str, Any], say: Say, items: queue.SimpleQueue[Any],
                 make: Callable[[dict[str, Any], Say], list[Sink]] | None,
                 ) -> tuple[list[Sink], int]:
    """The sinks made now, and how many more a thread is making (each arrives as a _Late)."""
    if make is not None:
        return make(spec, say), 0
    context = _context(spec)
    sinks = _make([n for n in spec["trackers"] if n in LOCAL_SINKS], context, say)
    late = [n for n in spec["trackers"] if n not in LOCAL_SINKS]
    if late:
        threading.Thread(target=_make_late, args=(late, context, say, items),
                         name="redline-writer-sinks", daemon=True).start()
    return sinks, len(late)


class _Loop:
    """The main thread's loop: the queue written to the sinks in batches until stopped.

    `history` keeps every record while a late sink is still starting (it is replayed to
    it); `notes_sent` counts the sampler's notes already passed on.
    """

    def __init__(self, say: Say, items: queue.SimpleQueue[Any], sinks: list[Sink],
                 waiting: int, sampler: Sampler | None) -> None:
        self.say, self.items, self.sinks, self.sampler = say, items, sinks, sampler
        self.waiting = waiting
        self.history: list[list[Any]] | None = [] if waiting else None
        self.notes_sent = 0
        self.stopping = False

    def run(self) -> None:
        """Until `null` (or end of input) and every late sink has arrived or timed out."""
        while not self.stopping or self.waiting:
            try:
                first = self.items.get(timeout=LATE_SINK_WAIT_S if self.stopping else None)
            except queue.Empty:  # stopping, and a late sink never came: give up on it
                self.say({"note": f"{self.waiting} tracker(s) did not start in "
                                  f"{LATE_SINK_WAIT_S:g} s after training ended; their "
                                  "records are in metrics.jsonl"})
                return
            batch = [first]
            while not self.items.empty():  # everything that is already here: one write per stream
                batch.append(self.items.get())
            self.handle(batch)
            self.pass_notes()

    def handle(self, batch: list[Any]) -> None:
        """One batch: records grouped per stream, written in order before any control item."""
        pending: dict[str, list[dict[str, Any]]] = {}
        for item in batch:
            if isinstance(item, list):
                pending.setdefault(item[0], []).append(item[1])
                if self.history is not None:
                    self.history.append(item)
                continue
            self.write(pending)
            pending = {}
            if isinstance(item, _Late):
                self.arrived(item)
            elif item is None:
                self.stopping = True
            else:
                self.say({"flushed": item["flush"]})
        self.write(pending)

    def write(self, pending: dict[str, list[dict[str, Any]]]) -> None:
        for stream, records in pending.items():
            _write(self.sinks, stream, records, self.say)

    def arrived(self, late: _Late) -> None:
        """A late sink: it gets the history and joins; the last one ends the history."""
        self.waiting -= 1
        if late.sink is not None:
            _replay(late.sink, self.history or [], self.sinks, self.say)
            self.say({"started": {late.name: getattr(late.sink, "run_id", None)}})
        if not self.waiting:
            self.history = None

    def pass_notes(self) -> None:
        if self.sampler is not None:
            for note in self.sampler.notes[self.notes_sent:]:
                self.say({"note": note})
            self.notes_sent = len(self.sampler.notes)

    def shutdown(self) -> None:
        """Stop the sampler and write its last sample and notes; then close every sink."""
        if self.sampler is not None:
            self.sampler.stop()  # its last sample is queued: write it
            last: list[dict[str, Any]] = []
            while not self.items.empty():
                item = self.items.get()
                if isinstance(item, list) and item[0] == "system":
                    last.append(item[1])
            if last:
                _write(self.sinks, "system", last, self.say)
            self.pass_notes()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                _failed(sink.name, e, self.say)
        self.say({"closed": True})


def _replay(sink: Sink, history: list[list[Any]], sinks: list[Sink], say: Say) -> None:
    """A late sink gets what came before it, stream by stream in order, then joins."""
    joined = [sink]
    for stream, record in history:
        _write(joined, stream, [record], say)
        if not joined:  # it failed on the way: reported, dropped
            return
    sinks.append(sink)


if __name__ == "__main__":
    # The lowest priority: woken by the training process's write, the writer must not
    # preempt it on its CPU (Linux runs a woken task there when it can); it runs on an
    # idle core, or between training's time slices.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(19)
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries that print to stdout must not corrupt the protocol
    sys.stdout = sys.stderr
    serve(json.loads(sys.argv[1]), sys.stdin, protocol)
