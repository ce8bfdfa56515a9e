"""torchrun / torch.distributed: the process group, the few messages redline sends, and
what a rank does when another one fails.

redline never launches or schedules processes itself: `torchrun` (or `redline train
--nproc N`, which calls torch's own launcher, torch.distributed.run) starts one process
per device and sets RANK, WORLD_SIZE and LOCAL_RANK; `World.from_env` reads them and
`init` joins the process group (NCCL on CUDA, gloo otherwise). Training is
DistributedDataParallel or FSDP2 (job/build.py); what redline adds rides on a second,
gloo-only *control group*, so its messages are host-side Python ints and objects: none of them
waits for the device (no sync), whatever the training backend.

What redline sends, and when:

  - every step, with the OOM guard on: one agreement (`Comm.agree` of two ints, a
    max-reduce, made by the Engine), between the last micro-batch's forward and its
    backward, which is where DDP's own gradient all-reduce begins. It says whether any
    rank ran out of memory (so all ranks redo the step with the same smaller micro-batch,
    none left waiting in an all-reduce the failed rank never joins) and whether any rank
    was asked to stop (SIGTERM/SIGINT: all ranks stop after the same step, then save).
    Its wait is measured: the time a rank waits there is the time it waited for the
    slowest rank (the straggler figure). Without the guard there is none, and a stop is
    agreed at the next window instead;
  - once per telemetry window: one all-gather of each rank's window figures;
  - once per run: the run directory, the FLOPs count, the batch search's answer;
  - per checkpoint: a gather of every rank's RNG state to rank 0, which writes.

A rank that fails. Each rank's heartbeat thread bumps a counter in the rendezvous store
every `HEARTBEAT_S` (a store write, ~20 us, GIL released). A rank whose step raises writes
why to the store, then looks: another rank that wrote an earlier failure, or whose
heartbeat stopped (killed: SIGKILL, the OOM killer, a lost host), is the cause, and this
rank stops with one sentence naming it (`PeerFailed`, exit 1) instead of waiting in a
collective that will never complete. If every other rank is alive and well, this rank is
the cause and its own error stands, traceback included. A dead peer's sockets close, so
gloo fails at once; on NCCL torchrun stops the remaining workers itself when one exits.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from redline._torch_compat import default_store
from redline.errors import RunStopped, UserError, require

HEARTBEAT_S = 1.0
BARRIER_S = 30.0  # how long a finishing rank waits for the others before it leaves
T = TypeVar("T")
STRATEGIES = ("ddp", "fsdp", "auto")


@dataclass(frozen=True)
class DistributedConfig:
    """The `distributed` section: how the model is spread over the ranks under torchrun
    (`--nproc N`); a single process trains the whole model whatever it says."""

    strategy: str = "ddp"
    """ddp: every rank holds the whole model, its gradients and optimizer state
    (DistributedDataParallel); fsdp: each block, then the root, is sharded over the ranks
    with FSDP2's fully_shard, so a rank holds 1/N of the parameters, gradients and
    optimizer state and gathers one block's parameters at a time; auto: ddp when the
    model's states fit one rank's memory with room for the micro-batch, else fsdp (the
    run says why)."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered parameters after its forward and gather them again
    for backward (less memory, one more all-gather per block); false keeps them from
    forward to backward."""

    def __post_init__(self) -> None:
        require(self.strategy in STRATEGIES, "distributed.strategy", self.strategy,
                " | ".join(STRATEGIES))
        require(isinstance(self.reshard_after_forward, bool),
                "distributed.reshard_after_forward", self.reshard_after_forward,
                "true or false (an integer would make a process group per module)")


class PeerFailed(RunStopped):
    """Another rank failed or died; the message names it (exit 1)."""


class PeerOutOfMemory(torch.OutOfMemoryError):
    """Another rank ran out of memory in this attempt (the Engine's agreement): this one
    redoes the step too."""


def oom_after_agreement(rank: int, step: int, sharded: bool = False) -> torch.OutOfMemoryError:
    """An out-of-memory error in the last backward, after the agreement: DDP's gradient
    all-reduce (FSDP's reduce-scatters) has begun there, so the step cannot be redone;
    the error ends the run."""
    where = "FSDP reduce-scatters" if sharded else "DDP all-reduces"
    return torch.OutOfMemoryError(
        f"out of memory on rank {rank} in the last micro-batch's backward at step {step}, "
        f"where {where} the gradients: that backward cannot be redone by one rank "
        "alone; lower train.batch_size or memory.target (redline tune measures what fits)")


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # ranks on this host (they share its memory)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory, checkpoints and trackers."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @staticmethod
    def from_env() -> World:
        """The world torchrun describes in the environment (none: a single process)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return World()
        env = os.environ
        return World(int(env.get("RANK", "0")), size, int(env.get("LOCAL_RANK", "0")),
                     int(env.get("LOCAL_WORLD_SIZE", "1")))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream after the model is built (rank 0: `seed`,
    as a single process), so ranks do not draw the same noise for different samples."""
    return seed if rank == 0 else seed + 1_000_003 * rank


class Comm:
    """redline's own messages between ranks (the module docstring lists them).

    A single process gets a Comm too, whose calls answer locally: code that uses it has
    one path. `counts` tallies the messages by kind (the tests count them)."""

    def __init__(self, world: World, group: Any = None, store: Any = None) -> None:
        self.world = world
        self.group = group
        self.store = store
        self.broken = False  # a rank failed: no further collective is attempted
        self.counts: dict[str, int] = {}
        self._beat: threading.Thread | None = None
        self._stop_beat = threading.Event()

    # ---- collectives (host-side, on the gloo control group) ------------------------------

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def agree(self, *flags: int) -> list[int]:
        """The element-wise max of `flags` over the ranks: one 8-byte-per-flag all-reduce."""
        if not self.world.distributed or self.broken:
            return list(flags)
        self._count("agree")
        t = torch.tensor(flags, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order."""
        if not self.world.distributed or self.broken:
            return [obj]
        self._count("all_gather")
        out: list[Any] = [None] * self.world.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_to_main(self, obj: T) -> list[T] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if not self.world.distributed or self.broken:
            return [obj]
        self._count("gather")
        out: list[Any] | None = [None] * self.world.size if self.world.main else None
        dist.gather_object(obj, out, dst=self._global(0), group=self.group)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """`fn()` run on rank 0 and its result sent to every rank. Bad input found there
        (a UserError) is raised on every rank with the same sentence, so none hangs."""
        if not self.world.distributed:
            return fn()
        result: tuple[str, Any] = ("ok", None)
        if self.world.main:
            try:
                result = ("ok", fn())
            except UserError as e:
                result = ("error", (type(e), str(e)))
        self._count("broadcast")
        box = [result]
        dist.broadcast_object_list(box, src=self._global(0), group=self.group)
        status, value = box[0]
        if status == "error":
            kind, message = value
            raise kind(message)
        return value

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    # ---- failure -------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        if self.store is None or self._beat is not None:
            return
        self._beat = threading.Thread(target=self._heartbeat, name="redline-heartbeat",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        key = f"redline/beat/{self.world.rank}"
        while not self._stop_beat.wait(HEARTBEAT_S):
            try:
                self.store.add(key, 1)
            except Exception:  # the store is gone (its host ended): nothing to tell
                return

    def failure_cause(self, exc: BaseException, step: int) -> str | None:
        """After `exc` on this rank at `step`: the sentence naming the rank that failed
        first, or None when this rank is the cause (every other rank alive and well)."""
        if not self.world.distributed:
            return None
        self.broken = True
        if self.store is None:
            return None
        me = self.world.rank
        now = time.time()
        try:
            self.store.set(f"redline/down/{me}", json.dumps(
                {"t": now, "step": step, "error": f"{type(exc).__name__}: {exc}"[:300]}))
        except Exception:
            return (f"the rendezvous store is unreachable at step {step}: the process that "
                    "hosts it (torchrun's agent, or rank 0) has gone")
        others = [r for r in range(self.world.size) if r != me]
        beats = {r: self._read_beat(r) for r in others}
        deadline = time.monotonic() + 2.5 * HEARTBEAT_S
        while True:
            for r in others:
                down = self._read_down(r)
                if down is not None and down["t"] <= now:
                    return (f"rank {r} failed at step {down['step']} ({down['error']}); "
                            f"rank {me} stops too")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        # silent and no heartbeat since: dead (a rank that failed after this one, because
        # of it, wrote why before it stopped beating)
        dead = [r for r in others if self._read_beat(r) == beats[r] and self._read_down(r) is None]
        if dead:
            names = ("rank " if len(dead) == 1 else "ranks ") + ", ".join(map(str, dead))
            return (f"{names} stopped answering at step {step} (killed, or its host is "
                    f"gone); rank {me} stops too")
        return None

    def _read_beat(self, rank: int) -> int | None:
        try:
            return int(self.store.add(f"redline/beat/{rank}", 0))
        except Exception:
            return None

    def _read_down(self, rank: int) -> dict[str, Any] | None:
        key = f"redline/down/{rank}"
        try:
            if not self.store.check([key]):
                return None
            return json.loads(self.store.get(key))
        except Exception:
            return None

    def close(self) -> None:
        """Stop the heartbeat and leave the process group (skipped after a failure: the
        group cannot be torn down with a peer gone, and the process is ending anyway)."""
        self._stop_beat.set()
        if self._beat is not None:  # not inside a store call while the group goes
            self._beat.join(timeout=5)
            self._beat = None
        if self.world.distributed and not self.broken and dist.is_initialized():
            # the ranks leave together: a gloo rank that tore its groups down while a peer
            # still held its connections after FSDP's collectives aborted at exit
            # ("terminate called without an active exception", 1 run in 8 without this);
            # bounded, so a rank that never arrives cannot hold this one
            with contextlib.suppress(RuntimeError):  # a peer gone or slow: leave anyway
                dist.monitored_barrier(group=self.group,
                                       timeout=datetime.timedelta(seconds=BARRIER_S))
            dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """`redline ARGV` in `nproc` processes on this host, through torch's own launcher
    (torchrun --standalone); the exit code of the first rank that failed, else 0. A signal
    that stops the launcher (it passes it to the ranks) raises its SignalException."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "redline", *argv])
    # its agent logs each rank's exit as an error with a timestamp; the ranks have said why
    # in a sentence, and the line below names the first that failed
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        print(f"redline: rank {rank} {how} (its output above says why)", file=sys.stderr,
              flush=True)
        return code if code > 0 else 1
    return 0


_JOINED: list[Comm] = []  # the process's Comm, once it has joined (a study trains many runs)


def init(world: World, device_kind: str, timeout_s: float = 600.0) -> Comm:
    """Join the process group torchrun set up, once per process; the Comm for `world`
    (the same one on every later call; it leaves the group when the process exits).

    `timeout_s` bounds any collective's wait (a rank that hangs without dying)."""
    if not world.distributed:
        return Comm(world)
    if _JOINED:
        return _JOINED[0]
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        # NCCL refuses two ranks on one GPU: REDLINE_DIST_BACKEND=gloo runs them anyway
        backend = os.environ.get("REDLINE_DIST_BACKEND") or (
            "nccl" if device_kind == "cuda" else "gloo")
        if device_kind == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, timeout=timeout)
    # its own group even when training uses gloo too: FSDP issues asynchronous collectives
    # on the default group, and a message of redline's must never queue among them
    group = dist.new_group(backend="gloo", timeout=timeout)
    comm = Comm(world, group, default_store())
    comm.start_heartbeat()
    _JOINED.append(comm)
    atexit.register(comm.close)
    return comm
