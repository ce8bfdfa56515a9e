"""The short quality check a precision passes before `redline tune` may choose it.

A faster number format is only worth having if it trains as well. Before the search spends
time on a precision it runs a few dozen optimizer steps of the starting configuration in
it, beside fp32 with the same seed and fp32 with another seed, all in lockstep (step k of
each in turn, so their step times are also an interleaved speed comparison at this batch):

    fp32, seed s          the reference
    fp32, seed s + 1      its run-to-run noise: another initialisation and data order
    P,    seed s          for each candidate precision P

Each run's loss is the mean over the second half of its steps. fp32's two runs give the
band (judge.py: mean ± 2 standard deviations, and at least ± MIN_BAND of the mean, since
two runs can agree by chance more closely than their noise). A precision whose loss is not
finite, or is worse than the band, is excluded with the number; one within it or better is
admitted. A precision whose first step takes SLOWER times fp32's is dropped at once, as too
slow to be worth a quality check (fp16 convolutions on some CPUs run 50x slower than fp32).
With `least_speed`, one whose first SPEED_STEPS timed steps run at less than that share of
fp32's samples/s is dropped then, unchecked: fp32 is always admitted, so a format that much
slower than it cannot be chosen (redline tune batch-searches only formats within 25 % of
the fastest). When every candidate is dropped the check ends, fp32 alone admitted:
reportgen-tiny's and sst-tiny's small matmuls run bf16 and fp16 at 0.3-0.7x fp32's speed
on this CPU, and checking their quality was 10-20 s of a 30-100 s search.

This is a screen, not a study: a few dozen steps catch a format that breaks training
(overflow, lost precision in a sum, a loss that stops falling), not a small quality cost
at the end of a long run; `redline study` measures that.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.judge import Band, judge
from redline.precision import PRECISIONS
from redline.task import Task
from redline.tuning.trial import Runner

STEPS = 30  # optimizer steps per run
MIN_STEPS = 10  # a deadline stops the runs no earlier than this
MIN_BAND = 0.01  # the band's half-width is at least this share of fp32's loss
SLOWER = 10.0  # a first step this many times fp32's: dropped without a quality check
SPEED_STEPS = 5  # timed steps (after the warm-up) that decide `least_speed`
REFERENCE = "fp32"
NOT_CANDIDATES = {"fp8-emulated": "an emulation: fp8's numerics with no speed-up"}


StepTime = Callable[[str, float], float]


def measured(run: str, seconds: float) -> float:
    """The step time as the clock measured it (check_precisions' default `step_time`)."""
    return seconds


@dataclass
class PrecisionCheck:
    """One precision's short run."""

    name: str
    admitted: bool
    reason: str  # in words, with the numbers
    loss: float | None = None  # mean loss of the run's second half
    step_s: float | None = None  # median step time at the starting micro-batch
    speed_vs_fp32: float | None = None  # fp32's step time over this one's (>1: faster)


def candidates(device: DeviceInfo) -> tuple[list[str], dict[str, str]]:
    """(precisions this device runs, other than fp32; {name: why not} for the rest)."""
    runs, not_run = [], {}
    for name, cls in PRECISIONS.items():
        if name == REFERENCE:
            continue
        reason = NOT_CANDIDATES.get(name) or cls.unsupported_reason(device)
        if reason:
            not_run[name] = reason
        else:
            runs.append(name)
    return runs, not_run


def check_precisions(task: Task, config: RunConfig, device: DeviceInfo,
                     names: Sequence[str], steps: int = STEPS,
                     say: Callable[[str], None] = lambda _: None,
                     deadline_s: float | None = None,
                     least_speed: float | None = None,
                     step_time: StepTime = measured,
                     limit_s: float | None = None) -> list[PrecisionCheck]:
    """The short quality check (module docstring) of `names` against fp32, at `config`'s
    micro-batch and effective batch; fp32's own row comes first. `deadline_s`: the runs
    stop after this many seconds once MIN_STEPS steps are done. `least_speed`: a format
    slower than this share of fp32's samples/s in its first steps is dropped unchecked.
    `step_time(run, seconds)`: the step time the speed rules see for a step of `run`
    ("fp32", "fp32-other-seed" or a name) that took `seconds`; the clock's by default (a
    test gives its own, so the rules' verdicts do not depend on the machine's load).
    `limit_s`: a hard limit (redline tune's budget): no round of steps starts that the last
    round's time says would end past it, even before MIN_STEPS; a format checked for fewer
    than MIN_STEPS steps is then dropped (not enough steps to judge its quality)."""
    seed = config.train.seed
    runs = {"fp32": Runner(task, config.updated({"precision.name": REFERENCE}), device),
            "fp32-other-seed": Runner(task, config.updated({
                "precision.name": REFERENCE, "train.seed": seed + 1}), device)}
    for name in names:
        runs[name] = Runner(task, config.updated({"precision.name": name}), device)
    dropped: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in runs}
    t0 = time.perf_counter()
    last_round = 0.0
    try:
        for k in range(steps):
            if (deadline_s is not None and k >= MIN_STEPS
                    and time.perf_counter() - t0 > deadline_s):
                break
            if (limit_s is not None and k >= 2
                    and time.perf_counter() - t0 + last_round > limit_s):
                if k < MIN_STEPS:
                    dropped.update({n: f"not checked: {k} steps fit in its share of the "
                                       f"budget ({limit_s:.0f} s), under the {MIN_STEPS} "
                                       "needed to judge its quality"
                                    for n in names if n not in dropped})
                break
            round_t0 = time.perf_counter()
            say(f"quality check: step {k + 1} of {steps} in {', '.join(names) or 'fp32'}")
            for name, runner in runs.items():
                if name in dropped:
                    continue
                took = step_time(name, runner.step()[0])
                if k:  # the first step is warm-up
                    times[name].append(took)
                else:
                    runner.first_step_s = took
            if k == 0:
                dropped.update(_too_slow(runs, step_time))
            if k == SPEED_STEPS and least_speed is not None:
                dropped.update(_cannot_win(times, dropped, names, least_speed))
            last_round = time.perf_counter() - round_t0
            if k and all(name in dropped for name in names):
                break  # fp32 alone is left (timed once at least): nothing to compare it with
    finally:
        for runner in runs.values():
            runner.close()
    return _verdicts(runs, times, dropped, names)


