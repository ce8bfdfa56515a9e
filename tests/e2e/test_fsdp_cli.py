"""FSDP2 (distributed.strategy fsdp) under torchrun with 2 CPU processes and gloo: the
Engine's guarantees on a sharded model (tests/distributed/fsdp_step.py), the CLI run that
once hung, and an OOM on one rank redone by both."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from redline.telemetry.jsonl import read_jsonl

from ..conftest import ROOT, run_cli
from .test_distributed import FAULTY, SCRIPTS, torchrun

pytestmark = pytest.mark.slow  # several processes each: seconds

MEMGPT = f"{ROOT / 'tests' / 'tasks' / 'memgpt.py'}:MemGPT"


def test_a_sharded_step_equals_one_process_step_and_keeps_every_guarantee(tmp_path: Path
                                                                          ) -> None:
    out = torchrun([str(SCRIPTS / "fsdp_step.py"), str(tmp_path / "r.json")], tmp_path,
                   timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    for case in ("whole", "accumulated", "clipped"):  # fp32: equal to rounding
        assert r[case]["moved"] > 1e-3, case  # the step moved the weights: equality means something
        assert r[case]["diff"] < 1e-6, case
        one, two = r[case]["norm"]
        assert abs(one - two) < 1e-5 * one, case  # the norm over all shards
        assert r[case]["plain_norm"], case  # a plain tensor, not a DTensor
    assert r["bf16"]["diff"] < 5e-3 and r["bf16"]["moved"] > 0.1  # trains, near fp32's
    assert r["inferred"]["ranks_found"] and r["inferred"]["diff"] < 1e-6  # no comm given
    assert r["scaler"] == {"moved": 0.0, "scale": 8.0}  # an inf in one shard: all skip
    assert r["skip_host"] == 0.0 and r["skip_flag"] == 0.0  # both ranks skipped
    assert "changed in place" in r["refused"][0]
    assert "build it after fully_shard" in r["refused"][1]
    assert r["agreements"] >= 1  # the guarded case agreed


TINY = ["train", MEMGPT, "--steps", "3", "--no-progress", "--no-report", "--set",
        "train.batch_size=2", "--set", "train.effective_batch_size=8", "--set",
        "task_args.n=16", "--set", "task_args.seq=16", "--set", "task_args.layers=2"]


def test_cli_trains_a_sharded_gpt_to_the_end_and_counts_its_flops_once(tmp_path: Path
                                                                       ) -> None:
    # activation checkpointing installed on the blocks before they are sharded
    args = [*TINY, "--set", "memory.activation_checkpointing=full"]
    out = run_cli([*args, "--nproc", "2", "--run-dir", "fsdp", "--set",
                   "distributed.strategy=fsdp"], tmp_path, timeout=300,
                  env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "view tensor" not in out.stderr  # FSDP's warning, replaced by a real check
    alone = run_cli([*args, "--run-dir", "alone"], tmp_path, timeout=300)
    assert alone.returncode == 0, alone.stderr

    def flops(run: str) -> int:
        (event,) = [e for e in read_jsonl(tmp_path / run / "events.jsonl")
                    if e["event"] == "flops"]
        return event["flops_per_step"]

    assert flops("fsdp") == flops("alone") > 0  # the model once, not once per shard
    ranks = read_jsonl(tmp_path / "fsdp" / "ranks.jsonl")  # FSDP's collectives, per rank
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["comm_pct"] > 0 for r in ranks)


def test_4bit_optimizer_state_is_refused_when_sharded(tmp_path: Path) -> None:
    out = run_cli([*TINY, "--nproc", "2", "--run-dir", "r", "--set",
                   "distributed.strategy=fsdp", "--set", "memory.optimizer_state=4bit"],
                  tmp_path, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr
    assert "use memory.optimizer_state=8bit" in out.stderr


def test_oom_on_one_rank_is_redone_by_both_when_sharded(tmp_path: Path) -> None:
    # rank 1 fails before its forward: rank 0 hears of it at its first unit's boundary,
    # instead of waiting in an all-gather rank 1 never joins
    out = torchrun(["-m", "redline", "train", FAULTY, "--steps", "6", "--no-progress",
                    "--no-report", "--run-dir", "run", "--set", "task_args.fail_at=3",
                    "--set", "task_args.oom_above=4", "--set", "train.batch_size=16",
                    "--set", "train.effective_batch_size=32", "--set", "train.eval_every=0",
                    "--set", "memory.grow_after=1000", "--set", "distributed.strategy=fsdp"],
                   tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    changes = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl")
               if e["event"] == "micro_batch"]
    assert [(c["old"], c["new"], c["phase"]) for c in changes] == [
        (16, 8, "rank 1"), (8, 4, "rank 1")]
    last = [r for r in read_jsonl(tmp_path / "run" / "ranks.jsonl") if r["step"] == 6]
    assert sorted(r["rank"] for r in last) == [0, 1]
    assert {r["micro_batch"] for r in last} == {4}


def test_an_oom_mid_forward_or_mid_backward_is_redone_exactly(tmp_path: Path) -> None:
    out = torchrun([str(SCRIPTS / "fsdp_oom.py"), str(tmp_path / "o.json")], tmp_path,
                   timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "o.json").read_text())
    for where in ("loss", "forward", "backward"):  # on rank 1, in the first micro-batch
        assert r[where]["micro"] == 2, where  # shrunk from 4 on both ranks
        assert r[where]["diff"] < 1e-6, where  # and the step is the whole batch's


def test_the_own_loop_guides_fsdp_block_runs_under_torchrun(tmp_path: Path) -> None:
    (script,) = re.findall(r"```python torchrun-fsdp\n(.*?)```",
                           (ROOT / "docs" / "own-loop.md").read_text(), flags=re.S)
    (tmp_path / "train_fsdp.py").write_text(script)
    out = torchrun(["train_fsdp.py"], tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "own-loop-fsdp"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert all(r["dist/world_size"] == 2 and r["accumulation_steps"] == 2 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trains
    weights = torch.load(run / "model.pt", weights_only=True)
    assert weights["0.weight"].shape == (128, 32)  # whole, not a shard
