"""Kill a real training process and resume it: the result must be bit-identical."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from redline.checkpoint import list_checkpoints
from redline.telemetry.jsonl import read_jsonl

from ..conftest import TOY, run_cli

pytestmark = pytest.mark.slow  # CLI runs in subprocesses: seconds each

STEPS = 120
# Steps are stretched (sleep_s) so a kill lands midway; eval, logging and checkpoint
# cadences deliberately do not divide each other.
ARGS = ["train", TOY, "--steps", str(STEPS), "--set", "task_args.sleep_s=0.02",
        "--set", "checkpoint.every=10", "--set", "checkpoint.keep=2",
        "--set", "train.eval_every=25", "--set", "telemetry.log_every=7",
        "--set", "train.schedule=cosine", "--set", "train.warmup_steps=5",
        "--set", "train.effective_batch_size=32", "--no-progress"]


def _final_state(run_dir: Path) -> dict:
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    return torch.load(last, weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cwd = tmp_path_factory.mktemp("reference")
    out = run_cli([*ARGS, "--run-dir", "ref", "--set", "task_args.sleep_s=0"], cwd)
    assert out.returncode == 0, out.stderr
    return _final_state(cwd / "ref")


def _start(cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "redline", *ARGS, "--run-dir", "run"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_checkpoint(proc: subprocess.Popen[str], ckpt_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    target = ckpt_dir / f"step-{step:08d}.pt"
    while not target.exists():
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


def _logged_past_the_newest_checkpoint(run: Path) -> bool:
    saved = list_checkpoints(run / "checkpoints")
    if not saved or not (run / "metrics.jsonl").is_file():
        return False
    newest = int(saved[-1].stem.split("-")[1])
    return any(r.get("step", 0) > newest for r in read_jsonl(run / "metrics.jsonl"))


def test_kill_9_then_resume_is_bit_identical(tmp_path: Path, reference: dict) -> None:
    proc = _start(tmp_path)
    _wait_for_checkpoint(proc, tmp_path / "run" / "checkpoints", 40)
    deadline = time.monotonic() + 60  # killed with windows logged past its last checkpoint
    while not _logged_past_the_newest_checkpoint(tmp_path / "run"):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=180)
    killed_at = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert int(killed_at.stem.split("-")[1]) < STEPS  # it really stopped midway

    out = run_cli([*ARGS, "--run-dir", "run", "--resume"], tmp_path)
    assert out.returncode == 0, out.stderr
    _assert_identical(reference, _final_state(tmp_path / "run"))
    # each step once in metrics.jsonl: the rows the killed attempt logged past its
    # checkpoint were dropped, and the resumed run logged those steps again
    windows = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert windows == sorted(set(windows)) and windows[-1] == STEPS


def test_sigterm_saves_a_checkpoint_then_resume_is_bit_identical(tmp_path: Path,
                                                                 reference: dict) -> None:
    proc = _start(tmp_path)
    _wait_for_checkpoint(proc, tmp_path / "run" / "checkpoints", 30)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in stdout and "--resume" in stdout
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    step = int(saved.stem.split("-")[1])
    assert 30 <= step < STEPS
    interrupted = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl")
                   if e["event"] == "interrupted"]
    assert interrupted == [{**interrupted[0], "signal": "SIGTERM", "step": step}]

    # the command the run printed, resumed from its own config.yaml, is bit-identical too
    command = re.search(r"continue with (redline train .*)$", stdout, re.M)
    assert command, stdout
    assert f"{command.group(1)}." in run_cli(["doctor", "run"], tmp_path).stdout  # the same
    out = run_cli(shlex.split(command.group(1))[1:], tmp_path)
    assert out.returncode == 0, out.stderr
    _assert_identical(reference, _final_state(tmp_path / "run"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes_in_a_tensor(path: Path) -> None:
    """8 bytes inverted in the largest tensor's data: torch.load reads it without a word
    (the zip records' CRC-32 is not checked), the weights are silently wrong."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename),
                     key=lambda i: i.file_size)
        with archive.open(record) as f:
            payload = f.read()
    data = bytearray(path.read_bytes())
    at = data.index(payload) + len(payload) // 2
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["step"]  # loads, corrupt


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes_in_a_tensor],
                         ids=["truncated", "flipped-bytes"])
def test_corrupt_newest_checkpoint_warns_and_resumes_from_the_previous(
        tmp_path: Path, reference: dict, damage: Callable[[Path], None]) -> None:
    proc = _start(tmp_path)
    _wait_for_checkpoint(proc, tmp_path / "run" / "checkpoints", 50)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=180)
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    damage(newest)

    out = run_cli([*ARGS, "--run-dir", "run", "--resume"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"{newest.name} is unreadable" in out.stderr
    assert "truncated or corrupt; moved it to" in out.stderr
    assert "trying the previous checkpoint" in out.stderr and "failed" not in out.stderr
    # moved aside, not counted toward checkpoint.keep
    assert (tmp_path / "run" / "checkpoints" / "unreadable" / newest.name).is_file()
    _assert_identical(reference, _final_state(tmp_path / "run"))


# ---- a task's own scheduler (issue 19, observed case 6) --------------------------------------

HOOKS = Path(__file__).resolve().parents[1] / "tasks" / "hookcases.py"
CYCLE = ["train", f"{HOOKS}:OneCycleRegression", "--steps", "60", "--set",
         "checkpoint.every=10", "--set", "telemetry.log_every=1", "--set",
         "train.effective_batch_size=32", "--set", "train.batch_size=16", "--no-progress"]


def _lrs(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["lr"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def test_a_task_onecycle_schedule_is_resumed_exactly(tmp_path: Path) -> None:
    ref = run_cli([*CYCLE, "--run-dir", "ref"], tmp_path)
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    slow = ["--run-dir", "run", "--set", "task_args.sleep_s=0.03"]  # a stop lands midway
    proc = subprocess.Popen([sys.executable, "-m", "redline", *CYCLE, *slow], cwd=tmp_path,
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, tmp_path / "run" / "checkpoints", 20)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped = int(list_checkpoints(tmp_path / "run" / "checkpoints")[-1].stem.split("-")[1])
    assert 20 <= stopped < 60
    out = run_cli([*CYCLE, *slow, "--resume"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert _lrs(tmp_path / "run") == _lrs(tmp_path / "ref")  # the same schedule, each step
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05, momentum=0.9)
    cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=60)
    expected = []
    for _ in range(60):  # torch's own OneCycleLR, stepped once per optimizer step
        opt.step()
        cycle.step()
        expected.append(cycle.get_last_lr()[0])
    assert [lr for _, lr in _lrs(tmp_path / "run")] == pytest.approx(expected, rel=1e-9)
    a, b = _final_state(tmp_path / "ref"), _final_state(tmp_path / "run")
    assert a["step"] == b["step"] == 60
    assert a["scheduler"] == b["scheduler"]
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
