"""Run lifecycle helpers: run-directory names and signal handling."""

from __future__ import annotations

import contextlib
import signal
from datetime import datetime
from pathlib import Path
from typing import Any


class Signals:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and stops at the next step."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

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


def default_run_dir(task_name: str, root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{task_name}-{stamp}"


def latest_run_dir(task_name: str, root: str | Path = "runs") -> Path | None:
    runs = sorted(Path(root).glob(f"{task_name}-*"), key=lambda p: p.name)
    return runs[-1] if runs else None
