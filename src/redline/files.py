"""Files written whole, atomically: a reader (or a crash, a full disk) never sees half of one.

Every file redline writes whole (config.yaml, environment.json, report.html, a tuned
config, summaries, checkpoints) goes through `atomic_write_text` / `atomic_write_bytes` or,
for a writer that streams (torch.save), `atomic_file`: the data goes to a temporary file
in the same directory (`temp_path`: `.NAME.tmp-PID`), is flushed and fsynced, then renamed
over the final name with `os.replace` (atomic on POSIX), and the directory is fsynced. A
failure at any point removes the temporary file and leaves the previous file, if any,
untouched; an OSError becomes `StorageError` naming the file (errors.writing).

A process killed mid-write (kill -9, a lost node) cannot remove its temporary file:
`remove_orphans` deletes those of processes no longer alive. The run directory calls it
when a run claims the directory, holding its lock, so no live redline run is writing
there. Append-only logs (events.jsonl, metrics.jsonl) are not written here: a line at a
time, a torn last line is skipped on reading.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from redline.errors import writing

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temp_path(final: str | Path) -> Path:
    """Where the file `final` is written before it is renamed into place."""
    final = Path(final)
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(path: str | Path, what: str) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` only if the block completes.

    An OSError (read-only, disk full) is a StorageError naming `what` and `path`; any
    exception (KeyboardInterrupt included) removes the temporary file, leaving `path` as it
    was.
    """
    final = Path(path)
    tmp = temp_path(final)
    try:
        with writing(what, final):
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)


def atomic_write_bytes(path: str | Path, data: bytes, what: str = "file") -> Path:
    """Write `data` to `path` atomically (module docstring); the path."""
    with atomic_file(path, what) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, what: str = "file",
                      encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically in `encoding` (module docstring); the path."""
    return atomic_write_bytes(path, text.encode(encoding), what)


def remove_orphans(directory: str | Path) -> list[Path]:
    """Delete the temporary files (`temp_path` names) in `directory` whose writing process
    is gone, and temporary directories (a sharded checkpoint written under a `temp_path`
    name, checkpoint_sharded.py); the paths removed. Those of a live process, and every
    other name, are kept."""
    d = Path(directory)
    if not d.is_dir():
        return []
    removed = []
    for path in d.iterdir():
        m = _TEMP.match(path.name)
        if m is None or _alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has not written here yet: a reused pid's leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by another user (or unknown): keep its file
    return True


def fsync_dir(d: str | Path) -> None:
    """Make a rename in `d` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not supported on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
