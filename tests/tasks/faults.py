"""Tasks for the fault tests (tests/e2e/test_faults.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy import ToyRegression


class GoesNaN(ToyRegression):
    """The toy task whose training loss turns NaN from step 23 on (call 1 counts FLOPs at
    start, so training call 24 is step 23): a step no window boundary falls on."""

    name = "goes-nan"
    calls = 0

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        loss = super().loss(model, batch)
        if model.training:
            GoesNaN.calls += 1
            if GoesNaN.calls > 23:
                return loss * float("nan")
        return loss
