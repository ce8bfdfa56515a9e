"""Sharded checkpoints (distributed.strategy fsdp): one directory per checkpoint, each rank
writing its own shards with torch.distributed.checkpoint (DCP).

    checkpoints/step-00000020/
      __0_0.distcp, __1_0.distcp   each rank's shards of the model AND optimizer state
      .metadata                    DCP's index of every tensor's chunks
      state.pt                     rank 0's: scheduler, engine, callbacks, every rank's RNG,
                                   data position, config, task, tracker id, world size, and
                                   the size and CRC-32 of every other file here

Model and optimizer go through `get_state_dict` / `set_state_dict`, which key the
optimizer state by parameter name and strip FSDP/DDP/compile prefixes: the files name the
bare model's parameters, so a checkpoint loads into any world size (DCP reshards each
tensor's chunks on load: 2 ranks -> 1, 1 -> 2), into a plain model with no process group,
and into a DDP run.

Atomic: every rank writes into `.step-XXXXXXXX.tmp-PID` (rank 0's pid, sent to all) beside
the final name; DCP's save ends only when every rank's files are written and fsynced (its
last step gathers every rank's write results to rank 0). Rank 0 then writes state.pt with
the manifest, fsyncs the directory, renames it into place and fsyncs the parent: a
checkpoint directory is complete or absent. A temporary directory a killed run left is
removed by the next run that claims the run directory (files.remove_orphans).

Verified on load (`verify`): state.pt's zip CRCs, then every file the manifest lists
(present, its size, its CRC-32), so a missing or damaged shard is found at --resume and
the checkpoint moved aside like an unreadable file.

weights_only: DCP's FileSystemReader unpickles `.metadata` with plain pickle, and its
planner reads non-tensor values with torch.load(weights_only=False). `SafeReader` reads
the metadata with torch's weights-only unpickler, allowing only DCP's metadata classes
(_torch_compat.dcp_metadata_globals), and `SafePlanner` loads values with
weights_only=True: opening a checkpoint runs no code it names. `SafeWriter` pickles the
metadata with protocol 2, the one that unpickler reads.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from redline import checkpoint as ckpt
from redline._torch_compat import dcp_metadata_globals, weights_only_unpickle
from redline.checkpoint import CheckpointError
from redline.errors import StorageError, writing
from redline.files import fsync_dir, temp_path

__all__ = ["STATE", "CheckpointException", "SafePlanner", "SafeReader", "SafeWriter",
           "load_into", "load_state", "model_state_dict", "read_metadata", "save_sharded",
           "verify"]

STATE = "state.pt"  # rank 0's file: all but the model and optimizer
_METADATA = ".metadata"
_CHUNK = 1 << 20


class SafeWriter(FileSystemWriter):
    """DCP's writer, its `.metadata` pickled with protocol 2 (the weights-only unpickler
    reads no later protocol's frames)."""

    def finish(self, metadata: Metadata, results: Any) -> None:
        super().finish(metadata, results)
        path = Path(self.path) / _METADATA
        tmp = path.with_name(_METADATA + ".p2")
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f, protocol=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class SafeReader(FileSystemReader):
    """DCP's reader, its metadata unpickled weights-only (module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / _METADATA
        metadata = read_metadata(path)
        metadata.storage_meta.load_id = self.load_id  # what the base class sets
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, its non-tensor values read with weights_only=True."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            _set_nested(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _set_nested(root: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value


def read_metadata(path: Path) -> Metadata:
    """A DCP `.metadata` file, unpickled weights-only; CheckpointError if it names any
    global but DCP's metadata classes, or does not read."""
    try:
        with open(path, "rb") as f:
            metadata = weights_only_unpickle(f, dcp_metadata_globals())
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} names code outside torch.distributed.checkpoint's "
                              f"metadata ({str(e).splitlines()[0][:120]}); redline does not "
                              "run it: restore the checkpoint from a trusted copy") from None
    except Exception as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}); it is truncated "
                              "or corrupt") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} is not a torch.distributed.checkpoint metadata file")
    if getattr(metadata, "storage_meta", None) is None:
        from torch.distributed.checkpoint.metadata import StorageMeta
        metadata.storage_meta = StorageMeta()
    return metadata


@contextmanager
def _one_process(alone: bool) -> Iterator[None]:
    """DCP warns at every call without a process group that it assumes one process: that
    is the intent here (a single-process run, export), so the warning is not passed on."""
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ---- save ---------------------------------------------------------------------------------

