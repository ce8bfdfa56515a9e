"""`redline export RUN_DIR --to model.pt`: a run's model as one plain state_dict file.

The file holds the model's state_dict and nothing else: full tensors (a sharded
checkpoint's shards put together), on the CPU, keyed as the bare model's parameters and
buffers (no `module.` of DDP, no `_orig_mod.` of torch.compile; a sharded checkpoint names
them so already), so `model.load_state_dict(torch.load(path, weights_only=True))` works
anywhere, with no redline installed. The task's model is not built: a single-file
checkpoint's "model" entry is read as it is; a sharded checkpoint's tensors are made
empty from its metadata and filled by torch.distributed.checkpoint in this one process
(no process group). Written atomically (files.atomic_file). Export only reads the run
directory: an unreadable checkpoint is skipped (and said), never moved.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from redline import checkpoint as ckpt
from redline import checkpoint_sharded as sharded_ckpt
from redline.config import ConfigError
from redline.files import atomic_file

_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's wrappers


def export(run_dir: str | Path, to: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """Write the model of `run_dir`'s checkpoint at `step` (default: the newest readable)
    to `to`; (the checkpoint read, the file written). Bad input is a ConfigError."""
    run_dir, to = Path(run_dir), Path(to)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist; name a directory "
                          "`redline train` wrote")
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ConfigError(f"{str(run_dir)!r} holds no checkpoint to export; train with "
                          "checkpoint.every > 0, or until the run ends, first")
    _check_writable(to)
    if step is not None:
        steps = ", ".join(str(ckpt.checkpoint_step(p)) for p in found)
        found = [p for p in found if ckpt.checkpoint_step(p) == step]
        if not found:
            raise ConfigError(f"{str(run_dir)!r} has no checkpoint of step {step}; "
                              f"choose one of {steps}")
    for path in reversed(found):
        try:
            state = read_model(path)
        except ckpt.CheckpointError as e:
            print(f"redline: warning: {e}; trying the previous checkpoint", file=sys.stderr,
                  flush=True)
            continue
        with atomic_file(to, "exported model") as f:
            torch.save(state, f)
        return path, to
    raise ConfigError(f"no checkpoint of {str(run_dir)!r} is readable (see the warnings "
                      "above); choose another --step or restore a backup")


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The bare model's full state_dict on the CPU from checkpoint `path` (a file or a
    sharded checkpoint's directory), verified; CheckpointError if it is damaged."""
    if path.is_dir():
        sharded_ckpt.load_state(path)  # checks every shard against the manifest
        try:
            return sharded_ckpt.model_state_dict(path)
        except ckpt.CheckpointError:
            raise
        except (Exception, sharded_ckpt.CheckpointException) as e:  # DCP: many types
            raise ckpt.CheckpointError(f"{path} is unreadable ({type(e).__name__}); it is "
                                       "truncated or corrupt") from None
    return _bare(ckpt.load_checkpoint(path, "cpu")["model"])


def _bare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with a wrapper's prefix removed where every key carries it."""
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _check_writable(to: Path) -> None:
    parent = to.parent if str(to.parent) else Path(".")
    if to.is_dir():
        raise ConfigError(f"--to {str(to)!r} is a directory; name the file to write, e.g. "
                          f"{str(to / 'model.pt')!r}")
    if not parent.is_dir():
        raise ConfigError(f"--to {str(to)!r}: directory {str(parent)!r} does not exist; "
                          "create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--to {str(to)!r}: directory {str(parent)!r} is not writable; "
                          "choose a path you can write")
