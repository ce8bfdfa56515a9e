"""Engine.step(): one optimizer step over one batch, split into micro-batches.

Why the gradient is exact: the task's loss is a *mean* over the samples it is given.
For a batch of N samples split into micro-batches of sizes m_1..m_k, the full-batch
loss is sum_i (m_i / N) * mean_loss(micro_batch_i). Each micro-batch's loss is
multiplied by its share m_i / N before backward, so the gradients that accumulate in
`.grad` equal the full-batch gradient (up to floating-point summation order), for any
split, uneven last chunk included. The optimizer and scheduler step once per batch.

Nothing here reads a device value on the host: the loss comes back as a device tensor,
the gradient norm stays on the device (`Engine.grad_norm`), and the caller decides when
to look at them (the telemetry window). The one exception
is fp16's GradScaler, whose `step` reads its inf flag on the host by design.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from redline.device import DeviceInfo
from redline.events import Dispatcher, Event, State
from redline.memory.guard import OOMGuard, OutOfMemoryAtMinimum, restore_rng, snapshot_rng
from redline.precision import Precision, get_precision

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: the size of dim 0 of its tensors (which must agree)."""
    sizes = set(_leading_sizes(batch))
    if not sizes:
        raise ValueError("batch has no tensor or per-sample list to split along dim 0")
    if len(sizes) > 1:
        raise ValueError(f"batch tensors disagree on the batch dimension (dim 0): {sorted(sizes)}")
    return sizes.pop()


def _first_size(batch: Any) -> int | None:
    """Dim 0 of the first tensor (or per-sample list) found: the hot path's batch size.

    Whether all the batch's tensors agree is checked by batch_size_of, which the hot path
    needs only when it actually splits the batch.
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, (list, tuple)):
        # the common batch, (inputs, targets): one isinstance, not a scan of every entry
        if batch and isinstance(first := batch[0], torch.Tensor) and first.dim() > 0:
            return first.shape[0]
        if _is_per_sample_list(batch):
            return len(batch)
        values: Any = batch
    elif isinstance(batch, Mapping):
        values = batch.values()
    else:
        return None
    for v in values:
        if (n := _first_size(v)) is not None:
            return n
    return None


def _leading_sizes(batch: Any) -> list[int]:
    if isinstance(batch, torch.Tensor):
        return [batch.shape[0]] if batch.dim() > 0 else []
    if isinstance(batch, Mapping):
        return [s for v in batch.values() for s in _leading_sizes(v)]
    if isinstance(batch, (list, tuple)):
        if _is_per_sample_list(batch):
            return [len(batch)]
        return [s for v in batch for s in _leading_sizes(v)]
    return []


def _is_per_sample_list(seq: Sequence[Any]) -> bool:
    # A list of plain values (captions, ids) holds one entry per sample; a list that holds
    # tensors or containers is a structure to recurse into.
    return len(seq) > 0 and not any(
        isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in seq
    )


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """The samples [start, stop) of every tensor and per-sample list in `batch`."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        if _is_per_sample_list(batch):
            return type(batch)(batch[start:stop])
        items = [slice_batch(v, start, stop) for v in batch]
        if hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return type(batch)(items)
    return batch


def split_batch(batch: Any, micro_batch_size: int) -> list[tuple[Any, int]]:
    """Split along dim 0 into chunks of at most `micro_batch_size`: [(chunk, n_samples)]."""
    n = batch_size_of(batch)
    if micro_batch_size >= n:
        return [(batch, n)]
    return [
        (slice_batch(batch, i, min(i + micro_batch_size, n)), min(micro_batch_size, n - i))
        for i in range(0, n, micro_batch_size)
    ]


