"""The paired-ratio machinery the overhead benchmarks share: a loop variant timed in blocks,
the bare loop (the floor), and the median of per-repeat ratios with its 95 % interval.

Used by bench/step_costs.py, bench/inspect_overhead.py, bench/distributed_overhead.py and
bench/overhead.py.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from workloads import CLIP, Workload

FLOOR = "bare loop (floor)"


class Variant:
    """`block(n)` runs n steps and returns seconds per step."""

    def __init__(self, step: Callable[[], None], close: Callable[[], None] = lambda: None,
                 per_step: Any = None) -> None:
        self.step, self.close, self.per_step, self.steps = step, close, per_step, 0
        self.sink_s: dict[str, float] = {}  # redline: time in hub.publish, per stream
        self.sink_n: dict[str, int] = {}

    def block(self, n: int) -> float:
        self.steps += n
        step, t0 = self.step, time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t0) / n


def _bare(w: Workload, log: Any = None, ps: Any = None,
          after: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> Variant:
    """The floor: what a hand-written loop does for the same result (clip, scheduler step);
    with `log` and `ps`, a peer's per-step logging; `after(step, loss, norm)` for what
    bench/step_costs.py adds to it."""
    it, k = itertools.cycle(w.data), itertools.count(1)
    model, opt, sched, loss_fn = w.model, w.optimizer, w.scheduler, w.loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, next(it))
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        sched.step()
        if log is not None and ps is not None:
            ps.log(log, i := next(k), loss, gn, opt.param_groups[0]["lr"], step=i)
        elif after is not None:
            after(next(k), loss.detach(), gn)

    return Variant(step, per_step=ps)


def median_ci(ratios: list[float]) -> tuple[float, float, float]:
    """Median of per-repeat ratios, with a distribution-free 95 % confidence interval: the
    order statistics around the median that a Binomial(n, 1/2) puts 95 % of the mass
    between."""
    r, n = sorted(ratios), len(ratios)
    half = 0.98 * math.sqrt(n)  # 1.96 standard deviations of Binomial(n, 1/2)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return statistics.median(r), r[lo], r[hi]


def paired(times: dict[str, list[float]], name: str, floor: str = FLOOR
           ) -> tuple[float, float, float]:
    """Median of the per-repeat ratios name/floor, with a 95 % confidence interval.

    Each repeat runs every variant once, close together in time, so a ratio within one
    repeat cancels the machine's slow drift (median_ci gives the interval)."""
    return median_ci([t / f for t, f in zip(times[name], times[floor], strict=True)])
