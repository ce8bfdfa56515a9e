"""The memory plan against an exhaustive grid of levers, under shrinking CPU memory budgets.

    PYTHONPATH=src python bench/levers.py                 # both models, 4-5 budgets: ~3 min
    PYTHONPATH=src python bench/levers.py --quick         # about 1 minute
    PYTHONPATH=src python bench/levers.py --models memgpt --budgets fit@E,x1,x0.5

Two models from tests/tasks/memgpt.py, fp32, effective batch E kept (MODELS below):

  memgpt   a GPT with its own pre-norm blocks: activations dominate at the tuned batch
  widemlp  residual MLP blocks: the parameters' and AdamW's state dominate

A budget is an emulation of a smaller device (memory.budget on a CPU: redline's storage
tracker counts every tensor byte). A cell fits when its tracked steady-state peak (step 2:
the optimizer's state present) is at most memory.target (0.85) of the budget. Budgets are
named by how they are made, from the no-lever peaks measured first:

  fit@N    the no-lever peak at micro-batch N over the target, 2 % over (fit@E: fits at
           the tuned batch without levers)
  xF       F times the no-lever micro-batch-1 peak (x1: micro-batch 1 no longer fits the
           target; x0.25: the issue's "a quarter of the micro-batch-1 peak")

For each model and budget, side by side:

  grid   every lever combination (checkpointing none | selective | full of every block x
         each memory.optimizer_state but cpu-offload, which is CUDA-only) at its largest
         fitting micro-batch (powers of two up to E, tried from E down). Peaks are measured
         once per (levers, micro-batch) and shared between budgets; a budget's grid wall
         time is the sum of the measurements and timings that budget's grid needs, each as
         it was measured here (so it is what a grid for that budget alone would spend).
  plan   redline.tuning.memory_plan_run.plan_memory on the same config and budget, in a
         fresh process each (its compile and warm-ups cold, as a user's first run); its
         wall time measured in that process.

Every cell any grid or plan picked, and every combination at micro-batch E, is then timed
in one set of interleaved rounds (one torch thread by default: --threads) through
redline's job runner (tuning/trial.py's Runner and interleave; unbudgeted, OOM guard on, as
training runs): the grid's best and the plan's choice are compared there. Goals: the plan
within 5 % of the grid's best samples/s, in under 15 % of the grid's wall time. Also: the
breakdown's prediction (Breakdown.predict, measured once per model at micro-batch 2)
against each measured cell's peak (goal: within 10 %); what `accelerate estimate-memory`
would say for the model (accelerate.utils.calculate_maximum_sizes, and its fp32
"Training using Adam" rule: the largest of model, gradients (1x), optimizer (2x) and step
(4x): accelerate/commands/estimate.py, estimate_training_usage and estimate_command); and
what each lever costs at the tuned micro-batch (samples/s against no lever, memory freed).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # no CUDA kernels here

from levers_report import TARGET, Cell, Result, label, print_tables, write_json
from redline import batch as batch_tree
from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.job.build import build_job
from redline.job.memory import measure_job_breakdown, planned_states
from redline.job.runner import JobRunner
from redline.memory.breakdown import Breakdown
from redline.memory.config import OPTIMIZER_STATES
from redline.memory.levers import Levers
from redline.memory.probe import live_tensor_bytes, measure_peak
from redline.memory.sizes import format_size
from redline.rng import preserved_rng
from redline.task import resolve_task
from redline.tuning.trial import Runner, interleave

TASKS = Path(__file__).resolve().parent.parent / "tests" / "tasks" / "memgpt.py"
MODES = ("none", "selective", "full")
STATES = tuple(s for s in OPTIMIZER_STATES if s != "cpu-offload")  # cpu-offload: CUDA only
COMBOS = [Levers(mode, None, state) for state in STATES for mode in MODES]
QUICK_BUDGETS = "fit@E,x1"
QUICK_STATES = "fp32,4bit"
CPU = DeviceInfo.detect("cpu")
# fit@N budgets leave 2 % over the no-lever peak: a lever's own few KiB (the checkpoint
# wrappers' bookkeeping) must not decide whether a cell fits a budget set to the byte.
FIT_SLACK = 1.02


@dataclass(frozen=True)
class Model:
    key: str
    cls: str
    args: dict[str, Any]
    effective: int  # the tuned batch: samples per step, kept by every cell
    what: str
    budgets: str  # the default ladder (module docstring)

    @property
    def spec(self) -> str:
        return f"{TASKS}:{self.cls}"

    def config(self, levers: Levers, micro: int | str, budget: int | None = None
               ) -> RunConfig:
        return RunConfig(task=self.spec, task_args=dict(self.args)).updated({
            "device": "cpu", "precision.name": "fp32", "precision.compile": False,
            "data.num_workers": 0, "train.batch_size": micro,
            "train.effective_batch_size": self.effective, "memory.budget": budget,
            "memory.target": TARGET, **levers.updates()})

    def sizes(self) -> list[int]:
        """Micro-batches the grid tries, from E down."""
        return [self.effective >> i for i in range(self.effective.bit_length())]


# Sizes chosen so that a step takes well under a second on 2 cores (the width 256,
# 6 layers, sequence 512 takes 5-30 s a step here); --model KEY:JSON[:E] sets others.
MODELS = {
    "memgpt": Model("memgpt", "MemGPT", {"n": 64, "vocab": 128, "seq": 256, "width": 64,
                                         "layers": 4, "heads": 4}, 8,
                    "GPT, activations dominate", "fit@E,fit@2,x1,x0.6,x0.25"),
    "widemlp": Model("widemlp", "WideMLP", {"n": 256, "dim": 64, "width": 256,
                                            "hidden": 1024, "layers": 4}, 16,
                     "residual MLP, states dominate", "fit@E,x1,x0.9,x0.25"),
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _batch(model: Model, job: Any, size: int) -> Any:
    return batch_tree.first_samples(job.train_set, size)


def measure_cell(model: Model, task: Any, levers: Levers, micro: int) -> Cell:
    """The tracked steady-state peak of one step at `micro` with `levers` (step 1 first, so
    AdamW's state exists and torchao's step has compiled; the tracked step runs eagerly)."""
    t0 = time.perf_counter()
    with preserved_rng():
        job = build_job(model.config(levers, micro).updated({"memory.oom_guard": False}),
                        task, CPU)
        runner = JobRunner(job)
        batch = _batch(model, job, model.effective)
        runner.step_on(batch)
        job.optimizer.zero_grad(set_to_none=True)  # freed in the step: not the baseline
        baseline = live_tensor_bytes(job.model, job.optimizer)
        with torch.compiler.set_stance("force_eager"):
            peak = measure_peak(lambda: runner.step_on(batch), CPU, baseline).peak_bytes
    return Cell(levers, micro, peak, time.perf_counter() - t0)


def budget_bytes(name: str, model: Model, peak: Callable[[Levers, int], Cell]) -> int:
    if name.startswith("fit@"):
        n = model.effective if name == "fit@E" else int(name[4:])
        return int(FIT_SLACK * peak(Levers(), n).peak / TARGET)
    if name.startswith("x"):
        return int(float(name[1:]) * peak(Levers(), 1).peak)
    raise SystemExit(f"--budgets: {name!r} is neither fit@N (fit@E) nor xF (x0.5)")


def grid(model: Model, budget: int, peak: Callable[[Levers, int], Cell]
         ) -> tuple[dict[Levers, int | None], float, list[tuple[Levers, int]]]:
    """Each combination's largest fitting micro-batch (None: not even 1), the measuring
    seconds that took, and every (levers, micro) it measured."""
    found: dict[Levers, int | None] = {}
    spent, measured = 0.0, []
    for levers in COMBOS:
        found[levers] = None
        for micro in model.sizes():
            cell = peak(levers, micro)
            spent += cell.cost_s
            measured.append((levers, micro))
            if cell.peak <= TARGET * budget:
                found[levers] = micro
                break
    return found, spent, measured


def run_plan(model: Model, budget: int, timeout: float) -> dict[str, Any]:
    """plan_memory in a fresh process (module docstring): its choice and wall time."""
    cmd = [sys.executable, __file__, "--plan-worker", model.key, str(budget),
           json.dumps(model.args), str(model.effective)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no plan within {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


def plan_worker(key: str, budget: int, args: dict[str, Any], effective: int) -> None:
    from redline.tuning.memory_plan_run import plan_memory

    model = Model(key, MODELS[key].cls, args, effective, MODELS[key].what, "")
    config = model.config(Levers(), effective, budget)
    t0 = time.perf_counter()
    plan = plan_memory(resolve_task(model.spec, model.args), config, CPU, say=say)
    wall = time.perf_counter() - t0
    print(plan.render(), file=sys.stderr)
    lv = plan.levers
    print(json.dumps({"checkpointing": lv.checkpointing, "blocks": lv.checkpointed_blocks,
                      "state": lv.optimizer_state, "micro": plan.micro_batch,
                      "wall_s": wall, "summary": plan.summary()}))


def time_cells(model: Model, task: Any, keys: list[tuple[Levers, int]], rounds: int,
               min_s: float, result: Result) -> None:
    """Every cell in `keys` timed in the same interleaved rounds; each cell's seconds
    (build, warm-up, its rounds) kept for the grids' wall time."""
    built: list[Runner] = []
    try:
        for levers, micro in keys:
            t0 = time.perf_counter()
            runner = Runner(task, model.config(levers, micro), CPU)
            runner.warm_up()
            built.append(runner)
            result.timing_s[(levers, micro)] = time.perf_counter() - t0
        marks: list[tuple[int, float]] = []
        timings = interleave(built, rounds, min_s,
                             lambda i, r: marks.append((i, time.perf_counter())))
        marks.append((-1, time.perf_counter()))
        for (i, t), (_, t_next) in itertools.pairwise(marks):
            result.timing_s[keys[i]] += t_next - t
        for key, timing in zip(keys, timings, strict=True):
            result.rates[key] = timing.rates
    finally:
        for runner in built:
            runner.close()


