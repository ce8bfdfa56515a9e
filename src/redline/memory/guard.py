"""OOM guard policy: which micro-batch size to run, when to shrink, when to grow back.

How the guard keeps the math exact. The Engine snapshots, at the start of each step, the
torch RNG states (while the step draws random numbers: StepRng) and the model's BatchNorm
statistics. If an out-of-memory error
(recognised by type, torch.OutOfMemoryError, never by message: illegal-access, NCCL and
cuBLAS errors are not retried) strikes during forward or backward, the Engine lets the
exception and its frames go first (they hold the activations), discards the partial
gradients, restores the snapshot, frees cached memory, and redoes the *same* batch split
into smaller micro-batches. Each micro-batch's loss is weighted by its share of the
samples, so the gradient is the full-batch gradient whatever the split; the optimizer and
scheduler step once, after the whole batch. No sample is skipped or reordered and no
optimizer step is lost. The GradScaler needs no snapshot: its state only changes in
`update()`, after the optimizer step, which a failed forward/backward never reaches.

OOMGuard holds only the decision; StepStart is what a redo goes back to. `decide(oom)`
is a pure function of the current size and whether *any* process ran out of memory, so
under torch.distributed every rank can reach the same decision from one all-reduce of a
single flag (MAX over ranks) at a fixed point of the step, and no rank waits on another
that has taken a different path.

Growing back: after `grow_after` consecutive clean steps below the configured size, the
size doubles (capped at the configured size). A size that fails again after growing
doubles the wait before the next attempt, so a size that does not fit is not retried
every few steps.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from redline._torch_compat import foreach_copy_, has_running_stats
from redline.rng import TorchState, restore_torch_state, same_torch_state, torch_state


class OutOfMemoryAtMinimum(RuntimeError):
    """Even one sample per micro-batch does not fit; the message says where it failed."""


@dataclass
class Change:
    """One decision of the guard, as recorded in events.jsonl."""

    old: int
    new: int
    reason: str  # "oom" | "grow"


@dataclass
class OOMGuard:
    """Micro-batch size policy of the OOM guard (see the module docstring)."""

    configured: int  # the micro-batch the user asked for; never exceeded
    grow_after: int = 100  # clean steps before growing back; 0: never grow back
    current: int = 0
    clean_steps: int = 0
    retries: int = 0  # OOMs recovered from, over the whole run
    history: list[Change] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.configured < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {self.configured}")
        if self.grow_after < 0:
            raise ValueError(f"memory.grow_after must be >= 0, got {self.grow_after}")
        self.current = self.current or self.configured
        self._wait = self.grow_after
        self._grew_to: int | None = None

    def decide(self, oom: bool) -> Change | None:
        """The decision after a step attempt; `oom` is True if any process ran out."""
        if oom:
            return self._shrink()
        self.clean_steps += 1
        if (self.grow_after and self.current < self.configured
                and self.clean_steps >= self._wait):
            return self._record(min(self.configured, self.current * 2), "grow")
        return None

    def _shrink(self) -> Change:
        if self.current == 1:
            raise OutOfMemoryAtMinimum("out of memory with a micro-batch of 1 sample")
        if self._grew_to == self.current:  # growing back failed: wait twice as long
            self._wait *= 2
        self.retries += 1
        return self._record(max(1, (self.current + 1) // 2), "oom")

    def _record(self, new: int, reason: str) -> Change:
        change = Change(self.current, new, reason)
        self.current = new
        self.clean_steps = 0
        self._grew_to = new if reason == "grow" else None
        self.history.append(change)
        return change

    def state_dict(self) -> dict[str, int]:
        return {"current": self.current, "clean_steps": self.clean_steps,
                "retries": self.retries, "wait": self._wait}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.current = int(state["current"])
        self.clean_steps = int(state["clean_steps"])
        self.retries = int(state["retries"])
        self._wait = int(state["wait"])


class StepRng:
    """The RNG state a redone step rewinds to, kept as cheaply as the model allows.

    Snapshotting torch's generators (rng.torch_state) costs ~3.5 us a step inside a CPU
    training loop (a 5 KB state copied into a new tensor), yet a step that draws no random
    numbers needs no snapshot: its start state is the current one. So the first
    `probe_steps` steps are snapshotted and compared with their end states, and with each
    other's; if nothing drew, inside a step or between steps, snapshots stop and the last
    state becomes the reference. Every `recheck_every` steps one end state is compared with
    it again, and any draw turns snapshots back on for good. After an OOM in a step that was
    not snapshotted, the current state is compared with the reference: equal, nothing drew
    and the redo is exact; different, the redo cannot rewind what was drawn (`rewind`
    returns False, the guard's event says so) and every step is snapshotted from then on.
    A model with dropout, or a loss that draws noise, is snapshotted every step.
    """

    def __init__(self, cuda_devices: Sequence[int] | None, probe_steps: int = 2,
                 recheck_every: int = 64) -> None:
        self.cuda_devices = cuda_devices
        self.always = False  # a draw was seen: snapshot every step
        self._probe, self._recheck_every = probe_steps, recheck_every
        self.snapshotting = probe_steps > 0  # whether `before` takes a snapshot
        self.countdown = recheck_every  # quiet steps left until the next recheck
        self._reference: TorchState | None = None  # the state while nothing draws

    def before(self) -> TorchState | None:
        """At the step's start: a snapshot, or None where nothing draws.

        `snapshotting` says beforehand whether this returns a snapshot, so the engine's
        hot path can skip the call (it runs every step, at cold cache)."""
        return torch_state(self.cuda_devices) if self.snapshotting else None

    def after(self, snapshot: TorchState | None) -> None:
        """At the end of a completed step, with what `before` returned."""
        if self.always:
            return
        if snapshot is not None:  # probing: did this step, or anything since, draw?
            self._probe -= 1
            now = torch_state(self.cuda_devices)
            if not (same_torch_state(snapshot, now) and (
                    self._reference is None or same_torch_state(self._reference, snapshot))):
                self.always = True
            self._reference = now
            self.snapshotting = self.always or self._probe > 0
            return
        self.countdown -= 1
        if self.countdown == 0:
            self.recheck()

    def recheck(self) -> None:
        """Compare the state with the reference now (every `recheck_every` quiet steps)."""
        self.countdown = self._recheck_every
        if not same_torch_state(self._reference, torch_state(self.cuda_devices)):
            self.always = self.snapshotting = True

    def rewind(self, snapshot: TorchState | None) -> bool:
        """Back to the step's start; False when a draw since the last check cannot be."""
        if snapshot is not None:
            restore_torch_state(snapshot)
            return True
        if same_torch_state(self._reference, torch_state(self.cuda_devices)):
            return True
        self.always = self.snapshotting = True
        return False


class StepStart:
    """What a redone step goes back to: torch's RNG (`rng`, a StepRng) and the BatchNorm
    running statistics (`buffers`, changed by every forward).

    The engine saves them itself at each step's start, on its hot path: `rng.before()`
    while `rng.snapshotting`, and one fused copy of `buffers` into `saved` (kept only
    with a guard). `restore` runs only after an out-of-memory error.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], guarded: bool) -> None:
        self.buffers = [b for m in model.modules() if has_running_stats(m)
                        for b in m.buffers(recurse=False)]
        self.saved = [b.detach().clone() for b in self.buffers] if guarded else []
        # torch's CPU generator and those of the parameters' CUDA devices
        self.rng = StepRng(sorted({p.device.index or 0 for p in params
                                   if p.device.type == "cuda"}))

    def restore(self, optimizer: torch.optim.Optimizer, snapshot: TorchState | None) -> bool:
        """Back to the state at the start of the step, with the failed attempt's memory freed;
        False when the RNG could not be rewound exactly (StepRng.rewind)."""
        optimizer.zero_grad(set_to_none=True)
        exact = self.rng.rewind(snapshot)
        if self.buffers:
            with torch.no_grad():
                foreach_copy_(self.buffers, self.saved)
        gc.collect()  # reference cycles in user code can still pin activations
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return exact
