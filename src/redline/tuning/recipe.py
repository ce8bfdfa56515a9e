"""The optimizer's recipe for a chosen micro-batch: effective batch, accumulation, lr.

When `batch_size: auto` picks a micro-batch, what the optimizer sees must follow the
user's settings, never a cached result's or a measurement's whim:

  - `train.effective_batch_size` set: it is kept, by gradient accumulation;
  - unset: the batch the run would have had without `auto` is kept (`train.batch_size`'s
    default, 16; redline tune sets its start's), by gradient accumulation: the search
    chooses only how it is split into micro-batches;
  - unset, with `train.grow_effective_batch` (opt-in): the effective batch is the
    micro-batch chosen (times the ranks) where that is larger, printed old -> new; it
    never shrinks below the batch it would have had;
  - under torchrun the effective batch is all ranks' together: each rank accumulates its
    share;
  - the learning rate is `train.lr`, rescaled by `train.lr_scaling` (none, linear, sqrt)
    from the batch it was tuned for (`train.lr_reference_batch`, else the configured
    effective batch, else the default batch) to the effective batch: it changes only where
    the effective batch grew.

So the recipe is computed from the current config every time, including from a cached
search (which holds only what was measured) and on resume (whose checkpoint is then
compared with it, so a changed lr is refused like any other change).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from redline.config import RunConfig, TrainConfig

# The micro-batch a run has without `batch_size: auto`: TrainConfig's default (16).
DEFAULT_BATCH: int = next(f.default for f in dataclasses.fields(TrainConfig)
                          if f.name == "batch_size")  # type: ignore[assignment]


@dataclass(frozen=True)
class Recipe:
    micro_batch: int
    accumulation_steps: int
    effective_batch_size: int
    lr: float
    eval_batch_size: int | None
    ranks: int = 1  # torchrun: the effective batch is micro_batch x accumulation x ranks

    def apply(self, config: RunConfig) -> RunConfig:
        """`config` with this recipe's micro-batch, effective batch, lr and eval batch."""
        return config.updated({
            "train.batch_size": self.micro_batch,
            "train.effective_batch_size": self.effective_batch_size, "train.lr": self.lr,
            "train.eval_batch_size": self.eval_batch_size})

    def describe(self, config: RunConfig) -> str:
        """One line: what the optimizer will see, and what changed from `config`."""
        t = config.train
        ranks = f" x {self.ranks} ranks" if self.ranks > 1 else ""
        split = f"{self.micro_batch} x {self.accumulation_steps}{ranks}"
        if t.effective_batch_size:
            effective = (f"effective batch {self.effective_batch_size} kept "
                         f"(train.effective_batch_size) = {split}")
        elif not t.grow_effective_batch:
            effective = (f"effective batch {self.effective_batch_size} kept (the batch the "
                         f"run would have had without auto) = {split}; set train."
                         "grow_effective_batch to let it grow")
        else:
            old = kept_batch(config)
            change = (f"{old} -> {self.effective_batch_size}"
                      if old != self.effective_batch_size else f"{old} kept")
            effective = (f"effective batch {change} (train.grow_effective_batch) = {split}")
        reference = reference_batch(config)
        # Unchanged, the value is not repeated: a task's own optimizer sets its own lr,
        # which train.lr may not be (run/setup.py says so once).
        if self.lr != t.lr:
            lr = (f"train.lr {t.lr:.3g} -> {self.lr:.3g} (train.lr_scaling {t.lr_scaling} "
                  f"from batch {reference})")
        else:
            lr = "train.lr unchanged (" + ("train.lr_scaling none" if t.lr_scaling == "none"
                                           else "the batch it was tuned for") + ")"
        return f"micro-batch {self.micro_batch}; {effective}; {lr}"


def kept_batch(config: RunConfig) -> int:
    """The effective batch `batch_size: auto` keeps: train.effective_batch_size, else the
    batch the run would have had without auto (an integer batch_size, else DEFAULT_BATCH)."""
    t = config.train
    return t.effective_batch_size or (
        t.batch_size if isinstance(t.batch_size, int) else DEFAULT_BATCH)


def reference_batch(config: RunConfig) -> int:
    """The batch train.lr was tuned for: lr_reference_batch, else the kept batch."""
    return config.train.lr_reference_batch or kept_batch(config)


def scaled_lr(config: RunConfig, effective: int) -> float:
    """train.lr rescaled by train.lr_scaling from the batch it was tuned for to `effective`."""
    t = config.train
    reference = reference_batch(config)
    if t.lr_scaling == "none" or reference == effective:
        return t.lr
    ratio = effective / reference
    return t.lr * (ratio if t.lr_scaling == "linear" else math.sqrt(ratio))


def recipe(config: RunConfig, micro_batch: int, eval_batch_size: int | None,
           ranks: int = 1, floor: int | None = None) -> Recipe:
    """The recipe `config` implies for `micro_batch` per rank (see the module docstring).
    `floor`: the least a grown effective batch may be (the start's micro-batch; default:
    kept_batch)."""
    t = config.train
    grow = t.grow_effective_batch and not t.effective_batch_size
    # growing is opt-in, and it only grows: a smaller micro-batch accumulates to the start's
    least = floor or kept_batch(config)
    effective = max(micro_batch * ranks, least) if grow else kept_batch(config)
    share = max(1, effective // ranks)
    micro = min(micro_batch, share)
    return Recipe(micro, math.ceil(share / micro), effective, scaled_lr(config, effective),
                  eval_batch_size or t.eval_batch_size, ranks)


def searched_config(start: RunConfig, name: str) -> RunConfig:
    """The config a precision's batch search runs: batch_size auto, the start's effective
    batch kept unless train.grow_effective_batch, lr scaled from the start's batch."""
    changes: dict[str, Any] = {"precision.name": name, "train.batch_size": "auto",
                               "train.lr_reference_batch": reference_batch(start)}
    if not start.train.grow_effective_batch:
        changes["train.effective_batch_size"] = start.train.samples_per_step
    return start.updated(changes)


def describe_change(start: RunConfig, chosen: RunConfig) -> str:
    """The micro-batch, and what the optimizer sees, against the start's."""
    t, s = chosen.train, start.train
    if t.samples_per_step != s.samples_per_step:
        effective = (f"effective batch {s.samples_per_step} -> {t.samples_per_step} "
                     "(train.grow_effective_batch)")
    else:
        effective = f"effective batch {t.samples_per_step} kept (the start's)"
    lr = (f"train.lr {s.lr:.3g} -> {t.lr:.3g} (train.lr_scaling {s.lr_scaling})"
          if t.lr != s.lr else "train.lr unchanged")
    return f"micro-batch {t.micro_batch} x {accumulation(chosen)}; {effective}; {lr}"


def accumulation(config: RunConfig) -> int:
    """Micro-batches per optimizer step."""
    return -(-config.train.samples_per_step // config.train.micro_batch)
