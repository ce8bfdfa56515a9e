"""What a checkpoint holds for an exact resume, and how a run takes it back.

A checkpoint is plain PyTorch (`torch.load(..., weights_only=True)` reads it): the model,
optimizer, scheduler and engine (loss scaler, micro-batch) states, every callback's
`state_dict()`, the RNG states (python, numpy, torch, cuda), the position in the data
(epoch, batches consumed, samples seen), the resolved config and the tracker's run id.
Under torchrun rank 0 writes it, with every rank's RNG state (`rng_ranks`, gathered once
per checkpoint); each rank takes its own back. Resumed with another number of ranks, the
data position and the optimizer's steps continue, but the random streams cannot (each
rank is re-seeded, and the run says it is not an exact resume).
`load` picks the newest readable checkpoint, moving unreadable ones aside (and saying so),
and refuses a config that changed what the run trains (checkpoint.check_resumable).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from redline import checkpoint as ckpt
from redline.build import Job, seed_everything
from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.distributed import rank_seed
from redline.events import Callback, State, callback_states, load_callback_states
from redline.telemetry.jsonl import EventLog


def payload(job: Job, state: State, callbacks: list[Callback],
            tracker_run_id: str | None) -> dict[str, Any] | None:
    """Everything a resumed run needs (the module docstring's list); None on a rank other
    than 0, which only sends its RNG state."""
    ranks = job.comm.gather_to_main(ckpt.rng_state()) if job.world.distributed else None
    if not job.world.main:
        return None
    return {
        "model": job.model.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(),
        "engine": job.engine.state_dict(),
        "callbacks": callback_states(callbacks),
        "rng": ckpt.rng_state(),
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "samples_seen": state.samples_seen,
        "config": job.config.to_dict(),
        "task": job.task.name,
        "tracker_run_id": tracker_run_id,
        **({"rng_ranks": ranks} if ranks is not None else {}),
    }


def load(run_dir: Path, device: DeviceInfo, config: RunConfig, events: EventLog,
         skipped: list[str]) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint; unreadable ones are moved aside, reported, and their
    new paths appended to `skipped`."""
    def skip(moved_to: Path, reason: str) -> None:
        print(f"warning: {reason}; moved it to {moved_to} and trying the previous "
              "checkpoint", flush=True, file=sys.stderr)
        events.event("checkpoint_skipped", path=str(moved_to), reason=reason)
        skipped.append(str(moved_to))

    found = ckpt.load_latest(run_dir / "checkpoints", device.torch_device, on_skip=skip)
    assert found is not None, "rundir.claim checked that a checkpoint exists"
    ckpt.check_resumable(found[1].get("config", {}), config.to_dict(), found[0])
    return found


def apply(job: Job, state: State, callbacks: list[Callback], payload: dict[str, Any],
          events: EventLog | None = None) -> None:
    """Put a checkpoint's states back into the job, the loop's state and the callbacks."""
    job.model.load_state_dict(payload["model"])
    job.optimizer.load_state_dict(payload["optimizer"])
    job.scheduler.load_state_dict(payload["scheduler"])
    job.engine.load_state_dict(payload["engine"])
    load_callback_states(callbacks, payload.get("callbacks", {}))
    _restore_rng(job, payload, events)
    state.step = int(payload["step"])
    state.epoch = int(payload["epoch"])
    state.batch_in_epoch = int(payload["batch_in_epoch"])
    state.samples_seen = int(payload["samples_seen"])


def _restore_rng(job: Job, payload: dict[str, Any], events: EventLog | None) -> None:
    world = job.world
    ranks = payload.get("rng_ranks") or [payload["rng"]]
    if len(ranks) == world.size:
        ckpt.set_rng_state(ranks[world.rank])
        return
    seed_everything(rank_seed(job.config.train.seed + int(payload["step"]), world.rank))
    if world.main:
        print(f"redline: the checkpoint was written by {len(ranks)} rank(s), this run has "
              f"{world.size}: the data and the optimizer continue, the random streams are "
              "re-seeded (not an exact resume)", file=sys.stderr, flush=True)
    if events is not None:
        events.event("resume_not_exact", reason="ranks", checkpoint_ranks=len(ranks),
                     ranks=world.size)
