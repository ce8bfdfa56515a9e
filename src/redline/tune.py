"""The batch search (autobatch): the largest micro-batch that fits a memory target, and
the fastest one. A workflow: it builds its trials through build.py, like training.

Predict, then check. Peak memory of a training step is close to affine in the batch
size: memory(b) ~ a + k*b (a: weights, gradients, optimizer state, workspace; k: the
activations of one sample). Two or three real probe steps (forward, backward and the
optimizer step, so optimizer state is counted) give a and k by least squares; the size
that meets the target is (target - a) / k. One real verification step at that size,
followed by one evaluation batch, confirms it under the budget; if it does not fit, the
size shrinks by 10 % and is verified again.

Largest is not fastest: past some size, samples/s stops growing while memory keeps
filling, and on a CPU it often falls. Samples/s is scanned at the powers of two from 1 up
(each timed for at least MIN_TIMED_S), and the scan stops once two sizes in a row are
clearly slower (FALLEN) than the best so far: the largest sizes, the slowest to time, are
timed only where the answer can be. The sizes near the best are then timed again in
interleaved rounds, and the *knee* is the smallest size within 2 % (or the rounds' noise)
of the best: the size chosen. The effective batch (samples per optimizer step) is kept with gradient
accumulation; when it has to change, the learning rate follows `train.lr_scaling`.

The budget is `memory.budget`, or the device's memory; on a CPU without a budget, a
share of the memory available when the search starts (memory/probe.py says why): every
probe and verification step runs under that budget, so the search stops at an
out-of-memory error it raised itself, never at the kernel's OOM killer.

Under torchrun every rank searches on its own device (each trial is one process's step,
with the host's memory split between the ranks on it), and the ranks settle on the
smallest micro-batch any of them chose (one message): the size every rank can hold.

Results are cached on disk under the job's fingerprint (build.Job.fingerprint: model
structure and dtypes, precision, compile, optimizer, input shapes, device and its memory,
torch version) and the budget and target: a cache hit costs one verification step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from redline import batch as batch_tree
from redline.build import Job, build_job
from redline.checkpoint import list_checkpoints, preserved_rng
from redline.config import ConfigError, RunConfig
from redline.device import DeviceInfo
from redline.distributed import Comm, World
from redline.memory.probe import MemoryBudget, default_budget, live_tensor_bytes, measure_peak
from redline.recipe import Recipe, recipe
from redline.task import Task
from redline.telemetry.console import status

KNEE_TOLERANCE = 0.02  # the least a size must be faster by to count as faster
ROUNDS = 3  # interleaved timing rounds per size
MIN_TIMED_S = 0.02  # a size's timing covers steps adding up to at least this
FALLEN = 0.15  # slower than the best by this much: clearly past the knee
MAX_SIZE = 1 << 16


@dataclass
class Trial:
    size: int
    kind: str  # "probe" | "verify" | "eval-probe" | "throughput"
    peak_bytes: int | None = None
    fits: bool = True
    samples_per_s: float | None = None  # throughput: the median of the interleaved rounds
    spread: tuple[float, float] | None = None  # throughput: the rounds' min and max


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
    trials: list[Trial] = field(default_factory=list)
    ranks: int = 1  # torchrun: the ranks the effective batch is shared by

    @property
    def fastest(self) -> int:
        return self.chosen

    @property
    def knee_tolerance(self) -> float | None:
        """The tolerance the knee was chosen at (see choose_knee); None: nothing timed.
        A throughput trial keeps its rounds' median and range, which for ROUNDS = 3 is
        every round."""
        timed = [(t.spread[0], t.samples_per_s, t.spread[1]) for t in self.trials
                 if t.kind == "throughput" and t.spread and t.samples_per_s]
        return max(KNEE_TOLERANCE, timing_noise(timed)) if timed else None

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.chosen, self.accumulation_steps, self.effective_batch_size,
                      self.lr, self.eval_batch_size, self.ranks)

    def apply(self, config: RunConfig) -> RunConfig:
        """`config` with the tuned micro-batch, effective batch, lr and eval batch."""
        return self.recipe.apply(config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutobatchResult:
        trials = [Trial(**{**t, "spread": tuple(t["spread"]) if t.get("spread") else None})
                  for t in d.pop("trials", [])]
        d["fit"] = tuple(d["fit"])
        return cls(**d, trials=trials)


Progress = Callable[[str], None]


class _Harness:
    """A job built for trial steps (build.py: what training builds, each batch run whole)."""

    def __init__(self, task: Task, config: RunConfig, device: DeviceInfo) -> None:
        self.task = task
        self.job: Job = build_job(config.updated({"train.batch_size": "auto"}), task, device)
        self.device, self.precision = device, self.job.precision
        self.model, self.optimizer, self.engine = (self.job.model, self.job.optimizer,
                                                   self.job.engine)
        self.train_set, self.eval_set = self.job.train_set, self.job.eval_set

    def batch(self, dataset: Any, size: int) -> Any:
        return batch_tree.move(batch_tree.first_samples(dataset, size), self.device.torch_device)

    def train_step(self, size: int) -> None:
        batch = self.batch(self.train_set, size)
        with self.precision.global_context():
            loss = self.engine.step(batch, self.task.loss)
        float(loss.item())  # waits for the device, so timings and peaks are complete

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
        """Run `fn` under the budget: (peak within target, peak; None when it ran out)."""
        baseline = self.live_bytes()
        try:
            with MemoryBudget(budget, self.device, baseline=baseline):
                peak = measure_peak(fn, self.device, baseline=baseline).peak_bytes
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return False, None
        return peak <= target, peak


def autobatch(task: Task, config: RunConfig, device: DeviceInfo, *,
              cache_dir: str | Path | None = None, measure_throughput: bool = True,
              progress: Progress | None = None, sharing: int = 1) -> AutobatchResult:
    """Find the micro-batch to train `task` with under `config.memory` (see module doc);
    `sharing`: processes training on this host (torchrun's ranks on one machine)."""
    say = progress or (lambda _: None)
    if config.memory.budget_bytes is not None:
        budget, source = config.memory.budget_bytes, "memory.budget"
    else:
        budget, source = default_budget(device, sharing)
        say(f"no memory.budget: searching within {source}")
    target = int(config.memory.target * budget)
    with preserved_rng():  # tuning must not shift training's random streams
        h = _Harness(task, config, device)
        fingerprint = h.job.fingerprint(f"budget={budget}", f"target={config.memory.target}")
        cached = _load_cache(cache_dir, fingerprint)
        if cached is not None:
            say(f"cache hit: micro-batch {cached.chosen}; verifying")
            ok, _ = h.fits(lambda: _train_and_eval(h, cached.chosen, cached.eval_batch_size),
                           budget, target)
            if ok:
                cached.cache_hit, cached.verify_steps = True, 1
                cached.probe_steps = cached.throughput_steps = 0
                return _with_recipe(cached, config)  # the measurement; this config's recipe
            say("cached size no longer fits; searching again")
        result = _search(h, config, budget, target, measure_throughput, say)
    result.fingerprint, result.budget_source = fingerprint, source
    _save_cache(cache_dir, result)
    return _with_recipe(result, config)


def _with_recipe(result: AutobatchResult, config: RunConfig, ranks: int = 1
                 ) -> AutobatchResult:
    """The result with the effective batch, accumulation and lr `config` implies (recipe.py):
    a cached search holds what was measured, never the lr of the run that measured it."""
    r = recipe(config, result.chosen, result.eval_batch_size, ranks)
    result.chosen, result.accumulation_steps = r.micro_batch, r.accumulation_steps
    result.effective_batch_size, result.lr = r.effective_batch_size, r.lr
    result.ranks = ranks
    return result


def resolve_auto_batch(task: Task, config: RunConfig, device: DeviceInfo, run_dir: Path,
                       resume: bool, interactive: bool | None,
                       check: Callable[[], None] = lambda: None, comm: Comm | None = None
                       ) -> tuple[RunConfig, dict[str, Any]]:
    """batch_size: auto -> the config with the tuned micro-batch, effective batch, lr and
    eval batch, and what to record of the decision. `check()` runs before each trial (it
    may raise, e.g. lifecycle.Interrupted on SIGTERM). `comm`: the ranks, which settle on
    the smallest micro-batch any chose (module docstring).

    A resumed run reuses the values its first start chose (they are in its config.yaml),
    so the math of the steps already taken does not change.
    """
    world = comm.world if comm is not None else World()
    saved = run_dir / "config.yaml"
    if resume and saved.is_file() and list_checkpoints(run_dir / "checkpoints"):
        # What the first start measured (micro-batch, eval batch); the rest follows this
        # config, and the checkpoint's config is compared with the result like any resume.
        old = yaml.safe_load(saved.read_text())["train"]
        plan = recipe(config, old["batch_size"], old["eval_batch_size"], world.size)
        if world.main:
            print(f"batch_size: auto: {plan.describe(config)} (from {saved})",
                  file=sys.stderr, flush=True)
        return plan.apply(config), {"source": str(saved), "micro_batch": plan.micro_batch}
    with status("autobatch", interactive=interactive) as shown:
        say = shown if world.main else (lambda msg: None)  # rank 0 shows its search
        r = autobatch_ranks(task, config, device, comm,
                            progress=lambda msg: (check(), say(msg)))
    if world.main:
        print(f"batch_size: auto: {r.recipe.describe(config)}", file=sys.stderr, flush=True)
    return r.apply(config), {
        "micro_batch": r.chosen, "max_fit": r.max_fit,
        "accumulation_steps": r.accumulation_steps,
        "effective_batch_size": r.effective_batch_size, "lr": r.lr,
        "eval_batch_size": r.eval_batch_size, "cache_hit": r.cache_hit,
        "probe_steps": r.probe_steps, "verify_steps": r.verify_steps,
        "budget_bytes": r.budget_bytes, "budget_source": r.budget_source}


def autobatch_ranks(task: Task, config: RunConfig, device: DeviceInfo, comm: Comm | None,
                    **options: Any) -> AutobatchResult:
    """`autobatch` on every rank (each on its own device, sharing the host's memory), then
    the size every rank holds: the smallest chosen, in one message (module docstring)."""
    world = comm.world if comm is not None else World()
    r = autobatch(task, config, device, sharing=world.local_size, **options)
    if comm is None or not world.distributed:
        return r
    micro, evaluation = comm.agree(-r.chosen, -(r.eval_batch_size or 0))  # max of negatives
    r.chosen, r.eval_batch_size = -micro, -evaluation or None
    return _with_recipe(r, config, world.size)


def _train_and_eval(h: _Harness, size: int, eval_size: int | None) -> None:
    h.train_step(size)
    if eval_size:
        h.eval_step(eval_size)


def _search(h: _Harness, config: RunConfig, budget: int, target: int,
            measure_throughput: bool, say: Progress) -> AutobatchResult:
    cap = min(MAX_SIZE, len(h.train_set))  # type: ignore[arg-type]
    if config.train.effective_batch_size:
        cap = min(cap, config.train.effective_batch_size)
    trials: list[Trial] = []
    a, k = _fit_memory(h, cap, budget, target, trials, say)
    size = max(1, min(cap, int((target - a) / k) if k > 0 else cap))
    eval_size = _eval_size(h, budget, target, trials, say) if h.eval_set is not None else None
    verify_steps = 0
    while True:
        say(f"verifying micro-batch {size}")
        verify_steps += 1
        ok, peak = h.fits(lambda s=size: _train_and_eval(h, s, eval_size), budget, target)
        trials.append(Trial(size, "verify", peak, ok))
        if ok or size == 1:
            break
        size = max(1, int(size * 0.9))
    if not ok:
        raise ConfigError(f"not even a micro-batch of 1 fits memory.target "
                          f"({config.memory.target:.0%} of {budget} bytes)")
    chosen, tsteps = (_knee(h, size, trials, say) if measure_throughput else (size, 0))
    effective = config.train.effective_batch_size or chosen
    return AutobatchResult(  # the recipe fields are filled in by _with_recipe
        max_fit=size, chosen=min(chosen, effective), accumulation_steps=1,
        effective_batch_size=effective, lr=config.train.lr,
        eval_batch_size=eval_size, budget_bytes=budget, target_bytes=target, fit=(a, k),
        probe_steps=sum(t.kind == "probe" for t in trials), verify_steps=verify_steps,
        throughput_steps=tsteps, trials=trials)


def _fit_memory(h: _Harness, cap: int, budget: int, target: int, trials: list[Trial],
                say: Progress) -> tuple[float, float]:
    """(a, k) of memory(b) ~ a + k*b from at most three probe steps.

    Probes at s and 2s give a first prediction; the third probe lands halfway to it, and
    the line through the two largest probes is used: per-sample cost at tiny sizes carries
    fixed overheads, so the fit that extrapolates least is the one nearest the target.
    """
    s = min(8, cap)
    points: list[tuple[int, int]] = []
    while len(trials) < 3:
        say(f"probing micro-batch {s}")
        _, peak = h.fits(lambda s=s: h.train_step(s), budget, target)
        trials.append(Trial(s, "probe", peak, peak is not None))
        if peak is None:  # even the probe is too big: halve and keep looking
            if s == 1:
                break
            s = max(1, s // 2)
            continue
        points.append((s, peak))
        if len(points) == 1:
            nxt = 2 * s
        else:
            a, k = _least_squares(points[-2:])
            nxt = max(2 * s, int((target - a) / k / 2)) if k > 0 else 2 * s
        if nxt > cap or nxt <= s:
            break
        s = nxt
    if not points:
        raise ConfigError("a training step does not fit in memory even with one sample")
    if len(points) == 1:
        return float(points[0][1]), float(points[0][1]) / points[0][0]
    return _least_squares(points[-2:])


def _eval_size(h: _Harness, budget: int, target: int, trials: list[Trial], say: Progress
               ) -> int:
    n = len(h.eval_set)  # type: ignore[arg-type]
    points = []
    for s in sorted({min(n, 4), min(n, 8)}):
        say(f"probing evaluation batch {s}")
        _, peak = h.fits(lambda s=s: h.eval_step(s), budget, target)
        trials.append(Trial(s, "eval-probe", peak, peak is not None))
        if peak is not None:
            points.append((s, peak))
    if not points:
        return 1
    a, k = _least_squares(points) if len(points) > 1 else (0.0, points[0][1] / points[0][0])
    return max(1, min(n, MAX_SIZE, int((target - a) / k) if k > 0 else n))


def _knee(h: _Harness, largest: int, trials: list[Trial], say: Progress) -> tuple[int, int]:
    """The throughput knee (module docstring): (the size, the timing steps it took)."""
    steps = 0

    def rate(s: int) -> float:  # samples/s of steps at s adding up to MIN_TIMED_S
        nonlocal steps
        done, t0 = 0, time.perf_counter()
        while True:
            h.train_step(s)
            done += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= MIN_TIMED_S:
                steps += done
                return s * done / elapsed

    sizes = sorted({1 << i for i in range(largest.bit_length()) if 1 << i <= largest}
                   | {largest})
    scanned: dict[int, float] = {}
    for s in sizes:
        say(f"scanning micro-batch {s}")
        h.train_step(s)  # allocator and kernels for this shape
        steps += 1
        scanned[s] = rate(s)
        trials.append(Trial(s, "scan", samples_per_s=scanned[s]))
        best = max(scanned.values())
        if len(scanned) >= 3 and all(v < (1 - FALLEN) * best
                                     for v in list(scanned.values())[-2:]):
            break  # two sizes in a row clearly slower: larger ones will not win
    best = max(scanned.values())
    near = [s for s, v in scanned.items() if v >= (1 - FALLEN) * best]
    rates: dict[int, list[float]] = {s: [] for s in near}
    for r in range(ROUNDS):
        # Interleaved, and each round in the other direction: a machine that slows down or
        # speeds up mid-search shifts every size alike instead of favouring one end.
        for s in near if r % 2 == 0 else reversed(near):
            say(f"timing micro-batch {s} (round {r + 1} of {ROUNDS})")
            rates[s].append(rate(s))
    for s in near:
        trials.append(Trial(s, "throughput", samples_per_s=statistics.median(rates[s]),
                            spread=(min(rates[s]), max(rates[s]))))
    return choose_knee(rates)[0], steps


def choose_knee(rates: dict[int, list[float]]) -> tuple[int, float]:
    """(the size to train with, the tolerance it was chosen at) from each size's rates.

    A size is as fast as the best when its median is within the tolerance: the larger of
    KNEE_TOLERANCE and the timing noise measured, the median relative spread of the
    sizes' rounds. The smallest such size is chosen. Differences inside the noise decide
    nothing, so a busy machine does not change the choice; where all sizes are within it,
    the choice is the smallest size whatever the load.
    """
    median = {s: statistics.median(v) for s, v in rates.items()}
    tolerance = max(KNEE_TOLERANCE, timing_noise(rates.values()))
    best = max(median.values())
    return min(s for s, m in median.items() if m >= (1 - tolerance) * best), tolerance


def timing_noise(rates: Iterable[Sequence[float]]) -> float:
    """The median over sizes of their rounds' range relative to their median rate."""
    return statistics.median((max(v) - min(v)) / statistics.median(v) for v in rates)


def _least_squares(points: list[tuple[int, int]]) -> tuple[float, float]:
    xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    k = max(k, 1.0)
    return my - k * mx, k


def default_cache_dir() -> Path:
    return Path(os.environ.get("REDLINE_CACHE_DIR",
                               Path.home() / ".cache" / "redline")) / "autobatch"


def _cache_path(cache_dir: str | Path | None, fingerprint: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"{fingerprint}.json"


def _load_cache(cache_dir: str | Path | None, fingerprint: str) -> AutobatchResult | None:
    path = _cache_path(cache_dir, fingerprint)
    try:
        return AutobatchResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent or unreadable: search afresh


def _save_cache(cache_dir: str | Path | None, result: AutobatchResult) -> None:
    path = _cache_path(cache_dir, result.fingerprint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")  # ranks may write it at once
        tmp.write_text(json.dumps(result.to_dict()))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home must not stop training; the next run searches again
