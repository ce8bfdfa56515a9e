"""`redline tune`'s compile stage: torch.compile adopted only where it repays its compile.

The compile time is measured (the compiled runner's first steps against the eager one's),
then the compiled step is timed against the eager one in interleaved rounds (trial.py). It
is adopted when it is faster beyond the rounds' noise and the time it saves over
`train.steps` exceeds the compile time. Not tried where even halving the step (MAX_GAIN)
would not repay the least a compile takes here (COMPILE_FLOOR_S), nor where less than
MIN_COMPILE_BUDGET_S of the budget is left.
"""

from __future__ import annotations

from collections.abc import Callable

from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.task import Task
from redline.tuning.batchsearch import KNEE_TOLERANCE
from redline.tuning.trial import Timing, interleave, noise, runners
from redline.tuning.tune_report import Clock, Row, TuneReport

COMPILE_FLOOR_S = 10.0  # the least a torch.compile of a training step took on this CPU
MIN_COMPILE_BUDGET_S = 30.0
MAX_GAIN = 0.5  # compile is not tried where halving the step would not repay COMPILE_FLOOR_S


def choose_compile(task: Task, config: RunConfig, device: DeviceInfo, factors: tuple[str, ...],
                   clock: Clock, report: TuneReport, say: Callable[[str], None], *,
                   rounds: int, min_s: float) -> RunConfig:
    """`config` with torch.compile on or off, as measured (module docstring); the rows and
    the reason go to `report`."""
    if "compile" not in factors:
        return config
    steps = config.train.steps
    step_s = _step_seconds(report, config)
    if step_s is not None and MAX_GAIN * steps * step_s < COMPILE_FLOOR_S:
        report.reasons["compile"] = (
            f"off, not tried: even halving the {step_s * 1e3:.0f} ms step would save "
            f"{MAX_GAIN * steps * step_s:.1f} s over train.steps {steps}, less than a "
            f"compile takes on this machine (at least {COMPILE_FLOOR_S:.0f} s)")
        return config
    if clock.left() < MIN_COMPILE_BUDGET_S:
        report.reasons["compile"] = (f"off, not tried: {max(0.0, clock.left()):.0f} s of "
                                     "--budget-s left, too little to compile and time it "
                                     "(raise --budget-s)")
        return config
    compiled = config.updated({"precision.compile": True})
    say("compile: compiling the training step (torch.compile)")
    try:
        with runners(task, [config, compiled], device) as (eager, fast):
            cold_s = fast.warm_up() - eager.warm_up()
            timings = interleave([eager, fast], rounds, min_s, lambda i, r: say(
                f"compile: timing {'compiled' if i else 'eager'} (round {r + 1})"))
    except Exception as e:  # inductor fails in many ways; the eager step ran in every stage
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        report.reasons["compile"] = f"off: torch.compile failed here ({first})"
        return config
    return compile_decision(config, compiled, timings, max(0.0, cold_s), report)


def compile_decision(config: RunConfig, compiled: RunConfig, timings: list[Timing],
                      compile_s: float, report: TuneReport) -> RunConfig:
    """On when the time the compiled step saves over train.steps exceeds the compile time
    measured here, a first compile. (A later process reads torch's on-disk cache and pays
    less: 2.2 s against 44 s on sr3-tiny, measured; the decision does not count on it.)"""
    eager, fast = timings
    per_step = config.train.samples_per_step
    saved_per_step = per_step / eager.samples_per_s - per_step / fast.samples_per_s
    steps = config.train.steps
    tolerance = max(KNEE_TOLERANCE, noise(timings))
    gain = fast.samples_per_s / eager.samples_per_s - 1
    for label, t in (("eager", eager), ("compiled", fast)):
        report.rows.append(Row("compile", label, t.samples_per_s, t.spread,
                               note=f"compile {compile_s:.1f} s" if label == "compiled"
                               else ""))
    numbers = (f"compiled {gain:+.1%} samples/s, compile {compile_s:.1f} s, saving "
               f"{saved_per_step * steps:.1f} s over train.steps {steps}")
    if gain > tolerance and saved_per_step * steps > compile_s:
        report.reasons["compile"] = f"on: {numbers}"
        return compiled
    why = ("within the noise" if gain <= tolerance
           else "the run is too short to repay the compile")
    report.reasons["compile"] = f"off: {numbers} ({why})"
    return config


def _step_seconds(report: TuneReport, config: RunConfig) -> float | None:
    rates = [r.samples_per_s for r in report.rows if r.samples_per_s and r.factor in
             ("batch", "channels_last", "loader")]
    return config.train.samples_per_step / max(rates) if rates else None
