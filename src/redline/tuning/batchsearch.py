"""The batch search's measurements: the memory fit and the throughput knee.

`autobatch.autobatch` is the API (the budget, the cache, the ranks); this module is what it
measures, on a job built for trial steps through build.py and stepped through
job/runner.py, like training (a size's timing: whole steps on one batch, each synced).

Predict, then check. Peak memory of a training step is close to affine in the batch
size: memory(b) ~ a + k*b (a: weights, gradients, optimizer state, workspace; k: the
activations of one sample). Two or three real probe steps (forward, backward and the
optimizer step, so optimizer state is counted) give a and k by least squares; the size
that meets the target is (target - a) / k. One real verification step at that size,
followed by one evaluation batch, confirms it under the budget; if it does not fit, the
size shrinks by 10 % and is verified again.

Largest is not fastest: past some size, samples/s stops growing while memory keeps
filling, and on a CPU it often falls. No size is tried beyond the effective batch kept
(recipe.py; `_cap`). Samples/s is scanned at the powers of two from 1 up and at the start
(the micro-batch the run would have had: kept unless beaten), each timed for at least
MIN_TIMED_S, until knee.py's stop rules end the scan (a fall confirmed in interleaved
rounds, a size that does not fit, the deadline). The start is timed even where the scan
stopped below it. Every size scanned, but those whose fall the rounds confirmed, is then
timed again in ROUNDS interleaved rounds with the start, and knee.choose_knee keeps the
start unless a size beats it beyond the rounds' noise: the size chosen, with its reason.

`redline tune` wants the fastest size, not the largest, so it skips verifying the largest
(`search_fastest`): two probes predict it, the scan's first step at each size beyond the
probes runs under the budget (a size that does not fit ends the scan), and the chosen
size is verified with its evaluation batch. On sr3-tiny that is most of the search's
time saved: the largest size's steps are the slowest of all.

Every probe and verification step runs under the budget, so the search stops at an
out-of-memory error it raised itself, never at the kernel's OOM killer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from redline import batch as batch_tree
from redline.config import ConfigError, RunConfig
from redline.device import DeviceInfo
from redline.job.build import Job, build_job
from redline.job.runner import JobRunner
from redline.memory.probe import MemoryBudget, live_tensor_bytes, measure_peak
from redline.task import Task
from redline.tuning.knee import (
    KNEE_TOLERANCE,
    SizeFails,
    choose_knee,
    knee_reason,
    scan,
    to_time_in_rounds,
)
from redline.tuning.recipe import Recipe, kept_batch

__all__ = ["KNEE_TOLERANCE", "AutobatchResult", "DoesNotFit", "Harness", "SizeTrial",
           "choose_knee", "search_fastest", "search_largest"]

ROUNDS = 3  # interleaved timing rounds per size
MIN_TIMED_S = 0.02  # a size's timing covers steps adding up to at least this
MAX_SIZE = 1 << 16


@dataclass
class SizeTrial:
    """One size the batch search tried: a memory probe, a verification or a timing (not a
    trial.Runner, which times a whole config)."""

    size: int
    kind: str  # "probe" | "verify" | "eval-probe" | "scan" | "confirm" | "throughput"
    peak_bytes: int | None = None
    fits: bool = True
    samples_per_s: float | None = None  # throughput: the median of the interleaved rounds
    spread: tuple[float, float] | None = None  # throughput: the rounds' min and max
    rounds: list[float] | None = None  # throughput: every round's samples/s


@dataclass
class AutobatchResult:
    max_fit: int  # largest micro-batch within memory.target
    chosen: int  # the throughput knee: the micro-batch to train with
    accumulation_steps: int
    effective_batch_size: int
    lr: float
    eval_batch_size: int | None
    budget_bytes: int
    target_bytes: int
    fit: tuple[float, float]  # (a, k): memory(b) ~ a + k*b bytes
    budget_source: str = "memory.budget"  # where budget_bytes came from, in words
    probe_steps: int = 0
    verify_steps: int = 0
    throughput_steps: int = 0
    cache_hit: bool = False
    fingerprint: str = ""
    trials: list[SizeTrial] = field(default_factory=list)
    ranks: int = 1  # torchrun: the ranks the effective batch is shared by
    max_fit_predicted: bool = False  # max_fit from the memory fit, not a verified step
    start: int | None = None  # the micro-batch the run would have had: kept unless beaten
    why: str = ""  # the knee's reason, with the numbers
    tolerance: float | None = None  # the knee's: KNEE_TOLERANCE or the rounds' noise

    @property
    def fastest(self) -> int:
        return self.chosen

    def timed(self) -> dict[int, SizeTrial]:
        """Each size's speed: its final rounds where it had them, else the rounds that
        confirmed its fall, else its scan."""
        out: dict[int, SizeTrial] = {}
        for kind in ("scan", "confirm", "throughput"):
            out.update({t.size: t for t in self.trials
                        if t.kind == kind and t.samples_per_s})
        return out

    @property
    def knee_tolerance(self) -> float | None:
        """The tolerance the knee was chosen at (see choose_knee); None: nothing timed."""
        return self.tolerance

    def table(self) -> list[dict[str, Any]]:
        """The samples/s table behind the choice, one row per size timed (ascending):
        `micro_batch`, `samples_per_s` (the rounds' median, else the scan's one timing),
        `rounds` (every round's samples/s; one value: scanned once), `start`, `chosen`."""
        return [{"micro_batch": size, "samples_per_s": t.samples_per_s,
                 "rounds": list(t.rounds or [t.samples_per_s]),
                 "start": size == self.start, "chosen": size == self.chosen}
                for size, t in sorted(self.timed().items())]

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.chosen, self.accumulation_steps, self.effective_batch_size,
                      self.lr, self.eval_batch_size, self.ranks)

    def apply(self, config: RunConfig) -> RunConfig:
        """`config` with the tuned micro-batch, effective batch, lr and eval batch."""
        return self.recipe.apply(config)

    def to_dict(self) -> dict[str, Any]:
        """The result with its samples/s table (`samples_per_s_table`: see table())."""
        return {**asdict(self), "samples_per_s_table": self.table()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutobatchResult:
        d = {k: v for k, v in d.items() if k != "samples_per_s_table"}
        trials = [SizeTrial(**{**t, "spread": tuple(t["spread"]) if t.get("spread") else None})
                  for t in d.pop("trials", [])]
        d["fit"] = tuple(d["fit"])
        return cls(**d, trials=trials)


Progress = Callable[[str], None]


class DoesNotFit(ConfigError):
    """Not even a micro-batch of one sample fits memory.target: the model needs memory
    levers (the memory plan, tuning/memory_plan.py), or a larger budget."""


class Harness:
    """A job built for trial steps (build.py: what training builds, each batch run whole)."""

    def __init__(self, task: Task, config: RunConfig, device: DeviceInfo) -> None:
        self.task = task
        # A compiled model's first call under the CPU tracker would stop dynamo compiling
        # its forward for the rest of the process (trial.py), so on a CPU the trials run
        # the model eagerly: its memory and speed are the eager step's.
        eager = device.kind == "cpu" and config.precision.compile
        self.job: Job = build_job(config.updated(
            {"train.batch_size": "auto", **({"precision.compile": False} if eager else {})}),
            task, device)
        self.device, self.precision = device, self.job.precision
        self.model, self.optimizer, self.engine = (self.job.model, self.job.optimizer,
                                                   self.job.engine)
        self.train_set, self.eval_set = self.job.train_set, self.job.eval_set
        self.runner = JobRunner(self.job)  # its loader unused: the trials pick their batches
        self.timing_s = MIN_TIMED_S  # each size's timing covers steps adding up to this
        self.deadline: float | None = None  # perf_counter time after which the scan stops
        self._warm = False  # the optimizer's state exists (fits: the steady state)

    def batch(self, dataset: Any, size: int) -> Any:
        return batch_tree.move(batch_tree.first_samples(dataset, size), self.device.torch_device)

    def train_step(self, size: int) -> None:
        """One optimizer step on the first `size` training samples (job/runner.py)."""
        with self.runner.context():
            loss = self.runner.step_on(self.batch(self.train_set, size))
            float(loss.item())  # sync: timings and peaks are complete

    def time_size(self, size: int) -> tuple[int, float]:
        """(steps, samples/s) of whole steps at `size` adding up to `timing_s`, each on the
        same batch, as JobRunner.time runs them."""
        batch = self.batch(self.train_set, size)
        with self.runner.context():
            steps, busy, _ = self.runner.time(self.timing_s, batch)
        return steps, size * steps / busy

    def eval_step(self, size: int) -> None:
        assert self.eval_set is not None
        batch = self.batch(self.eval_set, size)
        self.job.step_model.eval()
        try:
            with torch.no_grad(), self.precision.forward_context():
                float(self.task.loss(self.job.step_model, batch).float().item())
        finally:
            self.job.step_model.train()

    def live_bytes(self) -> int:
        # Gradients of the previous trial would count in the baseline and, freed inside the
        # measured step by zero_grad, never be subtracted: drop them first.
        self.optimizer.zero_grad(set_to_none=True)
        return live_tensor_bytes(self.model, self.optimizer)

    def fits(self, fn: Callable[[], None], budget: int, target: int) -> tuple[bool, int | None]:
        """Run `fn` under the budget: (peak within target, peak; None when it ran out).
        Measured at the steady state: before the first, one untracked step of one sample
        allocates the optimizer's state (AdamW's appears at its first step, so a first
        step's peak would miss it)."""
        if not self._warm:
            self.train_step(1)
            self._warm = True
        baseline = self.live_bytes()
        try:
            with MemoryBudget(budget, self.device, baseline=baseline):
                peak = measure_peak(fn, self.device, baseline=baseline).peak_bytes
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return False, None
        return peak <= target, peak


def train_and_eval(h: Harness, size: int, eval_size: int | None) -> None:
    h.train_step(size)
    if eval_size:
        h.eval_step(eval_size)


def search_largest(h: Harness, config: RunConfig, budget: int, target: int,
                   measure_throughput: bool, say: Progress, start: int | None = None
                   ) -> AutobatchResult:
    """The largest size within the target (verified), then the knee up to it, against
    `start` (the micro-batch the run would have had)."""
    cap = _cap(h, config)
    trials: list[SizeTrial] = []
    a, k = _fit_memory(h, cap, budget, target, trials, say)
    size = max(1, min(cap, int((target - a) / k) if k > 0 else cap))
    eval_size = _eval_size(h, budget, target, trials, say) if h.eval_set is not None else None
    size, eval_size, verify_steps = _verify(h, config, size, eval_size, budget, target,
                                            trials, say)
    chosen, tsteps, why, tolerance = (
        _knee(h, size, trials, say, start=start) if measure_throughput
        else (size, 0, "the largest fitting size (speed not measured)", None))
    return AutobatchResult(  # the recipe fields are filled in by _with_recipe
        max_fit=size, chosen=chosen, accumulation_steps=1,
        effective_batch_size=chosen, lr=config.train.lr, start=start, why=why,
        tolerance=tolerance,
        eval_batch_size=eval_size, budget_bytes=budget, target_bytes=target, fit=(a, k),
        probe_steps=sum(t.kind == "probe" for t in trials), verify_steps=verify_steps,
        throughput_steps=tsteps, trials=trials)


def search_fastest(h: Harness, config: RunConfig, budget: int, target: int,
                   measure_throughput: bool, say: Progress, start: int | None = None
                   ) -> AutobatchResult:
    """The fastest size without verifying the largest (autobatch's verify_largest=False):
    two probes predict the largest; the scan checks each size it reaches beyond them
    against the budget (its warm-up step, tracked) and stops at one that does not fit."""
    cap = _cap(h, config)
    trials: list[SizeTrial] = []
    a, k = _fit_memory(h, cap, budget, target, trials, say, probes=2)
    predicted = max(1, min(cap, int((target - a) / k) if k > 0 else cap))
    eval_size = _eval_size(h, budget, target, trials, say) if h.eval_set is not None else None
    checked = max((t.size for t in trials if t.kind == "probe" and t.fits), default=0)

    def check(size: int) -> bool:
        if size <= checked:
            h.train_step(size)
            return True
        ok, peak = h.fits(lambda: h.train_step(size), budget, target)
        trials.append(SizeTrial(size, "verify", peak, ok))
        return ok

    chosen, tsteps, why, tolerance = _knee(h, predicted, trials, say, check, start)
    scan_checks = sum(t.kind == "verify" for t in trials)
    # the chosen size with its evaluation batch, as training will run them
    chosen, eval_size, verify_steps = _verify(h, config, chosen, eval_size, budget, target,
                                              trials, say)
    verify_steps += scan_checks
    return AutobatchResult(
        max_fit=predicted, chosen=chosen, accumulation_steps=1, start=start, why=why,
        tolerance=tolerance,
        effective_batch_size=chosen, lr=config.train.lr, eval_batch_size=eval_size,
        budget_bytes=budget, target_bytes=target, fit=(a, k),
        probe_steps=sum(t.kind == "probe" for t in trials), verify_steps=verify_steps,
        throughput_steps=tsteps, trials=trials, max_fit_predicted=True)


def _cap(h: Harness, config: RunConfig) -> int:
    """The largest size worth trying: the training set, and the effective batch where it is
    kept (recipe.py: a micro-batch never exceeds it)."""
    cap = min(MAX_SIZE, len(h.train_set))  # type: ignore[arg-type]
    t = config.train
    if t.effective_batch_size or not t.grow_effective_batch:
        cap = min(cap, kept_batch(config))
    return cap


def _verify(h: Harness, config: RunConfig, size: int, eval_size: int | None, budget: int,
            target: int, trials: list[SizeTrial], say: Progress
            ) -> tuple[int, int | None, int]:
    """`size` and its evaluation batch under the budget, shrinking by 10 % until they fit,
    then the evaluation batch by half (it runs with the step's gradients still held, which
    its own probe did not have): (the size and evaluation batch that fit, the
    verification steps it took)."""
    steps = 0
    while True:
        say(f"verifying micro-batch {size}" + (f" with evaluation batch {eval_size}"
                                               if eval_size else ""))
        steps += 1
        ok, peak = h.fits(lambda s=size, e=eval_size: train_and_eval(h, s, e), budget, target)
        trials.append(SizeTrial(size, "verify", peak, ok))
        if ok:
            return size, eval_size, steps
        if size == 1 and eval_size and eval_size > 1:
            eval_size = eval_size // 2
            continue
        if size == 1:
            raise DoesNotFit(f"not even a micro-batch of 1 fits memory.target "
                              f"({config.memory.target:.0%} of {budget} bytes)")
        size = max(1, int(size * 0.9))


def _fit_memory(h: Harness, cap: int, budget: int, target: int, trials: list[SizeTrial],
                say: Progress, probes: int = 3) -> tuple[float, float]:
    """(a, k) of memory(b) ~ a + k*b from at most `probes` probe steps.

    Probes at s and 2s give a first prediction; the third probe lands halfway to it, and
    the line through the two largest probes is used: per-sample cost at tiny sizes carries
    fixed overheads, so the fit that extrapolates least is the one nearest the target.
    """
    s = min(8, cap)
    points: list[tuple[int, int]] = []
    too_big = cap + 1  # the smallest size that ran out of memory
    # Probes that ran out do not count: a model that needs its memory levers (the memory
    # plan) may fit only far below the first probe.
    while len(points) < probes:
        say(f"probing micro-batch {s}")
        _, peak = h.fits(lambda s=s: h.train_step(s), budget, target)
        trials.append(SizeTrial(s, "probe", peak, peak is not None))
        if peak is None:  # even the probe is too big: halve and keep looking
            if s == 1:
                break
            too_big, s = s, max(1, s // 2)
            continue
        points.append((s, peak))
        if len(points) == 1:
            nxt = 2 * s
        else:
            a, k = _least_squares(points[-2:])
            nxt = max(2 * s, int((target - a) / k / 2)) if k > 0 else 2 * s
        nxt = min(nxt, too_big - 1)
        if nxt > cap or nxt <= s:
            break
        s = nxt
    if not points:
        raise DoesNotFit("a training step does not fit in memory even with one sample")
    if len(points) == 1:
        return float(points[0][1]), float(points[0][1]) / points[0][0]
    return _least_squares(points[-2:])


def _eval_size(h: Harness, budget: int, target: int, trials: list[SizeTrial], say: Progress
               ) -> int:
    n = len(h.eval_set)  # type: ignore[arg-type]
    points = []
    for s in sorted({min(n, 4), min(n, 8)}):
        say(f"probing evaluation batch {s}")
        _, peak = h.fits(lambda s=s: h.eval_step(s), budget, target)
        trials.append(SizeTrial(s, "eval-probe", peak, peak is not None))
        if peak is not None:
            points.append((s, peak))
    if not points:
        return 1
    a, k = _least_squares(points) if len(points) > 1 else (0.0, points[0][1] / points[0][0])
    return max(1, min(n, MAX_SIZE, int((target - a) / k) if k > 0 else n))


def _knee(h: Harness, largest: int, trials: list[SizeTrial], say: Progress,
          check: Callable[[int], bool] | None = None, start: int | None = None
          ) -> tuple[int, int, str, float]:
    """The throughput knee (knee.py decides on the rates timed here): (the size, the timing
    steps it took, why it was chosen, the tolerance it was chosen at). `start`: the
    micro-batch the run would have had, timed in the same rounds and kept unless beaten
    beyond the noise.
    `check(size)`: runs a size's first step and says whether it fit (else: fits, untracked)."""
    steps = 0

    def rate(s: int) -> float:  # samples/s of steps at s adding up to h.timing_s
        nonlocal steps
        done, samples_per_s = h.time_size(s)
        steps += done
        return samples_per_s

    def measure(s: int) -> float | None:  # samples/s at s; None: s does not fit
        nonlocal steps
        steps += 1
        try:
            if check is None:
                h.train_step(s)  # allocator and kernels for this shape
            elif not check(s):
                return None
        except (ValueError, RuntimeError) as e:
            if start is None or s >= start or isinstance(e, torch.OutOfMemoryError):
                raise  # the size the user asked for fails: the user's error, with its trace
            # Below the start, which ran: the size itself is the cause (BatchNorm refuses
            # one value per channel; a model may reshape with a fixed batch).
            raise SizeFails(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from e
        speed = rate(s)
        trials.append(SizeTrial(s, "scan", samples_per_s=speed))
        return speed

    def rounds(sizes: list[int], label: str = "timing") -> dict[int, list[float]]:
        out: dict[int, list[float]] = {s: [] for s in sizes}
        for r in range(ROUNDS):
            # Interleaved, and each round in the other direction: a machine that slows down
            # or speeds up mid-search shifts every size alike instead of favouring one end.
            for s in sizes if r % 2 == 0 else reversed(sizes):
                say(f"{label} micro-batch {s} (round {r + 1} of {ROUNDS})")
                out[s].append(rate(s))
        return out

    sizes = sorted({1 << i for i in range(largest.bit_length()) if 1 << i <= largest}
                   | {largest} | ({start} if start and start <= largest else set()))
    deadline = h.deadline
    left = None if deadline is None else (lambda: deadline - time.perf_counter())
    scanned = scan(sizes, measure, say, left, rounds)
    if start is not None and start not in scanned.speeds:
        # the scan stopped below the start (a fall, the deadline): the start is timed all
        # the same, the reference every choice is judged against; None: it does not fit
        say(f"scanning micro-batch {start} (the start)")
        speed = measure(start) if start <= largest else None
        if speed is None:
            start = None
        else:
            scanned.speeds[start] = speed
    final = to_time_in_rounds(scanned, start, None if left is None else left(), h.timing_s,
                              lambda s: s / scanned.speeds[s])
    timed = rounds(final)
    for kind, measured in (("confirm", scanned.rounds), ("throughput", timed)):
        for s, v in measured.items():
            trials.append(SizeTrial(s, kind, samples_per_s=statistics.median(v),
                                    spread=(min(v), max(v)), rounds=list(v)))
    chosen, tolerance = choose_knee(timed, start)
    return chosen, steps, knee_reason(timed, start, chosen, tolerance, scanned.stop), tolerance


def _least_squares(points: list[tuple[int, int]]) -> tuple[float, float]:
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    k = max(k, 1.0)
    return my - k * mx, k