def measure_breakdown(model: Model, task: Any) -> Breakdown:
    """The breakdown at micro-batch 2 (as the plan measures it)."""
    size = min(2, model.effective)
    config = model.config(Levers(), "auto").updated({
        "memory.activation_checkpointing": "auto", "memory.checkpointed_blocks": None})
    with preserved_rng():
        job = build_job(config, task, CPU)
        with job.precision.global_context():
            b = measure_job_breakdown(job, _batch(model, job, size))
    b.samples_per_step = model.effective  # every cell accumulates to it, as the plan's do
    return b


def accelerate_estimate(task: Any) -> int | None:
    """`accelerate estimate-memory`'s fp32 "Training using Adam" for the model: max of
    model, gradients (1x), optimizer (2x), step (4x) = 4x its size (estimate.py)."""
    try:
        from accelerate.commands.estimate import estimate_training_usage
        from accelerate.utils import calculate_maximum_sizes
    except ImportError:
        return None
    total, _ = calculate_maximum_sizes(task.build_model())
    return int(max(estimate_training_usage(total, "float32").values()))


def saved_cells(path: str | None, model: Model) -> dict[tuple[Levers, int], Cell]:
    """The peaks (and their measuring seconds) an earlier run's --json measured for this
    model at this shape, so a rerun spends its time on the plans and the timing."""
    if path is None:
        return {}
    for r in json.loads(Path(path).read_text()):
        if r["model"] == model.key and r["args"] == model.args and \
                r["effective"] == model.effective:
            cells = [Cell(Levers(c["checkpointing"], c["blocks"], c["state"]), c["micro"],
                          c["peak"], c["cost_s"]) for c in r["cells"]]
            return {(c.levers, c.micro): c for c in cells}
    return {}


def bench_model(model: Model, names: list[str], rounds: int, min_s: float,
                plan_timeout: float, peaks_json: str | None = None) -> Result:
    task = resolve_task(model.spec, model.args)
    n = sum(p.numel() for p in task.build_model().parameters())
    offered = planned_states(False)[0]
    result = Result(model, list(COMBOS), n, offered, cells=saved_cells(peaks_json, model))

    def peak(levers: Levers, micro: int) -> Cell:
        if (levers, micro) not in result.cells:
            result.cells[(levers, micro)] = cell = measure_cell(model, task, levers, micro)
            say(f"  {model.key} {label(levers, micro)}: peak {format_size(cell.peak)} "
                f"({cell.cost_s:.1f} s)")
        return result.cells[(levers, micro)]

    say(f"{model.key}: no-lever peaks, breakdown")
    peak(Levers(), model.effective)
    peak(Levers(), 1)  # the x budgets' reference, and the accelerate comparison's
    result.breakdown = measure_breakdown(model, task)
    result.accelerate = accelerate_estimate(task)
    wanted: list[tuple[Levers, int]] = [(c, model.effective) for c in COMBOS]
    for name in names:
        budget = budget_bytes(name, model, peak)
        say(f"{model.key}: budget {name} = {format_size(budget)}: grid")
        found, spent, measured = grid(model, budget, peak)
        say(f"{model.key}: budget {name}: plan")
        plan = run_plan(model, budget, plan_timeout) if plan_timeout > 0 else \
            {"error": "not run (--no-plan)"}
        fitting = [(lv, m) for lv, m in found.items() if m is not None]
        if "error" not in plan:
            key = (Levers(plan["checkpointing"], plan["blocks"], plan["state"]),
                   plan["micro"])
            plan["key"] = key
            plan["peak"] = peak(*key).peak  # measured as the grid's cells are
            fitting_plan = [key]
        else:
            fitting_plan = []
        wanted += [k for k in fitting + fitting_plan if k not in wanted]
        result.budgets.append({"name": name, "budget": budget, "found": found,
                               "measure_s": spent, "measured": measured, "plan": plan})
    say(f"{model.key}: timing {len(wanted)} cells side by side")
    time_cells(model, task, wanted, rounds, min_s, result)
    if result.breakdown is not None:
        for cell in result.cells.values():
            cell.predicted = result.breakdown.predict(cell.levers, cell.micro)
    return result


