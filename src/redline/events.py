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
                    BEFORE_BACKWARD             once per micro-batch, loss weighted by share
                    backward(loss)
                unscale, clip
                BEFORE_OPTIMIZER_STEP           gradients final and unscaled
                optimizer.step(); scheduler.step()
            STEP_END                            state.step is the finished step count
            telemetry.record_step(...)
                WINDOW                          a telemetry window's record is complete
            if it is time: evaluate -> EVAL_END
            if it is time: save     -> CHECKPOINT_SAVED
        EPOCH_END
    FIT_END                                     also after an interrupt, before exiting

    ANOMALY              whenever something needs attention ({"kind": ...}: a corrupt
                         checkpoint skipped on resume, BatchNorm layers seeing
                         micro-batches instead of the batch)
    MICRO_BATCH_CHANGE   the OOM guard changed the micro-batch: shrunk after an
                         out-of-memory error and the step redone, or grown back after
                         clean steps ({"old", "new", "reason": "oom" | "grow", ...})

WINDOW passes the window's record (a dict, as it will be written to metrics.jsonl and
every tracker) before it is published: a callback may add its own metrics to it, at its
own cadence (every window, or every tenth), without a host sync on the steps between.
On a GPU the record is completed one window late, when its device values have arrived.

A callback implements `on_<event value>` for the events it needs; the dispatch table is
built once, so the hot loop calls only methods that a callback overrides. A callback with
state to keep across a resume returns it from `state_dict()` and takes it back in
`load_state_dict()`; the trainer stores it in every checkpoint.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
    WINDOW = "window"
    EVAL_END = "eval_end"
    CHECKPOINT_SAVED = "checkpoint_saved"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"
    MICRO_BATCH_CHANGE = "micro_batch_change"
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


Handler = Callable[..., None]


class Callback:
    """Base class: override the `on_*` methods for the events you need."""

    def on_fit_start(self, state: State) -> None: ...
    def on_epoch_start(self, state: State) -> None: ...
    def on_batch_start(self, state: State, batch: Any) -> None: ...
    def on_before_backward(self, state: State, loss: torch.Tensor) -> None: ...
    def on_before_optimizer_step(self, state: State, optimizer: torch.optim.Optimizer) -> None: ...
    def on_step_end(self, state: State, loss: torch.Tensor) -> None: ...
    def on_window(self, state: State, record: dict[str, Any]) -> None: ...
    def on_eval_end(self, state: State, metrics: dict[str, float]) -> None: ...
    def on_checkpoint_saved(self, state: State, path: str) -> None: ...
    def on_epoch_end(self, state: State) -> None: ...
    def on_fit_end(self, state: State) -> None: ...
    def on_micro_batch_change(self, state: State, info: dict[str, Any]) -> None: ...
    def on_anomaly(self, state: State, info: dict[str, Any]) -> None: ...

    def handler(self, event: Event) -> Handler | None:
        """The method to call for `event`, or None when this callback does not handle it."""
        if getattr(type(self), event.method) is getattr(Callback, event.method):
            return None
        return getattr(self, event.method)  # type: ignore[no-any-return]

    def state_dict(self) -> dict[str, Any]:
        """What this callback must keep across a resume (kept in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned when the checkpoint was written."""


class Dispatcher:
    """Calls each event's handlers in registration order.

    `table[event]` is a list that stays the same object when callbacks are added, so the
    hot loop may hold on to it.
    """

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: list[Callback] = []
        self.table: dict[Event, list[Handler]] = {event: [] for event in Event}
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: Callback) -> None:
        self.callbacks.append(callback)
        for event in Event:
            handler = callback.handler(event)
            if handler is not None:
                self.table[event].append(handler)

    def has(self, event: Event) -> bool:
        return bool(self.table[event])

    def fire(self, event: Event, state: State, *args: Any) -> None:
        for handler in self.table[event]:
            handler(state, *args)


class Periodic(Callback):
    """Runs a heavy observer's STEP_END every `every` steps; its other events as they come.

    People add expensive monitoring (a FLOPs profile, per-dataset metrics, weight
    histograms) inside the step and pay for it every step. Wrapped, the observer's
    `on_step_end` runs every `every` optimizer steps and the other steps cost one integer
    modulo; every other event it handles reaches it unchanged:

        Trainer(config, callbacks=[Periodic(WeightNorms(), every=500)])
    """

    def __init__(self, observer: Callback, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.observer, self.every = observer, every

    def handler(self, event: Event) -> Handler | None:
        inner = self.observer.handler(event)
        if event is not Event.STEP_END or inner is None:
            return inner

        def every_n(state: State, loss: Any) -> None:
            if state.step % self.every == 0:
                inner(state, loss)

        return every_n

    def state_dict(self) -> dict[str, Any]:
        return self.observer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.observer.load_state_dict(state)


def _callback_keys(callbacks: list[Callback]) -> list[str]:
    """A stable key per callback: its class name, numbered when a class repeats."""
    keys, seen = [], dict[str, int]()
    for cb in callbacks:
        name = type(cb).__qualname__
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


def callback_states(callbacks: list[Callback]) -> dict[str, Any]:
    """Each callback's non-empty state_dict(), keyed as load_callback_states expects."""
    states = {key: cb.state_dict() for key, cb in zip(_callback_keys(callbacks), callbacks,
                                                       strict=True)}
    return {key: state for key, state in states.items() if state}


def load_callback_states(callbacks: list[Callback], states: dict[str, Any]) -> None:
    """Give each callback the state a checkpoint kept for it (the same class, in order)."""
    for key, cb in zip(_callback_keys(callbacks), callbacks, strict=True):
        if key in states:
            cb.load_state_dict(states[key])
