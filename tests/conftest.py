from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = f"{ROOT / 'tests' / 'tasks' / 'toy.py'}:ToyRegression"

# Device list for parametrized tests: CUDA cases are marked `cuda` and skip without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def toy_spec() -> str:
    return TOY


def run_cli(args: list[str], cwd: Path, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m redline ARGS` in `cwd` as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "redline", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