def save_sharded(directory: Path, step: int, model: nn.Module, optimizer: Any,
                 state: dict[str, Any] | None, keep: int, from_main: Callable[[Any], Any],
                 finite: bool = True) -> Path:
    """Write step `step`'s checkpoint directory; called by every rank alike. `state`: rank
    0's payload (None elsewhere); `from_main`: Comm.from_main (run on rank 0, its result
    sent to all). Rotates to the newest `keep`; `finite` False: into nonfinite/, outside
    the rotation. A file-system fault is a StorageError on every rank."""
    if not finite:
        directory, keep = directory / ckpt.NONFINITE, 10**9
    final = directory / ckpt.checkpoint_name(step, sharded=True)
    tmp = Path(from_main(lambda: _make_temp(final)))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        alone = not dist.is_initialized()
        with writing("checkpoint", final), _one_process(alone), _unwrapped():
            dcp.save({"model": model_sd, "optimizer": optim_sd},
                     storage_writer=SafeWriter(tmp), no_dist=alone)
        failed = from_main(lambda: _finish(tmp, final, step, state, keep))
        if failed:
            raise StorageError(failed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay
        raise
    return final


@contextmanager
def _unwrapped() -> Iterator[None]:
    """DCP wraps what any rank's write raised in one CheckpointException (a BaseException):
    a disk fault (OSError, a StorageError by `writing`) or a second Ctrl-C
    (KeyboardInterrupt) is raised as itself, so they stop the run as a single file's do."""
    try:
        yield
    except CheckpointException as e:
        for error, _ in e.failures.values():
            if isinstance(error, OSError | KeyboardInterrupt):
                raise error from None
        raise


def _make_temp(final: Path) -> str:
    tmp = temp_path(final)
    with writing("checkpoint", final):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return str(tmp)


def _finish(tmp: Path, final: Path, step: int, state: dict[str, Any] | None,
            keep: int) -> str | None:
    """Rank 0, once every rank's files are written: the manifest and state.pt, then the
    rename into place and the rotation. A StorageError's sentence (sent to every rank)."""
    assert state is not None, "rank 0 holds the payload"
    try:
        with writing("checkpoint", final):
            files = {p.name: list(_size_crc(p)) for p in sorted(tmp.iterdir())}
            payload = {"format": ckpt.FORMAT_VERSION, "step": step, "sharded": True,
                       **state, "files": files}
            _write_state(tmp / STATE, payload)
            fsync_dir(tmp)
            # the same step written before (nonfinite/ of an earlier attempt): set aside
            # under a temporary name first, so a crash leaves one of the two complete
            old = temp_path(final.with_name(final.name + ".old"))
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
    except StorageError as e:
        return str(e)
    for old in ckpt.list_checkpoints(final.parent)[:-keep]:
        ckpt.remove_checkpoint(old)
    return None


def _write_state(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(payload, f)
        except RuntimeError as e:  # torch's zip writer wraps the disk's OSError
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _size_crc(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


# ---- load ---------------------------------------------------------------------------------

def load_state(path: Path, full_check: bool = True) -> dict[str, Any]:
    """state.pt of checkpoint directory `path` (all but model and optimizer), checked;
    `full_check` also checks every shard against the manifest (`verify`)."""
    state_file = path / STATE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is incomplete (no {STATE})")
    payload = ckpt.load_checkpoint(state_file)
    if not payload.get("sharded") or "files" not in payload:
        raise CheckpointError(f"{state_file} is not a sharded checkpoint's state")
    if full_check:
        verify(path, payload["files"])
    return payload


def verify(path: Path, files: dict[str, list[int]]) -> None:
    """CheckpointError unless every file of the manifest is there with its size and
    CRC-32 (one sequential read of the checkpoint)."""
    if _METADATA not in files:
        raise CheckpointError(f"{path} is incomplete (no {_METADATA} in its manifest)")
    for name, (size, crc) in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete ({name} is missing)")
        if _size_crc(file) != (size, crc):
            raise CheckpointError(f"{file} fails its size or CRC-32 check; it is truncated "
                                  "or corrupt")


def load_into(path: Path, model: nn.Module, optimizer: Any) -> None:
    """Load checkpoint directory `path`'s model and optimizer state into `model` (plain,
    DDP or FSDP-sharded, at any world size: DCP reads each rank's chunks) and `optimizer`.
    Every rank calls it; without a process group it reads alone."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optimizer": optim_sd}
    alone = not dist.is_initialized()
    with _one_process(alone):
        dcp.load(target, storage_reader=SafeReader(path), planner=SafePlanner(),
                 no_dist=alone)
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optimizer"])


def model_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model's full state_dict from checkpoint directory `path`, on the CPU, keyed as
    the bare model's: empty tensors built from the metadata, filled by DCP in this process
    (no process group, no model)."""
    metadata = read_metadata(path / _METADATA)
    model: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            model[key.removeprefix("model.")] = torch.empty(meta.size,
                                                            dtype=meta.properties.dtype)
    target = {"model": model}
    # model keys may hold dots: DCP flattens the nested dict, so one level is ours
    with _one_process(True):
        dcp.load(target, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=True)
    return target["model"]
