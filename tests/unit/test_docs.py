"""The docs' code blocks run as written (docs/own-loop.md), in order, in a temp directory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_own_loop_guide_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    blocks = python_blocks(DOCS / "own-loop.md")
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    for block in blocks:
        exec(compile(block, "docs/own-loop.md", "exec"), namespace)
    rows = [json.loads(line) for line in
            (tmp_path / "runs" / "own-loop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30, 40]
    assert [r["step"] for r in rows if "eval/loss" in r] == [20, 40]
    assert all(r["mfu"] for r in rows if "loss" in r)
    assert (tmp_path / "runs" / "own-loop" / "report.html").is_file()
    assert os.listdir(tmp_path / "runs" / "own-loop-stats" / "stats" / "layers")


@pytest.mark.slow
def test_the_own_loop_guide_runs_under_torchrun(tmp_path: Path) -> None:
    import subprocess
    import sys

    (script,) = re.findall(r"```python torchrun\n(.*?)```", (DOCS / "own-loop.md").read_text(),
                           flags=re.S)
    (tmp_path / "train_ddp.py").write_text(script)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "train_ddp.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "own-loop-ddp"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert all(r["dist/world_size"] == 2 and r["accumulation_steps"] == 2 for r in rows)
    ranks = [json.loads(line) for line in (run / "ranks.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0] * 4 + [1] * 4
