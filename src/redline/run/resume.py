"""What a checkpoint holds for an exact resume, and how a run takes it back.

A checkpoint is plain PyTorch (`torch.load(..., weights_only=True)` reads it; one with
low-bit optimizer states after `import torchao.optim`, which registers their classes): the model,
optimizer, scheduler and engine (loss scaler, micro-batch) states, every callback's
`state_dict()`, the RNG states (python, numpy, torch, cuda), the position in the data
(epoch, batches consumed, samples seen), the resolved config and the tracker's run id.
Under torchrun rank 0 writes it, with every rank's RNG state (`rng_ranks`, gathered once
per checkpoint); each rank takes its own back. Resumed with another number of ranks, the
data position and the optimizer's steps continue, but the random streams cannot (each
rank is re-seeded, and the run says it is not an exact resume).
With distributed.strategy fsdp (any number of ranks, one included) a checkpoint is a
directory (checkpoint_sharded.py): every rank writes its shards of the model and the
optimizer with torch.distributed.checkpoint, rank 0 the rest (this payload less those
two); a run at another world size reshards them on load and says so.
`newest_readable` picks the newest readable checkpoint, moving unreadable ones aside (and
saying so), and refuses a config that changed what the run trains
(checkpoint.check_resumable). `find` is the checkpoint a resumed run starts from (rank 0
picks, every rank reads); `restore_states` puts one back into a job. `Checkpoints` is what
the trainer calls: save, restore, and what to keep when the loop fails (a checkpoint of
the last completed step, except after a second Ctrl-C; under torchrun, a sentence naming
the rank that failed first).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from redline import checkpoint as ckpt
from redline import checkpoint_sharded as sharded_ckpt
from redline import rng
from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.distributed import PeerFailed, rank_seed
from redline.errors import RunStopped, StorageError
from redline.events import (
    Callback,
    Dispatcher,
    Event,
    State,
    callback_states,
    load_callback_states,
)
from redline.job.build import Job, seed_everything
from redline.memory.guard import OutOfMemoryAtMinimum
from redline.telemetry.jsonl import EventLog
from redline.telemetry.session import Telemetry


def writes_sharded(job: Job) -> bool:
    """Whether this run's checkpoints are sharded directories (distributed.strategy fsdp,
    whatever the number of ranks, so 1 -> 2 ranks resumes too)."""
    return job.config.distributed.strategy == "fsdp"


def payload(job: Job, state: State, callbacks: list[Callback],
            tracker_run_id: str | None) -> dict[str, Any] | None:
    """Everything a resumed run needs (the module docstring's list); None on a rank other
    than 0, which only sends its RNG state. A sharded checkpoint's model and optimizer are
    written by every rank (checkpoint_sharded.save_sharded), not held here."""
    ranks = job.comm.gather_to_main(rng.rng_state()) if job.world.distributed else None
    if not job.world.main:
        return None
    sharded = writes_sharded(job)
    return {
        **({} if sharded else {"model": job.model.state_dict(),
                               "optimizer": job.optimizer.state_dict()}),
        "world_size": job.world.size,
        "scheduler": job.scheduler.state_dict(),
        "engine": job.engine.state_dict(),
        "callbacks": callback_states(callbacks),
        "rng": rng.rng_state(),
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "samples_seen": state.samples_seen,
        "config": job.config.to_dict(),
        "task": job.task.name,
        "tracker_run_id": tracker_run_id,
        **({"rng_ranks": ranks} if ranks is not None else {}),
    }


def newest_readable(run_dir: Path, device: DeviceInfo, config: RunConfig, events: EventLog,
                    skipped: list[str]) -> tuple[Path, dict[str, Any]]:
    """The newest readable checkpoint; unreadable ones are moved aside, reported, and their
    new paths appended to `skipped`."""
    def skip(moved_to: Path, reason: str) -> None:
        print(f"warning: {reason}; moved it to {moved_to} and trying the previous "
              "checkpoint", flush=True, file=sys.stderr)
        events.event("checkpoint_skipped", path=str(moved_to), reason=reason)
        skipped.append(str(moved_to))

    found = ckpt.load_latest(run_dir / "checkpoints", device.torch_device, on_skip=skip,
                             load=read)
    assert found is not None, "rundir.claim checked that a checkpoint exists"
    ckpt.check_resumable(found[1].get("config", {}), config.to_dict(), found[0])
    return found


def read(path: Path, map_location: str | torch.device = "cpu", full_check: bool = True
         ) -> dict[str, Any]:
    """One checkpoint, verified: a file (checkpoint.load_checkpoint), or a sharded
    checkpoint's directory, whose rank-0 state this reads (the shards are checked against
    its manifest with `full_check`, loaded by `restore_states`)."""
    if path.is_dir():
        return sharded_ckpt.load_state(path, full_check)
    return ckpt.load_checkpoint(path, map_location)


def find(job: Job, run_dir: Path, events: EventLog, skipped: list[str]
         ) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from, as rank 0 picked it (`newest_readable`), read by every rank;
    moved-aside unreadable ones appended to `skipped`."""
    found: list[tuple[Path, dict[str, Any]]] = []

    def pick() -> tuple[Path, list[str]]:
        found.append(newest_readable(run_dir, job.device, job.config, events, skipped))
        return found[0][0], skipped

    path, moved = job.comm.from_main(pick)
    skipped[:] = moved
    if found:
        return found[0]
    return path, read(path, job.device.torch_device, full_check=False)


