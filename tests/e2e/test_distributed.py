"""torchrun with 2 CPU processes and gloo, as a user runs it: gradients, resume after kill -9,
an OOM on one rank, a rank that dies or fails, and the collectives a step makes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from redline.checkpoint import list_checkpoints
from redline.telemetry.jsonl import read_jsonl

from ..conftest import ROOT, TOY, processes_mentioning, run_cli

pytestmark = pytest.mark.slow  # several processes each: seconds

FAULTY = f"{ROOT / 'tests' / 'tasks' / 'ranks.py'}:FaultyRank"
SCRIPTS = ROOT / "tests" / "distributed"
HUNG_S = 600  # a run still going after this is hung (a failing rank did not stop the other)


def torchrun(args: list[str], cwd: Path, timeout: float = 900,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node 2 ARGS`, the way torch documents it."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def test_two_rank_step_equals_one_process_step_on_the_combined_batch(tmp_path: Path) -> None:
    out = torchrun([str(SCRIPTS / "gradient.py"), str(tmp_path / "g.json")], tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["moved"] > 1e-3  # the step changed the weights, so equality means something
    assert result["diff"] < 1e-6
    assert result["agreements"] == {"agree": 1}


TRAIN = ["train", TOY, "--steps", "30", "--no-progress", "--no-report",
         "--set", "checkpoint.every=10", "--set", "telemetry.log_every=7",
         "--set", "train.batch_size=8", "--set", "train.effective_batch_size=32",
         "--set", "train.eval_every=0", "--set", "train.schedule=cosine"]


def _final(run: Path) -> dict:
    return torch.load(list_checkpoints(run / "checkpoints")[-1], weights_only=True)


def test_killed_two_rank_run_resumes_bit_identical(tmp_path: Path) -> None:
    ref = run_cli([*TRAIN, "--nproc", "2", "--run-dir", "ref", "--set",
                   "task_args.sleep_s=0.05"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "redline", *TRAIN, "--nproc", "2",
                             "--run-dir", str(run), "--set", "task_args.sleep_s=0.05"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step-00000020.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    # kill -9 everything: the launcher and each rank (torch starts ranks in their own
    # sessions, so they are found by their run directory, as pkill -f would)
    for pid in processes_mentioning(str(run)):
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=180)
    assert not (run / "checkpoints" / "step-00000030.pt").exists()  # killed midway
    out = run_cli([*TRAIN, "--nproc", "2", "--run-dir", str(run), "--resume",
                   "--set", "task_args.sleep_s=0.05"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    a, b = _final(tmp_path / "ref"), _final(run)
    assert a["step"] == b["step"] == 30
    assert len(a["rng_ranks"]) == 2
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


def test_oom_on_one_rank_is_recovered_by_both_with_the_same_micro_batch(tmp_path: Path
                                                                        ) -> None:
    out = torchrun(["-m", "redline", "train", FAULTY, "--steps", "12", "--no-progress",
                    "--no-report", "--run-dir", "run", "--set", "task_args.fail_at=3",
                    "--set", "task_args.oom_above=4", "--set", "train.batch_size=16",
                    "--set", "train.effective_batch_size=32", "--set", "telemetry.log_every=4",
                    "--set", "train.eval_every=0", "--set", "memory.grow_after=1000"],
                   tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    changes = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl")
               if e["event"] == "micro_batch"]
    assert [(c["old"], c["new"], c["phase"]) for c in changes] == [
        (16, 8, "rank 1"), (8, 4, "rank 1")]
    assert "after OOM on rank 1 at step 3" in out.stderr
    ranks = read_jsonl(tmp_path / "run" / "ranks.jsonl")
    last = [r for r in ranks if r["step"] == 12]
    assert sorted(r["rank"] for r in last) == [0, 1]
    assert {r["micro_batch"] for r in last} == {4}
    assert _final(tmp_path / "run")["step"] == 12


@pytest.mark.parametrize("how, said", [
    ("kill", "rank 1 stopped answering at step"),
    ("raise", "rank 1 failed at step 4 (ValueError: the user's loss failed on this rank)"),
])
def test_a_failing_rank_stops_the_other_with_a_sentence(tmp_path: Path, how: str,
                                                        said: str) -> None:
    # the timeout only tells a hung rank from a slow machine (it raises); the run ended
    # early because the other rank stopped, which its last checkpoint shows
    out = torchrun(["-m", "redline", "train", FAULTY, "--steps", "200", "--no-progress",
                    "--no-report", "--run-dir", "run", "--set", f"task_args.how={how}",
                    "--set", "task_args.fail_at=5", "--set", "checkpoint.every=2",
                    "--set", "train.eval_every=0"], tmp_path, timeout=HUNG_S)
    assert out.returncode != 0
    assert said in out.stderr, out.stderr
    assert "continue with --resume" in out.stderr
    if how == "raise":  # the failing rank's own error keeps its traceback
        assert "Traceback" in out.stderr and "ValueError" in out.stderr
    assert list_checkpoints(tmp_path / "run" / "checkpoints")
    assert _final(tmp_path / "run")["step"] < 200  # stopped, not run to its end


def test_a_step_that_does_not_log_sends_one_agreement_and_nothing_else(tmp_path: Path
                                                                       ) -> None:
    out = torchrun([str(SCRIPTS / "collectives.py"), str(tmp_path / "calls"), f"task={TOY}",
                    "train.steps=12", "telemetry.log_every=5", "checkpoint.every=6",
                    "train.batch_size=4", "train.effective_batch_size=16",
                    "train.eval_every=0"], tmp_path, env={"RUN_DIR": str(tmp_path / "run")})
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        calls = {int(k): v for k, v in
                 json.loads((tmp_path / f"calls.{rank}.json").read_text()).items()}
        assert calls[0] == {"broadcast_object_list": 2}  # the run directory, the FLOPs
        for step in range(1, 13):
            expected = {"all_reduce": 1}  # the step's agreement (OOM, stop)
            if step % 5 == 0 or step == 12:
                expected["all_gather_object"] = 1  # the window's figures
            if step % 6 == 0:
                expected["gather_object"] = 1  # the checkpoint's RNG states
            assert calls[step] == expected, (rank, step)


def test_torchrun_run_directory_reads_like_a_single_process_one(tmp_path: Path) -> None:
    out = torchrun(["-m", "redline", "train", TOY, "--steps", "20", "--no-progress",
                    "--run-dir", "run", "--set", "telemetry.log_every=5",
                    "--set", "train.batch_size=16"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("trained 20 steps") == 1  # rank 0 reports
    run = tmp_path / "run"
    assert (run / "report.html").is_file()
    windows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [w["step"] for w in windows] == [5, 10, 15, 20]
    assert all(w["dist/world_size"] == 2 and w["dist/slowest_rank"] in (0, 1)
               for w in windows)
    assert windows[-1]["micro_batch"] == 8 and windows[-1]["effective_batch"] == 16
    per_rank = read_jsonl(run / "ranks.jsonl")
    assert sorted((r["step"], r["rank"]) for r in per_rank) == [
        (s, r) for s in (5, 10, 15, 20) for r in (0, 1)]
    doctor = run_cli(["doctor", str(run)], tmp_path)
    assert doctor.returncode in (0, 1), doctor.stderr
    assert "2 ranks" in doctor.stdout


def test_batch_search_tune_and_study_run_under_torchrun(tmp_path: Path) -> None:
    budget = ["--memory-budget", "64MiB", "--set", "train.effective_batch_size=64"]
    auto = torchrun(["-m", "redline", "train", TOY, "--steps", "8", "--batch-size", "auto",
                     *budget, "--no-progress", "--no-report", "--run-dir", "auto",
                     "--set", "telemetry.log_every=4"], tmp_path)
    assert auto.returncode == 0, auto.stderr
    assert auto.stderr.count("batch_size: auto:") == 1 and "x 2 ranks" in auto.stderr
    micro = [r["micro_batch"] for r in read_jsonl(tmp_path / "auto" / "ranks.jsonl")]
    chosen = next(e for e in read_jsonl(tmp_path / "auto" / "events.jsonl")
                  if e["event"] == "autobatch")["micro_batch"]
    assert set(micro) == {chosen}  # every rank trains with the size they settled on

    tune = torchrun(["-m", "redline", "tune", TOY, *budget, "--output", "tuned.yaml"],
                    tmp_path)
    assert tune.returncode == 0, tune.stderr
    assert tune.stdout.count("tuned config: tuned.yaml") == 1 and "x 2 ranks" in tune.stdout

    study = torchrun(["-m", "redline", "study", TOY, "--precision", "fp32,bf16-mixed",
                      "--seeds", "2", "--steps", "8", "--run-dir", "study", "--no-progress"],
                     tmp_path)
    assert study.returncode == 0, study.stderr
    assert study.stdout.count("recommendation:") == 1
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    outcomes = [json.loads(p.read_text())
                for p in sorted((tmp_path / "study" / "outcomes").glob("*.json"))]
    assert [o["status"] for o in outcomes] == ["finished"] * 3
    assert all(o["fit"]["ranks"] == 2 for o in outcomes)
    assert summary["recommendation"]["setting"] in ("fp32", "bf16-mixed")


def test_lightning_batch_search_settles_on_a_size_every_rank_holds(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from redline.integrations.lightning import find_batch_size
    from tests.integrations.test_lightning import Data, Regressor

    alone = find_batch_size(Regressor(), Data(), effective_batch_size=256,
                            memory_budget="100KiB")
    out = torchrun([str(SCRIPTS / "lightning_batch.py"), str(tmp_path / "plans.json")],
                   tmp_path)
    assert out.returncode == 0, out.stderr
    first, second = json.loads((tmp_path / "plans.json").read_text())
    same = ("micro_batch", "accumulate_grad_batches", "effective_batch_size", "ranks")
    assert [first[k] for k in same] == [second[k] for k in same] and first["ranks"] == 2
    assert second["max_fit"] < first["max_fit"]  # rank 1 had far less memory
    assert first["micro_batch"] <= alone.max_fit  # what rank 1's memory holds
    assert first["micro_batch"] * first["accumulate_grad_batches"] * 2 == 256


@pytest.mark.parametrize("guard", ["true", "false"])
def test_ctrl_c_stops_every_rank_after_the_same_step_and_saves(tmp_path: Path,
                                                               guard: str) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "redline", *TRAIN, "--steps", "400",
                             "--nproc", "2", "--run-dir", str(run),
                             "--set", "task_args.sleep_s=0.02", "--set", "checkpoint.every=1000",
                             "--set", f"memory.oom_guard={guard}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no window in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the launcher passes it to the ranks, as Ctrl-C would
    _, stderr = proc.communicate(timeout=HUNG_S)
    assert proc.returncode == 130, stderr
    saved = list_checkpoints(run / "checkpoints")
    assert saved, stderr
    step = _final(run)["step"]
    assert 0 < step < 400 and len(_final(run)["rng_ranks"]) == 2
    stopped = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "interrupted"]
    assert [e["step"] for e in stopped] == [step]
    if guard == "false":  # agreed at a window's close
        assert step % 7 == 0


def test_lightning_ddp_under_torchrun_with_the_search_and_the_callback(tmp_path: Path
                                                                       ) -> None:
    pytest.importorskip("lightning")
    out = torchrun([str(SCRIPTS / "lightning_ddp.py"), str(tmp_path / "run")], tmp_path)
    assert out.returncode == 0, out.stderr
    windows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [w["step"] for w in windows] == [2, 4, 6]
    micro = windows[0]["micro_batch"]
    assert windows[0]["effective_batch"] == 128  # the search's plan, kept by both ranks
    assert windows[0]["accumulation_steps"] * micro * 2 == 128


def test_out_of_memory_at_one_sample_on_one_rank_ends_both_with_the_last_step_saved(
        tmp_path: Path) -> None:
    out = torchrun(["-m", "redline", "train", FAULTY, "--steps", "20", "--no-progress",
                    "--no-report", "--run-dir", "run", "--set", "task_args.fail_at=5",
                    "--set", "task_args.oom_above=0", "--set", "train.batch_size=8",
                    "--set", "train.effective_batch_size=16", "--set", "train.eval_every=0"],
                   tmp_path, timeout=HUNG_S)
    assert out.returncode == 1, out.stderr
    assert "even with a micro-batch of 1 sample" in out.stderr
    changes = [(e["old"], e["new"]) for e in read_jsonl(tmp_path / "run" / "events.jsonl")
               if e["event"] == "micro_batch"]
    assert changes == [(8, 4), (4, 2), (2, 1)]
    assert _final(tmp_path / "run")["step"] == 4  # the last completed step, every rank's RNG
    assert len(_final(tmp_path / "run")["rng_ranks"]) == 2
