"""Checkpoints that resume exactly: atomic writes, verified reads, a fallback past bad files.

A checkpoint is one `torch.save` dict; its `"model"` entry is the model's `state_dict`, so
plain PyTorch can read it. Writes go through files.atomic_file: a temporary file in the
same directory, fsynced, renamed over the final name (atomic on POSIX), the directory
fsynced too: a crash mid-write leaves the previous checkpoints intact, and a temporary
file a killed process left behind is removed when the next run claims the directory. A
second Ctrl-C during a save stops it: the temporary file is removed, nothing else is
touched. On load, every record of the file's zip container is checked against its CRC-32
(`verify`; torch.load does not check it), so a truncated file and one with flipped bytes
are both found; the newest file that verifies and reads back completely wins, the others
are reported and moved aside.

Every value is a tensor, a number, a string or a container of them, so checkpoints load
with `weights_only=True` (no arbitrary code runs when a checkpoint is opened).

A run with distributed.strategy fsdp writes directories instead (checkpoint_sharded.py,
one layer up, builds on this module): `list_checkpoints`, the rotation and `load_latest`
(given that module's reader) treat a directory like a file.
"""

from __future__ import annotations

import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redline.errors import MissingExtra, UserError, require
from redline.files import atomic_file
from redline.fp8 import torchao_import

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)(\.pt)?$")  # a file, or a sharded checkpoint's directory


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


def checkpoint_name(step: int, sharded: bool = False) -> str:
    """step-XXXXXXXX.pt, or step-XXXXXXXX for a sharded checkpoint's directory
    (checkpoint_sharded.py)."""
    return f"step-{step:08d}" + ("" if sharded else ".pt")


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint `list_checkpoints` found."""
    m = _NAME.match(path.name)
    assert m is not None, f"{path} is no checkpoint's name"
    return int(m.group(1))


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint, a file or a sharded checkpoint's directory (rotation)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


UNREADABLE = "unreadable"  # where checkpoints that do not read back are moved


def list_checkpoints(directory: str | Path, unreadable: bool = False) -> list[Path]:
    """Checkpoints in `directory` (or those moved aside as unreadable), oldest first: files
    and sharded checkpoints' directories (a temporary one, `.NAME.tmp-PID`, is not one)."""
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
    StorageError naming the file; a KeyboardInterrupt (a second Ctrl-C) raised while it
    writes propagates as itself. Either way the temporary file is removed and the
    checkpoints written before are untouched (the new one is written aside, then renamed).
    torch.save and fsync are C calls, and Python runs a signal's handler only after them: a
    Ctrl-C that arrives once the data is written leaves the new checkpoint complete.
    """
    if not finite:
        return save_checkpoint(Path(directory) / NONFINITE, step, payload, keep=10**9)
    d = Path(directory)
    final = d / checkpoint_name(step)
    payload = {"format": FORMAT_VERSION, "step": step, **payload}
    with atomic_file(final, "checkpoint") as f:
        try:
            torch.save(payload, f)
        except RuntimeError as e:
            # torch's zip writer turns what its write raised into a RuntimeError: the
            # disk's OSError (a StorageError), or a second Ctrl-C's KeyboardInterrupt (stop
            # now: the temporary file goes, the previous checkpoints stay)
            if isinstance(e.__context__, OSError | KeyboardInterrupt):
                raise e.__context__ from None
            raise
    for old in list_checkpoints(d)[:-keep]:
        remove_checkpoint(old)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint file; raises CheckpointError if it is unreadable, corrupt or
    incomplete (a sharded checkpoint's directory: checkpoint_sharded.load_state).

    `verify` checks every record's CRC first (torch.load does not), so a flipped bit in a
    tensor's data is found here, not in the trained model.
    """
    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a sharded checkpoint's directory; read it with "
                              "redline.checkpoint_sharded")
    verify(path)
    try:
        payload = _load(path, map_location)
    except MissingExtra:  # a sound file this install cannot read: not corrupt
        raise
    except Exception as e:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}); "
                              "it is truncated or corrupt") from None
    missing = [k for k in ("format", "step") if k not in payload]
    if "model" not in payload and not payload.get("sharded"):
        missing.append("model")
    if missing:
        raise CheckpointError(f"{path} is not a redline checkpoint (missing {missing})")
    return payload


