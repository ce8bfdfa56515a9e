"""Engine.step(): one optimizer step over one batch, split into micro-batches.

Why the gradient is exact: the task's loss is a *mean* over the samples it is given.
For a batch of N samples split into micro-batches of sizes m_1..m_k, the full-batch
loss is sum_i (m_i / N) * mean_loss(micro_batch_i). Each micro-batch's loss is
multiplied by its share m_i / N before backward, so the gradients that accumulate in
`.grad` equal the full-batch gradient (up to floating-point summation order), for any
split, uneven last chunk included. The optimizer and scheduler step once per batch (the
scheduler on a skipped step too, as torch's GradScaler loop does).
One exception: a layer that normalises with the statistics of the batch it sees
(BatchNorm in training mode) sees each micro-batch's statistics, not the full batch's,
so that step is not the full-batch step; the first split says so (Event.ANOMALY, kind
"batch_statistics", naming the layers).

Nothing here reads a device value on the host: the loss comes back as a device tensor,
the gradient norm stays on the device (`Engine.grad_norm`), and the caller decides when
to look at them (the telemetry window). `skip_nonfinite` skips the update of a step whose
gradient norm is not finite. Where the norm lives in host memory (CPU) it is read there:
no sync, and ~5 us a step against ~45 us for the three extra ops and the step-count undo
of the flag path (measured in a CPU training loop). On a device, a fused optimizer (what
the trainer builds) is handed the flag as `found_inf` and skips on the device, no host
read; another optimizer needs one host read (a sync) a step. fp16's GradScaler skips
such steps itself (on the device with a fused optimizer, after a host read of its inf
flag otherwise). Where whether it skipped is known on the host for free (the hook's flag,
or a gradient norm in host memory), the steps feed a `ScalerWatch`: while the scaler skips
more than SCALER_SKIP_SHARE of SCALER_WINDOW steps, each skipped step fires Event.ANOMALY
(kind "scaler_skips", with the skipped steps in a row), on which the trainer warns at once
and counts them toward train.nonfinite_patience (run/watch.py): fp16 cannot train nothing
silently. With a fused optimizer on a device, knowing would cost a sync a step: there the
telemetry window's `skipped_steps` carries the count.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from redline import batch as batch_tree
from redline._torch_compat import (
    arm_all_reduce,
    foreach_copy_,
    found_inf_given,
    record_memory_history,
    supports_found_inf,
    unwrap_compiled,
    uses_batch_statistics,
)
from redline.device import DeviceInfo
from redline.distributed import Comm, PeerOutOfMemory, oom_after_agreement
from redline.events import Dispatcher, Event, State
from redline.memory.guard import OOMGuard, OutOfMemoryAtMinimum, StepStart
from redline.memory.sharding import ViewWatch, check_optimizer, is_sharded, plain_value
from redline.precision import Precision, ScalerWatch, get_precision

LossFn = Callable[[nn.Module, Any], torch.Tensor]
# Attempts of each micro-batch size run under `memory_check`: the first allocates the
# optimizer's state (AdamW's, at its first step), the second is the steady state.
CHECKED_STEPS = 2


@dataclass(frozen=True)
class EngineConfig:
    """How the Engine steps, checked when made. What it steps (model, optimizer, scheduler)
    and whom it tells (dispatcher, state, comm) are the Engine's own arguments."""

    precision: Precision | str = "fp32"
    """The precision policy, or its name (resolved for the model's device)."""
    grad_clip: float | None = None
    """Clip the gradients' global norm to this; None: no clipping (the norm is kept)."""
    micro_batch_size: int | None = None
    """Samples per forward/backward; a larger batch is split and its gradients accumulated
    exactly (module docstring). None: every batch whole."""
    oom_guard: OOMGuard | bool = False
    """Redo a step that runs out of memory with smaller micro-batches: True (a guard from
    micro_batch_size), a configured OOMGuard, or False."""
    memory_check: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    """With the guard: a context (a tracked memory budget) that each micro-batch size's
    first two attempts run in (the second holds the optimizer's state: the steady state),
    where the allocator itself would not raise (job/build.py)."""
    skip_nonfinite: bool = False
    """Skip the update of a step whose gradient norm is not finite (module docstring)."""
    host_reads: bool | None = None
    """Check the gradient norm on the host: None where it is host memory (the CPU); False
    runs the device path (a fused optimizer's `found_inf`) anywhere."""

    def __post_init__(self) -> None:
        clip, micro = self.grad_clip, self.micro_batch_size
        if clip is not None and not clip > 0:
            raise ValueError(f"grad_clip must be a positive number or None, got {clip!r}")
        if micro is not None and micro < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro!r}")
        if self.oom_guard is True and self.micro_batch_size is None:
            raise ValueError("oom_guard needs a micro_batch_size to shrink from")

    @classmethod
    def of(cls, config: EngineConfig | Precision | str | None, **settings: Any) -> EngineConfig:
        """`config` with `settings` replaced; a precision (or None) starts from the defaults."""
        if isinstance(config, EngineConfig):
            return dataclasses.replace(config, **settings) if settings else config
        return cls(**settings) if config is None else cls(precision=config, **settings)


