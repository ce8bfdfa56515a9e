"""Run under torchrun: find_batch_size on every rank, rank 1 with far less than rank 0's
memory; rank 0 writes both ranks' plans to argv[1]."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))

from tests.integrations.test_lightning import Data, Regressor

from redline.distributed import World, init
from redline.integrations.lightning import find_batch_size


def main() -> None:
    world = World.from_env()
    budget = "64MiB" if world.rank == 0 else "100KiB"
    plan = find_batch_size(Regressor(), Data(), effective_batch_size=256, memory_budget=budget)
    plans = init(world, "cpu").all_gather(plan.__dict__)
    if world.main:
        with open(sys.argv[1], "w") as f:
            json.dump(plans, f)


if __name__ == "__main__":
    main()
