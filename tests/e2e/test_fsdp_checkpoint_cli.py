"""Sharded checkpoints as a user meets them: distributed.strategy fsdp, killed with
SIGKILL and resumed bit-identically, resumed at another world size (2 ranks -> 1, 1 -> 2)
with the parameters and optimizer state exactly as saved, and `redline export`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from redline.checkpoint import list_checkpoints
from redline.checkpoint_sharded import SafePlanner, SafeReader, read_metadata
from redline.task import resolve_task

from ..conftest import ROOT, TOY, kill_at_checkpoint, processes_mentioning, run_cli
from .test_distributed import torchrun

pytestmark = pytest.mark.slow  # several processes each: seconds

SCRIPT = ROOT / "tests" / "distributed" / "ckpt_reshard.py"
ENV = {"OMP_NUM_THREADS": "1"}
TRAIN = ["train", TOY, "--steps", "20", "--no-progress", "--no-report",
         "--set", "checkpoint.every=8", "--set", "telemetry.log_every=7",
         "--set", "train.batch_size=8", "--set", "train.effective_batch_size=16",
         "--set", "train.eval_every=0", "--set", "train.schedule=cosine",
         "--set", "distributed.strategy=fsdp", "--set", "task_args.sleep_s=0.03"]


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint (model and optimizer), read in this process."""
    metadata = read_metadata(checkpoint / ".metadata")
    flat = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)}
    dcp.load(flat, storage_reader=SafeReader(checkpoint), planner=SafePlanner(), no_dist=True)
    return flat


def _assert_same_final(a: Path, b: Path, step: int) -> None:
    last_a, last_b = (list_checkpoints(p / "checkpoints")[-1] for p in (a, b))
    assert last_a.name == last_b.name == f"step-{step:08d}" and last_a.is_dir()
    ta, tb = _tensors(last_a), _tensors(last_b)
    assert set(ta) == set(tb) and any(k.startswith("optimizer.state.") for k in ta)
    for key, tensor in ta.items():
        assert torch.equal(tensor, tb[key]), key


def test_a_killed_one_process_fsdp_run_resumes_bit_identical_exports_and_goes_on_in_two(
        tmp_path: Path) -> None:
    ref = run_cli([*TRAIN, "--run-dir", "ref"], tmp_path, env=ENV)
    assert ref.returncode == 0, ref.stderr
    kill_at_checkpoint(TRAIN, tmp_path, 8, 20)
    out = run_cli([*TRAIN, "--run-dir", "run", "--resume"], tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr
    _assert_same_final(tmp_path / "ref", tmp_path / "run", 20)
    out = run_cli(["export", "run", "--to", "model.pt"], tmp_path)
    assert out.returncode == 0, out.stderr
    model = resolve_task(TOY).build_model()
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict
    # the one-process run continued by two ranks: resharded, and said so
    out = run_cli([*TRAIN, "--steps", "22", "--nproc", "2", "--run-dir", "run", "--resume"],
                  tmp_path, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resharded step-00000020's parameters and optimizer state from 1 rank(s) to 2" \
        in out.stderr
    assert list_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == "step-00000022"


def test_a_two_rank_checkpoint_loads_in_one_process_and_a_one_process_one_in_two(
        tmp_path: Path) -> None:
    """What was saved is what is loaded, tensor for tensor, and the next step's loss is
    the one the run that saved it took (within 1e-5 relative)."""
    for saver, loader in ((2, 1), (1, 2)):
        d = tmp_path / f"{saver}to{loader}"
        d.mkdir()
        for mode, ranks in (("save", saver), ("load", loader)):
            args = [str(SCRIPT), mode, str(d)]
            out = (torchrun(args, tmp_path, timeout=300) if ranks == 2 else
                   subprocess.run([sys.executable, *args], capture_output=True, text=True,
                                  timeout=300, env={**os.environ, **ENV}))
            assert out.returncode == 0, out.stderr
        saved = torch.load(d / f"saved-{saver}.pt", weights_only=True)
        loaded = torch.load(d / f"loaded-{loader}.pt", weights_only=True)
        assert loaded["next_loss"] == pytest.approx(saved["next_loss"], rel=1e-5)
        _assert_equal(saved["model"], loaded["model"], "model")
        _assert_equal(saved["optimizer"], loaded["optimizer"], "optimizer")


def _assert_equal(a: object, b: object, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, where


def test_a_killed_two_rank_fsdp_run_resumes_bit_identical_then_at_one_rank(
        tmp_path: Path) -> None:
    ref = run_cli([*TRAIN, "--nproc", "2", "--run-dir", "ref"], tmp_path, env=ENV,
                  timeout=600)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "redline", *TRAIN, "--nproc", "2",
                             "--run-dir", str(run)],
                            cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-00000008").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    for pid in processes_mentioning(str(run)):  # the launcher and each rank
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=180)
    assert not (run / "checkpoints" / "step-00000016").exists()  # killed midway
    out = run_cli([*TRAIN, "--nproc", "2", "--run-dir", str(run), "--resume"], tmp_path,
                  env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr
    _assert_same_final(tmp_path / "ref", run, 20)
    # the same run continued by one process: resharded, and said so
    out = run_cli([*TRAIN, "--steps", "22", "--run-dir", str(run), "--resume"], tmp_path,
                  env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resharded step-00000020's parameters and optimizer state from 2 rank(s) to 1" \
        in out.stderr
