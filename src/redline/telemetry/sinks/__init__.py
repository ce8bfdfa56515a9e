"""Telemetry sinks: the one registry of tracker names, and how a name becomes a sink.

A sink is where the telemetry writer process sends each batch of records:

    class Sink(Protocol):
        name: str
        def write(self, stream: str, records: list[dict]) -> None: ...   # "metrics" | "system"
        def close(self) -> None: ...

A tracker name (`telemetry.trackers`, `--tracker`) is one of

  - a built-in: `jsonl` (the run directory's source of truth), `console`, `tensorboard`,
    `wandb`;
  - a name an installed package registers in the entry-point group `redline.sinks`;
  - `package.module:Class` or `path/to/file.py:Class`: your own sink.

Every name maps to a callable that takes one `SinkContext` (run directory, run name, the
tracker run id, options) and returns the sink (a class
whose `__init__(self, context)` builds it qualifies). Sinks are made in the writer process
(telemetry/hub.py says why), which imports the module named; this module, which the
training process uses to validate names, imports nothing heavy. `tensorboard` and `wandb`
import their packages only when such a sink is made, and a missing one names its extra.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from redline.errors import ConfigError, MissingExtra
from redline.plugins import entry_point_targets, load_target

ENTRY_POINT_GROUP = "redline.sinks"

BUILTIN_SINKS: dict[str, str] = {
    "jsonl": "redline.telemetry.sinks.jsonl:from_context",
    "console": "redline.telemetry.sinks.console:from_context",
    "tensorboard": "redline.telemetry.sinks.tensorboard:from_context",
    "wandb": "redline.telemetry.sinks.wandb:from_context",
}
# Those the training process can still write itself if the writer process dies (hub.py).
LOCAL_SINKS = ("jsonl", "console")
# tracker -> (the module it imports, the extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {"tensorboard": ("tensorboard", "tensorboard"),
                                      "wandb": ("wandb", "wandb")}


class Sink(Protocol):
    """Where telemetry goes. `write` runs in the writer process, never on training's thread."""

    name: str

    def write(self, stream: str, records: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SinkContext:
    """What a sink is made from: the run it records and the tracker options."""

    run_dir: Path
    run_name: str | None = None
    run_id: str | None = None  # the tracker run this run writes to (a resume: its first's)
    start_step: int = 0  # the step the run starts from: a resumed run's checkpoint step
    options: Mapping[str, Any] = field(default_factory=dict)  # e.g. wandb_mode, wandb_project


def available_sinks() -> dict[str, str]:
    """Tracker name -> target: built-ins first, then those registered by entry points."""
    sinks = dict(BUILTIN_SINKS)
    for name, target in entry_point_targets(ENTRY_POINT_GROUP).items():
        sinks.setdefault(name, target)
    return sinks


def check_name(name: str) -> None:
    """ConfigError unless `name` is a known tracker or a spec that points at something real.

    A spec's module is located, not run: the writer process is where it is imported.
    """
    if name in available_sinks():
        return
    module, sep, attr = name.rpartition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"telemetry.trackers: unknown tracker {name!r}; valid trackers: "
                          f"{', '.join(available_sinks())}, or 'package.module:Class' or "
                          "'path/to/file.py:Class' for your own sink")
    if module.endswith(".py"):
        if not Path(module).is_file():
            raise ConfigError(f"telemetry.trackers: sink file {module!r} does not exist")
    elif _find_module(module) is None:
        raise ConfigError(f"telemetry.trackers: cannot find module {module!r} for sink {name!r}")


def _find_module(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a missing parent package
        return None


def check_installed(trackers: list[str] | tuple[str, ...]) -> None:
    """MissingExtra naming the extra to install, for a built-in whose package is missing."""
    for tracker in trackers:
        if tracker in EXTRAS:
            module, extra = EXTRAS[tracker]
            if _find_module(module) is None:
                raise MissingExtra(f"the {tracker} tracker", module, extra)


def make_sink(name: str, context: SinkContext) -> Sink:
    """The sink called `name` (see the module docstring), made from `context`."""
    target = available_sinks().get(name, name)
    factory: Callable[[SinkContext], Sink] = load_target(target, name, ConfigError, "sink")
    sink = factory(context)
    if not all(callable(getattr(sink, m, None)) for m in ("write", "close")):
        raise TypeError(f"sink {name!r} made a {type(sink).__name__}, which lacks "
                        "write(stream, records) and close()")
    if not isinstance(getattr(sink, "name", None), str):
        sink.name = name  # type: ignore[misc]
    return sink


def make_sinks(trackers: list[str] | tuple[str, ...], context: SinkContext) -> list[Sink]:
    """One sink per tracker name, in order (a repeated name counts once).

    Names are checked before any sink is made, and sinks already made are closed if a later
    one fails, so a bad list leaves no half-started W&B run behind.
    """
    for name in trackers:
        check_name(name)
    sinks: list[Sink] = []
    try:
        for name in dict.fromkeys(trackers):
            sinks.append(make_sink(name, context))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
