"""FSDP2 (distributed.strategy fsdp) under torchrun with 2 CPU processes and gloo: the
Engine's guarantees on a sharded model (tests/distributed/fsdp_step.py), the CLI run that
once hung, and an OOM on one rank redone by both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redline.telemetry.jsonl import read_jsonl

from ..conftest import ROOT, run_cli
from .test_distributed import SCRIPTS, torchrun

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
    assert r["skip_host"] == 0.0 and r["skip_flag"] == 0.0  # both ranks skipped
    assert "changed in place" in r["refused"][0]
    assert "build it after fully_shard" in r["refused"][1]
    assert r["agreements"] >= 1  # the guarded case agreed


def test_cli_trains_a_sharded_gpt_to_the_end_and_counts_its_flops_once(tmp_path: Path
                                                                       ) -> None:
    args = ["train", MEMGPT, "--steps", "3", "--no-progress", "--no-report", "--set",
            "train.batch_size=2", "--set", "train.effective_batch_size=8", "--set",
            "task_args.n=16", "--set", "task_args.seq=16", "--set", "task_args.layers=2"]
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
