"""Tasks for the fault tests (tests/e2e/test_faults.py): the toy regression, with the
import of a third-party package that brings torchao (whose import logs warnings)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torchao  # noqa: F401  (what Lightning, transformers or a user's task may import)
from toy import ToyRegression


class ImportsTorchao(ToyRegression):
    """The toy task, in a module that imports torchao (as a user's task may)."""

    name = "imports-torchao"
