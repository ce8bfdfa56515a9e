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

With the OOM guard a step that runs out of memory is redone from its start (the RNG and
the BatchNorm statistics restored: guard.StepStart) with smaller micro-batches. What the
update does after the gradients, and why it reads nothing on the host, is update.py's;
what the step does across ranks (DDP, FSDP, the agreement before a redo) is ranks.py's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from redline import batch as batch_tree
from redline._torch_compat import (
    foreach_copy_,
    record_memory_history,
    uses_batch_statistics,
)
from redline.device import DeviceInfo
from redline.distributed import Comm, PeerOutOfMemory
from redline.engine.config import CHECKED_STEPS, EngineConfig, LossFn
from redline.engine.ranks import StepRanks
from redline.engine.update import (
    flag_on_device,
    gradient_norm,
    scheduling,
    step_unless_nonfinite,
)
from redline.events import Dispatcher, Event, State
from redline.memory.guard import OOMGuard, OutOfMemoryAtMinimum, StepStart
from redline.precision import Precision, ScalerWatch, get_precision


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
        DDP-wrapped `model` (ranks.py). `scheduler_steps`: the scheduler is stepped until
        its `last_epoch` reaches it (the run's length), so a timing that steps past the run
        leaves a OneCycleLR at its end instead of raising."""
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
        # skip_nonfinite: where the flag is decided (update.py)
        self._skip_nonfinite = config.skip_nonfinite and not precision.scales_loss
        self._flag_on_device = flag_on_device(optimizer, self._params, config.host_reads)
        self._ranks = StepRanks(model, optimizer, comm, self.guard is not None)
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

    def stop_when(self, requested: Callable[[], bool]) -> None:
        """Send `requested()` (this rank was asked to stop) with each step's agreement;
        `stop_agreed` turns True on every rank after the same step once any rank was."""
        self._ranks.stop_requested = requested

    @property
    def stop_agreed(self) -> bool:
        """True on every rank after the same step once any rank was asked to stop."""
        return self._ranks.stop_agreed

    @property
    def sync_wait_s(self) -> float | None:
        """Time spent in the agreement, waiting for the slowest rank (None: no agreement)."""
        return self._ranks.sync_wait_s

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

    def _try(self, batch: Any, loss_fn: LossFn, micro: int) -> torch.Tensor | None:
        """One attempt at the step; None when this rank, or any other, ran out of memory."""
        ranks = self._ranks
        failed = False
        ranks.start_attempt()
        try:
            return self._attempt(batch, loss_fn, micro)
        except PeerOutOfMemory:
            self._phase = f"rank {ranks.failed_rank}"
        except torch.OutOfMemoryError:
            ranks.check_redoable(self.state.step + 1)
            failed = True
        finally:
            ranks.in_attempt = False
        ranks.abort(failed)  # outside the handler: its frames are gone
        return None

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

    def _accumulate(self, batch: Any, loss_fn: LossFn, micro: int | None) -> torch.Tensor:
        """Forward and backward over every micro-batch; gradients accumulate in .grad,
        and under DDP are all-reduced in the last backward (ranks.py). The last
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
                with self._ranks.no_sync():  # DDP: gradients accumulate locally
                    loss = self._forward(chunk, size, n, loss_fn)
                    self._phase = "backward"
                    self.precision.backward(loss)
                total = loss.detach() if total is None else total + loss.detach()
        if self._ranks.comm is None:
            loss = self._forward(batch, m, n, loss_fn)
        else:
            with self._ranks.no_sync():  # the ranks may yet abandon it: DDP expects no backward
                loss = self._forward(batch, m, n, loss_fn)
            self._ranks.before_last_backward()
        self._phase = "backward"
        self.precision.backward(loss)  # under DDP, the gradients are all-reduced in here
        return loss.detach() if total is None else total + loss.detach()

    def _forward(self, chunk: Any, m: int | None, n: int | None, loss_fn: LossFn
                 ) -> torch.Tensor:
        """A micro-batch of `m` of the batch's `n` samples: its loss, weighted by its share."""
        self._phase = "forward"
        with self.precision.forward_context():
            loss = loss_fn(self.model, chunk).float()
        if self._ranks.views is not None:
            self._ranks.views.check()
        if m != n:
            loss = loss * (m / n)  # type: ignore[operator]
        for handler in self._on_backward:
            handler(self.state, loss)
        return loss

    def _finish_step(self) -> None:
        """The update (update.py): unscale, clip, the optimizer step or its skip, the
        scheduler, the fp16 scaler's skips watched."""
        self.precision.unscale(self.optimizer)
        norm = gradient_norm(self._params, self.grad_clip, self._ranks.dtensors)
        if norm is not None:
            self.grad_norm = norm
        for handler in self._on_optimizer_step:
            handler(self.state, self.optimizer)
        self.updating = True
        if self._skip_nonfinite and norm is not None:
            self.applied = step_unless_nonfinite(self.optimizer, self.precision, norm,
                                                 self._flag_on_device)
        else:
            self.applied = self.precision.optimizer_step(self.optimizer)
        # once per optimizer step, applied or skipped, as torch's own GradScaler loop does:
        # the schedule follows the step count (so a resumed run continues it exactly)
        if self.scheduler is not None and scheduling(self.scheduler, self.scheduler_steps):
            self.scheduler.step()
        self.updating = False
        if self.scaler_watch is not None:  # fp16: most updates skipped? (update.py)
            info = self.scaler_watch.observe(self.applied, norm, self.state.step + 1)
            if info is not None:
                self.dispatcher.fire(Event.ANOMALY, self.state, info)

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

    def state_dict(self) -> dict[str, Any]:
        return {"precision": self.precision.state_dict(), "micro_batch_size":
                self.micro_batch_size, "guard": self.guard.state_dict() if self.guard else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.precision.load_state_dict(dict(state.get("precision", {})))
        if self.guard is not None and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
            self.micro_batch_size = self.guard.current
