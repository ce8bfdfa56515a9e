"""The `wandb` tracker: one `log` call per logging window, from the telemetry writer process.

Steps. W&B keeps one monotonically increasing step per run and silently drops a row whose
step is behind the newest one (checked with 0.31). Metrics records carry the training step
and are logged at it: `run.log(values, step=step)`, which leaves that row open until a
larger step arrives. System (hardware) samples never move W&B's step: the hub's metrics
for a window arrive a window late (they wait for the device), so a sample logged at the
current, newer step would make W&B drop the next metrics row. Instead each batch of
samples is merged (newest value per name) and logged with `commit=False` and no step,
which attaches it to the open row, i.e. the latest metrics step (step 0 or the resumed
step before any metrics). system.jsonl keeps every sample with its own time.

Resume. `run_id` (chosen by the trainer at a run's first start and saved in its
checkpoints, so known before W&B answers) is passed as `id=` with `resume="allow"`, which
creates the run the first time and online continues it after a resume (W&B's documented
behaviour; no server was reachable to check it here). Offline there is no server to
resume from (`run.resumed` stays False): the new session writes a second
`offline-run-*/run-<id>.wandb` under the same id, for `wandb sync` to upload to that run.
Credentials come only from the environment or `wandb login`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from redline.errors import MissingExtra
from redline.telemetry import schema as K
from redline.telemetry.sinks import SinkContext

MODES = ("online", "offline", "disabled")


def _values(record: dict[str, Any]) -> dict[str, Any]:
    # "step" and "time" are the row's axes (W&B adds _step, _timestamp); None is "no value"
    return {k: v for k, v in record.items() if k not in (K.STEP, K.TIME) and v is not None}


class WandbSink:
    """A W&B run in `run_dir/wandb/`, never capturing the console.

    `mode` None is W&B's own rule (the WANDB_MODE variable, else online): this is the one
    place redline decides a W&B mode.
    """

    name = "wandb"
    close_timeout_s = 10.0

    def __init__(self, run_dir: str | Path,
                 mode: Literal["offline", "online", "disabled"] | None = None,
                 project: str | None = None, run_id: str | None = None,
                 name: str | None = None, group: str | None = None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise MissingExtra("the wandb tracker", "wandb", "wandb") from e
        if mode is not None and mode not in MODES:
            raise ValueError(f"wandb mode must be offline, online or disabled, not {mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            console="off",  # redline prints its own lines; no stdout/stderr capture
            x_disable_stats=True,  # redline samples the hardware itself (system stream)
        )
        self._run = wandb.init(
            dir=str(self.run_dir), mode=mode, project=project or "redline", id=run_id,
            resume="allow" if run_id else None, name=name, group=group, settings=settings,
            # a separate run object: never finish a run the user (or an adapter) has open
            reinit="create_new",
        )
        self.run_id: str = self._run.id
        self.mode = mode
        # offline, the run's transaction log (what `wandb sync` uploads); asked of the run,
        # as W&B settings files can change the mode
        offline = getattr(self._run, "offline", False) and not getattr(self._run, "disabled", 0)
        self.run_file = Path(self._run.settings.sync_file) if offline else None

    def write(self, stream: str, records: list[dict[str, Any]]) -> None:
        if stream == "histograms":
            import numpy as np
            import wandb

            for record in records:
                self._run.log({f"hist/{h['name']}": wandb.Histogram(np_histogram=(
                    np.asarray(h["counts"]), np.asarray(h["edges"])))
                    for h in record["histograms"]}, commit=False)
            return
        if stream == "samples":
            for record in records:
                self._run.log(_samples(record), commit=False)
            return
        if stream == "metrics":
            for record in records:  # one record per window: one log call per window
                self._run.log(_values(record), step=int(record[K.STEP]))
            return
        merged: dict[str, Any] = {}
        for record in records:
            merged.update(_values(record))
        if merged:
            self._run.log(merged, commit=False)  # joins the latest metrics step's row

    def close(self) -> None:
        # wandb 0.31's finish() has no `quiet` argument; WANDB_SILENT quietens it
        self._run.finish()
        if self.run_file is not None:
            # finish() can return before wandb-core has written the last rows: wait (bounded)
            # so that a closed sink means a complete file, for `wandb sync` or a reader
            from redline.telemetry.wandb_reader import is_complete

            deadline = time.monotonic() + self.close_timeout_s
            while not is_complete(self.run_file) and time.monotonic() < deadline:
                time.sleep(0.02)


def _samples(record: dict[str, Any]) -> dict[str, Any]:
    """A run's saved samples as W&B images (captioned) and one table of texts and metrics."""
    import wandb

    images, rows = [], []
    for entry in record["samples"]:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in entry.get("metrics", {}).items())
        for name, path in entry.get("images", {}).items():
            images.append(wandb.Image(str(path), caption=f"{entry['title']}: {name}"
                                      + (f" ({metrics})" if metrics else "")))
        rows.append([entry["title"], " | ".join(f"{k}: {v}" for k, v in
                                                entry.get("texts", {}).items()), metrics])
    values: dict[str, Any] = {"samples/table": wandb.Table(
        columns=["input", "texts", "metrics"], data=rows)}
    if images:
        values["samples/images"] = images
    return values


def from_context(context: SinkContext) -> WandbSink:
    return WandbSink(context.run_dir, mode=context.options.get("wandb_mode"),
                     project=context.options.get("wandb_project"), run_id=context.run_id,
                     name=context.run_name, group=context.options.get("wandb_group"))
