"""redline tune and `--batch-size auto` on models nobody on the project wrote, quiet and loaded.

The tasks in bench/usertasks/ are written the way a user writes one (their own optimizer,
a OneCycle schedule, dict batches, a collate_fn for variable-length sequences, tied and
frozen weights with activation checkpointing). For each task and each condition this runs

    redline tune bench/usertasks/FILE.py:Class --budget-s B --json --output TMP.yaml
    redline train bench/usertasks/FILE.py:Class --batch-size auto --steps 2 --run-dir TMP

and prints one table: the start (micro-batch x accumulation = effective batch, precision),
tune's choice, the speed-up tune measured side by side (median and range of its rounds),
its wall time against the budget, and the micro-batch / effective batch `--batch-size auto`
chose. "loaded" runs two busy-loop processes beside redline (what a shared machine does).

    python bench/unseen.py                  # all tasks, quiet and loaded, 60 s budget
    python bench/unseen.py --budget-s 90 --conditions loaded --tasks varlen_gru:VarLenGRU
    python bench/unseen.py --grow --conditions quiet   # growing the effective batch allowed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TASKS = ("onecycle_cnn:OneCycleCNN", "dict_transformer:DictTransformer",
         "varlen_gru:VarLenGRU", "tied_frozen:TiedFrozen")
BUSY = "while True: pass"
VERBOSE = False


def redline(*args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "redline", *args], capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in tune's output")


def shape(train: dict, precision: str) -> str:
    micro = train["batch_size"]
    eff = train.get("effective_batch_size") or micro
    return f"{micro} x {max(1, eff // micro)} = {eff}, {precision}"


def tune_row(spec: str, budget: float, scratch: Path, grow: bool) -> dict:
    out = scratch / "tuned.yaml"
    extra = ["--set", "train.grow_effective_batch=true"] if grow else []
    proc, wall = redline("tune", spec, "--budget-s", str(budget), "--json", "--no-cache",
                         "--output", str(out), *extra)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["?"], "wall_s": wall}
    result = last_json(proc.stdout)
    start = result["start"]
    tuned = yaml.safe_load(out.read_text()) if out.is_file() else result.get("tuned", start)
    low, high = result.get("speedup_range") or (None, None)
    if VERBOSE:
        print(json.dumps(result.get("reasons", {}), indent=1), file=sys.stderr, flush=True)
    return {"start": shape(start["train"], start["precision"]["name"]),
            "choice": shape(tuned["train"], tuned["precision"]["name"]),
            "speedup": result.get("speedup"), "range": (low, high), "wall_s": wall,
            "written": ("start (kept)" if result.get("kept_start") else "tuned")
            if out.is_file() else "nothing"}


def auto_row(spec: str, scratch: Path) -> str:
    run_dir = scratch / "auto"
    proc, _ = redline("train", spec, "--batch-size", "auto", "--steps", "2", "--run-dir",
                      str(run_dir))
    if proc.returncode != 0:
        return "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    eff = train.get("effective_batch_size") or train["batch_size"]
    return f"{train['batch_size']} -> eff {eff}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=60)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--conditions", default="quiet,loaded")
    p.add_argument("--grow", action="store_true",
                   help="tune with train.grow_effective_batch=true (growth is opt-in)")
    p.add_argument("--verbose", action="store_true", help="print tune's reasons per task")
    a = p.parse_args()
    global VERBOSE
    VERBOSE = a.verbose
    os.environ.setdefault("REDLINE_CACHE_DIR", tempfile.mkdtemp(prefix="redline-cache-"))
    print("| task | machine | start | tune's choice | speed-up (range) | wall / budget | "
          "config written | batch auto (micro -> effective) |\n|---|---|---|---|---|---|---|---|")
    for condition in a.conditions.split(","):
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in
                range(2 if condition == "loaded" else 0)]
        try:
            for name in a.tasks.split(","):
                module, cls = name.split(":")
                spec = f"{HERE / 'usertasks' / module}.py:{cls}"
                with tempfile.TemporaryDirectory() as tmp:
                    t = tune_row(spec, a.budget_s, Path(tmp), a.grow)
                    auto = auto_row(spec, Path(tmp))
                if "error" in t:
                    print(f"| {cls} | {condition} | error: {t['error'][0]} | | | "
                          f"{t['wall_s']:.0f} / {a.budget_s:.0f} s | | {auto} |", flush=True)
                    continue
                low, high = t["range"]
                spread = f" ({low:.2f}-{high:.2f})" if low is not None else ""
                speed = f"{t['speedup']:.2f}x{spread}" if t["speedup"] else "-"
                print(f"| {cls} | {condition} | {t['start']} | {t['choice']} | {speed} | "
                      f"{t['wall_s']:.0f} / {a.budget_s:.0f} s | {t['written']} | {auto} |",
                      flush=True)
        finally:
            for b in busy:
                b.kill()


if __name__ == "__main__":
    main()
