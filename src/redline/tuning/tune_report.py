"""`redline tune`'s record and its clock: the rows of settings tried, the reasons, the speed-up.

tune.py fills a TuneReport as it searches (compile_choice.py adds the compile stage's
rows); workflow.py writes it beside the tuned config and output.py prints it. Its rows
are the samples/s table behind every choice (`rows`: factor, setting, samples_per_s, the
rounds' spread and every round's samples/s in `rounds`). The Clock predicts: a stage
starts only if its predicted seconds fit in what is left (`Clock.fits`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BUDGET_S = 120.0


@dataclass
class Row:
    """One setting tried: what it was, how fast, what memory, what became of it."""

    factor: str
    setting: str
    samples_per_s: float | None = None
    spread: float | None = None  # the rounds' range over their median
    peak_bytes: int | None = None
    note: str = ""
    rounds: list[float] | None = None  # every round's samples/s (one: timed once)
    predicted_bytes: int | None = None  # the memory plan's predicted peak (memory rows)


@dataclass
class TuneReport:
    start: dict[str, Any]  # the starting config (RunConfig.to_dict)
    tuned: dict[str, Any]  # the config written
    rows: list[Row] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # factor -> the choice and why
    start_samples_per_s: float | None = None
    tuned_samples_per_s: float | None = None
    speedup: float | None = None  # median of the final rounds' ratios
    speedup_range: tuple[float, float] | None = None
    wall_s: float = 0.0
    budget_s: float = DEFAULT_BUDGET_S
    kept_start: bool = False  # the starting config was written: nothing beat it (why: reasons)
    memory_plan: dict[str, Any] | None = None  # MemoryPlan.to_dict (memory_plan.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere 0): the command's own
    start-up (imports, the task's construction) counts against --budget-s too."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


class Clock:
    """The budget's clock: `spent_s` already used when it starts (the command's start-up)."""

    def __init__(self, budget_s: float, spent_s: float = 0.0) -> None:
        self.budget_s, self.t0 = budget_s, time.perf_counter() - spent_s

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.used()

    def fits(self, predicted_s: float, reserve_s: float = 0.0) -> bool:
        """Whether a stage predicted to take `predicted_s` fits in the time left, less
        `reserve_s` kept for the stages that must follow (the final side-by-side timing)."""
        return predicted_s <= self.left() - reserve_s


def timings_s(timings: int, step_s: float, min_s: float) -> float:
    """The predicted seconds of `timings` timings of at least `min_s` each, in whole steps
    of `step_s` (a timing ends at the first step past `min_s`)."""
    return timings * (min_s + step_s)

