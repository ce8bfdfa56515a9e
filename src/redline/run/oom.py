"""Out of memory even at a micro-batch of 1: one message that says where the memory went and
which lever would fit, and RUN_DIR/memory.json for `redline doctor`.

The OOM guard cannot shrink below one sample, so the run ends. Before it does, the step's
steady-state breakdown at micro-batch 1 (memory/breakdown.py) is taken without risking the
process: on a CPU measured on a job built for it, under an unbudgeted tracker (the budget
is an emulation: the machine has the memory); on CUDA predicted from the tensors' sizes
(another step would fail again), and the allocator's history, recorded while the guard
retried (engine/step.py), is dumped to RUN_DIR/memory_snapshot.pickle for
https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from redline import files
from redline._torch_compat import dump_memory_snapshot, record_memory_history
from redline.job.build import Job
from redline.job.memory import measure_config_breakdown, predict_from_sizes, state_kinds
from redline.memory.breakdown import MEMORY_FILE, Breakdown, fit_sentence
from redline.memory.guard import OutOfMemoryAtMinimum
from redline.memory.sizes import format_size

SNAPSHOT_FILE = "memory_snapshot.pickle"


def explain_oom(exc: OutOfMemoryAtMinimum, job: Job, run_dir: Path,
                saved: Path | None) -> OutOfMemoryAtMinimum:
    """`exc` as one message: what ran out, the breakdown at micro-batch 1, the lever that
    would fit with its `--set` flags, and the checkpoint to resume from; memory.json (and
    on CUDA the snapshot) written into `run_dir`."""
    first = str(exc).splitlines()[0]
    resume = (f"; the last completed step is saved ({saved}): continue with --resume and "
              "the lever" if saved else "")
    limit = _limit(job)
    try:
        breakdown = _breakdown(job, run_dir)
    except Exception as e:  # the explanation must not hide the error it explains
        return OutOfMemoryAtMinimum(f"{first}; the memory breakdown could not be measured "
                                    f"({type(e).__name__}: {e}){resume}")
    lines, sentence = [first], None
    if limit is not None:
        fits, sentence = fit_sentence(breakdown, limit, 1, state_kinds(job.task, job.config))
        sentence = _would_fit(sentence) if not fits else sentence
        lines[0] += f"; {sentence}{resume}"
    lines.append(breakdown.render(limit))
    _write(run_dir / MEMORY_FILE, breakdown, limit, first, sentence)
    return OutOfMemoryAtMinimum("\n".join(lines))


def _would_fit(sentence: str) -> str:
    # "does not fit: A of B; would fit with X (..); e.g. --set ..." -> "would fit with: X .."
    return sentence.replace("would fit with ", "would fit with: ", 1)


def _limit(job: Job) -> int | None:
    memory = job.config.memory
    if memory.budget_bytes is not None:
        return memory.budget_bytes
    if job.memory_limit is not None:
        return job.memory_limit[0]
    return job.device.memory_total


def _breakdown(job: Job, run_dir: Path) -> Breakdown:
    if not job.device.is_cuda:
        return _per_rank(job, measure_config_breakdown(job.config, job.task, job.device, 1))
    try:
        dump_memory_snapshot(str(run_dir / SNAPSHOT_FILE))
    finally:
        record_memory_history(False)
    return _per_rank(job, predict_from_sizes(
        job, 1, "on CUDA a step is not run again after it ran out of memory; the "
        f"allocator's snapshot is {SNAPSHOT_FILE} (https://pytorch.org/memory_viz)"))


def _per_rank(job: Job, b: Breakdown) -> Breakdown:
    """`b` (one process's) predicting one of the run's ranks: under torchrun the fit is a
    rank's, sharded where the run shards (and sharding is a lever where it does not)."""
    world, dist = job.comm.world, job.config.distributed
    if world.distributed:
        b.world_size = world.size
        b.levers = replace(b.levers, strategy=dist.strategy,
                           reshard_after_forward=dist.reshard_after_forward)
        if dist.strategy == "fsdp":
            b.notes.append(f"sharded over {world.size} ranks a rank's peak is predicted at "
                           f"{format_size(b.predict(b.levers, b.micro_batch))}")
    return b


def _write(path: Path, breakdown: Breakdown, limit: int | None, error: str,
           sentence: str | None) -> None:
    data = {"when": "out of memory at a micro-batch of 1", "error": error, "budget": limit,
            "fit": sentence, "breakdown": breakdown.to_dict()}
    files.atomic_write_text(path, json.dumps(data, indent=1), "memory breakdown")
