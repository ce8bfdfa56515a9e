"""The run directory: claimed by one run at a time, and the files a run writes as it starts.

`chosen` is the directory a run asks for (with --resume and none named: the task's latest);
`claim` makes (or checks) the directory and holds its lock for the run (`RunDirLock`);
`write_start_files` writes config.yaml and environment.json. A framework run (Lightning,
the HF Trainer: integrations/recorder.py) has no checkpoints of redline's and no RunConfig:
it locks its directory with `lock` and writes the same two files with `write_config` and
`write_environment`. `announce` says, on stderr
and in events.jsonl, what a user must know before the first step. A file-system fault (a
read-only directory, a full disk, no permission) is a `StorageError`: one sentence naming
the path and the fault, exit 1, nothing already saved touched.

One run writes a run directory at a time: `RunDirLock` holds an exclusive `flock` on
RUN_DIR/.lock for as long as the run lives. The kernel drops it when the process ends, by
any means (kill -9 included), so nothing stale is ever left to clean up; a second run on
the same directory is refused with the holder's pid. Holding it, the run removes the temporary
files (and a sharded checkpoint's temporary directories) a killed process left mid-write
(`remove_orphans`). config.yaml and environment.json
are written atomically (files.py). Default run directories are made
with `new_run_dir`, which creates the directory atomically and numbers it (`-2`, `-3`,
...) when another run started in the same second.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from redline import checkpoint as ckpt
from redline import files
from redline.config import ConfigError, RunConfig
from redline.environment import environment_check
from redline.errors import UserError, writing
from redline.memory.sizes import format_size
from redline.precision import Precision

LOCK_NAME = ".lock"
# where redline writes files whole, so a killed process may leave a temporary file
ORPHAN_DIRS = (".", "checkpoints", f"checkpoints/{ckpt.NONFINITE}", "samples", "stats/layers",
               "stats/series", "stats/snapshots")


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


def chosen(run_dir: str | Path | None, task_name: str, resume: bool) -> Path | None:
    """The directory a run asked for: `run_dir`, else with --resume the task's latest run
    under runs/, else None (a new runs/TASK-TIME directory, made when the run starts)."""
    if run_dir is not None:
        return Path(run_dir)
    if not resume:
        return None
    found = latest_run_dir(task_name)
    if found is None:
        raise ConfigError(f"--resume found no earlier run of {task_name!r} under runs/; "
                          "pass --run-dir DIR")
    return found


def claim(run_dir: Path | None, task_name: str, resume: bool,
          held: contextlib.ExitStack) -> tuple[Path, bool]:
    """(the run directory, whether this run made it), locked until `held` closes.

    None makes a new runs/TASK-TIME directory. --resume needs a directory with a
    checkpoint (readable or moved aside); a fresh run refuses one that has checkpoints.
    """
    made = run_dir is None or not run_dir.exists()
    if run_dir is not None and resume and not run_dir.is_dir():
        raise ConfigError(f"--resume: run directory {str(run_dir)!r} does not exist; drop "
                          "--resume to start a new run there")
    run_dir, _ = lock(run_dir, task_name, held)
    readable = ckpt.list_checkpoints(run_dir / "checkpoints")
    if resume and not (readable or ckpt.list_checkpoints(run_dir / "checkpoints",
                                                         unreadable=True)):
        raise ConfigError(f"--resume: run directory {str(run_dir)!r} holds no checkpoint to "
                          "continue from; drop --resume to start afresh")
    if not resume and readable:
        raise ConfigError(f"run directory {str(run_dir)!r} already has checkpoints; pass "
                          "--resume to continue it, or choose another --run-dir")
    return run_dir, made


def lock(run_dir: Path | None, name: str, held: contextlib.ExitStack) -> tuple[Path, bool]:
    """(the run directory, whether it was made), made if need be and locked until `held`
    closes; None makes a new runs/NAME-TIME directory. What `claim` checks besides
    (checkpoints, --resume) is not done here."""
    made = run_dir is None or not run_dir.exists()
    with writing("run directory", run_dir or Path("runs")):
        run_dir = new_run_dir(name) if run_dir is None else run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(RunDirLock(run_dir))
    remove_orphans(run_dir)
    return run_dir, made


def remove_orphans(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed process left mid-write in the run directory and
    its checkpoints (files.remove_orphans: redline's own `.NAME.tmp-PID` names, of a pid no
    longer alive); called holding the directory's lock, so no other run writes there."""
    removed = []
    for sub in ORPHAN_DIRS:
        removed += files.remove_orphans(run_dir / sub)
    if removed:
        print(f"redline: removed {len(removed)} temporary file(s) an interrupted save left "
              f"in {run_dir} ({', '.join(p.name for p in removed)})", file=sys.stderr,
              flush=True)
    return removed


def write_start_files(run_dir: Path, config: RunConfig, task_name: str,
                      run: dict[str, Any], notes: Sequence[str] = ()) -> None:
    """config.yaml (the resolved config: train again with --config; `notes`, e.g. that the
    task's optimizer replaces train.lr, as comments above it) and environment.json
    (doctor's snapshot, with what this run resolved in `run`)."""
    resolved = config.to_dict()
    resolved["task"] = config.task or task_name
    write_config(run_dir, resolved, notes)
    write_environment(run_dir, config.device, run)


def write_config(run_dir: Path, settings: Mapping[str, Any], notes: Sequence[str] = ()
                 ) -> None:
    """RUN_DIR/config.yaml: `settings` (plain data) as YAML, in their order, below `notes`
    as comments."""
    header = "".join(f"# {note}\n" for note in notes)
    files.atomic_write_text(run_dir / "config.yaml",
                            header + yaml.safe_dump(dict(settings), sort_keys=False), "config")


def write_environment(run_dir: Path, device: str, run: dict[str, Any]) -> None:
    """RUN_DIR/environment.json: doctor's snapshot of `device`'s machine, with `run`."""
    env = environment_check(device).to_dict()
    env["run"] = run
    files.atomic_write_text(run_dir / "environment.json", json.dumps(env, indent=2),
                            "environment snapshot")


def announce(events: Any, precision: Precision, memory_limit: tuple[int, str] | None,
             tracked_budget: int | None = None) -> None:
    """fp8's per-layer decisions, an emulated precision, and the memory limit a CPU run
    without memory.budget checks each new micro-batch against."""
    if precision.layer_plan:
        events.event("fp8_layers", recipe=precision.config.fp8_recipe,
                     layers=precision.layer_plan)
    if precision.emulated:
        print(f"redline: {precision.name} is an emulation: its numerics are the format's, "
              "its speed is not (no speed-up)", file=sys.stderr, flush=True)
    if tracked_budget is not None:  # a CPU budget is enforced by tracking every tensor op
        events.event("memory_budget_tracked", bytes=tracked_budget)
        print(f"redline: memory.budget {format_size(tracked_budget)} on a CPU: every tensor "
              "operation is tracked to enforce it, which slows steps (8-10 % on sr3-tiny, "
              "more on small models); leave memory.budget unset to train untracked",
              file=sys.stderr, flush=True)
    if memory_limit is not None:
        size, source = memory_limit
        events.event("memory_limit", bytes=size, source=source)
        print(f"redline: no memory.budget: each new micro-batch is checked against {source} "
              "before it runs, so the OOM guard can shrink it", file=sys.stderr, flush=True)
