"""Run under torchrun: train the toy task with every torch.distributed collective counted
by the step it ran in (calls made by DDP's reducer, in C++, are not Python calls and are
not counted: the gradient all-reduce). Each rank writes {step: {name: calls}} to
argv[1] + ".RANK.json"; steps are those the loop was in (0: set-up, max+1: after)."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import defaultdict
from typing import Any

import torch.distributed as dist

from redline import Callback, RunConfig, Trainer
from redline.config import load_config

NAMES = ("all_reduce", "all_gather", "all_gather_object", "gather", "gather_object",
         "broadcast", "broadcast_object_list", "barrier", "reduce", "scatter",
         "scatter_object_list", "reduce_scatter", "all_to_all", "send", "recv")
calls: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
where = {"step": 0, "depth": 0}


def counted(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if where["depth"] == 0:  # all_gather_object calls all_gather: count the outer call
            calls[where["step"]][name] += 1
        where["depth"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            where["depth"] -= 1
    return wrapper


class StepOf(Callback):
    def on_batch_start(self, state: Any, batch: Any) -> None:
        where["step"] = state.step + 1

    def on_fit_end(self, state: Any) -> None:
        where["step"] = state.step + 1


def main() -> None:
    for name in NAMES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    config: RunConfig = load_config(overrides=sys.argv[2:])
    Trainer(config, run_dir=os.environ["RUN_DIR"], callbacks=[StepOf()], progress=False).fit()
    with open(f"{sys.argv[1]}.{os.environ['RANK']}.json", "w") as f:
        json.dump({str(k): dict(v) for k, v in calls.items()}, f)


if __name__ == "__main__":
    main()
