"""Run lit_accum.py and hf_accum.py at accumulation 1, 2 and 4 and compare what redline's
callback recorded with what the framework itself logged.

    PYTHONPATH=src python bench/usertasks/check_accum.py

Lightning: each recorded step's loss against the mean of the step's micro-batch losses the
module saw (Lightning logs one micro-batch's value per step); HF: against the Trainer's own
log_history `loss` and `grad_norm` (logging_steps=1, the callback's log_every=1). Prints
the largest relative difference and the largest data_wait_pct per run."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def lightning(run_dir: Path, k: int) -> tuple[float, float]:
    seen = json.loads((run_dir / "micro_batch_losses.json").read_text())
    # An epoch's last optimizer step takes the batches left (Lightning steps at an epoch's
    # end): 1500 samples at 16 are 94 batches, so at k=4 every 24th step has 2.
    per_epoch, steps = -(-1500 // 16), []
    for first in range(0, len(seen), per_epoch):
        epoch = seen[first:first + per_epoch]
        steps += [epoch[i:i + k] for i in range(0, len(epoch), k)]
    worst = 0.0
    rows = records(run_dir)
    for r in rows:
        micro = steps[r["step"] - 1]
        want = sum(micro) / len(micro)
        worst = max(worst, abs(r["loss"] - want) / abs(want))
    return worst, max(r.get("data_wait_pct") or 0.0 for r in rows)


def hf(run_dir: Path, k: int) -> tuple[float, float]:
    history = json.loads((run_dir / "hf_log_history.json").read_text())
    logged = {h["step"]: h for h in history if "loss" in h and "grad_norm" in h}
    worst = 0.0
    rows = records(run_dir)
    for r in rows:
        h = logged[r["step"]]
        worst = max(worst, abs(r["loss"] - h["loss"]) / abs(h["loss"]),
                    abs(r["grad_norm"] - h["grad_norm"]) / abs(h["grad_norm"]))
    return worst, max(r.get("data_wait_pct") or 0.0 for r in rows)


def main() -> None:
    print("| framework | accumulation | steps compared | largest relative difference | "
          "largest data_wait_pct |\n|---|---|---|---|---|")
    for name, script, compare in (("Lightning", "lit_accum.py", lightning),
                                  ("HF Trainer", "hf_accum.py", hf)):
        for k in (1, 2, 4):
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = Path(tmp) / "run"
                subprocess.run([sys.executable, str(HERE / script), str(run_dir), str(k)],
                               check=True, capture_output=True)
                worst, wait = compare(run_dir, k)
                n = len(records(run_dir))
            print(f"| {name} | {k} | {n} | {worst:.2e} | {wait:.1f} |", flush=True)


if __name__ == "__main__":
    main()