def move_to(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor of a nested batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)) and not _is_per_sample_list(batch):
        items = [move_to(v, device, non_blocking) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0
                    ) -> torch.optim.Optimizer:
    """The optimizer redline trains with (AdamW), shared by the trainer and the tuner."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


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
    ) -> None:
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
        self._saved_buffers: list[torch.Tensor] = []  # made by the first guarded step
        # The CUDA generators a redone step must rewind: those of the parameters' devices.
        self._rng_devices = sorted({p.device.index or 0 for p in self._params
                                    if p.device.type == "cuda"})
        self._fire_backward = self.dispatcher.has(Event.BEFORE_BACKWARD)
        self._fire_opt = self.dispatcher.has(Event.BEFORE_OPTIMIZER_STEP)

    def step(self, batch: Any, loss_fn: LossFn) -> torch.Tensor:
        """One optimizer step on `batch`; returns the batch's mean loss as a device tensor."""
        if self.guard is None:
            total = self._accumulate(batch, loss_fn, self.micro_batch_size)
            self._finish_step()
            return total
        return self._guarded_step(batch, loss_fn, self.guard)

    def _accumulate(self, batch: Any, loss_fn: LossFn, micro: int | None) -> torch.Tensor:
        """Forward and backward over every micro-batch; gradients accumulate in .grad."""
        if micro is not None:  # only a micro-batch size can make a batch need splitting
            n = _first_size(batch)
            if n is None or micro < n:
                return self._accumulate_chunks(split_batch(batch, micro), loss_fn)
        # One chunk, the common case: kept free of lists and weights (it runs every step).
        self.optimizer.zero_grad(set_to_none=True)
        self._phase = "forward"
        with self.precision.forward_context():
            loss = loss_fn(self.model, batch).float()
        if self._fire_backward:
            self.dispatcher.fire(Event.BEFORE_BACKWARD, self.state, loss)
        self._phase = "backward"
        self.precision.backward(loss)
        return loss.detach()

    def _accumulate_chunks(self, chunks: list[tuple[Any, int]], loss_fn: LossFn
                           ) -> torch.Tensor:
        n = sum(m for _, m in chunks)
        self.optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        for chunk, m in chunks:
            self._phase = "forward"
            with self.precision.forward_context():
                loss = loss_fn(self.model, chunk)
            weighted = loss.float() * (m / n) if m != n else loss.float()
            if self._fire_backward:
                self.dispatcher.fire(Event.BEFORE_BACKWARD, self.state, weighted)
            self._phase = "backward"
            self.precision.backward(weighted)
            total = weighted.detach() if total is None else total + weighted.detach()
        assert total is not None
        return total

    def _guarded_step(self, batch: Any, loss_fn: LossFn, guard: OOMGuard) -> torch.Tensor:
        rng = snapshot_rng(self._rng_devices)
        if self._buffers:  # one fused copy into buffers kept for it, not a clone each
            if not self._saved_buffers:
                self._saved_buffers = [b.detach().clone() for b in self._buffers]
            torch._foreach_copy_(self._saved_buffers, self._buffers)
        while True:
            failed_in: str | None = None
            try:
                total = self._accumulate(batch, loss_fn, guard.current)
            except torch.OutOfMemoryError:
                failed_in = self._phase
            if failed_in is None:
                break
            # Outside the except block: the exception's traceback, which pins the failed
            # micro-batch's activations, is gone before anything is redone.
            self._recover(rng)
            try:
                change = guard.decide(oom=True)
            except OutOfMemoryAtMinimum:
                raise OutOfMemoryAtMinimum(
                    f"out of memory in {failed_in} at step {self.state.step + 1} even with "
                    "a micro-batch of 1 sample") from None
            self.micro_batch_size = change.new
            self.dispatcher.fire(Event.OOM_RETRY, self.state,
                                 {"old": change.old, "new": change.new, "reason": "oom",
                                  "phase": failed_in, "step": self.state.step + 1})
        self._finish_step()
        change = guard.decide(oom=False)
        if change is not None:
            self.micro_batch_size = change.new
            self.dispatcher.fire(Event.OOM_RETRY, self.state,
                                 {"old": change.old, "new": change.new, "reason": "grow",
                                  "phase": None, "step": self.state.step + 1})
        return total

    def _recover(self, rng: tuple[Any, ...]) -> None:
        """Back to the state at the start of the step, with the failed attempt's memory freed."""
        self.optimizer.zero_grad(set_to_none=True)
        restore_rng(rng)
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._saved_buffers)
        gc.collect()  # reference cycles in user code can still pin activations
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def _finish_step(self) -> None:
        self.precision.unscale(self.optimizer)
        if self.grad_clip is not None:  # clipping computes the norm anyway (no grads: 0)
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip, foreach=True)
        else:
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        if norm is not None:
            self.grad_norm = norm  # computed under no_grad: nothing to detach
        if self._fire_opt:
            self.dispatcher.fire(Event.BEFORE_OPTIMIZER_STEP, self.state, self.optimizer)
        self.updating = True
        self.precision.optimizer_step(self.optimizer)
        if self.scheduler is not None:
            self.scheduler.step()
        self.updating = False

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
