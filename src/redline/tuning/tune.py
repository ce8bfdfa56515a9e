"""`redline tune`: every setting that sets the speed, chosen by measurement, within a budget.

Researchers start from batch 4, fp32 and 0 loader workers and hand-tune the rest. This
workflow measures instead, one factor at a time where factors are independent, from the
start (the config as given) and keeping the start's effective batch and lr unless
`train.grow_effective_batch` (recipe.py):

  0. memory      the memory plan (memory_plan.py): the step's memory breakdown predicts
                 each combination of memory levers (activation checkpointing, low-bit
                 optimizer states) and micro-batch; where the start fits memory.target as
                 it is, nothing more (no lever); else the fitting ones are timed side by
                 side and the fastest verified under the budget. The stages below run with
                 the levers set (the batch search chooses the micro-batch with them fixed).
                 It runs first: on a GPU a start that does not fit could not be timed;
  1. precision   every format the device runs is screened by a short quality check
                 against fp32's own run-to-run noise (precision_screen.py); one that leaves the band
                 is excluded with the number, and one under LEAST_SPEED of fp32's speed
                 in its first steps is dropped unchecked (it could never be searched).
                 The check's lockstep steps also rank the admitted formats by speed at
                 the starting batch;
  2. channels_last  for a model with 4-D weights: timed on and off at the starting batch in
                 the fastest admitted format, before the batch search, since the layout
                 moves the knee;
  3. batch       the batch search (batchsearch.search_fastest), once per precision among
                 the TOP_PRECISIONS fastest admitted ones (successive halving: a format's
                 memory per sample and its best batch differ, so each gets its own fit and
                 knee; the runner-up only when within RUNNER_UP of the first at the start),
                 each against the start's micro-batch, then the knees are timed end to end
                 against the start (its precision and micro-batch);
  4. loader      workers, prefetch, pinning, persistence (loader_choice.py);
  5. compile     compile time predicted from the model's size, then, where it fits,
                 measured, and the compiled step timed against the eager one; adopted only
                 when the time it saves over `train.steps` exceeds the compile time
                 (compile_choice.py).

Each comparison is interleaved rounds through the job's own loader (trial.py), with the
start among the settings timed, and a setting replaces the start only when it is faster
by more than the rounds' noise (at least KNEE_TOLERANCE; judge.faster_than_start): a tie
keeps the start. Last, the starting and the tuned configuration are timed against each
other: that ratio is the speed-up printed, measured, never projected, and the tuned
config is returned only when it is faster beyond the noise; otherwise the start is
(keep_start; `kept_start` in the report, and the reason under "result"). Where the start
does not fit the memory budget (the plan's prediction), there is nothing to time it
against: the tuned config is written, and the result says so.

The budget: before each stage its time is predicted from the step times measured so far
(tune_report.timings_s; compile: compile_choice.predict_compile_s) and the stage starts
only if it fits in what is left less the final timing's predicted share (Clock.fits);
the quality check stops at SCREEN_SHARE of the budget, and the batch search's scan and
rounds keep a deadline. A stage skipped says so, with the prediction. The rows (the
samples/s table behind every choice, each with its rounds) and reasons are recorded in a
TuneReport (tune_report.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from redline.config import RunConfig
from redline.data import loader_options
from redline.device import DeviceInfo
from redline.judge import TIMING_TOLERANCE, faster_than_start
from redline.rng import preserved_rng
from redline.task import Task
from redline.tuning.autobatch import autobatch, start_micro_batch
from redline.tuning.batchsearch import AutobatchResult
from redline.tuning.compile_choice import choose_compile
from redline.tuning.loader_choice import MIN_TIMED_S as LOADER_MIN_S
from redline.tuning.loader_choice import choose_loader, worker_counts
from redline.tuning.memory_plan import MemoryPlan
from redline.tuning.memory_plan_run import plan_memory
from redline.tuning.precision_screen import candidates, check_precisions
from redline.tuning.recipe import describe_change, searched_config
from redline.tuning.trial import interleave, runners
from redline.tuning.tune_report import DEFAULT_BUDGET_S, Clock, Row, TuneReport, timings_s

# the order --factors lists them in; the memory stage runs first (module docstring)
FACTORS = ("precision", "batch", "channels_last", "loader", "compile", "memory")
TOP_PRECISIONS = 2  # precisions that get a batch search of their own
RUNNER_UP = 0.25  # the second is searched only when this close to the first at the start
# A format slower than this share of fp32's speed at the start (fp32 is always admitted)
# is never searched; 10 % below 1 - RUNNER_UP, as its first steps' timing is noisier.
LEAST_SPEED = 0.9 * (1 - RUNNER_UP)
RESERVE = 0.2  # of the budget, kept for the stages after the batch search's scan
SCREEN_SHARE = 0.3  # of the budget, the most the precisions' quality check may take
# Ties between precisions go to the first of these: fp32 master weights before none.
SAFER = ("fp32", "tf32", "bf16-mixed", "fp16-mixed", "fp8", "bf16-true")
ROUNDS = 3
MIN_TIMED_S = 0.3
BATCH_TIMING_S = 0.1  # each size in the batch search: 20 ms left sst-tiny's scan to noise



def starting_config(config: RunConfig) -> RunConfig:
    """What the user runs today: `config` with batch_size auto read as the default 16 (at
    most the effective batch) and num_workers auto as 0 (the settings tune replaces)."""
    changes: dict[str, Any] = {}
    if config.train.auto_batch:
        changes["train.batch_size"] = start_micro_batch(config)
    if config.data.num_workers == "auto":
        changes["data.num_workers"] = 0
    return config.updated(changes) if changes else config


def tune(task: Task, config: RunConfig, device: DeviceInfo, *,
         budget_s: float = DEFAULT_BUDGET_S, factors: tuple[str, ...] = FACTORS,
         quality_steps: int | None = None, cache_dir: Any = None,
         say: Callable[[str], None] = lambda _: None, spent_s: float = 0.0,
         world_size: int = 1) -> tuple[RunConfig, TuneReport]:
    """The tuned config for `task` and the report of how it was chosen (module docstring).
    `spent_s`: seconds of the budget already used (the command's start-up). `world_size`:
    the ranks on this host to plan for (tune --nproc; tune itself runs in one process)."""
    clock = Clock(budget_s, spent_s)
    say = _on_the_clock(say, clock)
    start = starting_config(config)
    report = TuneReport(start=start.to_dict(), tuned={}, budget_s=budget_s)
    planned, plan = _memory(task, start, device, factors, clock, report, say, world_size)
    sharded = planned.distributed.strategy == "fsdp" and world_size > 1
    if sharded:  # a sharded rank's memory cannot be measured in one process
        factors = tuple(f for f in factors if f != "batch")
    speeds = _precisions(task, planned, device, factors, quality_steps, clock, report, say,
                         plan.sample_s if plan is not None else None)
    # The layout before the batch search: it moves the knee (sr3-tiny: +7 % at micro-batch
    # 32, and micro-batch 64 best with it, 32 without; bench/speedup.py).
    layout = _channels_last(task, planned.updated({"precision.name": next(iter(speeds))}),
                            device, factors, clock, report, say)
    start_layout = planned.updated({"precision.channels_last":
                                    layout.precision.channels_last})
    current = _batch(task, start_layout, device, list(speeds), factors, cache_dir, clock,
                     report, say, speeds)
    if sharded:
        report.reasons["batch"] = (
            f"micro-batch {current.train.micro_batch}: the memory plan's (not searched: a "
            "sharded rank's memory cannot be measured in one process)")
    if _layout_again(current, start, layout, factors):  # off at a small batch: check again
        current = _channels_last(task, current, device, factors, clock, report, say,
                                 f" (at micro-batch {current.train.micro_batch})")
    current = _loader(task, current, device, factors, clock, report, say)
    current = choose_compile(task, current, device, factors, clock, report, say,
                             rounds=ROUNDS, min_s=MIN_TIMED_S,
                             reserve_s=_final_s(report, current))
    if plan is not None and not plan.start_fits:
        report.reasons["result"] = (
            "the tuned config is written: the start does not fit the memory budget "
            f"({plan.summary_of_start()}), so there is no speed-up to measure")
    else:
        current = _speedup(task, start, current, device, report, say)
    report.tuned, report.wall_s = current.to_dict(), clock.used()
    return current, report


def _memory(task: Task, start: RunConfig, device: DeviceInfo, factors: tuple[str, ...],
            clock: Clock, report: TuneReport, say: Callable[[str], None],
            world_size: int = 1) -> tuple[RunConfig, MemoryPlan | None]:
    """The memory plan (memory_plan_run.py): the start with the levers and micro-batch it
    chose, and the plan (None: not searched). Its timing starts only if it fits the budget
    less what the later stages need (RESERVE, the final timing)."""
    if "memory" not in factors:
        return start, None
    if device.kind not in ("cpu", "cuda"):  # the memory probes measure these two
        report.reasons["memory"] = (f"not planned: a step's memory is measured on cpu and "
                                    f"cuda, not {device.kind}")
        return start, None
    reserve = max(RESERVE * clock.budget_s, _final_s(report, start))
    plan = plan_memory(task, start, device, fits=lambda s: clock.fits(s, reserve), say=say,
                       world_size=world_size)
    for c in plan.rows:
        report.rows.append(Row("memory", c.describe(plan.blocks), c.samples_per_s, c.spread,
                               c.measured_peak, c.note, list(c.rates) or None,
                               predicted_bytes=c.predicted))
    report.reasons["memory"] = plan.summary()
    report.memory_plan = plan.to_dict()
    return plan.apply(start), plan


def _step_s(report: TuneReport, config: RunConfig) -> float:
    """A step of `config`, predicted from what was measured so far: the slowest timing of
    its precision and micro-batch (a budget is better kept by overestimating), else the
    median of the settings still in the running; 1 s before anything was timed."""
    valid = [r for r in report.rows if r.samples_per_s
             and not r.note.startswith(("excluded", "not tried", "no batch"))]
    own = f"{config.precision.name}, micro-batch {config.train.micro_batch}"
    mine = [r.samples_per_s for r in valid if r.setting.startswith(own) or r.note == "chosen"]
    rates = mine or [r.samples_per_s for r in valid]
    if not rates:
        return 1.0
    rate = min(rates) if mine else statistics.median(rates)
    return config.train.samples_per_step / rate  # type: ignore[operator]


def _final_s(report: TuneReport, config: RunConfig) -> float:
    """The final side-by-side timing's predicted seconds: two warm-ups and the rounds."""
    return timings_s(2 + 2 * (ROUNDS + 2), _step_s(report, config), MIN_TIMED_S)


def _on_the_clock(say: Callable[[str], None], clock: Clock) -> Callable[[str], None]:
    """Progress lines that say where the search is in its budget."""
    return lambda msg: say(f"[{clock.used():.0f} of {clock.budget_s:.0f} s] {msg}")


def _precisions(task: Task, start: RunConfig, device: DeviceInfo, factors: tuple[str, ...],
                steps: int | None, clock: Clock, report: TuneReport,
                say: Callable[[str], None], sample_s: float | None = None
                ) -> dict[str, float]:
    """The admitted precisions, fastest first, each with its speed relative to fp32 at the
    starting batch (precision_screen.py). `sample_s`: seconds per sample measured before
    (the memory plan's), to skip a check whose first step alone would overrun its share
    (a step cannot stop midway)."""
    if "precision" not in factors:
        report.reasons["precision"] = f"{start.precision.name}: kept (not searched)"
        return {start.precision.name: 1.0}
    names, not_run = candidates(device)
    for name, why in not_run.items():
        report.rows.append(Row("precision", name, note=f"not tried: {why}"))
    runs = len(names) + 2  # fp32 twice (two seeds), each other format once, in lockstep
    first_s = (sample_s or 0.0) * start.train.samples_per_step * runs
    if first_s > SCREEN_SHARE * clock.budget_s:
        why = (f"not checked: one step of its {runs} runs is predicted at "
               f"{first_s:.0f} s, more than the check's share of --budget-s "
               f"({SCREEN_SHARE * clock.budget_s:.0f} s)")
        report.rows += [Row("precision", n, note=f"excluded: {why}")
                        for n in names if n != start.precision.name]
        report.reasons["precision"] = f"{start.precision.name}: kept ({why})"
        return {start.precision.name: 1.0}
    checks = check_precisions(task, start, device, names, say=say,
                              deadline_s=0.2 * clock.budget_s, least_speed=LEAST_SPEED,
                              limit_s=SCREEN_SHARE * clock.budget_s,
                              **({"steps": steps} if steps else {}))
    for c in checks:
        report.rows.append(Row(
            "precision", f"{c.name}, micro-batch {start.train.micro_batch}",
            start.train.micro_batch / c.step_s if c.step_s else None,
            note=("admitted: " if c.admitted else "excluded: ") + c.reason))
    admitted = [c for c in checks if c.admitted]
    admitted.sort(key=lambda c: -(c.speed_vs_fp32 or 0.0))
    report.reasons["precision"] = "; ".join(
        f"{c.name} {'admitted' if c.admitted else 'excluded'}" + ("" if c.admitted else
                                                                  f" ({c.reason})")
        for c in checks if c.name != "fp32")
    return {c.name: c.speed_vs_fp32 or 0.0 for c in admitted}


def _batch(task: Task, start: RunConfig, device: DeviceInfo, ranked: list[str],
           factors: tuple[str, ...], cache_dir: Any, clock: Clock, report: TuneReport,
           say: Callable[[str], None], speeds: dict[str, float]) -> RunConfig:
    """Each top precision's fastest micro-batch, then the fastest of those, end to end.
    `speeds`: each precision's speed relative to fp32 at the starting batch."""
    options: list[RunConfig] = []
    if "batch" not in factors:
        report.reasons["batch"] = f"micro-batch {start.train.micro_batch}: kept (not searched)"
        options = [start.updated({"precision.name": n}) for n in ranked[:TOP_PRECISIONS]]
        ranked = []  # no batch search: the precisions are timed at the start's batch
    for i, name in enumerate(ranked[:TOP_PRECISIONS]):
        if i and speeds.get(name, 1.0) < (1 - RUNNER_UP) * speeds.get(ranked[0], 1.0):
            report.rows.append(Row("batch", name, note=(
                f"no batch search: {speeds[ranked[0]] / max(speeds[name], 1e-9):.1f}x slower than "
                f"{ranked[0]} at the starting batch")))
            continue
        if i and clock.left() < 0.4 * clock.budget_s:
            report.rows.append(Row("batch", name, note="no batch search: the budget is "
                                   "spent (raise --budget-s)"))
            continue
        cfg = searched_config(start, name)
        reserve = max(RESERVE * clock.budget_s, _final_s(report, start))
        if clock.left() <= reserve:  # the search's probes would run past the budget
            report.rows.append(Row("batch", name, note=(
                f"no batch search: {max(0.0, clock.left()):.0f} s of --budget-s left, "
                f"{reserve:.0f} s of them kept for the stages after it (raise --budget-s)")))
            continue
        r = autobatch(task, cfg, device, cache_dir=cache_dir, verify_largest=False,
                      timing_s=BATCH_TIMING_S, start=start.train.micro_batch,
                      deadline=time.perf_counter() + clock.left() - reserve,
                      progress=lambda m, n=name: say(f"batch search in {n}: {m}"))
        _batch_rows(r, name, report)
        report.reasons[f"batch in {name}"] = r.why
        options.append(r.apply(cfg))
    options.sort(key=lambda c: SAFER.index(c.precision.name) if c.precision.name in SAFER
                 else len(SAFER))  # a tie goes to the format that keeps more precision
    options = _distinct([start, *options])
    label = lambda c: (f"{c.precision.name} at micro-batch {c.train.micro_batch}"  # noqa: E731
                       + (" (the start)" if _same(c, start) else ""))
    predicted = timings_s(len(options) * (ROUNDS + 1), _step_s(report, start), MIN_TIMED_S)
    if len(options) == 1:
        chosen, why = start, "the start: the batch search kept its micro-batch"
    elif not clock.fits(predicted, _final_s(report, start)):
        chosen, why = start, (f"the start: timing the choices against it would take about "
                              f"{predicted:.0f} s, {max(0.0, clock.left()):.0f} s left")
    else:
        chosen, why = _fastest(task, options, device, "batch", report, say, label,
                               "the start is kept unless beaten beyond the noise; then a "
                               "tie goes to the format that keeps more precision")
    if "batch" in factors:
        report.reasons["batch"] = f"{describe_change(start, chosen)}: {why}"
    if "precision" in factors:
        report.reasons["precision"] = (f"{chosen.precision.name} ({why}; "
                                       f"{report.reasons['precision']})")
    return chosen


def _same(a: RunConfig, b: RunConfig) -> bool:
    return a.to_dict() == b.to_dict()


def _distinct(configs: list[RunConfig]) -> list[RunConfig]:
    """`configs` without repeats (a precision's knee may be the start itself)."""
    out: list[RunConfig] = []
    for c in configs:
        if not any(_same(c, o) or (c.precision.name == o.precision.name
                                   and c.train.micro_batch == o.train.micro_batch
                                   and c.train.samples_per_step == o.train.samples_per_step
                                   and c.train.lr == o.train.lr) for o in out):
            out.append(c)
    return out


def _batch_rows(r: AutobatchResult, name: str, report: TuneReport) -> None:
    """One row per size the batch search timed: its rounds where it had them, else its scan."""
    peaks = {t.size: t.peak_bytes for t in r.trials if t.kind == "verify" and t.fits}
    for size, t in sorted(r.timed().items()):
        spread = (t.spread[1] - t.spread[0]) / t.samples_per_s if t.spread else None
        note = ", ".join(n for n in ("the start" if size == r.start else "",
                                     "knee for " + name if size == r.chosen else "",
                                     "scanned once" if t.kind == "scan" else "") if n)
        report.rows.append(Row("batch", f"{name}, micro-batch {size}", t.samples_per_s,
                               spread, peaks.get(size), note,
                               list(t.rounds or [t.samples_per_s or 0.0])))


def _fastest(task: Task, options: list[RunConfig], device: DeviceInfo, factor: str,
             report: TuneReport, say: Callable[[str], None],
             label: Callable[[RunConfig], str], tie: str = "the start is kept unless "
             "beaten beyond the noise") -> tuple[RunConfig, str]:
    """`options[0]` (the start) unless another is faster beyond the noise, timed in the
    same interleaved rounds (judge.faster_than_start; `tie` says how ties go)."""
    with runners(task, options, device) as built:
        timings = interleave(built, ROUNDS, MIN_TIMED_S, lambda i, r: say(
            f"{factor}: timing {label(options[i])} (round {r + 1} of {ROUNDS})"))
    pick, tolerance = faster_than_start([t.rates for t in timings], 0)
    for c, t in zip(options, timings, strict=True):
        report.rows.append(Row(factor, label(c) + " (end to end)", t.samples_per_s,
                               t.spread, note="chosen" if c is options[pick] else "",
                               rounds=list(t.rates)))
    rates = ", ".join(f"{label(c)} {t.samples_per_s:.1f}"
                      for c, t in zip(options, timings, strict=True))
    top = max(range(len(timings)), key=lambda i: timings[i].samples_per_s)
    if pick:
        margin = timings[pick].samples_per_s / timings[0].samples_per_s - 1
        verdict = (f"{label(options[pick])} is {margin:+.1%} over the start, beyond the "
                   f"noise ({tolerance:.1%})")
    elif top:
        verdict = (f"{label(options[top])} is within the noise ({tolerance:.1%}) of the "
                   f"start, {label(options[0])}, which is kept ({tie})")
    else:
        verdict = f"the start, {label(options[0])}, is the fastest: kept"
    return options[pick], f"{verdict}: {rates} samples/s"


def has_conv(task: Task) -> bool:
    """Whether the task's model has 4-D (convolution) weights: channels_last can matter."""
    with preserved_rng():  # building a model draws its initialisation
        return any(p.dim() == 4 for p in task.build_model().parameters())


def _layout_again(current: RunConfig, start: RunConfig, layout: RunConfig,
                  factors: tuple[str, ...]) -> bool:
    """channels_last was timed, kept as it was, and the batch has grown since: its gain
    grows with the batch (reportgen-tiny: none at 4, +3 % at 256), so time it again."""
    return ("channels_last" in factors and "batch" in factors
            and layout.precision.channels_last == start.precision.channels_last
            and current.train.micro_batch > start.train.micro_batch
            and not layout.precision.channels_last)


def _channels_last(task: Task, config: RunConfig, device: DeviceInfo,
                   factors: tuple[str, ...], clock: Clock, report: TuneReport,
                   say: Callable[[str], None], where: str = "") -> RunConfig:
    if "channels_last" not in factors:
        return config
    if not has_conv(task):
        report.reasons["channels_last"] = "off: the model has no convolution weights"
        return config
    predicted = timings_s(2 + 2 * ROUNDS, _step_s(report, config), MIN_TIMED_S)
    if not clock.fits(predicted, _final_s(report, config)):
        if not where:  # a second look: the first decision and its reason stand
            report.reasons["channels_last"] = (
                f"{_on(config.precision.channels_last)} (the start), not tried: timing it "
                f"would take about {predicted:.0f} s, {max(0.0, clock.left()):.0f} s of "
                "--budget-s left (the final timing needs the rest)")
        return config
    on = config.updated({"precision.channels_last": not config.precision.channels_last})
    chosen, why = _fastest(task, [config, on], device, "channels_last", report, say,
                           lambda c: "channels_last " + _on(c.precision.channels_last))
    earlier = report.reasons.get("channels_last")
    report.reasons["channels_last"] = (f"{_on(chosen.precision.channels_last)}{where}: {why}"
                                       + (f"; at the starting batch: {earlier}" if where
                                          and earlier else ""))
    return chosen


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _loader(task: Task, config: RunConfig, device: DeviceInfo, factors: tuple[str, ...],
            clock: Clock, report: TuneReport, say: Callable[[str], None]) -> RunConfig:
    if "loader" not in factors:
        return config
    predicted = timings_s(1 + len(worker_counts()) * (ROUNDS + 1), _step_s(report, config),
                          LOADER_MIN_S)
    if not clock.fits(predicted, _final_s(report, config)):
        report.reasons["loader"] = (f"kept (the start), not tried: timing the worker counts "
                                    f"would take about {predicted:.0f} s, "
                                    f"{max(0.0, clock.left()):.0f} s of --budget-s left")
        return config
    choice = choose_loader(task, config, device, say)
    for row in choice.rows:
        text = ", ".join(f"{k} {v}" for k, v in row.settings.items())
        report.rows.append(Row("loader", text, row.samples_per_s, row.spread,
                               note=f"data wait {row.data_wait:.1%}", rounds=row.rounds))
    report.reasons["loader"] = "; ".join(f"{k}: {v}" for k, v in choice.reasons.items())
    return choice.apply(config)


def _speedup(task: Task, start: RunConfig, tuned: RunConfig, device: DeviceInfo,
             report: TuneReport, say: Callable[[str], None]) -> RunConfig:
    """The tuned config against the starting one, interleaved: the speed-up printed, and
    the config written: the tuned one only when faster beyond the rounds' noise, else the
    start (keep_start says why)."""
    if runs_alike(start, tuned, device):
        report.kept_start = True
        report.reasons["result"] = ("the starting config is written: no setting measured "
                                    "faster than it beyond the noise")
        return start
    rounds = ROUNDS + 2
    with runners(task, [start, tuned], device) as built:
        for runner in built:
            runner.warm_up()
        a, b = interleave(built, rounds, MIN_TIMED_S, lambda i, r: say(
            f"speed-up: timing the {'tuned' if i else 'starting'} config (round {r + 1} "
            f"of {rounds})"))
    ratios = [y / x for x, y in zip(a.rates, b.rates, strict=True)]
    report.start_samples_per_s, report.tuned_samples_per_s = a.samples_per_s, b.samples_per_s
    report.speedup = statistics.median(ratios)
    report.speedup_range = (min(ratios), max(ratios))
    for label, t in (("start", a), ("tuned", b)):
        report.rows.append(Row("speed-up", f"the {label} config (side by side)",
                               t.samples_per_s, t.spread, rounds=list(t.rates)))
    why = keep_start(a.rates, b.rates)
    if why is None:
        report.reasons["result"] = "the tuned config is written: faster than the start " \
                                   "beyond the noise"
        return tuned
    report.kept_start = True
    report.reasons["result"] = f"the starting config is written: {why}"
    return start


def runs_alike(a: RunConfig, b: RunConfig, device: DeviceInfo) -> bool:
    """Whether two configs train alike: equal once the loader's "auto" settings are
    resolved for `device` and the effective batch is spelled out (timing them against
    each other would only measure noise)."""
    def key(c: RunConfig) -> dict[str, Any]:
        d = c.to_dict()
        loader = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
        d["data"] = {**{k: v for k, v in d["data"].items() if k not in loader},
                     **loader_options(c.data, device.kind)}
        d["train"] = {**d["train"], "effective_batch_size": c.train.samples_per_step,
                      "lr_reference_batch": None}
        return d
    return key(a) == key(b)


def keep_start(start: list[float], tuned: list[float]) -> str | None:
    """Why the start is written instead of the tuned config (rounds of samples/s, timed side
    by side), or None: the tuned one is faster beyond the noise (judge.faster_than_start)."""
    pick, tolerance = faster_than_start([start, tuned], 0)
    if pick == 1:
        return None
    ratio = statistics.median(tuned) / statistics.median(start)
    return (f"the tuned config measured {ratio:.2f}x the start's samples/s side by side, "
            f"not faster beyond the noise ({max(TIMING_TOLERANCE, tolerance):.1%})")
