"""The `tensorboard` tracker: scalars in a TensorBoard event file, flushed once per batch."""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from redline.errors import MissingExtra
from redline.telemetry import schema as K
from redline.telemetry.sinks import SinkContext


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric values, less its "step" and "time" (they are the axes).

    Booleans and None (e.g. an MFU left empty for an unknown device) are not scalars.
    """
    return {k: v for k, v in record.items()
            if k not in (K.STEP, K.TIME) and isinstance(v, numbers.Real)
            and not isinstance(v, bool)}


class TensorBoardSink:
    """Every numeric value becomes `add_scalar(name, value, step, walltime=record["time"])`.

    System records without a step are placed at a running count of such samples, so each
    still gets its own point. The writer is flushed once per `write` call (one batch of a
    stream), never per scalar: the event file is written by the telemetry writer process, and
    the writer's own periodic flush is pushed out of the way.
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        try:
            # tensorboard first: torch.utils.tensorboard may already be imported and would
            # then not notice that tensorboard itself is missing
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MissingExtra("the tensorboard tracker", "tensorboard", "tensorboard") from e
        self.log_dir = Path(log_dir)
        # a queue large enough that add_scalar never blocks, and a flush period long enough
        # that only our explicit flush per batch writes
        # purge_step: a resumed run hides what the attempt it replaces wrote past its
        # checkpoint, so each step shows once (TensorBoard's own mechanism)
        self._writer = SummaryWriter(str(self.log_dir), max_queue=100_000, flush_secs=86_400,
                                     purge_step=purge_step)
        self._unstepped = 0  # running count for system samples that carry no step

    def write(self, stream: str, records: list[dict[str, Any]]) -> None:
        if stream == "histograms":
            for record in records:
                for h in record["histograms"]:
                    self._writer.add_histogram_raw(
                        h["name"], h["min"], h["max"], h["num"], h["sum"], h["sum_squares"],
                        h["edges"][1:], h["counts"], global_step=record[K.STEP])
            self._writer.flush()
            return
        if stream not in ("metrics", "system"):
            return  # "samples" are images and texts, not scalars
        for record in records:
            step = record.get(K.STEP)
            if step is None:
                step, self._unstepped = self._unstepped, self._unstepped + 1
            walltime = record.get(K.TIME)
            for name, value in scalars(record).items():
                self._writer.add_scalar(name, value, global_step=step, walltime=walltime)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()  # flushes what is queued


def from_context(context: SinkContext) -> TensorBoardSink:
    return TensorBoardSink(context.run_dir / "tensorboard",
                           purge_step=context.start_step + 1 if context.start_step else None)
