from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = f"{ROOT / 'tests' / 'tasks' / 'toy.py'}:ToyRegression"

# Device list for parametrized tests: CUDA cases skip without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")),
]


@pytest.fixture
def toy_spec() -> str:
    return TOY


def run_cli(args: list[str], cwd: Path, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m redline ARGS` in `cwd` as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "redline", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
