"""What one optimizer step does across ranks: when gradients are synchronised, and the
agreement that lets every rank redo a step one of them could not finish.

Under DistributedDataParallel (a `comm` of more than one rank) every forward, and every
backward but the last, runs under `no_sync`, so gradients accumulate locally; the last
backward is armed (_torch_compat.arm_all_reduce) and DDP all-reduces once, in it. A
forward the ranks abandon thus leaves DDP expecting no backward. Just before that
backward the ranks agree, in one host-side message (distributed.Comm.agree), on whether
any of them ran out of memory in this attempt and whether any was asked to stop. A rank
that ran out of memory earlier in the step sends its flag from the guard's handler
instead, so every rank makes exactly one agreement per attempt, and all of them redo the
step together with the same smaller micro-batch: none is left waiting in an all-reduce
the failed rank never joins. An out-of-memory error *inside* that last backward comes
after the agreement, when the gradient all-reduce has begun and cannot be redone alone:
it ends that rank's run with a sentence saying so, and the others stop naming it
(distributed.py). Without the OOM guard there is no agreement (an OOM ends the run the
same way; a stop is agreed at the next telemetry window instead: telemetry/session.py).

Under FSDP2 (a model sharded with `fully_shard`: by job/build.py, or in your own loop,
where the Engine finds the ranks from the process group when no `comm` is given) the
early micro-batches run with set_requires_gradient_sync(False) and the last backward
reduce-scatters. The gradient norm clip_grad_norm_ returns over sharded gradients is a
replicated DTensor holding the norm over all shards; `grad_norm` is its local value, a
plain tensor (no collective). fp16's GradScaler agrees on a non-finite gradient across
shards by itself (checked on torch 2.13: an inf in one rank's shard makes every rank
skip). An optimizer built before sharding, over tensors the model no longer uses, is
refused (ValueError). With the OOM guard, a sharded step also all-gathers inside forward
and backward, so one agreement before the last backward is not enough: a rank out of
memory mid-forward would leave the others waiting in the next all-gather. So each FSDP
unit's forward and backward start makes the agreement too (sharding.UnitBoundaries,
ordered before FSDP's all-gather there), until the attempt's own agreement; the failed
rank sends its flag from the guard's handler as under DDP, the others hear it at their
next unit boundary, and after the abort FSDP's state is reset (units resharded, the
unsharded gradients of the aborted micro-batches dropped) before all redo the step.
Cost: one host-side agreement per unit per forward and per early backward (29 a step for
4 units and 4 micro-batches). Measured on a loaded 2-core CPU machine with gloo: ~0.17
ms per agreement alone; inside a step ~1 ms each, since each also waits for the slower
rank (a tiny model's 50-85 ms step took ~35 ms longer guarded; noisy). Not covered:
an out-of-memory error inside FSDP's own all-gather (its buffer allocation, after the
boundary) leaves the failed rank waiting in its agreement and the others in that
all-gather until the process group's timeout (distributed.init) ends the run; one in
the last backward ends it as under DDP.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from redline._torch_compat import arm_all_reduce, unwrap_compiled
from redline.distributed import Comm, PeerOutOfMemory, oom_after_agreement
from redline.memory.sharding import (
    UnitBoundaries,
    ViewWatch,
    check_optimizer,
    is_sharded,
    reset_after_abort,
)


class StepRanks:
    """The Engine's ranks: a DDP-wrapped or FSDP-sharded model's gradient synchronisation
    and, with the OOM guard, the per-attempt agreement (module docstring). On one rank
    `comm` is None and every method here does nothing."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 comm: Comm | None, guarded: bool) -> None:
        self.model = model
        bare = unwrap_compiled(model)
        sharded = is_sharded(bare)
        if sharded:  # your own loop's fully_shard: its ranks, and an optimizer built after
            check_optimizer(bare, optimizer)
            comm = comm if comm is not None else _process_group_comm(model)
        self.comm = comm if comm is not None and comm.world.distributed else None
        # FSDP2 (memory/sharding.py): gradients stay unreduced on each rank until
        # set_requires_gradient_sync(True) before the last backward, as DDP's no_sync does
        self.sharded = self.comm is not None and sharded
        self.dtensors = sharded  # gradients are DTensors: their norm is one too
        # FSDP's view-output warning, replaced by a check of what it warns about
        self.views = ViewWatch(bare) if self.sharded else None
        if self.sharded:
            no_sync: Callable[[], Any] | None = functools.partial(_gradient_sync_off, bare)
        else:
            no_sync = getattr(model, "no_sync", None) if self.comm is not None else None
        self.no_sync: Callable[[], Any] = no_sync or contextlib.nullcontext
        self.guarded = guarded
        self.agreed = False  # this attempt's agreement was made
        self.in_attempt = False  # inside Engine._try: FSDP's unit boundaries agree
        # sharded, with the guard: an agreement at every FSDP unit boundary of the attempt
        # before its last backward (module docstring)
        self._boundaries = (UnitBoundaries(bare, self._at_boundary)
                            if self.sharded and guarded else None)
        self.stop_requested: Callable[[], bool] = lambda: False
        self.stop_agreed = False  # see Engine.stop_when
        self.failed_rank: int | None = None  # the rank the last agreement heard had failed
        # time spent in the agreement, waiting for the slowest rank (None: no agreement)
        self.sync_wait_s: float | None = 0.0 if self.comm is not None and guarded else None

    def before_last_backward(self) -> None:
        """Agree (with the guard), then arm the backward that synchronises the gradients:
        DDP all-reduces in it, FSDP reduce-scatters."""
        if self.guarded:  # without it an OOM ends the run: nothing to agree
            self.agree(oom=False)
        if self.sharded:
            unwrap_compiled(self.model).set_requires_gradient_sync(True)
        else:
            arm_all_reduce(self.model)

    def start_attempt(self) -> None:
        self.agreed = False
        self.in_attempt = True

    def check_redoable(self, step: int) -> None:
        """This rank ran out of memory: after the attempt's agreement the gradients'
        collective has begun and cannot be redone alone, so that ends the run."""
        if self.comm is not None and self.agreed:
            raise oom_after_agreement(self.comm.world.rank, step, self.sharded) from None

    def abort(self, failed: bool) -> None:
        """After an attempt that ran out of memory here (`failed`) or on another rank: tell
        the others (outside the handler: its frames are gone), and reset FSDP's state."""
        if failed and self.comm is not None:
            self.agree(oom=True)
        if self.sharded:  # gathered units resharded, accumulated shards dropped
            reset_after_abort(unwrap_compiled(self.model))

    def _at_boundary(self) -> None:
        """An FSDP unit's forward or backward starts (sharding.UnitBoundaries): agree
        before its all-gather, up to the attempt's own agreement (before the last
        backward, whose reduce-scatters cannot be redone by one rank)."""
        if self.in_attempt and not self.agreed:
            self.agree(oom=False, final=False)

    def agree(self, oom: bool, final: bool = True) -> None:
        """The attempt's agreement (module docstring; `final`: the one before the last
        backward, else an FSDP unit boundary's): raises PeerOutOfMemory when another rank
        ran out of memory; sets `stop_agreed` when any rank is stopping."""
        comm = self.comm
        assert comm is not None
        t = time.perf_counter()
        # host-side message on the control group: no device sync
        failed_rank, stop = comm.agree(comm.world.rank + 1 if oom else 0,
                                       int(self.stop_requested()))
        self.sync_wait_s = (self.sync_wait_s or 0.0) + time.perf_counter() - t
        self.agreed = self.agreed or final
        self.stop_agreed = self.stop_agreed or bool(stop)
        if failed_rank and not oom:
            self.failed_rank = failed_rank - 1
            raise PeerOutOfMemory(f"rank {failed_rank - 1} ran out of memory")


def _process_group_comm(model: nn.Module) -> Comm | None:
    """The ranks of a model sharded in your own loop, where no `comm` was given: those of
    the process group torchrun set up (distributed.init joins it), None without one."""
    import torch.distributed as dist

    from redline.distributed import World, init

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    param = next(model.parameters(), None)
    return init(World.from_env(), param.device.type if param is not None else "cpu")


@contextlib.contextmanager
def _gradient_sync_off(model: Any) -> Any:
    """FSDP's no_sync: this micro-batch's backward accumulates unsharded gradients locally
    (the last one, armed with set_requires_gradient_sync(True), reduce-scatters them)."""
    model.set_requires_gradient_sync(False)
    yield
