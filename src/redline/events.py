"""Events and callbacks: the one extension mechanism of redline.

The training loop, in pseudocode, with the event fired at each point:

    FIT_START                                   model, optimizer, data ready; resumed if asked
    for epoch:
        EPOCH_START
        for batch in loader:
            BATCH_START                         batch on the device
            engine.step(batch):
                for micro_batch in split(batch):
                    loss = forward(micro_batch)
                    BEFORE_BACKWARD             once per micro-batch, loss unscaled
                    backward(loss)
                unscale, clip
                BEFORE_OPTIMIZER_STEP           gradients final and unscaled
                optimizer.step(); scheduler.step()
            STEP_END                            state.step is the finished step count
            if it is time: evaluate -> EVAL_END
            if it is time: save     -> CHECKPOINT_SAVED
        EPOCH_END
    FIT_END                                     also after an interrupt, before exiting

    ANOMALY      whenever something needs attention (non-finite loss or gradients, a
                 corrupt checkpoint skipped on resume)
    OOM_RETRY    when a step is redone with smaller micro-batches (OOM guard)

A callback implements `on_<event value>` for the events it needs; the dispatch table is
built once, so the hot loop calls only methods that a callback overrides.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


class Event(enum.Enum):
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    BEFORE_BACKWARD = "before_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    STEP_END = "step_end"
    EVAL_END = "eval_end"
    CHECKPOINT_SAVED = "checkpoint_saved"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"
    OOM_RETRY = "oom_retry"
    ANOMALY = "anomaly"

    @property
    def method(self) -> str:
        return f"on_{self.value}"


@dataclass
class State:
    """What callbacks see: the loop's position and the objects being trained."""

    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    samples_seen: int = 0
    max_steps: int = 0
    run_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Base class: override the `on_*` methods for the events you need."""

    def on_fit_start(self, state: State) -> None: ...
    def on_epoch_start(self, state: State) -> None: ...
    def on_batch_start(self, state: State, batch: Any) -> None: ...
    def on_before_backward(self, state: State, loss: torch.Tensor) -> None: ...
    def on_before_optimizer_step(self, state: State, optimizer: torch.optim.Optimizer) -> None: ...
    def on_step_end(self, state: State, loss: torch.Tensor) -> None: ...
    def on_eval_end(self, state: State, metrics: dict[str, float]) -> None: ...
    def on_checkpoint_saved(self, state: State, path: str) -> None: ...
    def on_epoch_end(self, state: State) -> None: ...
    def on_fit_end(self, state: State) -> None: ...
    def on_oom_retry(self, state: State, info: dict[str, Any]) -> None: ...
    def on_anomaly(self, state: State, info: dict[str, Any]) -> None: ...


class Dispatcher:
    """Calls each event's overriding callback methods in registration order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        self.table: dict[Event, list[Callable[..., None]]] = {
            event: [
                getattr(cb, event.method)
                for cb in self.callbacks
                if getattr(type(cb), event.method) is not getattr(Callback, event.method)
            ]
            for event in Event
        }

    def has(self, event: Event) -> bool:
        return bool(self.table[event])

    def fire(self, event: Event, state: State, *args: Any) -> None:
        for handler in self.table[event]:
            handler(state, *args)
