"""A built job's memory breakdown (memory/breakdown.py), measured at the steady state.

AdamW allocates its state at the first `optimizer.step()`, after the first backward, so
a first step's peak misses it: every measurement here steps once untracked first (the
state then exists), then measures the second step. On a CPU the measured step runs under
an unbudgeted `MemoryTracker` (an emulation: the machine has the memory, so measuring a
step that does not fit a budget does not end the process); on CUDA the allocator's
peak is read (`max_memory_allocated`). The activations per block come from forward-only
passes with the job's checkpointing switched to each mode (installed for the measurement
where the job has none, and removed after).

Where a real step cannot run (CUDA after an out-of-memory error: another step would fail
again), `predict_from_sizes` gives the model states by their sizes and says the
activations were not measured. A fake-tensor measurement of the activations is not built.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from redline import batch as batch_tree
from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.job.build import Job, build_job
from redline.job.runner import JobRunner
from redline.memory.blocks import find_blocks
from redline.memory.breakdown import (
    MODES,
    BlockActivations,
    Breakdown,
    measure_activations,
    tensor_bytes,
)
from redline.memory.checkpointing import Checkpointing
from redline.memory.levers import STATE_BYTES_PER_PARAM, Levers
from redline.memory.tracker import MemoryTracker
from redline.task import Task, task_member


def measure_job_breakdown(job: Job, batch: Any) -> Breakdown:
    """The breakdown of `job` stepping `batch` (on the device; its micro-batch is the
    batch's leading size), at the steady state: one warm step first so the optimizer's state
    exists, then one measured step (CPU: MemoryTracker, unbudgeted; CUDA: the allocator),
    then forward-only passes with job.checkpointing switched to each mode for the per-block
    activations. Leaves the job's checkpointing as it found it. The model is stepped: use a
    job built for measuring (as the batch search and the dry run do)."""
    runner = JobRunner(job)
    with runner.context():
        runner.step_on(batch)  # warm: the optimizer's state exists from here on
        peak = _measured_step(runner, batch)
        grads = tensor_bytes([p.grad for p in job.model.parameters() if p.grad is not None])
        activations = _activations(job, batch)
    cuda = job.device.is_cuda
    source = ("the CUDA allocator, step 2" if cuda
              else "the CPU storage tracker, step 2")
    levers = _levers(job)
    b = Breakdown(micro_batch=batch_tree.leading_size(batch), gradients=grads,
                  temporaries=0, peak=peak, source=source, levers=levers,
                  **_states(job), **activations)
    b.temporaries = peak - b.backward_peak(levers, b.micro_batch)
    _fit_temporaries(b, runner, job)
    return b


def _fit_temporaries(b: Breakdown, runner: JobRunner, job: Job) -> None:
    """`b.temporaries_per_sample` from one more measured step at twice the micro-batch
    (where the training set has the samples and, on CUDA, the step fits)."""
    m, engine = b.micro_batch, job.engine
    if 2 * m > len(job.train_set) or engine.guard is not None:  # type: ignore[arg-type]
        return  # (a guard would split the larger batch: no larger step to measure)
    bigger = batch_tree.move(batch_tree.first_samples(job.train_set, 2 * m),
                             job.device.torch_device)
    split, engine.micro_batch_size = engine.micro_batch_size, None  # the batch whole
    try:
        with runner.context():
            peak = _measured_step(runner, bigger)
    except torch.OutOfMemoryError:  # CUDA: the larger step does not fit the device
        job.optimizer.zero_grad(set_to_none=True)
        return
    finally:
        engine.micro_batch_size = split
    categories = b.backward_peak(b.levers, 2 * m) - b.temporaries_at(2 * m)
    b.temporaries_per_sample = (peak - categories - b.temporaries) / m


def predict_from_sizes(job: Job, micro_batch: int, why: str) -> Breakdown:
    """The model states by their sizes (parameters, gradients as large as the trainable
    parameters, the optimizer's state as it is or as its kind predicts), with no step run:
    the activations are not measured (`why` says why, in the notes)."""
    states = _states(job)
    trainable = [p for p in job.model.parameters() if p.requires_grad]
    if not states["optimizer_state"] and "Adam" in type(job.optimizer).__name__:
        # not allocated yet (before the first step): predicted from its kind
        states["optimizer_state"] = int(_state_per_param(job) * states["trainable_elements"])
    grads = tensor_bytes(trainable)
    total = states["parameters"] + grads + states["optimizer_state"]
    return Breakdown(micro_batch=micro_batch, gradients=grads, blocks=[],
                     other_activations=0, temporaries=0, peak=total,
                     source="predicted from the tensors' sizes", levers=_levers(job),
                     measured_activations=False,
                     notes=[f"activations not measured: {why}"], **states)


def _state_per_param(job: Job) -> float:
    return STATE_BYTES_PER_PARAM.get(job.config.memory.optimizer_state, 8.0)


def _levers(job: Job) -> Levers:
    levers = Levers.of(job.config.memory)
    cp = job.checkpointing
    if cp is not None:  # as switched now (the plan may have switched it)
        levers = Levers(cp.mode, cp.count, levers.optimizer_state)
    return levers


def _states(job: Job) -> dict[str, Any]:
    params = list(job.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {"parameters": tensor_bytes(params), **_sharding_sizes(job),
            "optimizer_state": tensor_bytes(list(job.optimizer.state.values())),
            "optimizer_state_kind": job.config.memory.optimizer_state,
            "trainable_elements": sum(p.numel() for p in trainable),
            "largest_parameter": max((p.numel() for p in trainable), default=0)}


def _sharding_sizes(job: Job) -> dict[str, Any]:
    """What a sharded prediction needs (memory/breakdown.py): each FSDP unit's parameter
    bytes (the blocks memory/sharding.py would shard: find_blocks with
    memory.checkpoint_blocks) and the share of their bytes FSDP gathers (the mixed
    precisions gather fp32 parameters in 16 bits)."""
    blocks = find_blocks(job.model, job.config.memory.checkpoint_blocks)
    params = list(job.model.parameters())
    low = job.config.precision.name in ("bf16-mixed", "fp16-mixed")
    wide = bool(params) and all(p.element_size() == 4 for p in params)
    return {"block_parameters": [tensor_bytes(list(b.module.parameters())) for b in blocks],
            "gather_scale": 0.5 if low and wide else 1.0}


def _measured_step(runner: JobRunner, batch: Any) -> int:
    """The peak of one step, the optimizer's state present (the caller warmed it)."""
    job = runner.job
    job.optimizer.zero_grad(set_to_none=True)  # the step frees them first: not in the peak
    if job.device.is_cuda:
        dev = job.device.torch_device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        runner.step_on(batch)
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev))
    tracker = MemoryTracker(baseline=_live(job))
    with tracker:  # compiled code runs eagerly inside (memory/tracker.py)
        runner.step_on(batch)
    return tracker.peak


