"""Checkpoints that resume exactly: atomic writes, RNG states, and a fallback past bad files.

A checkpoint is one `torch.save` dict; its `"model"` entry is the model's `state_dict`, so
plain PyTorch can read it. Writes go to a temporary file in the same directory, are
fsynced, then renamed over the final name (rename is atomic on POSIX), and the directory
is fsynced too: a crash mid-write leaves the previous checkpoints intact. On load, the
newest file that reads back completely wins; a truncated or corrupt one is reported and
skipped.

Every value is a tensor, a number, a string or a container of them, so checkpoints load
with `weights_only=True` (no arbitrary code runs when a checkpoint is opened).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redline.errors import UserError, require, writing

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` section: how often the run saves what it needs to resume."""

    every: int = 500
    """Steps between checkpoints; 0: only at the end (and on SIGTERM/SIGINT)."""
    keep: int = 3
    """Newest checkpoints kept; older ones are deleted."""

    def __post_init__(self) -> None:
        require(self.every >= 0, "checkpoint.every", self.every, ">= 0 (0: only at the end)")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


class CheckpointError(UserError):
    """No usable checkpoint where one was required; the message says where and why."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


UNREADABLE = "unreadable"  # where checkpoints that do not read back are moved


def list_checkpoints(directory: str | Path, unreadable: bool = False) -> list[Path]:
    """Checkpoint files in `directory` (or those moved aside as unreadable), oldest first."""
    d = Path(directory) / UNREADABLE if unreadable else Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


NONFINITE = "nonfinite"  # where checkpoints of non-finite weights are kept


def checkpoint_path(directory: str | Path, step: int, finite: bool = True) -> Path:
    """Where `save_checkpoint` writes step `step`'s checkpoint."""
    d = Path(directory) if finite else Path(directory) / NONFINITE
    return d / checkpoint_name(step)


def save_checkpoint(directory: str | Path, step: int, payload: dict[str, Any],
                    keep: int, finite: bool = True) -> Path:
    """Write `payload` atomically as step-<step>.pt and delete all but the newest `keep`.

    `finite` False (the weights hold NaN or inf): written to `directory/nonfinite/`
    instead, outside the rotation, so it never displaces the last finite checkpoint and a
    resume never starts from it. A file-system fault (read-only, disk full) is a
    StorageError naming the file; the checkpoints written before are untouched (the new
    one is written aside, then renamed).
    """
    if not finite:
        return save_checkpoint(Path(directory) / NONFINITE, step, payload, keep=10**9)
    d = Path(directory)
    final = d / checkpoint_name(step)
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    payload = {"format": FORMAT_VERSION, "step": step, **payload}
    try:
        with writing("checkpoint", final):
            d.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    torch.save(payload, f)
                    f.flush()
                    os.fsync(f.fileno())
            except RuntimeError as e:  # torch's zip writer hides the disk's OSError
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    _fsync_dir(d)
    for old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint; raises CheckpointError if it is unreadable or incomplete."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}); "
                              "it is truncated or corrupt") from None
    missing = [k for k in ("format", "step", "model") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a redline checkpoint (missing {missing})")
    return payload


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu",
                on_skip: Callable[[Path, str], None] | None = None
                ) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in `directory`, or None if there is none at all.

    An unreadable one is moved aside to `directory/unreadable/` (kept for inspection, no
    longer counted toward `keep`), passed to `on_skip(moved_to, reason)`, and the previous
    one tried; if none reads back, CheckpointError says so.
    """
    files = list_checkpoints(directory)
    for path in reversed(files):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            aside = Path(directory) / UNREADABLE / path.name
            aside.parent.mkdir(exist_ok=True)
            path.replace(aside)
            if on_skip:
                on_skip(aside, str(e))
    if files:
        raise CheckpointError(f"none of the {len(files)} checkpoint(s) in {directory} is "
                              f"readable (moved to {Path(directory) / UNREADABLE}); start a new "
                              "run or restore a backup")
    return None


# Keys that may differ between a run and its resumption: they change how long the run
# goes and what it records, not the math of the steps already taken.
RESUMABLE_CHANGES = ("train.steps", "train.epochs", "train.eval_every", "train.eval_batches",
                     "train.eval_batch_size", "data.", "checkpoint.", "telemetry.")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "task_args":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume with settings that change the math of the steps already taken."""
    old, new = _flatten(saved), _flatten(current)
    for key in sorted(set(old) | set(new)):
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES):
            continue
        if key == "task" and not new.get(key):
            continue
        if old.get(key) != new.get(key):
            raise CheckpointError(
                f"cannot resume: {path.name} was written with {key}={old.get(key)!r} but this "
                f"run asks for {key}={new.get(key)!r}; use the same setting or a new --run-dir")


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # not supported on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
