"""A task module that imports torchao at its top, as a Lightning or transformers script, or
a user's own task, may (tests/e2e/test_faults.py: its import warnings must not show)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torchao  # noqa: F401
from toy import ToyRegression


class ImportsTorchao(ToyRegression):
    """The toy task, in a module that imports torchao."""

    name = "imports-torchao"
