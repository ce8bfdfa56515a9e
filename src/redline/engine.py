"""Engine.step(): one optimizer step over one batch, split into micro-batches.

Why the gradient is exact: the task's loss is a *mean* over the samples it is given.
For a batch of N samples split into micro-batches of sizes m_1..m_k, the full-batch
loss is sum_i (m_i / N) * mean_loss(micro_batch_i). Each micro-batch's loss is
multiplied by its share m_i / N before backward, so the gradients that accumulate in
`.grad` equal the full-batch gradient (up to floating-point summation order), for any
split, uneven last chunk included. The optimizer and scheduler step once per batch.

Nothing here reads a device value on the host: the loss comes back as a device tensor,
the gradient norm and the count of steps with non-finite gradients stay on the device,
and the caller decides when to look at them (the telemetry window). The one exception
is fp16's GradScaler, whose `step` reads its inf flag on the host by design.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from redline.device import DeviceInfo
from redline.events import Dispatcher, Event, State
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
        self.dispatcher = dispatcher or Dispatcher()
        self.state = state or State(model=model, optimizer=optimizer)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        # Device-side counters, read by whoever logs (never in the hot path).
        device = self._params[0].device if self._params else torch.device("cpu")
        self.grad_norm = torch.zeros((), device=device)
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)
        # True while parameters are being updated: a failure then leaves them half-stepped,
        # and the trainer must not checkpoint them.
        self.updating = False
        self._fire_backward = self.dispatcher.has(Event.BEFORE_BACKWARD)
        self._fire_opt = self.dispatcher.has(Event.BEFORE_OPTIMIZER_STEP)

    def step(self, batch: Any, loss_fn: LossFn) -> torch.Tensor:
        """One optimizer step on `batch`; returns the batch's mean loss as a device tensor."""
        n = batch_size_of(batch)
        chunks = split_batch(batch, self.micro_batch_size or n)
        self.optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        for chunk, m in chunks:
            with self.precision.forward_context():
                loss = loss_fn(self.model, chunk)
            weighted = loss.float() * (m / n) if m != n else loss.float()
            if self._fire_backward:
                self.dispatcher.fire(Event.BEFORE_BACKWARD, self.state, weighted)
            self.precision.backward(weighted)
            total = weighted.detach() if total is None else total + weighted.detach()
        assert total is not None
        self._finish_step()
        return total

    def _finish_step(self) -> None:
        self.precision.unscale(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            if self.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip, foreach=True)
            else:
                norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            self.grad_norm = norm.detach()
            self.nonfinite_steps.add_(~torch.isfinite(self.grad_norm))
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
            "nonfinite_steps": int(self.nonfinite_steps.item()),
            "micro_batch_size": self.micro_batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.precision.load_state_dict(dict(state.get("precision", {})))
        self.nonfinite_steps.fill_(int(state.get("nonfinite_steps", 0)))
