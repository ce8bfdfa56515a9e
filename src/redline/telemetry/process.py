"""The training process's own memory: resident now, and its peak since the last reading.

Read once per telemetry window on CPU, where there is no allocator to ask. On Linux both
come from one read of /proc/self/status (VmRSS, VmHWM), and writing "5" to
/proc/self/clear_refs resets the high-water mark, so each window's peak is its own.
Elsewhere, or where /proc cannot be written: psutil's RSS and the peak since the process
started (getrusage).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


class ProcessMemory:
    """`read()` -> (resident bytes now, peak resident bytes since the previous read)."""

    def __init__(self) -> None:
        self._proc = _STATUS.is_file()
        self._resettable = self._proc and self._reset()

    def read(self) -> tuple[int | None, int | None]:
        if self._proc:
            fields = _status_kib(("VmRSS:", "VmHWM:"))
            if self._resettable:
                self._resettable = self._reset()
            rss, hwm = fields.get("VmRSS:"), fields.get("VmHWM:")
            return (rss * 1024 if rss else None), (hwm * 1024 if hwm else None)
        return _psutil_rss(), _lifetime_peak()

    @staticmethod
    def _reset() -> bool:
        try:
            _CLEAR.write_text("5")
        except OSError:
            return False
        return True


def _status_kib(names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            name, _, rest = line.partition("\t")
            if name in names:
                out[name] = int(rest.split()[0])
    return out


def _psutil_rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _lifetime_peak() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; else KiB
