"""MFU by its definition, as a user sees it (issue 19, observed case 5): `redline train` on
a small GPT with activation checkpointing records model FLOPs that leave the recomputation
out and count attention (CPU flash attention included), with HFU beside MFU."""

from __future__ import annotations

from pathlib import Path

import pytest

from redline.telemetry.flops import analytic_transformer_flops
from redline.telemetry.jsonl import read_jsonl

from ..conftest import ROOT, run_cli
from ..tasks import gpt_flops

pytestmark = pytest.mark.slow  # a CLI run in a subprocess: ~15 s


def test_a_checkpointed_gpt_records_model_flops_and_hfu_beside_mfu(tmp_path: Path) -> None:
    task = f"{ROOT / 'tests' / 'tasks' / 'gpt_flops.py'}:GptFlopsCheckpointed"
    out = run_cli(["train", task, "--steps", "4", "--run-dir", "r",
                   "--set", "telemetry.log_every=2"], tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "r"
    (counted,) = [e for e in read_jsonl(run / "events.jsonl") if e.get("event") == "flops"]
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert rows
    tokens = rows[-1]["effective_batch"] * gpt_flops.SEQ
    # 6·N·tokens + attention, as without checkpointing (test_flops.py checks that equality
    # on the counter itself): the blocks' reruns are not model FLOPs, attention is.
    expected = analytic_transformer_flops(gpt_flops.matmul_weights(gpt_flops.TinyGPT()),
                                          tokens, gpt_flops.LAYERS, gpt_flops.SEQ,
                                          gpt_flops.WIDTH)
    assert counted["flops_per_step"] == expected
    assert counted["hardware_flops_per_step"] > expected  # the reruns, counted apart
    for row in rows:  # CPU: a measured peak, so both are present
        assert row["mfu"] is not None and row["hfu"] > row["mfu"]
        ratio = counted["hardware_flops_per_step"] / counted["flops_per_step"]
        assert row["hfu"] == pytest.approx(row["mfu"] * ratio, rel=1e-9)
    assert "recomputation included" in out.stdout  # the summary labels HFU beside MFU
