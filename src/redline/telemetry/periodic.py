"""Heavy observers at their own cadence, never on every step.

People add expensive monitoring (a FLOPs profile, per-dataset metrics, weight
histograms) inside the step and pay for it every step. `Periodic` runs such an observer
every N optimizer steps; on the other steps the dispatcher's call costs one integer
modulo:

    class WeightNorms(Callback):
        def on_step_end(self, state, loss):
            ...  # expensive: reads every parameter

    Trainer(config, callbacks=[Periodic(WeightNorms(), every=500)])
"""

from __future__ import annotations

from typing import Any

from redline.events import Callback, State


class Periodic(Callback):
    """Forwards STEP_END to `observer` every `every` steps; other events pass through."""

    def __init__(self, observer: Callback, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.observer, self.every = observer, every

    def on_step_end(self, state: State, loss: Any) -> None:
        if state.step % self.every == 0:
            self.observer.on_step_end(state, loss)

    def on_fit_start(self, state: State) -> None:
        self.observer.on_fit_start(state)

    def on_eval_end(self, state: State, metrics: dict[str, float]) -> None:
        self.observer.on_eval_end(state, metrics)

    def on_fit_end(self, state: State) -> None:
        self.observer.on_fit_end(state)
