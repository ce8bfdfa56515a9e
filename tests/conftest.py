from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# On a machine already busy (load at or above its cores: other jobs, the busy-loop processes
# the suite is checked beside), torch's OpenMP threads spinning at their barriers fight the
# other processes for the cores: reportgen-tiny's training ran 3x slower under two busy
# loops (183 s against 63 s with passive waiting; 41 s against 64 s on a quiet machine, so
# only a busy machine gets it). Set before torch loads OpenMP; subprocesses inherit it.
# Tests assert behaviour, never speed: this only keeps them within their hang timeouts.


def busy_env() -> dict[str, str]:
    """{"OMP_WAIT_POLICY": "PASSIVE"} while the machine is busy (see above), else {}."""
    busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    return {"OMP_WAIT_POLICY": "PASSIVE"} if busy else {}


os.environ.update({k: v for k, v in busy_env().items() if k not in os.environ})

import pytest  # noqa: E402  (OpenMP reads its settings when torch loads)
import torch  # noqa: E402

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


def run_cli(args: list[str], cwd: Path, timeout: float = 900,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m redline ARGS` in `cwd` as a user would. `timeout` only catches a hang:
    the longest CLI test takes ~1-2 min on a quiet 2-core machine, several times that on
    a busy one."""
    # the load is read again at each run: a suite started on a quiet machine may not stay so
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **busy_env(), **(env or {})}
    return subprocess.run([sys.executable, "-m", "redline", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def kill_at_checkpoint(args: list[str], cwd: Path, step: int, steps: int,
                       timeout: float = 300) -> None:
    """Run `python -m redline ARGS --run-dir run` in `cwd`, SIGKILL it once its checkpoint
    of `step` exists, and check it stopped before `steps` (a run to resume midway)."""
    from redline.checkpoint import list_checkpoints

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "redline", *args, "--run-dir", "run"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    target = cwd / "run" / "checkpoints" / f"step-{step:08d}.pt"
    deadline = time.monotonic() + timeout
    # a file, or a sharded checkpoint's directory (distributed.strategy fsdp)
    while not (target.exists() or target.with_suffix("").exists()):
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=180)
    killed_at = list_checkpoints(cwd / "run" / "checkpoints")[-1]
    assert int(killed_at.stem.split("-")[1]) < steps  # it really stopped midway


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (torchrun starts ranks in their own
    sessions: they are found by their run directory, as pkill -f would)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids
