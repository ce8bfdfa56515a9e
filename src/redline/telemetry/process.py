"""The training process's own memory: resident now, and the most it has been resident.

Read once per telemetry window on CPU, where there is no allocator to ask, so it must be
cheap inside a busy process: on Linux the resident size is one `pread` of
/proc/self/statm on a file kept open (~1 us; /proc/self/status measured 160-270 us
inside the benchmark's process), and the peak is getrusage's high-water mark since the
process started (~0.5 us). Elsewhere psutil's RSS.
"""

from __future__ import annotations

import contextlib
import os
import sys


class ProcessMemory:
    """`read()` -> (resident bytes now, peak resident bytes since the process started)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        with contextlib.suppress(OSError, AttributeError):
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE") if self._fd is not None else 0

    def read(self) -> tuple[int | None, int | None]:
        rss, peak = self._resident(), _lifetime_peak()
        # Linux updates the high-water mark lazily: the resident size can be ahead of it
        return rss, max(rss, peak) if rss is not None and peak is not None else peak

    def _resident(self) -> int | None:
        if self._fd is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(os.pread(self._fd, 256, 0).split()[1]) * self._page
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.Process().memory_info().rss)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def _lifetime_peak() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; else KiB