def _live(job: Job) -> int:
    params = list(job.model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    buffers = list(job.model.buffers())
    return tensor_bytes([params, grads, buffers, list(job.optimizer.state.values())])


def _activations(job: Job, batch: Any) -> dict[str, Any]:
    """blocks (per block, each mode) and other_activations (the job's mode), from one
    forward-only pass per mode."""
    with _switchable(job) as cp:
        blocks = cp.blocks if cp is not None else []
        if cp is None:
            modes = {"none": _forward_pass(job, batch, [])}
        else:
            mode, count = cp.mode, cp.count
            modes = {}
            try:
                for m in MODES:
                    cp.set(m)
                    modes[m] = _forward_pass(job, batch, blocks)
            finally:
                cp.set(mode, count)
    none = modes["none"]
    per_block = [BlockActivations(b.name, none.blocks[i],
                                  modes.get("selective", none).blocks[i],
                                  modes.get("full", none).blocks[i])
                 for i, b in enumerate(blocks)]
    return {"blocks": per_block, "other_activations": none.other}


@contextlib.contextmanager
def _switchable(job: Job) -> Iterator[Checkpointing | None]:
    """The job's checkpointing; where it has none, one installed (all blocks off) for the
    measurement and removed after. None when the model has no blocks."""
    if job.checkpointing is not None:
        yield job.checkpointing
        return
    blocks = find_blocks(job.model)
    if not blocks:
        yield None
        return
    cp = Checkpointing(blocks)
    try:
        yield cp
    finally:
        cp.remove()


def _forward_pass(job: Job, batch: Any, blocks: list[Any]) -> Any:
    loss_fn = job.task.loss
    model = job.model

    def forward() -> Any:
        with job.precision.forward_context():
            return loss_fn(model, batch)

    was_training = model.training
    model.train()
    try:
        if job.device.is_cuda:
            dev = job.device.torch_device
            return measure_activations(forward, blocks,
                                       lambda: int(torch.cuda.memory_allocated(dev)))
        tracker = MemoryTracker()
        with tracker:  # compiled code runs eagerly inside (memory/tracker.py)
            return measure_activations(forward, blocks, lambda: tracker.current)
    finally:
        model.train(was_training)


def state_kinds(task: Task, config: RunConfig) -> tuple[str, ...]:
    """The optimizer states a suggestion may choose for `task` (planned_states)."""
    own = task_member(task, "optimizer") is not None
    return planned_states(own, config.memory.optimizer_state)[0]


def planned_states(own_optimizer: bool, configured: str = "fp32"
                   ) -> tuple[tuple[str, ...], list[str]]:
    """(the optimizer-state kinds a plan or a suggestion may choose, why others are left
    out). A task's own optimizer is kept; the low-bit kinds need torchao. 8bit only where
    the config asks for it: where a gradient turns exactly zero after a small one (a dead
    ReLU unit, an embedding row seen once) its second moment quantizes to 0 and the update
    divides by eps (docs/memory.md: a weight moved 1.9 in 10 steps where fp32 AdamW moved
    none by 0.01), a risk to the run's quality redline does not take for the user; 4bit's
    second moment has no zero code. cpu-offload moves the update to the host: set it
    yourself."""
    if own_optimizer:
        return (configured,), ["optimizer state: the task's own optimizer is kept (no "
                               "state lever)"]
    if importlib.util.find_spec("torchao") is None:
        return (configured,), ["optimizer state: torchao is not installed (pip install "
                               "'redline[fp8]')"]
    kinds = ("fp32", "8bit", "4bit") if configured == "8bit" else ("fp32", "4bit")
    notes = ["optimizer state: cpu-offload is not planned (it moves the update to the "
             "host; set it yourself)"]
    if configured != "8bit":
        notes.append("optimizer state: 8bit is not planned (an element whose gradient "
                     "turns exactly zero can jump; docs/memory.md); set it yourself")
    return kinds, notes


def measuring_config(config: RunConfig, micro_batch: int) -> RunConfig:
    """`config` for a job built only to be measured at `micro_batch`: one micro-batch a
    step, no OOM guard, no budget (the measurement is unbudgeted), no compile (a
    TorchDispatchMode cannot see inside a compiled frame)."""
    return config.updated({"train.batch_size": micro_batch,
                           "train.effective_batch_size": None, "memory.budget": None,
                           "memory.oom_guard": False, "precision.compile": False})


def measure_config_breakdown(config: RunConfig, task: Task, device: DeviceInfo,
                             micro_batch: int) -> Breakdown:
    """The breakdown of the job `config` builds, at `micro_batch`, on a job built for the
    measurement and thrown away (the first `micro_batch` samples of the training set). On
    CUDA, a step that runs out of memory leaves a prediction from the tensors' sizes.
    Predictions are for `config`'s steps (`samples_per_step`: accumulated where the
    micro-batch is smaller)."""
    b = _measure_config(config, task, device, micro_batch)
    b.samples_per_step = None if config.train.auto_batch else config.train.samples_per_step
    return b


def _measure_config(config: RunConfig, task: Task, device: DeviceInfo,
                    micro_batch: int) -> Breakdown:
    job = build_job(measuring_config(config, micro_batch), task, device)
    batch = batch_tree.move(batch_tree.first_samples(job.train_set, micro_batch),
                            device.torch_device)
    if not device.is_cuda:
        return measure_job_breakdown(job, batch)
    try:
        return measure_job_breakdown(job, batch)
    except torch.OutOfMemoryError:
        pass  # outside the handler: the failed step's tensors are gone
    job.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return predict_from_sizes(job, micro_batch, "a step does not fit the device")
