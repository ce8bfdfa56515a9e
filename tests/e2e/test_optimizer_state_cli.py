"""memory.optimizer_state through the CLI: a low-bit run killed with SIGKILL resumes to the
bit, and what cannot run is refused with one sentence, exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from redline._torch_compat import plain_tensors
from redline.checkpoint import list_checkpoints

from ..conftest import ROOT, kill_at_checkpoint, run_cli

pytest.importorskip("torchao")

TASK = f"{ROOT / 'tests' / 'tasks' / 'optimizer_state.py'}:SlowGPT"
OWN = f"{ROOT / 'tests' / 'tasks' / 'memgpt.py'}:OwnOptimizer"
STEPS = 40
# Steps are stretched (sleep_s) so a kill lands midway; the reference runs unstretched.
ARGS = ["train", TASK, "--steps", str(STEPS), "--set", "task_args.layers=2",
        "--set", "task_args.sleep_s=0.05",
        "--set", "checkpoint.every=10", "--set", "checkpoint.keep=2",
        "--set", "train.eval_every=25", "--set", "train.schedule=cosine",
        "--set", "train.warmup_steps=5", "--set", "train.batch_size=8",
        "--no-progress"]


def _final(run: Path) -> dict:
    return torch.load(list_checkpoints(run / "checkpoints")[-1], weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    quantized = 0
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][pid][name]
            assert type(value) is type(other), (pid, name)
            quantized += type(value) is not torch.Tensor
            for x, y in zip(plain_tensors(value), plain_tensors(other), strict=True):
                assert torch.equal(x, y), (pid, name)
    assert quantized  # the low-bit states themselves were checkpointed and compared


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["8bit"])  # 4bit passes too (~150 s here: its compile)
def test_a_low_bit_run_killed_with_sigkill_resumes_bit_identical(tmp_path: Path, kind: str
                                                                   ) -> None:
    args = [*ARGS, "--set", f"memory.optimizer_state={kind}"]
    ref = run_cli([*args, "--run-dir", "ref", "--set", "task_args.sleep_s=0"], tmp_path)
    assert ref.returncode == 0, ref.stderr
    # the first untracked step compiles torchao's step: the default timeout allows it
    kill_at_checkpoint(args, tmp_path, 20, STEPS)
    out = run_cli([*args, "--run-dir", "run", "--resume"], tmp_path)
    assert out.returncode == 0, out.stderr
    _assert_identical(_final(tmp_path / "ref"), _final(tmp_path / "run"))

    # the same run dir with another state kind: one sentence, exit 2
    other = run_cli([*ARGS, "--set", "memory.optimizer_state=fp32", "--run-dir", "run",
                     "--resume", "--steps", str(STEPS + 5)], tmp_path)
    assert other.returncode == 2, other.stderr
    assert f"memory.optimizer_state={kind!r}" in other.stderr
    assert "Traceback" not in other.stderr


def _one_sentence(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    for word in words:
        assert word in lines[0], out.stderr


def test_cpu_offload_on_a_cpu_is_refused_in_one_sentence(tmp_path: Path) -> None:
    out = run_cli(["train", TASK, "--steps", "1", "--set", "memory.optimizer_state=cpu-offload",
                   "--no-progress"], tmp_path)
    _one_sentence(out, "CUDA only", "memory.optimizer_state=8bit")


def test_a_lever_over_a_tasks_own_optimizer_is_refused_in_one_sentence(tmp_path: Path
                                                                        ) -> None:
    out = run_cli(["train", OWN, "--steps", "1", "--set", "memory.optimizer_state=8bit",
                   "--no-progress"], tmp_path)
    _one_sentence(out, "SGD", "memory.optimizer_state: fp32")
