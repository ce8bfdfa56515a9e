"""Trends in a run's windows: memory that keeps growing (a leak) found from telemetry.

A training step at fixed shapes needs the same memory every step, so memory that grows
window after window is something kept alive (a loss tensor appended to a list, a graph
held by a metric). `growth` fits a least-squares line to (step, bytes) over the windows
after warm-up and calls it a leak only when it is both steep and steady: the line
explains most of the variation (R^2), the growth over the span is a real share of the
memory in use, and it did not come from one jump. Used by the run itself (it warns once)
and by `redline doctor RUN_DIR`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

MIN_WINDOWS = 6  # windows after the first (warm-up) needed to call a trend
MIN_R2 = 0.8  # how straight the line must be
MIN_GROWTH = 0.05  # growth over the span, as a share of the memory at its start


@dataclass(frozen=True)
class Growth:
    bytes_per_step: float
    r2: float
    first_step: int
    last_step: int
    start_bytes: float

    @property
    def per_1000_steps(self) -> float:
        return 1000 * self.bytes_per_step

    def sentence(self, what: str) -> str:
        mib = self.per_1000_steps / 2**20
        return (f"{what} grew steadily by {mib:,.1f} MiB per 1000 steps from step "
                f"{self.first_step} to {self.last_step} (R^2 {self.r2:.2f}): something keeps "
                "tensors alive across steps (a loss or output appended to a list, a graph "
                "kept by a metric); store .item() or .detach() values instead")


def growth(points: list[tuple[int, float]]) -> Growth | None:
    """The leak in (step, bytes) points, or None when memory is flat or merely noisy."""
    points = points[1:]  # the first window holds the warm-up's allocations
    if len(points) < MIN_WINDOWS:
        return None
    xs, ys = [float(s) for s, _ in points], [float(b) for _, b in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    total = sum((y - my) ** 2 for y in ys)
    residual = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys, strict=True))
    r2 = 1 - residual / total if total else 0.0
    span = slope * (xs[-1] - xs[0])
    steady = max(abs(b - a) for a, b in itertools.pairwise(ys)) < 0.5 * abs(span)
    if slope <= 0 or r2 < MIN_R2 or span < MIN_GROWTH * max(ys[0], 1.0) or not steady:
        return None
    return Growth(slope, r2, int(xs[0]), int(xs[-1]), ys[0])