# torchao's quantized optimizer states (memory.optimizer_state 8bit / 4bit) are tensor
# subclasses, which weights_only loads once their module is imported: a run that resumes
# or reads such a checkpoint without having built the optimizer first imports them here.
_STATE_MODULES = ("torchao.optim.subclass_8bit", "torchao.optim.subclass_4bit")


def _load(path: str | Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        needed = [m for m in _STATE_MODULES if f"GLOBAL {m}." in str(e)]
        if not needed:
            raise
    for module in needed:
        torchao_import(module, f"reading {Path(path).name} (low-bit optimizer state)")
    return torch.load(path, map_location=map_location, weights_only=True)


_CHUNK = 1 << 20


def verify(path: str | Path) -> None:
    """CheckpointError unless every record of the checkpoint's zip container matches the
    CRC-32 stored for it at save.

    Cost: one sequential read of the whole file in 1 MiB chunks (memory stays flat), CRC-32
    at several GB/s (zlib), so about the time of reading the file once more; torch.load
    then reads it again, mostly from the page cache.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as record:  # raises BadZipFile at a CRC mismatch
                    while record.read(_CHUNK):
                        pass
    except zipfile.BadZipFile as e:
        crc = re.match(r"Bad CRC-32 for file '(.+)'", str(e))
        why = (f"record {crc.group(1)!r} fails its CRC-32 check" if crc else
               f"not a complete zip archive: {e}")
        raise CheckpointError(f"{path} is unreadable ({why}); it is truncated or corrupt"
                              ) from None
    except (OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}); "
                              "it is truncated or corrupt") from None


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu",
                on_skip: Callable[[Path, str], None] | None = None,
                load: Callable[[Path, str | torch.device], dict[str, Any]] | None = None
                ) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in `directory`, or None if there is none at all.

    An unreadable one is moved aside to `directory/unreadable/` (kept for inspection, no
    longer counted toward `keep`), passed to `on_skip(moved_to, reason)`, and the previous
    one tried; if none reads back, CheckpointError says so. `load(path, map_location)`
    reads one (default `load_checkpoint`; run/resume.py passes one that also reads
    sharded checkpoints' directories).
    """
    files = list_checkpoints(directory)
    for path in reversed(files):
        try:
            return path, (load or load_checkpoint)(path, map_location)
        except CheckpointError as e:
            aside = Path(directory) / UNREADABLE / path.name
            aside.parent.mkdir(exist_ok=True)
            if aside.is_dir():  # an older copy of the same step, moved aside before
                shutil.rmtree(aside, ignore_errors=True)
            path.replace(aside)
            if on_skip:
                on_skip(aside, str(e))
    if files:
        raise CheckpointError(f"none of the {len(files)} checkpoint(s) in {directory} is "
                              f"readable (moved to {Path(directory) / UNREADABLE}); start a new "
                              "run or restore a backup")
    return None


# Keys that may differ between a run and its resumption: they change how long the run
# goes and what it records, not the math of the steps already taken. Activation
# checkpointing recomputes the same ops on the same inputs (the gradient is the one without
# it; memory/checkpointing.py), so a run saved with one mode resumes with another; FSDP's
# reshard_after_forward only chooses when a block's parameters are gathered again.
# distributed.strategy may not change: an fsdp run writes sharded checkpoints
# (checkpoint_sharded.py), ddp and single-process runs single files, and a run resumes
# the format its strategy writes. The number of ranks is no config key: an fsdp run
# resumes at any world size by resharding.
RESUMABLE_CHANGES = ("train.steps", "train.epochs", "train.eval_every", "train.eval_batches",
                     "train.eval_batch_size", "data.", "checkpoint.", "telemetry.",
                     "memory.activation_checkpointing", "memory.checkpoint_blocks",
                     "memory.checkpointed_blocks", "distributed.reshard_after_forward",
                     # where the run trains, not what: a run moved to more or fewer ranks
                     # (or another machine) is given the budget that fits there
                     "memory.budget")


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
