"""Engine.step(): one optimizer step over one batch, split into micro-batches.

Why the gradient is exact: the task's loss is a *mean* over the samples it is given.
For a batch of N samples split into micro-batches of sizes m_1..m_k, the full-batch
loss is sum_i (m_i / N) * mean_loss(micro_batch_i). Each micro-batch's loss is
multiplied by its share m_i / N before backward, so the gradients that accumulate in
`.grad` equal the full-batch gradient (up to floating-point summation order), for any
split, uneven last chunk included. The optimizer and scheduler step once per batch.
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
flag otherwise).

Under DistributedDataParallel (a `comm` of more than one rank) every micro-batch but the
last runs under `no_sync`, so gradients accumulate locally and DDP all-reduces once, in
the last micro-batch's backward. Just before that backward the ranks agree, in one
host-side message (distributed.Comm.agree), on whether any of them ran out of memory in
this attempt and whether any was asked to stop. A rank that ran out of memory earlier in
the step sends its flag from the guard's handler instead, so every rank makes exactly one
agreement per attempt, and all of them redo the step together with the same smaller
micro-batch: none is left waiting in an all-reduce the failed rank never joins. An
out-of-memory error *inside* that last backward comes after the agreement, when the
gradient all-reduce has begun and cannot be redone alone: it ends that rank's run with a
sentence saying so, and the others stop naming it (distributed.py). Without the OOM guard
there is no agreement (an OOM ends the run the same way; a stop is agreed at the next
telemetry window instead: session.py).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from redline import batch as batch_tree
from redline.device import DeviceInfo
from redline.distributed import Comm
from redline.events import Dispatcher, Event, State
from redline.memory.guard import OOMGuard, OutOfMemoryAtMinimum, StepRng
from redline.precision import Precision, get_precision

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class PeerOutOfMemory(torch.OutOfMemoryError):
    """Another rank ran out of memory in this attempt: this one redoes the step too."""


class Engine:
    """Runs optimizer steps with micro-batching, a precision policy and gradient clipping.

    Use it from your own loop:

        engine = Engine(model, optimizer, precision="bf16-mixed", micro_batch_size=8)
        for batch in loader:
            loss = engine.step(batch, lambda model, b: F.cross_entropy(model(b[0]), b[1]))
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision | str = "fp32",
        *,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        grad_clip: float | None = None,
        micro_batch_size: int | None = None,
        dispatcher: Dispatcher | None = None,
        state: State | None = None,
        oom_guard: OOMGuard | bool = False,
        memory_check: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        skip_nonfinite: bool = False,
        host_reads: bool | None = None,
        comm: Comm | None = None,
    ) -> None:
        """`host_reads`: check the gradient norm on the host (None: where it is host memory,
        the CPU); False runs the device path (the fused optimizer's `found_inf`) anywhere.
        `comm`: the ranks of a DDP-wrapped `model` (see the module docstring)."""
        if isinstance(precision, str):
            param = next(model.parameters(), None)
            spec = str(param.device) if param is not None else "cpu"
            precision = get_precision(precision, DeviceInfo.detect(spec))
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be a positive number or None, got {grad_clip!r}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size!r}")
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.scheduler = scheduler
        self.grad_clip = grad_clip
        self.micro_batch_size = micro_batch_size
        if oom_guard is True:
            if micro_batch_size is None:
                raise ValueError("oom_guard needs a micro_batch_size to shrink from")
            oom_guard = OOMGuard(micro_batch_size)
        self.guard: OOMGuard | None = oom_guard or None
        # With the guard: a context (a tracked memory budget) that each micro-batch size's
        # first attempt runs in, where the allocator itself would not raise (build.py).
        self._memory_check = memory_check
        self._checked: set[int] = set()
        # micro-batch -> peak tensor bytes its first, tracked step counted (CPU, no budget)
        self.checked_peaks: dict[int, int] = {}
        self.dispatcher = dispatcher or Dispatcher()
        self.state = state or State(model=model, optimizer=optimizer)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        # Device-side counters, read by whoever logs (never in the hot path).
        device = self._params[0].device if self._params else torch.device("cpu")
        # The last step's gradient norm, a device tensor (inf/NaN: a step fp16's scaler
        # skipped). Telemetry records it per step; the engine keeps no history, since
        # tensors kept alive across steps fragment the CPU allocator's heap.
        self.grad_norm = torch.zeros((), device=device)
        # True while parameters are being updated: a failure then leaves them half-stepped,
        # and the trainer must not checkpoint them.
        self.updating = False
        self._phase = "forward"
        # BatchNorm statistics change in forward; a redone step restores them.
        self._buffers = [b for m in model.modules() if isinstance(m, _NormBase)
                         for b in m.buffers(recurse=False)]
        # Layers that normalise with the statistics of the batch they see: split into
        # micro-batches, they see each micro-batch's (said once, Event.ANOMALY).
        self._batch_stat_layers = [(n, m) for n, m in model.named_modules()
                                   if isinstance(m, _BatchNorm)]
        self._saved_buffers = [b.detach().clone() for b in self._buffers] if oom_guard else []
        # What a redone step rewinds: torch's CPU generator and those of the parameters'
        # CUDA devices, snapshotted only while the step draws (guard.StepRng).
        self._rng = StepRng(sorted({p.device.index or 0 for p in self._params
                                    if p.device.type == "cuda"}))
        # The dispatcher's handler lists, held once: callbacks added later still reach them,
        # and an event nobody listens to costs one truthiness check.
        self._on_backward = self.dispatcher.table[Event.BEFORE_BACKWARD]
        self._on_optimizer_step = self.dispatcher.table[Event.BEFORE_OPTIMIZER_STEP]
        # Whether the last step's update was applied: a bool, or a device bool tensor where
        # the skip was decided on the device (never read here: that would be a sync).
        self.applied: bool | torch.Tensor = True
        # Skip the update of a step whose gradients are not finite: checked on the host
        # where that is free (CPU), else through a fused optimizer's `found_inf` (the
        # trainer's AdamW), else by a host read of the flag (on a GPU, a sync).
        self._skip_nonfinite = skip_nonfinite and not precision.scales_loss
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        on_cpu = all(p.device.type == "cpu" for p in self._params)
        self._flag_on_device = fused and not (on_cpu if host_reads is None else host_reads)
        # Distributed: the per-attempt agreement, and what it found out.
        self._comm = comm if comm is not None and comm.world.distributed else None
        no_sync = getattr(model, "no_sync", None) if self._comm is not None else None
        self._no_sync: Callable[[], Any] = no_sync or contextlib.nullcontext
        self._agreed = False  # this attempt's agreement was made
        # Whether this rank has been asked to stop (the trainer's signal flag), sent along;
        # `stop_agreed` becomes True once any rank was, after the same step on every rank.
        self.stop_requested: Callable[[], bool] = lambda: False
        self.stop_agreed = False
        # time spent in the agreement, waiting for the slowest rank (None: no agreement)
        self.sync_wait_s: float | None = (0.0 if self._comm is not None and self.guard
                                          is not None else None)

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
            torch._foreach_copy_(self._saved_buffers, self._buffers)
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
        """Forward and backward over every micro-batch; gradients accumulate in .grad."""
        if self._comm is not None:
            return self._accumulate_ddp(batch, loss_fn, micro)
        if micro is not None:  # only a micro-batch size can make a batch need splitting
            n = batch_tree.leading_size(batch)
            if n is None or micro < n:
                return self._accumulate_chunks(batch_tree.split(batch, micro), loss_fn)
        # One chunk, the common case: kept free of lists and weights (it runs every step).
        self.optimizer.zero_grad(set_to_none=True)
        self._phase = "forward"
        with self.precision.forward_context():
            loss = loss_fn(self.model, batch).float()
        for handler in self._on_backward:
            handler(self.state, loss)
        self._phase = "backward"
        self.precision.backward(loss)
        return loss.detach()

    def _accumulate_chunks(self, chunks: list[tuple[Any, int]], loss_fn: LossFn
                           ) -> torch.Tensor:
        n = sum(m for _, m in chunks)
        if self._batch_stat_layers:
            self._say_batch_statistics(chunks[0][1], n)
        self.optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        for chunk, m in chunks:
            weighted = self._forward(chunk, m, n, loss_fn)
            self._phase = "backward"
            self.precision.backward(weighted)
            total = weighted.detach() if total is None else total + weighted.detach()
        assert total is not None
        return total

    def _forward(self, chunk: Any, m: int, n: int, loss_fn: LossFn) -> torch.Tensor:
        """A micro-batch of `m` of the batch's `n` samples: its loss, weighted by its share."""
        self._phase = "forward"
        with self.precision.forward_context():
            loss = loss_fn(self.model, chunk)
        weighted = loss.float() * (m / n) if m != n else loss.float()
        for handler in self._on_backward:
            handler(self.state, weighted)
        return weighted

    def _accumulate_ddp(self, batch: Any, loss_fn: LossFn, micro: int | None
                        ) -> torch.Tensor:
        """`_accumulate` under DDP (module docstring). Every forward runs under no_sync, so
        a forward the ranks then abandon leaves DDP expecting no backward; after the
        agreement the last backward is armed to all-reduce, as DDP's own forward would."""
        n = batch_tree.leading_size(batch)
        chunks = (batch_tree.split(batch, micro) if micro is not None and n is not None
                  and micro < n else [(batch, n or 1)])
        total_n = sum(m for _, m in chunks)
        if len(chunks) > 1 and self._batch_stat_layers:
            self._say_batch_statistics(chunks[0][1], total_n)
        self.optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        for i, (chunk, m) in enumerate(chunks):
            with self._no_sync():  # gradients accumulate locally
                weighted = self._forward(chunk, m, total_n, loss_fn)
                if i < len(chunks) - 1:
                    self._phase = "backward"
                    self.precision.backward(weighted)
            total = weighted.detach() if total is None else total + weighted.detach()
        if self.guard is not None:  # without the guard an OOM ends the run: nothing to agree
            self._agree(oom=False)
        _arm_all_reduce(self.model)
        self._phase = "backward"
        self.precision.backward(weighted)  # DDP all-reduces the gradients in here
        assert total is not None
        return total

    def _redo(self, batch: Any, loss_fn: LossFn, guard: OOMGuard, rng: tuple[Any, ...] | None
              ) -> torch.Tensor:
        """After an OOM: back to the step's start, smaller micro-batches, until it fits.

        Called outside the except block, so the exception's traceback, which pins the
        failed micro-batch's activations, is gone before anything is redone.
        """
        while True:
            failed_in = self._phase
            exact = self._recover(rng)
            try:
                change = guard.decide(oom=True)
            except OutOfMemoryAtMinimum:
                raise OutOfMemoryAtMinimum(
                    f"out of memory in {failed_in} at step {self.state.step + 1} even with "
                    "a micro-batch of 1 sample") from None
            self._change_micro_batch(change.old, change.new, "oom", failed_in, exact)
            total = self._try(batch, loss_fn, guard.current)
            if total is not None:
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
                raise self._oom_after_agreement() from None
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
                                       int(self.stop_requested()))
        self.sync_wait_s = (self.sync_wait_s or 0.0) + time.perf_counter() - t
        self._agreed = True
        self.stop_agreed = self.stop_agreed or bool(stop)
        if failed_rank and not oom:
            self._phase = f"rank {failed_rank - 1}"
            raise PeerOutOfMemory(f"rank {failed_rank - 1} ran out of memory")

    def _oom_after_agreement(self) -> torch.OutOfMemoryError:
        assert self._comm is not None
        return torch.OutOfMemoryError(
            f"out of memory on rank {self._comm.world.rank} in the last micro-batch's "
            f"backward at step {self.state.step + 1}, where DDP all-reduces the gradients: "
            "that backward cannot be redone by one rank alone; lower train.batch_size or "
            "memory.target (redline tune measures what fits)")

    def _attempt(self, batch: Any, loss_fn: LossFn, micro: int) -> torch.Tensor:
        if self._memory_check is None or micro in self._checked:
            return self._accumulate(batch, loss_fn, micro)
        with self._memory_check() as budget:
            total = self._accumulate(batch, loss_fn, micro)
        self._checked.add(micro)
        tracker = getattr(budget, "tracker", None)
        if tracker is not None:  # what the tracked step counted: the run's CPU peak figure
            self.checked_peaks[micro] = tracker.peak
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

    def _recover(self, rng: tuple[Any, ...] | None) -> bool:
        """Back to the state at the start of the step, with the failed attempt's memory freed;
        False when the RNG could not be rewound exactly (guard.StepRng)."""
        self.optimizer.zero_grad(set_to_none=True)
        exact = self._rng.rewind(rng)
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved_buffers)
        gc.collect()  # reference cycles in user code can still pin activations
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return exact

    def _finish_step(self) -> None:
        self.precision.unscale(self.optimizer)
        if self.grad_clip is not None:  # clipping computes the norm anyway (no grads: 0)
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip, foreach=True)
        else:
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        if norm is not None:
            self.grad_norm = norm  # computed under no_grad: nothing to detach
        for handler in self._on_optimizer_step:
            handler(self.state, self.optimizer)
        self.updating = True
        if self._skip_nonfinite and norm is not None:
            self.applied = self._step_unless_nonfinite(norm)
        else:
            self.applied = self.precision.optimizer_step(self.optimizer)
        if self.scheduler is not None:
            self.scheduler.step()
        self.updating = False

    def _step_unless_nonfinite(self, norm: torch.Tensor) -> bool | torch.Tensor:
        if self._flag_on_device:  # the kernel skips the update and its step count
            bad = torch.isfinite(norm).logical_not()
            self.optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
            try:
                self.precision.optimizer_step(self.optimizer)
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
            return bad.logical_not()
        if not math.isfinite(norm.item()):  # host read: free on CPU; on a GPU a sync
            return False
        return self.precision.optimizer_step(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision.state_dict(),
            "micro_batch_size": self.micro_batch_size,
            "guard": self.guard.state_dict() if self.guard else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.precision.load_state_dict(dict(state.get("precision", {})))
        if self.guard is not None and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
            self.micro_batch_size = self.guard.current

    def stop_when(self, requested: Callable[[], bool]) -> None:
        """Send `requested()` (this rank was asked to stop) with each step's agreement;
        `stop_agreed` turns True on every rank after the same step once any rank was."""
        self.stop_requested = requested


def _arm_all_reduce(model: nn.Module) -> None:
    """What DistributedDataParallel's forward does outside no_sync (its _pre_forward and
    _post_forward, torch 2.x; find_unused_parameters=False, as build.py wraps), done after
    the forward instead: the next backward all-reduces the gradients."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile's wrapper around DDP
    ddp.require_backward_grad_sync = True
    ddp.require_forward_param_sync = True
    ddp.reducer.prepare_for_forward()
    ddp.reducer.prepare_for_backward([])