class Engine:
    """Runs optimizer steps with micro-batching, a precision policy and gradient clipping.

    Use it from your own loop:

        engine = Engine(model, optimizer, precision="bf16-mixed", micro_batch_size=8)
        for batch in loader:
            loss = engine.step(batch, lambda model, b: F.cross_entropy(model(b[0]), b[1]))

    Keyword settings (or a precision alone) build its `EngineConfig`: the line above is
    `Engine(model, optimizer, EngineConfig("bf16-mixed", micro_batch_size=8))`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 config: EngineConfig | Precision | str | None = None, *,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 scheduler_steps: int | None = None,
                 dispatcher: Dispatcher | None = None, state: State | None = None,
                 comm: Comm | None = None, **settings: Any) -> None:
        """`settings`: EngineConfig's fields, over `config`. `comm`: the ranks of a
        DDP-wrapped `model` (see the module docstring). `scheduler_steps`: the scheduler
        is stepped until its `last_epoch` reaches it (the run's length), so a timing that
        steps past the run leaves a OneCycleLR at its end instead of raising."""
        config = EngineConfig.of(config, **settings)
        precision = config.precision
        if isinstance(precision, str):
            param = next(model.parameters(), None)
            spec = str(param.device) if param is not None else "cpu"
            precision = get_precision(precision, DeviceInfo.detect(spec))
        self.config = config  # as given: the guard changes micro_batch_size below
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.scheduler = scheduler
        self.scheduler_steps = scheduler_steps
        self.grad_clip = config.grad_clip
        self.micro_batch_size = config.micro_batch_size
        guard = config.oom_guard
        self.guard: OOMGuard | None = (OOMGuard(config.micro_batch_size or 1)
                                       if guard is True else guard or None)
        self._checked: dict[int, int] = {}  # micro-batch size -> its attempts checked
        # micro-batch -> peak tensor bytes its first two, tracked steps counted (CPU, no budget)
        self.checked_peaks: dict[int, int] = {}
        self.dispatcher = dispatcher or Dispatcher()
        self.state = state or State(model=model, optimizer=optimizer)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        # The last step's gradient norm, a device tensor (inf/NaN: a step fp16's scaler
        # skipped), read by whoever logs, never here; no history (tensors kept across
        # steps fragment the CPU heap).
        self.grad_norm = torch.zeros((), device=self._params[0].device if self._params
                                     else torch.device("cpu"))
        # True while parameters are being updated: a failure then leaves them half-stepped,
        # and the trainer must not checkpoint them.
        self.updating = False
        self._phase = "forward"
        self._init_redo(model)
        # The dispatcher's handler lists, held once: callbacks added later still reach them,
        # and an event nobody listens to costs one truthiness check.
        self._on_backward = self.dispatcher.table[Event.BEFORE_BACKWARD]
        self._on_optimizer_step = self.dispatcher.table[Event.BEFORE_OPTIMIZER_STEP]
        # Whether the last step's update was applied: a bool, or a device bool tensor where
        # the skip was decided on the device (never read here: that would be a sync).
        self.applied: bool | torch.Tensor = True
        # skip_nonfinite: where the flag is decided (module docstring)
        self._skip_nonfinite = config.skip_nonfinite and not precision.scales_loss
        on_cpu = all(p.device.type == "cpu" for p in self._params)
        self._flag_on_device = supports_found_inf(optimizer) and not (
            on_cpu if config.host_reads is None else config.host_reads)
        self._init_ranks(comm)
        self.scaler_watch = ScalerWatch() if precision.scales_loss else None

    def _init_redo(self, model: nn.Module) -> None:
        """What a redone step restores, and the layers that make a split step inexact."""
        # guard.StepStart, held as the step reads it: the RNG while the step draws, the
        # BatchNorm statistics and the copy the step keeps of them.
        self._start = start = StepStart(model, self._params, self.guard is not None)
        self._rng, self._buffers, self._saved_buffers = start.rng, start.buffers, start.saved
        # Layers that normalise with the statistics of the batch they see: split into
        # micro-batches, they see each micro-batch's (said once, Event.ANOMALY).
        self._batch_stat_layers = [(n, m) for n, m in model.named_modules()
                                   if uses_batch_statistics(m)]

    def _init_ranks(self, comm: Comm | None) -> None:
        """Distributed: the per-attempt agreement, and what it found out."""
        bare = unwrap_compiled(self.model)
        sharded = is_sharded(bare)
        if sharded:  # your own loop's fully_shard: its ranks, and an optimizer built after
            check_optimizer(bare, self.optimizer)
            comm = comm if comm is not None else _process_group_comm(self.model)
        self._comm = comm if comm is not None and comm.world.distributed else None
        # FSDP2 (memory/sharding.py): gradients stay unreduced on each rank until
        # set_requires_gradient_sync(True) before the last backward, as DDP's no_sync does
        self._sharded = self._comm is not None and sharded
        self._dtensors = sharded  # gradients are DTensors: their norm is one too
        # FSDP's view-output warning, replaced by a check of what it warns about
        self._views = ViewWatch(bare) if self._sharded else None
        if self._sharded:
            no_sync: Callable[[], Any] | None = functools.partial(_gradient_sync_off, bare)
        else:
            no_sync = getattr(self.model, "no_sync", None) if self._comm is not None else None
        self._no_sync: Callable[[], Any] = no_sync or contextlib.nullcontext
        self._agreed = False  # this attempt's agreement was made
        self._stop_requested: Callable[[], bool] = lambda: False
        self.stop_agreed = False  # see stop_when
        # time spent in the agreement, waiting for the slowest rank (None: no agreement)
        self.sync_wait_s: float | None = (0.0 if self._comm is not None and self.guard
                                          is not None else None)

    def stop_when(self, requested: Callable[[], bool]) -> None:
        """Send `requested()` (this rank was asked to stop) with each step's agreement;
        `stop_agreed` turns True on every rank after the same step once any rank was."""
        self._stop_requested = requested

    def step(self, batch: Any, loss_fn: LossFn) -> torch.Tensor:
        """One optimizer step on `batch`; returns the batch's mean loss as a device tensor."""
        guard = self.guard
        if guard is None:
            total = self._accumulate(batch, loss_fn, self.micro_batch_size)
            self._finish_step()
            return total
        # The step's start, for a redo: torch's RNG while the step draws (guard.StepRng),
        # and the BatchNorm statistics in one fused copy into buffers kept for it.
        keeper = self._rng
        rng = keeper.before() if keeper.snapshotting else None
        if self._buffers:
            foreach_copy_(self._saved_buffers, self._buffers)
        total = self._try(batch, loss_fn, guard.current)
        if total is None:  # redone outside the except block (see _redo)
            total = self._redo(batch, loss_fn, guard, rng)
        self._finish_step()
        keeper.after(rng)
        change = guard.decide(oom=False)
        if change is not None:
            self._change_micro_batch(change.old, change.new, "grow", None)
        return total

    def _accumulate(self, batch: Any, loss_fn: LossFn, micro: int | None) -> torch.Tensor:
        """Forward and backward over every micro-batch; gradients accumulate in .grad,
        and under DDP are all-reduced in the last backward (module docstring). The last
        micro-batch, in the common case the only one, runs after the loop over the others:
        no list or weight is built for a batch that is not split (it runs every step)."""
        n = batch_tree.leading_size(batch) if micro is not None else None
        m, total = n, None
        self.optimizer.zero_grad(set_to_none=True)
        if n is not None and micro < n:  # type: ignore[operator]
            *early, (batch, m) = batch_tree.split(batch, micro)  # type: ignore[arg-type]
            if self._batch_stat_layers:
                self._say_batch_statistics(early[0][1], n)
            for chunk, size in early:
                with self._no_sync():  # DDP: gradients accumulate locally
                    loss = self._forward(chunk, size, n, loss_fn)
                    self._phase = "backward"
                    self.precision.backward(loss)
                total = loss.detach() if total is None else total + loss.detach()
        if self._comm is None:
            loss = self._forward(batch, m, n, loss_fn)
        else:
            with self._no_sync():  # the ranks may yet abandon it: DDP expects no backward
                loss = self._forward(batch, m, n, loss_fn)
            if self.guard is not None:  # without it an OOM ends the run: nothing to agree
                self._agree(oom=False)
            if self._sharded:  # FSDP reduce-scatters in this backward
                unwrap_compiled(self.model).set_requires_gradient_sync(True)
            else:
                arm_all_reduce(self.model)
        self._phase = "backward"
        self.precision.backward(loss)  # under DDP, the gradients are all-reduced in here
        return loss.detach() if total is None else total + loss.detach()

    def _forward(self, chunk: Any, m: int | None, n: int | None, loss_fn: LossFn
                 ) -> torch.Tensor:
        """A micro-batch of `m` of the batch's `n` samples: its loss, weighted by its share."""
        self._phase = "forward"
        with self.precision.forward_context():
            loss = loss_fn(self.model, chunk).float()
        if self._views is not None:
            self._views.check()
        if m != n:
            loss = loss * (m / n)  # type: ignore[operator]
        for handler in self._on_backward:
            handler(self.state, loss)
        return loss

    def _redo(self, batch: Any, loss_fn: LossFn, guard: OOMGuard, rng: tuple[Any, ...] | None
              ) -> torch.Tensor:
        """After an OOM: back to the step's start, smaller micro-batches, until it fits.

        Called outside the except block, so the exception's traceback, which pins the
        failed micro-batch's activations, is gone before anything is redone.
        """
        cuda = bool(self._params) and self._params[0].is_cuda
        if cuda:  # the retries' allocations, for a snapshot should even 1 sample fail
            record_memory_history(True)
        while True:
            failed_in = self._phase
            exact = self._start.restore(self.optimizer, rng)
            try:
                change = guard.decide(oom=True)
            except OutOfMemoryAtMinimum:
                raise OutOfMemoryAtMinimum(
                    f"out of memory in {failed_in} at step {self.state.step + 1} even with "
                    "a micro-batch of 1 sample") from None
            self._change_micro_batch(change.old, change.new, "oom", failed_in, exact)
            total = self._try(batch, loss_fn, guard.current)
            if total is not None:
                if cuda:
                    record_memory_history(False)
                return total

    def _try(self, batch: Any, loss_fn: LossFn, micro: int) -> torch.Tensor | None:
        """One attempt at the step; None when this rank, or any other, ran out of memory."""
        self._agreed = False
        failed = False
        try:
            return self._attempt(batch, loss_fn, micro)
        except PeerOutOfMemory:
            return None
        except torch.OutOfMemoryError:
            if self._comm is not None and self._agreed:
                raise oom_after_agreement(self._comm.world.rank, self.state.step + 1) from None
            failed = True
        if failed and self._comm is not None:  # outside the handler: its frames are gone
            self._agree(oom=True)
        return None

    def _agree(self, oom: bool) -> None:
        """The attempt's one agreement (module docstring): raises PeerOutOfMemory when
        another rank ran out of memory; sets `stop_agreed` when any rank is stopping."""
        comm = self._comm
        assert comm is not None
        t = time.perf_counter()
        # host-side message on the control group: no device sync
        failed_rank, stop = comm.agree(comm.world.rank + 1 if oom else 0,
                                       int(self._stop_requested()))
        self.sync_wait_s = (self.sync_wait_s or 0.0) + time.perf_counter() - t
        self._agreed = True
        self.stop_agreed = self.stop_agreed or bool(stop)
        if failed_rank and not oom:
            self._phase = f"rank {failed_rank - 1}"
            raise PeerOutOfMemory(f"rank {failed_rank - 1} ran out of memory")

    def _attempt(self, batch: Any, loss_fn: LossFn, micro: int) -> torch.Tensor:
        check = self.config.memory_check
        if check is None or self._checked.get(micro, 0) >= CHECKED_STEPS:
            return self._accumulate(batch, loss_fn, micro)
        # the last step's gradients, freed inside unseen by the tracker: not in its baseline
        self.optimizer.zero_grad(set_to_none=True)
        with check() as budget:
            total = self._accumulate(batch, loss_fn, micro)
        self._checked[micro] = self._checked.get(micro, 0) + 1
        tracker = getattr(budget, "tracker", None)
        if tracker is not None:  # what the tracked steps counted: the run's CPU peak figure
            self.checked_peaks[micro] = max(tracker.peak, self.checked_peaks.get(micro, 0))
        return total

    def _say_batch_statistics(self, micro: int, n: int) -> None:
        training = [name for name, m in self._batch_stat_layers if m.training]
        self._batch_stat_layers = []  # once
        if training:
            self.dispatcher.fire(Event.ANOMALY, self.state, {
                "kind": "batch_statistics", "layers": training, "micro_batch": micro,
                "batch": n, "step": self.state.step + 1})

    def _change_micro_batch(self, old: int, new: int, reason: str, phase: str | None,
                            exact: bool = True) -> None:
        self.micro_batch_size = new
        info = {"old": old, "new": new, "reason": reason, "phase": phase,
                "step": self.state.step + 1}
        if not exact:  # the redo draws other random numbers than the failed attempt did
            info["exact"] = False
        self.dispatcher.fire(Event.MICRO_BATCH_CHANGE, self.state, info)

    def _finish_step(self) -> None:
        self.precision.unscale(self.optimizer)
        if self.grad_clip is not None:  # clipping computes the norm anyway (no grads: 0)
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip, foreach=True)
        else:
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        if norm is not None:
            # computed under no_grad: nothing to detach. Sharded: a replicated DTensor
            # holding the norm over all shards; its local value is that norm (no collective)
            norm = self.grad_norm = plain_value(norm) if self._dtensors else norm
        for handler in self._on_optimizer_step:
            handler(self.state, self.optimizer)
        self.updating = True
        if self._skip_nonfinite and norm is not None:
            self.applied = self._step_unless_nonfinite(norm)
        else:
            self.applied = self.precision.optimizer_step(self.optimizer)
        # once per optimizer step, applied or skipped, as torch's own GradScaler loop does:
        # the schedule follows the step count (so a resumed run continues it exactly)
        if self.scheduler is not None and self._scheduling():
            self.scheduler.step()
        self.updating = False
        if self.scaler_watch is not None:  # fp16: most updates skipped? (module docstring)
            info = self.scaler_watch.observe(self.applied, norm, self.state.step + 1)
            if info is not None:
                self.dispatcher.fire(Event.ANOMALY, self.state, info)

    def _scheduling(self) -> bool:
        # Not past the run's length, nor a fixed-length schedule's (OneCycleLR raises
        # there; a resumed run given more train.steps keeps the checkpoint's total_steps).
        end = min(self.scheduler_steps or math.inf,
                  getattr(self.scheduler, "total_steps", None) or math.inf)
        return getattr(self.scheduler, "last_epoch", 0) < end

    def _step_unless_nonfinite(self, norm: torch.Tensor) -> bool | torch.Tensor:
        if self._flag_on_device:  # the kernel skips the update and its step count
            bad = torch.isfinite(norm).logical_not()
            with found_inf_given(self.optimizer, bad.float()):
                self.precision.optimizer_step(self.optimizer)
            return bad.logical_not()
        if not math.isfinite(norm.item()):  # host read: free on CPU; on a GPU a sync
            return False
        return self.precision.optimizer_step(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"precision": self.precision.state_dict(), "micro_batch_size":
                self.micro_batch_size, "guard": self.guard.state_dict() if self.guard else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.precision.load_state_dict(dict(state.get("precision", {})))
        if self.guard is not None and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
            self.micro_batch_size = self.guard.current


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
