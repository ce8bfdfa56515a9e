"""Telemetry sinks by tracker name: where the writer process sends each batch.

`jsonl` (the source of truth) and `console` need nothing extra; `tensorboard` and `wandb`
import their packages only when such a sink is made, and say which extra installs them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from redline.telemetry.hub import Sink

TRACKERS = ("jsonl", "console", "tensorboard", "wandb")


_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_installed(trackers: list[str]) -> None:
    """ImportError naming the extra to install, for a tracker whose package is missing."""
    import importlib.util

    for tracker in trackers:
        if tracker in _PACKAGES:
            module, extra = _PACKAGES[tracker]
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"the {tracker} tracker needs {module}: "
                                  f"pip install 'redline[{extra}]'")


def make_sinks(trackers: list[str], run_dir: Path, *, wandb_mode: str = "offline",
               wandb_project: str | None = None, wandb_run_id: str | None = None,
               run_name: str | None = None) -> list[Sink]:
    """One sink per tracker name, in order (a repeated name counts once).

    TensorBoard writes to `run_dir/tensorboard`, W&B to `run_dir/wandb`. Names are checked
    before any sink is made, and sinks already made are closed if a later one fails, so a
    bad list leaves no half-started W&B run behind.
    """
    unknown = [t for t in trackers if t not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker(s) {', '.join(map(repr, unknown))}; "
                         f"valid trackers: {', '.join(TRACKERS)}")
    run_dir = Path(run_dir)

    def jsonl() -> Sink:
        from redline.telemetry.sinks.jsonl import JsonlSink
        return JsonlSink(run_dir)

    def console() -> Sink:
        from redline.telemetry.sinks.console import ConsoleSink
        return ConsoleSink()

    def tensorboard() -> Sink:
        from redline.telemetry.sinks.tensorboard import TensorBoardSink
        return TensorBoardSink(run_dir / "tensorboard")

    def wandb() -> Sink:
        from redline.telemetry.sinks.wandb import WandbSink
        return WandbSink(run_dir, mode=wandb_mode,  # type: ignore[arg-type]
                         project=wandb_project, run_id=wandb_run_id, name=run_name)

    makers: dict[str, Callable[[], Sink]] = {
        "jsonl": jsonl, "console": console, "tensorboard": tensorboard, "wandb": wandb}
    sinks: list[Sink] = []
    try:
        for tracker in dict.fromkeys(trackers):
            sinks.append(makers[tracker]())
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
