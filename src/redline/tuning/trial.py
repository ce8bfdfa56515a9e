"""Timing a configuration as training runs it: a job built for trial steps, fed by its loader.

`redline tune` compares settings that the batch search's trial steps cannot see (the data
loader's workers, pinning and prefetch; channels_last; torch.compile), so a `Runner` builds
the whole job through build.py, exactly as training would, and times optimizer steps fed
by the job's own exact-resume loader, data-wait included, stepped by the code training
steps with (job/runner.py's JobRunner):

    runner = Runner(task, config, device)       # model, optimizer, loader: training's own
    runner.warm_up()                            # first step: kernels, workers, compile
    rate = runner.time(0.3)                     # samples/s over steps adding up to 0.3 s

`interleave` times several runners in rounds, each round in the other direction, so a
machine that slows down mid-measurement shifts every setting alike; `noise` is the rounds'
spread, below which no decision is made (judge.faster_than_start's rule: the start is
kept unless beaten beyond it).

Runners train a throwaway copy of the model on random streams of their own (seeded by
`train.seed`, kept between steps, so the run that follows draws what it would have
drawn), with the OOM guard on, as training runs (its first-step memory check at a new
size is a warm-up step, not timed), and memory.budget off: on a CPU the budget tracks
every op in Python, which training from the tuned config does not do.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.job.build import Job, build_job
from redline.job.runner import JobRunner
from redline.judge import relative_range, timing_noise
from redline.rng import preserved_rng, rng_state, set_rng_state
from redline.task import Task


@dataclass
class Timing:
    """One setting's interleaved rounds."""

    rates: list[float] = field(default_factory=list)  # samples/s, one per round
    waits: list[float] = field(default_factory=list)  # share of each round spent in the loader

    @property
    def samples_per_s(self) -> float:
        return statistics.median(self.rates) if self.rates else math.nan

    @property
    def spread(self) -> float:
        """The rounds' range relative to their median (0 with one round)."""
        return relative_range(self.rates)

    @property
    def data_wait(self) -> float:
        return statistics.median(self.waits) if self.waits else math.nan


def noise(timings: Sequence[Timing]) -> float:
    """The timing noise of a comparison (judge.timing_noise of the settings' rounds)."""
    return timing_noise([t.rates for t in timings])


class Runner:
    """`config`'s training job for `task`, stepped by its own loader (module docstring)
    through job/runner.py's JobRunner, the code training steps through."""

    def __init__(self, task: Task, config: RunConfig, device: DeviceInfo) -> None:
        # memory.budget off: on a CPU it tracks every op (slower); the batch search measured
        # memory. The OOM guard stays on: training runs with it, so timings include it.
        self.task, self.config = task, config.updated({"memory.budget": None})
        with preserved_rng():
            self.job: Job = build_job(self.config, task, device)
            self._rng = rng_state()  # the runner's own stream, seeded by train.seed
        self.runner: JobRunner | None = JobRunner(self.job)
        self.runner.begin_epoch(0)  # the loader's workers start here, not in a timed step
        self.per_step = self.config.train.samples_per_step
        self.first_step_s: float | None = None  # the warm-up step: kernels, workers, compile
        self.losses: list[float] = []

    def _timed(self, min_s: float) -> tuple[int, float, float]:
        """JobRunner.time on the runner's own random streams; the caller's stay put."""
        assert self.runner is not None, "the runner was closed"
        with preserved_rng(), self.runner.context():
            set_rng_state(self._rng)  # the runner's continue where its last step left them
            timed = self.runner.time(min_s, on_loss=self.losses.append)
            self._rng = rng_state()
        return timed

    def step(self) -> tuple[float, float]:
        """One optimizer step: (its seconds, the seconds of them spent waiting on data)."""
        _, took, wait = self._timed(0.0)
        return took, wait

    def warm_up(self) -> float:
        """The first step (allocator, kernels, loader workers, compilation): its seconds."""
        if self.first_step_s is None:
            self.first_step_s = self.step()[0]
        return self.first_step_s

    def time(self, min_s: float) -> tuple[float, float]:
        """(samples/s, data-wait share) over whole steps adding up to at least `min_s`."""
        self.warm_up()
        steps, busy, waited = self._timed(min_s)
        return steps * self.per_step / busy, waited / busy

    def close(self) -> None:
        """Stops the loader's workers (persistent ones live until the iterator goes)."""
        self.runner = None


def interleave(runners: Sequence[Runner], rounds: int, min_s: float,
               say: Any = None) -> list[Timing]:
    """Each runner timed `rounds` times, interleaved, alternating direction."""
    timings = [Timing() for _ in runners]
    for r in range(rounds):
        order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
        for i in order:
            if say is not None:
                say(i, r)
            rate, wait = runners[i].time(min_s)
            timings[i].rates.append(rate)
            timings[i].waits.append(wait)
    return timings


@contextlib.contextmanager
def runners(task: Task, configs: Sequence[RunConfig], device: DeviceInfo
            ) -> Iterator[list[Runner]]:
    """Runners for `configs`, closed (workers stopped) when the block ends."""
    built: list[Runner] = []
    try:
        for config in configs:
            built.append(Runner(task, config, device))
        yield built
    finally:
        for runner in built:
            runner.close()
