"""Run lifecycle helpers: run directories (unique names, one run at a time), signals.

A run stopped by a signal exits as a shell reports a process killed by it:
`exit_code(name)` is 128 + the signal's number (SIGTERM 143, SIGINT 130), and 0 when
nothing stopped it.

One run writes a run directory at a time: `RunDirLock` holds an exclusive `flock` on
RUN_DIR/.lock for as long as the run lives. The kernel drops it when the process ends, by
any means (kill -9 included), so nothing stale is ever left to clean up; a second run on
the same directory is refused with the holder's pid. Default run directories are made
with `new_run_dir`, which creates the directory atomically and numbers it (`-2`, `-3`,
...) when another run started in the same second.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

from redline.errors import UserError

LOCK_NAME = ".lock"


class RunDirBusy(UserError):
    """Another live process holds the run directory; the message names its pid."""


class RunDirLock:
    """An exclusive lock on a run directory while this process writes it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one run per directory is on the user
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"run directory {str(self.path.parent)!r} is in use by another "
                             f"redline run (pid {holder}); wait for it to end or choose "
                             "another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:  # unlocked by close; the file stays (deleting it races)
            os.close(self._fd)
            self._fd = None


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived before the training loop began (set-up, batch search)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} before the first step")
        self.signal = signal_name


class Signals:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and stops at the next step.

    Before the loop, set-up calls `check()` at safe points (the batch search between its
    trials: it can take minutes, and a scheduler that sends SIGTERM kills what has not
    stopped soon after), which raises `Interrupted`. The handler itself never raises: it
    may run inside a finalizer or a torch dispatch hook, where an exception is lost.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def check(self) -> None:
        """Raise Interrupted if a signal has arrived."""
        if self.received:
            raise Interrupted(self.received)

    def __enter__(self) -> Signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals cannot be caught here: the caller handles them.
            with contextlib.suppress(ValueError):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def exit_code(interrupted: str | int | None) -> int:
    """The process's exit code after `interrupted` (a signal's name or number) stopped it,
    as a shell reports a process that signal killed; 0 when no signal stopped it."""
    if interrupted is None or interrupted == "":
        return 0
    number = (signal.Signals[interrupted] if isinstance(interrupted, str)
              else signal.Signals(interrupted)).value
    return 128 + number


_STAMPED = re.compile(r"-(\d{8}-\d{6})(?:-(\d+))?$")


def new_run_dir(task_name: str, root: str | Path = "runs") -> Path:
    """A run directory made now: runs/TASK-YYYYmmdd-HHMMSS, numbered if taken."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    Path(root).mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = Path(root) / (f"{task_name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            path.mkdir()  # atomic: of two runs starting together, one gets each name
        except FileExistsError:
            continue
        return path
    raise AssertionError("10,000 runs of one task in one second")


def latest_run_dir(task_name: str, root: str | Path = "runs") -> Path | None:
    """The newest run directory of `task_name` under `root` (by its stamp and number)."""
    runs = []
    for path in Path(root).glob(f"{task_name}-*"):
        m = _STAMPED.search(path.name)
        if m and path.name[:m.start()] == task_name and path.is_dir():
            runs.append((m.group(1), int(m.group(2) or 1), path))
    return max(runs)[2] if runs else None