def restore_states(job: Job, state: State, callbacks: list[Callback],
                   payload: dict[str, Any], events: EventLog | None = None,
                   path: Path | None = None) -> None:
    """Put a checkpoint's states back into the job, the loop's state and the callbacks;
    `path`: where it was read (a sharded checkpoint's model and optimizer load from it)."""
    if payload.get("sharded"):
        assert path is not None, "a sharded checkpoint loads from its directory"
        _restore_sharded(job, path, payload, events)
    else:
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


def _restore_sharded(job: Job, path: Path, payload: dict[str, Any],
                     events: EventLog | None) -> None:
    """Every rank loads its part of the model and optimizer from the directory; at another
    world size DCP reshards them (said once)."""
    sharded_ckpt.load_into(path, job.model, job.optimizer)
    saved = int(payload.get("world_size", 1))
    if saved == job.world.size:
        return
    if job.world.main:
        print(f"redline: resharded {path.name}'s parameters and optimizer state from "
              f"{saved} rank(s) to {job.world.size}", file=sys.stderr, flush=True)
    if events is not None:
        events.event("resharded", path=str(path), checkpoint_ranks=saved,
                     ranks=job.world.size)


def _restore_rng(job: Job, payload: dict[str, Any], events: EventLog | None) -> None:
    world = job.world
    ranks = payload.get("rng_ranks") or [payload["rng"]]
    if len(ranks) == world.size:
        rng.set_rng_state(ranks[world.rank])
        return
    seed_everything(rank_seed(job.config.train.seed + int(payload["step"]), world.rank))
    if world.main:
        print(f"redline: the checkpoint was written by {len(ranks)} rank(s), this run has "
              f"{world.size}: the data and the optimizer continue, the random streams are "
              "re-seeded (not an exact resume)", file=sys.stderr, flush=True)
    if events is not None:
        events.event("resume_not_exact", reason="ranks", checkpoint_ranks=len(ranks),
                     ranks=world.size)