def machine_line(threads: int) -> str:
    load = os.getloadavg()
    return (f"{CPU.name}, {os.cpu_count()} cores; torch {torch.__version__}, {threads} "
            f"thread(s); python {platform.python_version()}; "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average "
            f"{load[0]:.1f} at the start")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="of: " + ", ".join(MODELS))
    p.add_argument("--budgets", default=None,
                   help="fit@N / fit@E / xF, comma-separated (default: " + "; ".join(
                       f"{m.key} {m.budgets}" for m in MODELS.values())
                   + f"; --quick: {QUICK_BUDGETS})")
    p.add_argument("--quick", action="store_true",
                   help=f"budgets {QUICK_BUDGETS}, states {QUICK_STATES}, three timing "
                        "rounds (about 1 minute on 2 idle cores)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5, "
                   "--quick 3)")
    p.add_argument("--min-s", type=float, default=0.3, help="seconds per cell per round")
    p.add_argument("--plan-timeout", type=float, default=300.0)
    p.add_argument("--states", default=None,
                   help="optimizer states the grid tries (default: every one but cpu-offload: "
                        + ",".join(STATES) + ")")
    p.add_argument("--model", action="append", default=[], metavar="KEY:JSON[:E]",
                   help='a model\'s task_args (and effective batch), e.g. memgpt:\'{"width": '
                        '256, "layers": 6, "seq": 512}\':4 (the issue\'s shape; slow here)')
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: with another process busy on a core, "
                        "2-thread steps of these small models swing up to 30-fold, OpenMP "
                        "threads waiting on each other; one thread only time-slices)")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--peaks-json", metavar="FILE",
                   help="reuse the peaks an earlier run's --json measured (and their "
                        "seconds, for the grids' wall time); the plans and the side-by-side "
                        "timing run afresh")
    p.add_argument("--no-plan", action="store_true", help="the grid alone")
    return p


def override(text: str) -> None:
    """--model KEY:JSON[:E]: other task_args (and effective batch) for a model."""
    key, _, rest = text.partition(":")
    spec, eff = rest, ""
    if not rest.rstrip().endswith("}"):  # a trailing :E
        spec, _, eff = rest.rpartition(":")
    m = MODELS[key]
    MODELS[key] = Model(key, m.cls, {**m.args, **json.loads(spec)},
                        int(eff) if eff else m.effective, m.what, m.budgets)


def main() -> None:
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching")  # torchao's
    if len(sys.argv) > 1 and sys.argv[1] == "--plan-worker":
        _, _, key, budget, args, effective = sys.argv
        torch.set_num_threads(int(os.environ.get("LEVERS_THREADS", "0")) or
                              torch.get_num_threads())
        plan_worker(key, int(budget), json.loads(args), int(effective))
        return
    a = parser().parse_args()
    torch.set_num_threads(a.threads)
    os.environ["LEVERS_THREADS"] = str(a.threads)
    states = a.states or (QUICK_STATES if a.quick else ",".join(STATES))
    COMBOS[:] = [Levers(mode, None, state) for state in states.split(",") for mode in MODES]
    for text in a.model:
        override(text)
    names = a.budgets or (QUICK_BUDGETS if a.quick else None)
    rounds = a.rounds or (3 if a.quick else 5)
    print("command: " + " ".join(["python", *sys.argv]))
    print("machine: " + machine_line(a.threads))
    print("budgets: CPU memory budgets, an emulation of a smaller device (module docstring)")
    if a.peaks_json:
        print(f"peaks and their measuring seconds: from {a.peaks_json} (an earlier run)")
    t0 = time.perf_counter()
    timeout = 0.0 if a.no_plan else a.plan_timeout
    results = [bench_model(MODELS[k], (names or MODELS[k].budgets).split(","), rounds,
                           a.min_s, timeout, a.peaks_json) for k in a.models.split(",")]
    print_tables(results)
    print(f"\nwhole bench: {time.perf_counter() - t0:.0f} s")
    if a.json:
        write_json(a.json, results)


if __name__ == "__main__":
    main()
