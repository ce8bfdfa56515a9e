"""The optimizer's recipe for a chosen micro-batch: effective batch, accumulation, lr.

When `batch_size: auto` picks a micro-batch, what the optimizer sees must follow the
user's settings, never a cached result's or a measurement's whim:

  - `train.effective_batch_size` set: it is kept, by gradient accumulation;
  - unset: the effective batch is the micro-batch chosen (and the run says so);
  - under torchrun the effective batch is all ranks' together: each rank accumulates its
    share (an unset effective batch is then the micro-batch times the ranks);
  - the learning rate is `train.lr`, rescaled by `train.lr_scaling` (none, linear, sqrt)
    from the batch it was tuned for (`train.lr_reference_batch`, else the configured
    effective batch or micro-batch) to the effective batch.

So the recipe is computed from the current config every time, including from a cached
search (which holds only what was measured) and on resume (whose checkpoint is then
compared with it, so a changed lr is refused like any other change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redline.config import RunConfig


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
        if t.effective_batch_size:
            ranks = f" x {self.ranks} ranks" if self.ranks > 1 else ""
            effective = (f"effective batch {self.effective_batch_size} kept "
                         f"(train.effective_batch_size) = {self.micro_batch} x "
                         f"{self.accumulation_steps}{ranks}")
        else:
            effective = (f"effective batch {self.effective_batch_size} (train."
                         "effective_batch_size unset: it follows the micro-batch)")
        reference = reference_batch(config)
        if self.lr != t.lr:
            lr = (f"lr {t.lr:.3g} -> {self.lr:.3g} (train.lr_scaling {t.lr_scaling} from "
                  f"batch {reference})")
        else:
            lr = f"lr {self.lr:.3g} (" + ("train.lr_scaling none" if t.lr_scaling == "none"
                                          else "the batch it was tuned for") + ")"
        return f"micro-batch {self.micro_batch}; {effective}; {lr}"


def reference_batch(config: RunConfig) -> int | None:
    """The batch train.lr was tuned for: lr_reference_batch, else the configured batch."""
    t = config.train
    return t.lr_reference_batch or t.effective_batch_size or (
        t.batch_size if isinstance(t.batch_size, int) else None)


def scaled_lr(config: RunConfig, effective: int) -> float:
    """train.lr rescaled by train.lr_scaling from the batch it was tuned for to `effective`."""
    t = config.train
    reference = reference_batch(config)
    if reference is None or t.lr_scaling == "none" or reference == effective:
        return t.lr
    ratio = effective / reference
    return t.lr * (ratio if t.lr_scaling == "linear" else math.sqrt(ratio))


def recipe(config: RunConfig, micro_batch: int, eval_batch_size: int | None,
           ranks: int = 1) -> Recipe:
    """The recipe `config` implies for `micro_batch` per rank (see the module docstring)."""
    t = config.train
    effective = t.effective_batch_size or micro_batch * ranks
    share = max(1, effective // ranks)
    micro = min(micro_batch, share)
    return Recipe(micro, math.ceil(share / micro), effective, scaled_lr(config, effective),
                  eval_batch_size or t.eval_batch_size, ranks)
