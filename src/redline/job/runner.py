"""A built Job stepped: the one place a batch reaches the engine.

Training (run/trainer.py), `redline tune`'s trials (tuning/trial.py), the batch search's
timings (tuning/batchsearch.py) and `--dry-run` (run/dryrun.py) all step through a
`JobRunner`, so what tune times is the code training runs, with the options the job was
built with (the engine's OOM guard, the precision's global context):

    runner = JobRunner(job)              # the job's own exact-resume loader
    with runner.context():               # the precision's global flags, once per block
        runner.begin_epoch(epoch, done)  # the position in the data (resume: batches done)
        loss = runner.step()             # next batch of the epoch: moved, stepped; None at
        runner.wait                      #   its end; the seconds the host waited on it
        loss = runner.next_step()        # the same, rolling over to the next epoch
        loss = runner.step_on(batch)     # a given batch (the batch search, the dry run)
        steps, busy, waited = runner.time(0.3)  # whole steps, each synced: >= 0.3 s

A batch is moved to the device here (non-blocking when the loader pins memory; not at all
on a CPU, where a loader's batches already are: Tensor.to would cost ~5 us a step). The
step itself does not wait for the device: the caller decides where to sync (the trainer
at its logging windows, a timing after each step); each sync is labelled `# sync:`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from redline import batch as batch_tree
from redline.data import iterate_from
from redline.job.build import Job

BatchHandler = Callable[[Any, Any], None]


class JobRunner:
    """`job` stepped by `loader` (default: the job's exact-resume training loader, made
    when the first epoch begins: a job built for the batch search has no step size yet)."""

    def __init__(self, job: Job, loader: DataLoader | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.job = job
        self.clock = clock  # seconds, for the data wait and the timings (tests inject one)
        self.engine = job.engine
        self.loss_fn = job.task.loss
        self.loader = loader
        self.device = job.device.torch_device
        self.move = self.device.type != "cpu"
        self.non_blocking = bool(job.loader_options.get("pin_memory"))
        self.epoch = 0  # the epoch `step` draws from
        self.wait = 0.0  # seconds the last `step` waited on the loader
        self._batches: Iterator[Any] = iter(())
        self._started = False  # begin_epoch was called (else next_step starts epoch 0)

    def context(self) -> contextlib.AbstractContextManager[None]:
        """The precision's global flags (e.g. TF32 matmuls), set for the block."""
        return self.job.precision.global_context()

    def begin_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """Draw from `epoch`'s batches, the first `batches_done` skipped (an exact resume)."""
        if self.loader is None:
            self.loader = self.job.train_loader()
        self.epoch, self._started = epoch, True
        self._batches = iterate_from(self.loader, epoch, batches_done)

    def step(self, on_batch: Sequence[BatchHandler] = (), state: Any = None
             ) -> torch.Tensor | None:
        """One optimizer step on the epoch's next batch; None, stepping nothing, once the
        epoch is done. Each `on_batch` handler is called as handler(state, batch) with the
        batch on the device, before the step (the trainer's BATCH_START callbacks).
        `wait`: the seconds the loader took."""
        clock = self.clock
        t = clock()
        batch = next(self._batches, None)
        self.wait = clock() - t  # the host waited on the loader
        if batch is None:
            return None
        if self.move:
            batch = batch_tree.move(batch, self.device, self.non_blocking)
        for handler in on_batch:
            handler(state, batch)
        return self.engine.step(batch, self.loss_fn)

    def next_step(self) -> torch.Tensor:
        """`step`, rolling over into the next epoch as training does; `wait` covers both
        draws."""
        if not self._started:
            self.begin_epoch(0)
        loss = self.step()
        if loss is None:
            waited = self.wait
            self.begin_epoch(self.epoch + 1)
            loss = self.step()
            assert loss is not None, "an epoch has at least one batch (data.train_loader)"
            self.wait += waited
        return loss

    def step_on(self, batch: Any) -> torch.Tensor:
        """One optimizer step on `batch` (moved to the device if it is not there)."""
        if self.move:
            batch = batch_tree.move(batch, self.device, self.non_blocking)
        return self.engine.step(batch, self.loss_fn)

    def time(self, min_s: float, batch: Any = None,
             on_loss: Callable[[float], None] | None = None) -> tuple[int, float, float]:
        """(steps, their seconds, the seconds of them spent waiting on data): whole steps,
        at least one, adding up to at least `min_s`, on `batch` if given, else on the
        loader's batches; `on_loss` gets each step's loss."""
        steps, busy, waited = 0, 0.0, 0.0
        while steps == 0 or busy < min_s:
            t0 = self.clock()
            if batch is None:
                loss = self.next_step()
                waited += self.wait
            else:
                loss = self.step_on(batch)
            value = float(loss.item())  # sync: a step is timed once the device finished it
            busy += self.clock() - t0
            steps += 1
            if on_loss is not None:
                on_loss(value)
        return steps, busy, waited
