"""Activation checkpointing as a user runs it (issue 20): `redline train --set
memory.activation_checkpointing=...` trains, records honest MFU beside HFU, survives kill -9
and --resume bit-identically, resumes in another mode, and refuses what it cannot do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from redline.checkpoint import list_checkpoints
from redline.telemetry.jsonl import read_jsonl

from ..conftest import ROOT, kill_at_checkpoint, run_cli

pytestmark = pytest.mark.slow  # CLI runs in subprocesses: seconds each

MEMGPT = f"{ROOT / 'tests' / 'tasks' / 'memgpt.py'}:MemGPT"
NO_BLOCKS = f"{ROOT / 'tests' / 'tasks' / 'checkpointing.py'}:NoBlocks"


def _mode(mode: str) -> list[str]:
    return ["--set", f"memory.activation_checkpointing={mode}"]


def _final_state(run_dir: Path) -> dict:
    return torch.load(list_checkpoints(run_dir / "checkpoints")[-1], weights_only=True)


def _assert_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert list(a["model"]) == list(b["model"])  # the model's own keys in every mode
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


def _flops(run: Path) -> dict:
    (counted,) = [e for e in read_jsonl(run / "events.jsonl") if e.get("event") == "flops"]
    return counted


def test_each_mode_trains_with_the_same_model_flops_and_more_hardware_flops(
        tmp_path: Path) -> None:
    flops = {}
    for mode in ("none", "selective", "full"):
        out = run_cli(["train", MEMGPT, "--steps", "2", "--run-dir", mode, "--no-progress",
                       "--set", "telemetry.log_every=1", *_mode(mode)], tmp_path)
        assert out.returncode == 0, out.stderr
        flops[mode] = _flops(tmp_path / mode)
        rows = [r for r in read_jsonl(tmp_path / mode / "metrics.jsonl") if "loss" in r]
        assert rows and all(r["loss"] == r["loss"] for r in rows)  # finite, logged
        if mode == "full":
            assert all(r["hfu"] > r["mfu"] for r in rows)
    # model FLOPs leave the recompute out (MFU is the same work); hardware FLOPs count it
    model = {m: f["flops_per_step"] for m, f in flops.items()}
    hardware = {m: f["hardware_flops_per_step"] for m, f in flops.items()}
    assert model["selective"] == model["full"] == model["none"]
    # without checkpointing the CPU flash-attention backward already reruns QKᵀ; selective
    # reruns none of the counted ops (it keeps matmuls and attention); full reruns them all
    assert hardware["none"] > model["none"]
    assert hardware["selective"] == hardware["none"]
    assert hardware["full"] > hardware["none"]


STEPS = 12
RESUMED = ["train", MEMGPT, "--steps", str(STEPS), "--set", "task_args.dropout=0.1",
           "--set", "checkpoint.every=4", "--set", "checkpoint.keep=2",
           "--set", "telemetry.log_every=3", "--no-progress", *_mode("selective")]


def test_kill_9_then_resume_is_bit_identical_with_selective_checkpointing(
        tmp_path: Path) -> None:
    ref = run_cli([*RESUMED, "--run-dir", "ref"], tmp_path)
    assert ref.returncode == 0, ref.stderr
    kill_at_checkpoint(RESUMED, tmp_path, 4, STEPS)
    out = run_cli([*RESUMED, "--run-dir", "run", "--resume"], tmp_path)
    assert out.returncode == 0, out.stderr
    _assert_identical(_final_state(tmp_path / "ref"), _final_state(tmp_path / "run"))


def test_a_run_saved_with_full_resumes_with_none_and_ends_as_a_plain_run(
        tmp_path: Path) -> None:
    common = ["train", MEMGPT, "--set", "checkpoint.every=3", "--no-progress"]
    plain = run_cli([*common, "--steps", "6", "--run-dir", "plain", *_mode("none")], tmp_path)
    assert plain.returncode == 0, plain.stderr
    first = run_cli([*common, "--steps", "3", "--run-dir", "run", *_mode("full")], tmp_path)
    assert first.returncode == 0, first.stderr
    out = run_cli([*common, "--steps", "6", "--run-dir", "run", "--resume", *_mode("none")],
                  tmp_path)
    assert out.returncode == 0, out.stderr
    # the recompute is the same arithmetic: bit-identical to a run never checkpointed
    _assert_identical(_final_state(tmp_path / "plain"), _final_state(tmp_path / "run"))


@pytest.mark.parametrize(("task", "extra", "says"), [
    (NO_BLOCKS, [], "found no repeated blocks in Linear"),
    (MEMGPT, ["--set", "memory.checkpoint_blocks=blocks.*"],
     "'blocks.*' matches no module of the model"),
])
def test_what_cannot_be_checkpointed_is_one_sentence_and_exit_2(
        tmp_path: Path, task: str, extra: list[str], says: str) -> None:
    out = run_cli(["train", task, "--steps", "1", "--no-progress", *_mode("full"), *extra],
                  tmp_path)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("redline: error:")]
    assert len(errors) == 1 and says in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_two_ranks_with_full_checkpointing_train_as_two_ranks_without(tmp_path: Path) -> None:
    runs = {}
    for mode in ("none", "full"):
        out = run_cli(["train", MEMGPT, "--steps", "2", "--nproc", "2", "--no-progress",
                       "--no-report", "--run-dir", mode, "--set", "checkpoint.every=2",
                       "--set", "train.eval_every=0", *_mode(mode)], tmp_path,
                      env={"OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr
        runs[mode] = _final_state(tmp_path / mode)
    # DDP's gradient hooks fire as the recompute-then-backward reaches each parameter;
    # gloo sums the same buckets: the same weights (fp32 tolerance, as the unit tests)
    for key, tensor in runs["none"]["model"].items():
        torch.testing.assert_close(runs["full"]["model"][key], tensor, rtol=1e-5, atol=1e-6,
                                   msg=key)
