"""The telemetry hub: the training process's end of a pipe to the telemetry writer process.

Why a process, not a writer thread. torch releases the GIL around its ops, so any Python
thread in the training process takes the GIL between two of the training thread's ops,
and the training thread then waits to get it back: for as long as that thread runs
Python, up to `sys.getswitchinterval()` (5 ms) at a time. Measured with
bench/overhead.py on a 2 ms CPU step: beside a writer thread (~0.3 ms of JSON and pipe
writes per window) and a sampler thread, the training thread's window close took ~0.9 ms;
without them it takes ~0.16 ms. So no telemetry thread does work in the training process while
it trains: `publish` encodes a record as one JSON line and writes it to the writer
process's stdin (~10 us, once per window), and everything else (the JSONL files, console
lines, TensorBoard, W&B, the hardware sampler) runs in that process (writer.py), on its
own interpreter and GIL.

The pipe is non-blocking: a line that does not fit (the writer is far behind) waits in a
backlog that the next publish retries, so the training thread never blocks on it. Lines
are also held back and written together at most every `send_every_s` (0.5 s): a write
to the pipe wakes the writer process, and measured inside a training step's loop it cost
~55 us, as much as encoding the line. `flush()` and `close()` write everything at once;
a process killed with SIGKILL loses at most the last half second of records. The one
thread here, the listener, sleeps in a read of the writer's stdout (GIL released) and
wakes only for its rare messages: ready, a failed sink, a note, the answer to a flush.
Nothing waits for the writer to start: records go into the pipe from the first window
(the writer reads them while its sinks start), so a tracker that takes a minute to
connect, or never does, delays no step.

If the writer process cannot start or dies, the hub says so once and from then on writes
the JSONL files and console lines itself, synchronously; TensorBoard and W&B are then off.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from redline.telemetry.sinks import LOCAL_SINKS, Sink, SinkContext, make_sink


def report_sink_failure(name: str, why: str) -> None:
    """The one sentence a failed sink gets on stderr (once: the sink is then disabled)."""
    print(f"redline: telemetry sink {name!r} failed and is disabled ({why})",
          file=sys.stderr, flush=True)


def _plain(value: Any) -> Any:  # numpy and torch scalars, and anything else, for JSON
    return value.item() if hasattr(value, "item") else str(value)


class QuietHub:
    """The hub of a rank other than 0 under torchrun: no writer process, nothing written
    (rank 0 publishes the run's records, every rank's window figures among them)."""

    run_id: str | None = None

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}

    def publish(self, stream: str, record: dict[str, Any]) -> None:
        pass

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def close(self, timeout: float = 120.0) -> None:
        pass


class Hub:
    """Starts the writer process for `trackers` and forwards records to it.

    `send_every_s`: the longest a published record waits before it is written to the pipe.

    The sinks are made there from a SinkContext of `run_dir`, `run_name`, `run_id` and
    `options` (sinks/__init__.py).
    """

    def __init__(self, trackers: Sequence[str], run_dir: str | Path, *,
                 options: Mapping[str, Any] | None = None, run_id: str | None = None,
                 run_name: str | None = None, start_step: int = 0,
                 sampler: dict[str, Any] | None = None,
                 on_failure: Callable[[str, str], None] | None = None,
                 on_note: Callable[[str], None] | None = None,
                 send_every_s: float = 0.5) -> None:
        self.trackers = list(dict.fromkeys(trackers))
        self.run_dir = Path(run_dir)
        self.context = SinkContext(self.run_dir, run_name, run_id, start_step,
                                   dict(options or {}))
        self.failed: dict[str, str] = {}
        self.run_ids: dict[str, str | None] = {}
        self._on_failure = on_failure or report_sink_failure
        self._on_note = on_note or (lambda note: None)
        self._local: list[Sink] | None = None  # set once the writer is gone
        self._backlog = bytearray()
        self.send_every_s = send_every_s
        self._last_send = 0.0
        self._cond = threading.Condition()
        self._tickets = self._flushed = 0
        self._ready, self._closed = threading.Event(), threading.Event()
        self._exited = self._closing = False
        spec = {"trackers": self.trackers, "run_dir": str(self.run_dir), "run_name": run_name,
                "run_id": run_id, "start_step": start_step, "options": dict(options or {}),
                "sampler": sampler}
        package_root = str(Path(__file__).resolve().parents[2])  # importable in the child
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        # wandb.init in this process exports the address of its own W&B service; the writer
        # starts its own, and must not attach to that one, which may be gone already
        env.pop("WANDB_SERVICE", None)
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "redline.telemetry.writer", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                # its own session: Ctrl-C in a terminal, or a scheduler signalling the
                # process group, reaches the trainer, which saves and then closes the
                # writer; the writer itself stops at the end of its input
                start_new_session=True)
        except OSError as e:
            self._proc = None
            self._fall_back(f"the telemetry writer process could not start: {e}")
            return
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        threading.Thread(target=self._listen, name="redline-telemetry-listener",
                         daemon=True).start()

    @property
    def run_id(self) -> str | None:
        """The tracker's run id (W&B's), for a resumed run to continue: the one given, or
        the one a sink reported once it started."""
        return self.context.run_id or next((r for r in self.run_ids.values() if r), None)

    def publish(self, stream: str, record: dict[str, Any]) -> None:
        """Hand one record to the writer (training thread; never blocks)."""
        if self._local is None and self._exited and not self._closing:
            self._writer_exited()
        if self._local is not None:
            self._write_local([[stream, record]])
            return
        line = json.dumps([stream, record], separators=(",", ":"), default=_plain) + "\n"
        now = time.monotonic()
        if now - self._last_send < self.send_every_s:
            self._backlog += line.encode()  # written with the next send (see module doc)
            return
        self._last_send = now
        self._send(line.encode())

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until everything published so far is written; False on timeout."""
        if self._local is not None:
            return True
        with self._cond:
            self._tickets += 1
            ticket = self._tickets
        self._send(f'{{"flush":{ticket}}}\n'.encode())
        deadline = time.monotonic() + timeout
        self._drain(deadline)
        with self._cond:
            return self._cond.wait_for(lambda: self._flushed >= ticket or self._exited,
                                       timeout=max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 120.0) -> None:
        """Write everything, stop the writer (it closes its sinks) and wait for it. Once:
        a second call does nothing."""
        if self._closing:
            return
        self._closing = True
        if self._local is None and self._proc is not None:
            deadline = time.monotonic() + timeout
            self._send(b"null\n")
            self._drain(deadline)
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError):  # a writer that died already closed it
                self._proc.stdin.close()
            self._closed.wait(max(0.0, deadline - time.monotonic()))
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        for sink in self._local or []:
            self._guard(sink, sink.close)

    # ---- the pipe ------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._local is not None:
            return
        if self._backlog:
            self._backlog += data
            data = bytes(self._backlog)
            self._backlog.clear()
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # broken pipe: the writer is gone
            self._backlog += data
            self._writer_exited()
            return
        if n < len(data):
            self._backlog += data[n:]

    def _drain(self, deadline: float) -> None:
        """Write the backlog, waiting for the pipe (flush and close only)."""
        while self._backlog and self._local is None and time.monotonic() < deadline:
            _, writable, _ = select.select([], [self._fd], [], deadline - time.monotonic())
            if writable:
                self._send(b"")

    def _listen(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            message = json.loads(line)
            if "ready" in message:
                self.run_ids.update(message["ready"])
                self._ready.set()
            elif "started" in message:
                self.run_ids.update(message["started"])
            elif "failed" in message:
                name, why = message["failed"]
                self.failed[name] = why
                self._on_failure(name, why)
            elif "note" in message:
                self._on_note(message["note"])
            elif "flushed" in message:
                with self._cond:
                    self._flushed = message["flushed"]
                    self._cond.notify_all()
            elif "closed" in message:
                self._closed.set()
        self._exited = True
        self._ready.set()
        self._closed.set()
        with self._cond:
            self._cond.notify_all()

    def _writer_exited(self) -> None:
        """The writer is gone (its output ended, or its pipe broke): fall back, saying how."""
        code = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._proc.wait(timeout=1)  # exiting already: its code is moments away
        self._fall_back("the telemetry writer process exited ("
                        + ("still running" if code is None else f"exit code {code}") + ")")

    # ---- without the writer --------------------------------------------------------------

    def _fall_back(self, why: str) -> None:
        """The writer is gone: say so once, write what is left of JSONL and console here."""
        gone = [t for t in self.trackers if t not in LOCAL_SINKS and t not in self.failed]
        for name in gone:
            self.failed[name] = why
        self._on_failure("writer", f"{why}; " + (
            f"{', '.join(gone)} off, " if gone else "") + "JSONL and console written in-process")
        self._local = []
        for name in (t for t in self.trackers if t in LOCAL_SINKS):
            try:
                self._local.append(make_sink(name, self.context))
            except Exception as e:
                self.failed[name] = f"{type(e).__name__}: {e}"
        pending, self._backlog = bytes(self._backlog), bytearray()
        items = []
        for line in pending.splitlines():  # the first may be the tail of a half-sent line
            try:
                items.append(json.loads(line))
            except ValueError:
                continue
        self._write_local([item for item in items if isinstance(item, list)])

    def _write_local(self, items: list[list[Any]]) -> None:
        for stream, record in items:
            for sink in list(self._local or []):
                self._guard(sink, lambda s=sink, st=stream, r=record: s.write(st, [r]))

    def _guard(self, sink: Sink, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as e:  # a broken sink must never stop training
            reason = f"{type(e).__name__}: {e}"
            self.failed[sink.name] = reason
            if self._local is not None and sink in self._local:
                self._local.remove(sink)
            self._on_failure(sink.name, reason)