def _too_slow(runs: dict[str, Runner], step_time: StepTime) -> dict[str, str]:
    """The formats whose first step took over SLOWER times fp32's (as `step_time` sees it:
    a test's own times, so a loaded machine's slow first step does not decide)."""
    first = {name: step_time(name, r.first_step_s) for name, r in runs.items()
             if r.first_step_s is not None}
    ref = first.get("fp32") or math.inf
    return {name: (f"its first step took {s:.2f} s, {s / ref:.0f}x "
                   "fp32's: too slow to be worth a quality check")
            for name, s in first.items() if not name.startswith("fp32") and s > SLOWER * ref}


def _cannot_win(times: dict[str, list[float]], dropped: dict[str, str], names: Sequence[str],
                least_speed: float) -> dict[str, str]:
    ref = statistics.median(times["fp32"])
    out = {}
    for name in names:
        if name in dropped or not times[name]:
            continue
        speed = ref / statistics.median(times[name])
        if speed < least_speed:
            out[name] = (f"{speed:.2f}x fp32's samples/s in its first {len(times[name])} "
                         f"steps, under {least_speed:.2f}x: too slow to be chosen "
                         "(no quality check)")
    return out


def _second_half(losses: list[float]) -> float:
    tail = losses[len(losses) // 2:]
    return statistics.fmean(tail) if all(math.isfinite(v) for v in tail) else math.nan


def _verdicts(runs: dict[str, Runner], times: dict[str, list[float]], dropped: dict[str, str],
              names: Sequence[str]) -> list[PrecisionCheck]:
    ref_loss = [_second_half(runs[n].losses) for n in ("fp32", "fp32-other-seed")]
    band = Band.of(ref_loss)
    floor = MIN_BAND * abs(band.mean) / 2  # as a std: the half-width is two of them
    band = Band(band.mean, max(band.std or 0.0, floor), band.n)
    ref_step = statistics.median(times["fp32"]) if times["fp32"] else math.nan
    out = [PrecisionCheck(REFERENCE, True, f"the reference (loss {ref_loss[0]:.4g}; another "
                          f"seed {ref_loss[1]:.4g})", ref_loss[0], ref_step, 1.0)]
    for name in names:
        if name in dropped:
            step = statistics.median(times[name]) if times[name] else runs[name].first_step_s
            out.append(PrecisionCheck(name, False, dropped[name], step_s=step,
                                      speed_vs_fp32=ref_step / step if step else None))
            continue
        loss = _second_half(runs[name].losses)
        step = statistics.median(times[name]) if times[name] else math.nan
        verdict = judge(loss, band, higher_better=False)
        shown = f"loss {loss:.4g} against fp32's {band.mean:.4g} ± {band.half_width:.2g}"
        out.append(PrecisionCheck(
            name, verdict.acceptable,
            f"{shown}: {verdict.kind}" if math.isfinite(loss) else "its loss is not finite",
            loss if math.isfinite(loss) else None, step, ref_step / step))
    return out
