"""The telemetry writer process: every sink and the hardware sampler, off the training process.

The hub (hub.py, which explains why this is a process) starts it as
`python -m redline.telemetry.writer SPEC`, a fresh interpreter that imports neither torch
nor the user's script (multiprocessing's spawn would re-import the parent's __main__: an
unguarded training script would run twice). SPEC is JSON: {"trackers", "run_dir",
"run_name", "resume_id", "options" (the SinkContext every sink is made from), "sampler"
(null, or {"kind", "index", "uuid", "pid", "every_s", "slow_every_s"})}. A tracker named
`package.module:Class` or `file.py:Class` is imported here (sinks/__init__.py).

Protocol, one JSON value per line. In, on stdin: `["metrics" | "system", record]`, then
`{"flush": n}` (answered once everything before it is written) and `null` (stop). Out, on
stdout: {"ready": {sink: run_id}}, {"failed": [sink, why]}, {"note": text},
{"flushed": n}, {"closed": true}. Stdout carries only the protocol: anything a library
prints goes to stderr, where the console tracker writes too.

Three threads: one reads stdin into a queue as fast as the parent writes (so the
parent's non-blocking pipe never fills while a sink is slow, e.g. W&B online), the
sampler adds its records to the same queue, and the main thread writes the queue to the
sinks in batches: everything queued at once goes to each sink as one call per stream.
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
from redline.telemetry.sinks import BUILTIN_SINKS, Sink, SinkContext, make_sink

Say = Callable[[dict[str, Any]], None]


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


def _make(spec: dict[str, Any], say: Say) -> list[Sink]:
    context = SinkContext(Path(spec["run_dir"]), spec.get("run_name"), spec.get("resume_id"),
                          spec.get("options") or {})
    sinks: list[Sink] = []
    for name in spec["trackers"]:
        try:
            sinks.append(make_sink(name, context))
        except Exception as e:  # cannot start: reported once, the others go on
            _failed(name, e, say)
    return sinks


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
          make: Callable[[dict[str, Any], Say], list[Sink]] = _make) -> None:
    """Run the writer until `null` or end of input; then close every sink."""
    say = _sayer(outbox)
    sinks = make(spec, say)
    say({"ready": {s.name: getattr(s, "run_id", None) for s in sinks}})
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        for line in inbox:
            item = json.loads(line)
            items.put(item)
            if item is None:
                return
        items.put(None)  # end of input: the parent is gone; write what came and stop

    threading.Thread(target=read, name="redline-writer-stdin", daemon=True).start()
    sampler = _sampler(spec.get("sampler"), items)
    notes_sent = 0
    stopping = False
    while not stopping:
        batch = [items.get()]
        while not items.empty():  # everything that is already here: one write per stream
            batch.append(items.get())
        pending: dict[str, list[dict[str, Any]]] = {}
        for item in batch:
            if isinstance(item, list):
                pending.setdefault(item[0], []).append(item[1])
                continue
            for stream, records in pending.items():  # in order, before a flush or stop
                _write(sinks, stream, records, say)
            pending = {}
            if item is None:
                stopping = True
                break
            say({"flushed": item["flush"]})
        for stream, records in pending.items():
            _write(sinks, stream, records, say)
        if sampler is not None:
            for note in sampler.notes[notes_sent:]:
                say({"note": note})
            notes_sent = len(sampler.notes)
    if sampler is not None:
        sampler.stop()  # its last sample is queued: write it
        last: list[dict[str, Any]] = []
        while not items.empty():
            item = items.get()
            if isinstance(item, list) and item[0] == "system":
                last.append(item[1])
        if last:
            _write(sinks, "system", last, say)
        for note in sampler.notes[notes_sent:]:
            say({"note": note})
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:
            _failed(sink.name, e, say)
    say({"closed": True})


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
