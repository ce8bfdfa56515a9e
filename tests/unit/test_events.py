from __future__ import annotations

import inspect

from redline.events import Callback, Dispatcher, Event, State


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