class Checkpoints:
    """A run's checkpoints: saved at the trainer's cadence, at its end and after a failure;
    picked and taken back on --resume. Under torchrun every rank calls the same methods at
    the same steps: rank 0 picks and writes, every rank's RNG state is gathered into what
    it writes (`find` picks the one to resume from). `telemetry`: the run's (its tracker
    run id is kept; saving is paused, not step time)."""

    def __init__(self, job: Job, state: State, run_dir: Path, events: EventLog,
                 dispatcher: Dispatcher, callbacks: list[Callback],
                 telemetry: Telemetry) -> None:
        self.job, self.state, self.run_dir, self.events = job, state, run_dir, events
        self.dispatcher, self.callbacks = dispatcher, callbacks
        self.directory = run_dir / "checkpoints"
        self._saved: tuple[int, Path] | None = None  # the step this process last saved
        self.telemetry = telemetry

    def save(self) -> Path:
        step = self.state.step
        if self._saved is not None and self._saved[0] == step:
            # this step is on disk already (a periodic save, then a stop at the same step):
            # writing the same weights again would only make a stop slower. In-process, so
            # every rank decides alike.
            return self._saved[1]
        with self.telemetry.paused():
            # one host read per checkpoint: non-finite weights must not displace the last
            # finite checkpoint (train.on_nonfinite: warn applies such updates)
            finite = self._finite()
            data = payload(self.job, self.state, self.callbacks, self.telemetry.tracker_run_id)
            path = ckpt.checkpoint_path(self.directory, step, finite)
            if writes_sharded(self.job):  # every rank writes its shards
                path = sharded_ckpt.save_sharded(
                    self.directory, step, self.job.model, self.job.optimizer, data,
                    self.job.config.checkpoint.keep, self.job.comm.from_main, finite=finite)
            elif data is not None:  # rank 0 writes
                path = ckpt.save_checkpoint(self.directory, step, data,
                                            self.job.config.checkpoint.keep, finite=finite)
        if not finite and self.events.announces:
            print(f"redline: warning: the weights at step {step} are not finite: checkpoint "
                  f"kept aside in {path.parent}; --resume starts from the last finite one",
                  file=sys.stderr, flush=True)
        self._saved = (step, path)
        self.events.event("checkpoint_saved", step=step, path=str(path), finite=finite)
        self.dispatcher.fire(Event.CHECKPOINT_SAVED, self.state, str(path))
        return path

    def _finite(self) -> bool:
        """Whether every parameter is finite. Sharded: each rank checks its own shards
        (touching a DTensor's values whole would gather it) and the ranks agree."""
        params = [p.to_local() if isinstance(p, DTensor) else p
                  for p in self.job.model.parameters()]
        finite = bool(torch.stack([p.isfinite().all() for p in params]).all())
        if writes_sharded(self.job) and self.job.world.distributed:
            finite = not self.job.comm.agree(int(not finite))[0]
        return finite

    @property
    def last_saved(self) -> Path | None:
        """The checkpoint this process saved last (None: none yet)."""
        return self._saved[1] if self._saved is not None else None

    def restore(self, path: Path, data: dict[str, Any]) -> int:
        """Take the checkpoint back; the step it resumes from."""
        restore_states(self.job, self.state, self.callbacks, data, self.events, path)
        self.events.event("resumed", path=str(path), step=self.state.step)
        return self.state.step

    def after_failure(self, exc: BaseException) -> None:
        """The loop died of `exc` (re-raised by the caller): keep the work done. Under
        torchrun, another rank's failure becomes PeerFailed naming it."""
        # Under torchrun a run that stops itself (RunStopped) or runs out of memory at one
        # sample (after the ranks' agreement) does so on every rank at the same step.
        agreed = isinstance(exc, RunStopped | OutOfMemoryAtMinimum) and not isinstance(
            exc, PeerFailed)
        if not self.job.world.distributed or agreed:
            self._save_after_failure(exc)
        elif not isinstance(exc, PeerFailed | KeyboardInterrupt):
            self._stop_with_peers(exc)

    def _save_after_failure(self, exc: BaseException) -> None:
        """A checkpoint of the last completed step, unless the failure struck while the
        optimizer was updating the parameters; the RNG has moved on by part of a step, so
        resuming from it is not bit-exact. Not after a second Ctrl-C (KeyboardInterrupt: the
        first one's flag is already set): that asks to stop now, so the checkpoints already
        written stand."""
        step = self.state.step
        saved = ckpt.list_checkpoints(self.directory)
        if step == 0 or self.job.engine.updating or isinstance(
                exc, StorageError | KeyboardInterrupt) or (
                saved and saved[-1].name == ckpt.checkpoint_name(
                    step, writes_sharded(self.job))):
            self.events.event("failed", step=step, error=type(exc).__name__)
            return
        try:
            path = self.save()
        except Exception as save_error:  # the disk may be why we failed
            print(f"redline: could not save a checkpoint after the failure: {save_error}",
                  file=sys.stderr)
            return
        self.events.event("failed", step=step, error=type(exc).__name__,
                          checkpoint=str(path), exact_resume=False)
        # RunStopped's sentence says it; an OOM at one sample's says it with the breakdown
        if not isinstance(exc, RunStopped | OutOfMemoryAtMinimum) and self.events.announces:
            print(f"redline: {type(exc).__name__} after step {step}; saved {path}; continue "
                  "with --resume once fixed", file=sys.stderr)

    def _stop_with_peers(self, exc: BaseException) -> None:
        """Another rank failed first: PeerFailed naming it (the last checkpoint stands:
        saving another needs the rank that is gone). Else this rank's error stands."""
        cause = self.job.comm.failure_cause(exc, self.state.step)
        if cause is None:
            self.events.event("failed", step=self.state.step, error=type(exc).__name__)
            return
        saved = ckpt.list_checkpoints(self.directory)
        last = (f"; the last checkpoint is {saved[-1].name}: continue with --resume"
                if saved else "; no checkpoint was saved yet")
        self.events.event("peer_failed", step=self.state.step, message=cause)
        raise PeerFailed(cause + last) from None
