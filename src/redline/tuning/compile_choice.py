"""`redline tune`'s compile stage: torch.compile adopted only where it repays its compile.

Before anything is compiled, the compile time is predicted from the model's size: a
training step's compile takes about SECONDS_PER_MODULE per leaf module (at least
COMPILE_FLOOR_S), times the machine's load (the 1-minute load average per core, at least
1: a loaded machine compiles slower; the digits ResNet took 115 s at load 5-11 on 2
cores). Not tried, with the reason, where even halving the step (MAX_GAIN) would not
repay that prediction over `train.steps`, nor where the prediction plus the timing rounds
does not fit in the budget left (less what the final side-by-side timing needs).

Otherwise the compile time is measured (the compiled runner's first step against the
eager one's), then the compiled step is timed against the eager one in interleaved rounds
(trial.py). It is adopted when it is faster beyond the rounds' noise and the time it saves
over `train.steps` exceeds the compile time.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.rng import preserved_rng
from redline.task import Task
from redline.tuning.batchsearch import KNEE_TOLERANCE
from redline.tuning.loader_choice import cores
from redline.tuning.trial import Timing, interleave, noise, runners
from redline.tuning.tune_report import Clock, Row, TuneReport, timings_s

COMPILE_FLOOR_S = 15.0  # the least a compile of a training step is predicted to take
# A training step's compile per leaf module, on a quiet machine: sr3-tiny's 49 took 35 s,
# a chain of 151 linear layers 42 s under load 3, a 14-module BatchNorm CNN 115 s under
# load 5-11 on 2 cores. Rough by nature; it errs towards skipping (the budget is a promise).
SECONDS_PER_MODULE = 1.0
MAX_GAIN = 0.5  # compile is not tried where halving the step would not repay its compile


def machine_load() -> float:
    """The 1-minute load average per core, at least 1 (1 where the OS does not say)."""
    try:
        return max(1.0, os.getloadavg()[0] / cores())
    except (AttributeError, OSError):
        return 1.0


def predict_compile_s(task: Task, load: float | None = None) -> tuple[float, str]:
    """(the predicted seconds to compile `task`'s training step, how, in words): from the
    model's leaf modules and the machine's load (module docstring)."""
    with preserved_rng():  # building a model draws its initialisation
        model = task.build_model()
    leaves = sum(1 for m in model.modules() if not any(True for _ in m.children()))
    load = machine_load() if load is None else load
    seconds = max(COMPILE_FLOOR_S, SECONDS_PER_MODULE * leaves) * load
    return seconds, (f"predicted from the model's {leaves} modules"
                     + (f" at load {load:.1f}x" if load > 1 else ""))


def choose_compile(task: Task, config: RunConfig, device: DeviceInfo, factors: tuple[str, ...],
                   clock: Clock, report: TuneReport, say: Callable[[str], None], *,
                   rounds: int, min_s: float, reserve_s: float = 0.0,
                   predicted: tuple[float, str] | None = None) -> RunConfig:
    """`config` with torch.compile on or off, as measured (module docstring); the rows and
    the reason go to `report`. `reserve_s`: the budget the stages after this one need;
    `predicted`: (compile seconds, how) instead of predict_compile_s's (a test's)."""
    if "compile" not in factors:
        return config
    steps = config.train.steps
    step_s = _step_seconds(report, config)
    compile_s, how = predicted or predict_compile_s(task)
    if step_s is not None and MAX_GAIN * steps * step_s < compile_s:
        report.reasons["compile"] = (
            f"off, not tried: even halving the {step_s * 1e3:.0f} ms step would save "
            f"{MAX_GAIN * steps * step_s:.1f} s over train.steps {steps}, less than a "
            f"compile takes (about {compile_s:.0f} s, {how})")
        return config
    stage_s = compile_s + timings_s(2 + 2 * rounds, step_s or 1.0, min_s)
    if not clock.fits(stage_s, reserve_s):
        report.reasons["compile"] = (
            f"off, not tried: compiling and timing it would take about {stage_s:.0f} s "
            f"(the compile {compile_s:.0f} s, {how}), and {max(0.0, clock.left()):.0f} s "
            "of --budget-s are left" + (f", {reserve_s:.0f} s of them for the final timing"
                                        if reserve_s else "") + " (raise --budget-s)")
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
