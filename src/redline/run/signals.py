"""Signals during a run: SIGTERM/SIGINT stop it cleanly, and the exit code says which.

A run stopped by a signal exits as a shell reports a process killed by it:
`exit_code(name)` is 128 + the signal's number (SIGTERM 143, SIGINT 130), and 0 when
nothing stopped it. `Signals` turns the two signals into a flag the training loop reads
after each step (it then saves and stops); before the loop, set-up calls `check()` at safe
points, which raises `Interrupted`.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any


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
    may run inside a finalizer or a torch dispatch hook, where an exception is lost. The
    exception: a second SIGINT (Ctrl-C pressed again while the run saves and stops) raises
    KeyboardInterrupt at once, and the run stops without another save (a checkpoint being
    written is abandoned, its temporary file removed; checkpoint.save_checkpoint); the CLI
    exits 130.
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
