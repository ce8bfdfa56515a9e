"""Judging a difference against noise: a setting's quality against the reference's own
run-to-run noise, and one setting's speed against another's timing noise (the last two
functions, which every speed decision of redline tune goes through).

A study trains the reference setting (fp32) with N seeds. For a metric, the seeds give a
mean m and a sample standard deviation s; the reference's noise band is m ± 2s (two
standard deviations: a second fp32 run falls inside it about 95 % of the time). Another
setting's value x is then

    diverged                          its loss or the metric is not finite, or it stopped
    within the reference's noise      |x - m| <= 2s
    better / worse by |x - m|,        outside the band, in the metric's direction
      beyond noise

With one reference seed there is no band: the difference is given, with "no noise floor"
(run --seeds 2 or more for one). Whether higher is better comes from the task
(`Task.metric_directions`, {"psnr": "max"}) or, failing that, from the metric's name:
loss, error, mse, rmse, mae, nll, perplexity, fid and lpips are lower-is-better, the rest
higher-is-better.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

LOWER_IS_BETTER = ("loss", "error", "mse", "rmse", "mae", "nll", "perplexity", "fid",
                   "lpips")
WITHIN, BETTER, WORSE, DIVERGED, NO_FLOOR = ("within noise", "better", "worse", "diverged",
                                             "no noise floor")


def higher_is_better(metric: str, directions: Mapping[str, str] | None = None) -> bool:
    """Whether a larger value of `metric` is better (see the module docstring)."""
    if directions and metric in directions:
        return directions[metric] == "max"
    name = metric.lower().rsplit("/", 1)[-1]
    return not any(word in name for word in LOWER_IS_BETTER)


@dataclass(frozen=True)
class Band:
    """The reference's values of one metric: mean, sample std, and the seeds' count."""

    mean: float
    std: float | None  # None with a single seed
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Band:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return cls(math.nan, None, 0)
        std = statistics.stdev(finite) if len(finite) >= 2 else None
        return cls(statistics.fmean(finite), std, len(finite))

    @property
    def half_width(self) -> float | None:
        return None if self.std is None else 2.0 * self.std


@dataclass(frozen=True)
class Verdict:
    kind: str  # WITHIN | BETTER | WORSE | DIVERGED | NO_FLOOR
    difference: float  # value - reference mean
    text: str

    @property
    def acceptable(self) -> bool:
        """Quality no worse than the reference's, as far as its noise can tell."""
        return self.kind in (WITHIN, BETTER)


def judge(value: float, band: Band, higher_better: bool, diverged: bool = False,
          reference: str = "fp32") -> Verdict:
    """The verdict on `value` against the reference `band` (see the module docstring)."""
    if diverged or not math.isfinite(value):
        return Verdict(DIVERGED, math.nan, "diverged")
    diff = value - band.mean
    if band.half_width is None:
        return Verdict(NO_FLOOR, diff, f"{diff:+.4g} (no noise floor: one reference seed)")
    if band.half_width == 0 and diff == 0:  # e.g. a baseline metric the setting cannot move
        return Verdict(WITHIN, 0.0, f"identical to {reference}'s (no run-to-run spread)")
    if abs(diff) <= band.half_width:
        return Verdict(WITHIN, diff,
                       f"within {reference}'s run-to-run noise (±{band.half_width:.3g})")
    better = (diff > 0) == higher_better
    kind = BETTER if better else WORSE
    return Verdict(kind, diff, f"{kind} by {abs(diff):.3g}, beyond noise "
                               f"(±{band.half_width:.3g})")


TIMING_TOLERANCE = 0.02  # the least one setting must be faster by to count as faster


def relative_range(rates: Sequence[float]) -> float:
    """One setting's rounds: their range relative to their median rate (0 with one round)."""
    return (max(rates) - min(rates)) / statistics.median(rates) if len(rates) >= 2 else 0.0


def timing_noise(rates: Iterable[Sequence[float]]) -> float:
    """The timing noise of a comparison: the median, over the settings timed in two rounds
    or more, of their rounds' range relative to their median rate (0 when none was)."""
    spreads = [relative_range(v) for v in rates if len(v) >= 2]
    return statistics.median(spreads) if spreads else 0.0


def first_as_fast(rates: Sequence[Sequence[float]]) -> tuple[int, float]:
    """(the first setting as fast as the best, the tolerance it was judged at), from each
    setting's rounds of samples/s, in order of preference.

    A setting is as fast as the best when its median is within the tolerance: the larger
    of TIMING_TOLERANCE and the rounds' noise. Differences inside it decide nothing, so a
    busy machine does not change the choice: the preferred setting keeps its place.
    """
    medians = [statistics.median(v) for v in rates]
    tolerance = max(TIMING_TOLERANCE, timing_noise(rates))
    best = max(medians)
    return next(i for i, m in enumerate(medians) if m >= (1 - tolerance) * best), tolerance


def faster_than_start(rates: Sequence[Sequence[float]], start: int = 0) -> tuple[int, float]:
    """(the setting to adopt, the tolerance it was judged at), from each setting's rounds of
    samples/s in order of preference, `rates[start]` being the start (the user's setting).

    The start is kept unless some setting's median beats the start's by more than the
    tolerance (the larger of TIMING_TOLERANCE and the rounds' noise); then the first
    setting, in order, that both beats the start by that much and is within it of the
    best (the best no more than 1 + tolerance times it) is adopted. A loaded machine
    widens the tolerance, so its ties go to the start.
    """
    medians = [statistics.median(v) for v in rates]
    tolerance = max(TIMING_TOLERANCE, timing_noise(rates))
    beats = [i for i, m in enumerate(medians)
             if i != start and m > (1 + tolerance) * medians[start]]
    if not beats:
        return start, tolerance
    best = max(medians[i] for i in beats)
    return next(i for i in beats if (1 + tolerance) * medians[i] >= best), tolerance
