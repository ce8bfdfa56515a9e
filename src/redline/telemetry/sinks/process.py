"""Sinks in a child process: TensorBoard and W&B never compete with training for the GIL.

Their writes are Python-heavy (protobuf records, W&B's client-side bookkeeping): ~0.5-1 ms
of interpreter time per window each. On a writer *thread* that time holds the GIL, and the
training thread, whose Python parts need it between kernels, waits: measured on a 2 ms
CPU step, 1.7-1.9 ms of stall per window (bench/overhead.py). A child process has its own
interpreter; the parent's writer thread only writes one JSON line per batch to a pipe.

The child is a fresh `python -m redline.telemetry.sinks.process` (not multiprocessing's
spawn, which re-imports the parent's __main__: a user's unguarded training script would
run twice). It builds the sinks, answers with their run ids (W&B's, for resume), reports
a sink that fails once, and writes every batch it reads until stdin says stop. Its own
stdout carries only that protocol: anything a library prints goes to stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from redline.telemetry.hub import report_sink_failure


class ProcessSink:
    """One hub sink that forwards every batch to sinks living in a child process."""

    name = "process"

    def __init__(self, names: list[str], run_dir: Path, *,
                 on_failure: Callable[[str, str], None] | None = None,
                 start_timeout_s: float = 180.0, **options: Any) -> None:
        self.names = list(names)
        self.run_ids: dict[str, str | None] = {}
        self._on_failure = on_failure or report_sink_failure
        self._ready, self._closed = threading.Event(), threading.Event()
        spec = json.dumps({"names": self.names, "run_dir": str(run_dir), "options": options})
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, spec],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, bufsize=1)
        threading.Thread(target=self._listen, name="redline-sinks-listener",
                         daemon=True).start()
        if not self._ready.wait(start_timeout_s):
            self._proc.kill()
            raise RuntimeError("the telemetry sink process did not start")

    @property
    def run_id(self) -> str | None:
        return next((rid for rid in self.run_ids.values() if rid), None)

    def write(self, stream: str, records: list[dict[str, Any]]) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps([stream, records]) + "\n")

    def close(self) -> None:
        if self._proc.poll() is None and self._proc.stdin is not None:
            try:
                self._proc.stdin.write("null\n")
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            self._closed.wait(120)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()

    def _listen(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            message = json.loads(line)
            if "failed" in message:
                self._on_failure(*message["failed"])
            elif "ready" in message:
                self.run_ids = message["ready"]
                self._ready.set()
            elif "closed" in message:
                self._closed.set()
        self._ready.set()  # the child exited: nobody waits for it any longer
        self._closed.set()


def _serve(spec: dict[str, Any], inbox: IO[str], outbox: IO[str]) -> None:
    from redline.telemetry.sinks import make_sinks

    def say(message: dict[str, Any]) -> None:
        try:
            outbox.write(json.dumps(message) + "\n")
            outbox.flush()
        except BrokenPipeError:  # the parent is gone; its sinks still get closed
            pass

    sinks = []
    for name in spec["names"]:
        try:
            sinks += make_sinks([name], Path(spec["run_dir"]), **spec["options"])
        except Exception as e:  # cannot start: reported once, the others go on
            say({"failed": [name, f"{type(e).__name__}: {e}"]})
    say({"ready": {s.name: getattr(s, "run_id", None) for s in sinks}})
    for line in inbox:
        item = json.loads(line)
        if item is None:
            break
        stream, records = item
        for sink in list(sinks):
            try:
                sink.write(stream, records)
            except Exception as e:
                say({"failed": [sink.name, f"{type(e).__name__}: {e}"]})
                sinks.remove(sink)
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:
            say({"failed": [sink.name, f"{type(e).__name__}: {e}"]})
    say({"closed": True})


if __name__ == "__main__":
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries that print to stdout must not corrupt the protocol
    sys.stdout = sys.stderr
    _serve(json.loads(sys.argv[1]), sys.stdin, protocol)
