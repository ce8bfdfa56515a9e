from __future__ import annotations

import inspect

from redline.events import Callback, Dispatcher, Event, Periodic, State


def test_event_enum_and_callback_base_stay_in_sync() -> None:
    methods = {name for name, _ in inspect.getmembers(Callback, inspect.isfunction)
               if name.startswith("on_")}
    assert methods == {e.method for e in Event}


def test_event_docstring_mentions_every_event() -> None:
    doc = inspect.getmodule(Event).__doc__ or ""
    for e in Event:
        assert e.name in doc, f"{e.name} is missing from the loop pseudocode"


def test_dispatch_table_holds_only_overrides_in_order() -> None:
    seen: list[str] = []

    class A(Callback):
        def on_step_end(self, state: State, loss: object) -> None:
            seen.append("a")

    class B(Callback):
        def on_step_end(self, state: State, loss: object) -> None:
            seen.append("b")

        def on_fit_end(self, state: State) -> None:
            seen.append("b-end")

    d = Dispatcher([A(), B(), Callback()])
    assert d.has(Event.STEP_END) and not d.has(Event.BATCH_START)
    assert len(d.table[Event.STEP_END]) == 2 and len(d.table[Event.FIT_END]) == 1
    d.fire(Event.STEP_END, State(), None)
    d.fire(Event.FIT_END, State())
    d.fire(Event.EPOCH_START, State())  # nobody listens: a no-op
    assert seen == ["a", "b", "b-end"]


def test_handler_lists_stay_the_same_objects_when_callbacks_are_added() -> None:
    seen: list[int] = []

    class Late(Callback):
        def on_before_backward(self, state: State, loss: object) -> None:
            seen.append(1)

    d = Dispatcher()
    held = d.table[Event.BEFORE_BACKWARD]  # what the Engine and the loop hold on to
    d.add(Late())
    for handler in held:
        handler(State(), None)
    assert seen == [1]


def test_periodic_gates_step_end_and_passes_every_other_event_through() -> None:
    seen: list[str] = []

    class Observer(Callback):
        def on_step_end(self, state: State, loss: object) -> None:
            seen.append(f"step {state.step}")

        def on_epoch_end(self, state: State) -> None:
            seen.append("epoch_end")

        def on_window(self, state: State, record: dict) -> None:
            seen.append("window")

        def state_dict(self) -> dict:
            return {"seen": len(seen)}

    periodic = Periodic(Observer(), every=3)
    d = Dispatcher([periodic])
    assert not d.has(Event.BATCH_START)  # what the observer does not handle costs nothing
    for step in range(1, 7):
        d.fire(Event.STEP_END, State(step=step), None)
    d.fire(Event.EPOCH_END, State(step=6))
    d.fire(Event.WINDOW, State(step=6), {})
    assert seen == ["step 3", "step 6", "epoch_end", "window"]
    assert periodic.state_dict() == {"seen": 4}
