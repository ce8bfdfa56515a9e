"""Where a training step's memory goes, by category, and what each lever would change.

At the steady state (step 2 on: AdamW allocates its state at the first `optimizer.step()`,
so a first step's peak misses it) a step's peak is

    peak = parameters + gradients + optimizer state + activations(micro-batch, levers)
           + recompute + temporaries

- parameters, gradients, optimizer state: the bytes of their tensors (a low-bit state's
  tensor subclass counted by its inner tensors).
- activations: what each block's forward leaves alive for backward (its output included),
  measured per block as the bytes alive after its forward minus before (a block's output
  is counted once, in the block that made it, however many later blocks keep it), in
  each checkpointing mode; the rest of the forward (embeddings, the head, the loss) is
  `other_activations`. They scale linearly with the micro-batch.
- recompute: a checkpointed block's backward runs its forward again, so for a moment it
  holds its unchecked activations, while the blocks after it have freed theirs (the
  worst such moment counts, beyond what the forward kept).
- the optimizer step: a low-bit optimizer's step dequantizes one parameter's two moments
  at a time into float32 temporaries (STEP_BYTES_PER_ELEMENT of the largest parameter),
  with every gradient alive: for a model whose states dominate, that moment is the peak,
  so `predict` takes the larger of it and the forward/backward's.
- temporaries: the measured peak minus all of the above. Positive: scratch of the backward
  (gradients of the logits, attention's backward). Negative: what does not coexist at the
  peak (the gradients grow while the activations are freed). They are partly per sample
  and partly not, so a second step at twice the micro-batch is measured where the data
  allows, and they follow the line through the two (`temporaries_per_sample`); scaling
  them like the activations under-predicted a GPT's full-checkpointing step at
  micro-batch 8 by 26 % (bench/levers.py), where negative temporaries grew with it.

`Breakdown.predict` adds these up for any levers (memory/levers.py) at any micro-batch; a
state kind other than the measured one is predicted from the trainable elements
(`STATE_BYTES_PER_PARAM`).

Sharded over N ranks (`world_size`, levers with strategy fsdp: memory/sharding.py), a
rank holds params/N, grads/N and optimizer state/N, and besides, at the backward's peak:
the root's own parameters gathered (FSDP never reshards the root after forward) and its
unsharded gradients (reduce-scattered when the root's backward ends, so alive through
it); with reshard_after_forward (one block gathered at a time) three of the largest
block: its gathered parameters, its unsharded gradient and the reduce-scatter's flat copy
of that gradient (or the next block's parameters, gathered early: backward prefetches);
without it every block's gathered parameters (kept from forward to backward) and one
block's unsharded gradient. Gathered parameters take `gather_scale` of their stored bytes
(0.5 under bf16-mixed / fp16-mixed: FSDP gathers them in the low precision); gradients
are counted at their stored (fp32, reduce_dtype) bytes. The activations are per rank as
measured (the micro-batch is per rank); negative temporaries (what did not coexist at
the peak, mostly gradients) shrink with the sharded gradients, by N. Measured on 2 gloo
ranks (torch 2.13 CPU, FSDP's storage resizes counted; docs/memory.md), this came within
+0.4 % / +3 % (reshard) and +9 % / +0.3 % (kept) of WideMLP's / MemGPT's real per-rank
peaks. Under ddp a rank holds everything, as one process (DDP's buckets are the
gradients' own storage: gradient_as_bucket_view).

The measurement itself lives above (job/memory.py), since it steps a built job;
`measure_activations` here is the device-independent part: forward passes over a
callable, with hooks at the block boundaries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redline.memory.blocks import Block
from redline.memory.levers import STATE_BYTES_PER_PARAM, STEP_BYTES_PER_ELEMENT, Levers
from redline.memory.sizes import format_size, live_tensor_bytes

MODES = ("none", "selective", "full")
MEMORY_FILE = "memory.json"  # RUN_DIR/memory.json: the breakdown at an OOM (run/oom.py)


@dataclass
class BlockActivations:
    """Bytes one block keeps for backward at `Breakdown.micro_batch`, in each mode."""

    name: str
    none: int
    selective: int
    full: int

    def of(self, mode: str) -> int:
        return int(getattr(self, mode))


@dataclass
class Breakdown:
    """A step's steady-state memory by category (module docstring), measured at `micro_batch`
    with `levers` (the job's own)."""

    micro_batch: int
    parameters: int
    gradients: int
    optimizer_state: int
    optimizer_state_kind: str
    trainable_elements: int
    blocks: list[BlockActivations]
    other_activations: int
    temporaries: int
    peak: int
    source: str
    levers: Levers = field(default_factory=Levers)  # what the measured step ran with
    measured_activations: bool = True  # False: predicted from sizes, activations unknown
    notes: list[str] = field(default_factory=list)
    largest_parameter: int = 0  # elements of the largest trainable tensor (step_peak)
    # bytes of temporaries per sample, from a second step at twice the micro-batch (None:
    # not measured, the temporaries scale with the micro-batch like the activations)
    temporaries_per_sample: float | None = None
    # the samples of one optimizer step the prediction is for: a micro-batch below it
    # accumulates (None: each step one micro-batch, as measured)
    samples_per_step: int | None = None
    # bytes of each FSDP unit's own parameters as stored (the blocks, in order; what is
    # left of `parameters` is the root's): what a sharded rank gathers
    block_parameters: list[int] = field(default_factory=list)
    gather_scale: float = 1.0  # gathered bytes per stored byte (0.5: bf16/fp16-mixed)
    world_size: int = 1  # the ranks a sharded prediction (strategy fsdp) divides among

    # ---- prediction ----------------------------------------------------------------------

    def state_bytes(self, kind: str) -> int:
        """The optimizer's state in `kind`: as measured, or predicted from the elements."""
        if kind == self.optimizer_state_kind:
            return self.optimizer_state
        return int(STATE_BYTES_PER_PARAM[kind] * self.trainable_elements)

    def activations(self, levers: Levers, micro_batch: int | None = None) -> int:
        """Bytes kept for backward with `levers` at `micro_batch` (default: the measured)."""
        kept = self.other_activations + sum(
            b.of(self._mode(levers, i)) for i, b in enumerate(self.blocks))
        return self._scale(kept, micro_batch)

    def recompute(self, levers: Levers, micro_batch: int | None = None) -> int:
        """The transient of re-running a checkpointed block's forward in backward: when
        backward reaches checkpointed block i, the blocks after it have freed theirs, and
        block i holds its unchecked activations again; the worst such moment beyond what
        the forward kept."""
        kept = [b.of(self._mode(levers, i)) for i, b in enumerate(self.blocks)]
        total, worst, before = sum(kept), 0, 0
        for i, b in enumerate(self.blocks):
            before += kept[i]
            if self._mode(levers, i) != "none":
                worst = max(worst, before + b.none - kept[i] - total)
        return self._scale(max(0, worst), micro_batch)

    def predict(self, levers: Levers, micro_batch: int) -> int:
        """The steady-state peak predicted with `levers` at `micro_batch` (module docstring):
        the larger of the forward/backward's and the optimizer step's."""
        return max(self.backward_peak(levers, micro_batch),
                   self.step_peak(levers.optimizer_state, self.divides(levers)))

    def backward_peak(self, levers: Levers, micro_batch: int) -> int:
        """The forward/backward's peak: every category, activations at `micro_batch`; a
        sharded rank's (module docstring) where `levers` shard."""
        temporaries = self._accumulated(self.temporaries_at(micro_batch), micro_batch)
        if self.divides(levers) and temporaries < 0:
            temporaries = -self._per_rank(-temporaries)
        return (self.states(levers) + self.gathered(levers)
                + self.activations(levers, micro_batch) + self.recompute(levers, micro_batch)
                + temporaries)

    def divides(self, levers: Levers) -> bool:
        """Whether `levers` shard the states over more than one rank."""
        return levers.sharded and self.world_size > 1

    def states(self, levers: Levers) -> int:
        """Parameters, gradients and optimizer state one rank holds with `levers`."""
        total = self.parameters + self.gradients + self.state_bytes(levers.optimizer_state)
        return self._per_rank(total) if self.divides(levers) else total

    @property
    def root_parameters(self) -> int:
        """Bytes of the parameters in no block: the root FSDP unit's own."""
        return max(0, self.parameters - sum(self.block_parameters))

    def gathered(self, levers: Levers) -> int:
        """What a sharded rank holds unsharded at the backward's peak (module docstring):
        the root's parameters and gradients; the largest block's parameters, gradient and
        its reduce-scatter copy (without reshard_after_forward: every block's parameters
        and one block's gradient); 0 unsharded."""
        if not self.divides(levers):
            return 0
        blocks, root = self.block_parameters, self.root_parameters
        largest = max(blocks, default=0)
        if levers.reshard_after_forward:
            held, grads = largest, 2 * self._grad_of(largest)
        else:
            held, grads = sum(blocks), self._grad_of(largest)
        return int(self.gather_scale * (root + held)) + self._grad_of(root) + grads

    def _grad_of(self, parameter_bytes: int) -> int:
        """The gradient bytes of parameters of `parameter_bytes` (frozen ones have none)."""
        return round(parameter_bytes * self.gradients / max(1, self.parameters))

    def _per_rank(self, total: int) -> int:
        return -(-int(total) // self.world_size)

    def _accumulated(self, temporaries: int, micro_batch: int) -> int:
        """Negative temporaries are what does not coexist at a whole batch's peak (the
        gradients, made while backward frees the activations); under accumulation the
        earlier micro-batches' gradients are alive through the next forward, so they all
        coexist (bench/levers.py: predictions at micro-batch 1 of 8 were short by exactly
        the gradients)."""
        if self.samples_per_step is not None and micro_batch < self.samples_per_step:
            return max(0, temporaries)
        return temporaries

    def temporaries_at(self, micro_batch: int) -> int:
        """The temporaries at `micro_batch`: on the line through the two micro-batches
        measured where a second was (`temporaries_per_sample`), else scaled with it."""
        if self.temporaries_per_sample is None:
            return self._scale(self.temporaries, micro_batch)
        return int(self.temporaries
                   + self.temporaries_per_sample * (micro_batch - self.micro_batch))

    def step_peak(self, kind: str, sharded: bool = False) -> int:
        """The optimizer step's peak: the model states, and the step's own temporaries for
        state `kind` (a low-bit step dequantizes one parameter's moments at a time:
        STEP_BYTES_PER_ELEMENT of its largest parameter); `sharded`: a rank's share of
        them over `world_size` ranks."""
        step = int(STEP_BYTES_PER_ELEMENT.get(kind, 0.0) * self.largest_parameter)
        total = self.parameters + self.gradients + self.state_bytes(kind)
        if sharded and self.world_size > 1:  # each rank steps its shards only
            return self._per_rank(total) + self._per_rank(step)
        return total + step

    def fewest_blocks(self, levers: Levers, micro_batch: int, limit: int) -> int | None:
        """The fewest first blocks to checkpoint in `levers.checkpointing` for predict() to be
        at most `limit` at `micro_batch`; None when even every block is not enough."""
        n = len(self.blocks)
        for count in range(n + 1):
            trial = dataclasses.replace(levers, checkpointed_blocks=count)
            if self.predict(trial, micro_batch) <= limit:
                return count
        return None

    def _mode(self, levers: Levers, index: int) -> str:
        count = levers.checkpointed_blocks
        if levers.checkpointing == "none" or (count is not None and index >= count):
            return "none"
        return levers.checkpointing

    def _scale(self, value: int, micro_batch: int | None) -> int:
        if micro_batch is None or micro_batch == self.micro_batch:
            return int(value)
        return round(value * micro_batch / self.micro_batch)

    # ---- rendering -----------------------------------------------------------------------

    def rows(self) -> list[tuple[str, int]]:
        """(category, bytes) at the measured levers and micro-batch; they sum to `peak`."""
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                (f"optimizer state ({self.optimizer_state_kind})", self.optimizer_state)]
        for i, b in enumerate(self.blocks):
            rows.append((f"activations {b.name}", b.of(self._mode(self.levers, i))))
        rows.append(("activations, other", self.other_activations))
        recompute = self.recompute(self.levers)
        if recompute:
            rows.append(("recompute (one block)", recompute))
        rows.append(("temporaries", self.temporaries))
        return rows

    def render(self, budget: int | None = None) -> str:
        """The table a person reads: each category, its share of the peak, the peak (and its
        share of `budget`)."""
        peak = max(self.peak, 1)
        rows = self.rows()
        if len(self.blocks) > 8:  # many blocks: one line for them all
            acts = sum(b for name, b in rows if name.startswith("activations ")
                       and name != "activations, other")
            rows = [r for r in rows if not (r[0].startswith("activations ")
                                            and r[0] != "activations, other")]
            rows.insert(3, (f"activations, {len(self.blocks)} blocks", acts))
        width = max(len(name) for name, _ in rows)
        lines = [f"at micro-batch {self.micro_batch}, steady state ({self.source}); "
                 f"levers: {self.levers.describe(len(self.blocks))}"]
        for name, size in rows:
            lines.append(f"  {name:<{width}}  {format_size(size):>10}  {size / peak:6.1%}")
        of = f" of {format_size(budget)} budget ({self.peak / budget:.0%})" if budget else ""
        lines.append(f"  {'peak':<{width}}  {format_size(self.peak):>10}{of}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["levers"] = asdict(self.levers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Breakdown:
        d = dict(d)
        d["blocks"] = [BlockActivations(**b) for b in d.get("blocks", [])]
        d["levers"] = Levers(**d.get("levers", {}))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def tensor_bytes(tensors: Sequence[Any]) -> int:
    """Bytes of the unique storages behind `tensors` (nested lists/dicts allowed); a tensor
    subclass that flattens (`__tensor_flatten__`, e.g. torchao's low-bit optimizer states)
    is counted by its inner tensors (sizes.live_tensor_bytes)."""
    return live_tensor_bytes(list(tensors))


@dataclass
class ForwardActivations:
    """One forward pass's kept bytes: per block, and the rest."""

    blocks: list[int]
    other: int


def measure_activations(forward: Callable[[], Any], blocks: Sequence[Block],
                        current: Callable[[], int]) -> ForwardActivations:
    """Run `forward` (returns what keeps the graph alive, e.g. the loss) once and read
    `current()` (bytes alive now) before and after each block's forward: a block keeps what
    its forward left alive. Everything else kept is `other`. The graph is dropped after."""
    before: dict[int, int] = {}
    kept = [0] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):
        def pre(_m: Any, _a: Any, i: int = i) -> None:
            before[i] = current()

        def post(_m: Any, _a: Any, _o: Any, i: int = i) -> None:
            kept[i] += current() - before.pop(i)

        handles.append(block.module.register_forward_pre_hook(pre))
        handles.append(block.module.register_forward_hook(post))
    try:
        start = current()
        out = forward()
        total = current() - start
    finally:
        for h in handles:
            h.remove()
    del out
    return ForwardActivations(kept, total - sum(kept))


# The levers tried for "would fit with", cheapest in step time first (docs/memory.md:
# low-bit state costs a few percent, selective checkpointing less than full).
_CANDIDATES = (("none", "8bit"), ("selective", "fp32"), ("selective", "8bit"),
               ("full", "fp32"), ("full", "8bit"), ("full", "4bit"))


def fitting_levers(b: Breakdown, micro_batch: int, limit: int,
                   state_kinds: Sequence[str] = ("fp32", "4bit")
                   ) -> list[tuple[Levers, int]]:
    """Lever combinations predicted to fit `limit` at `micro_batch`, cheapest first, with
    their predicted peaks: the fewest checkpointed blocks for each mode. `state_kinds`: the
    optimizer states that can be used (a task's own optimizer: only what it has). Over
    several ranks (`b.world_size`) the run's strategy is kept, and where it is not fsdp,
    sharding is tried after the others (alone, then with each)."""
    found = []
    ranks = b.levers.strategy
    shardings = [(ranks, b.levers.reshard_after_forward)]
    if b.world_size > 1 and not b.levers.sharded:
        shardings.append(("fsdp", True))
    for strategy, reshard in shardings:
        for mode, kind in (("none", "fp32"), *_CANDIDATES) if strategy != ranks \
                else _CANDIDATES:
            if kind not in state_kinds or (mode != "none" and not b.blocks):
                continue
            levers = Levers(mode, None, kind, strategy, reshard)
            if mode != "none":
                count = b.fewest_blocks(levers, micro_batch, limit)
                if count is None:
                    continue
                levers = dataclasses.replace(
                    levers, checkpointed_blocks=count if count < len(b.blocks) else None)
            peak = b.predict(levers, micro_batch)
            if peak <= limit:
                found.append((levers, peak))
    return found


def set_flags(levers: Levers) -> str:
    """The `--set` flags that configure `levers`, e.g.
    "--set memory.activation_checkpointing=full --set memory.checkpointed_blocks=3"."""
    flags = []
    if levers.checkpointing != "none":
        flags.append(f"--set memory.activation_checkpointing={levers.checkpointing}")
        if levers.checkpointed_blocks is not None:
            flags.append(f"--set memory.checkpointed_blocks={levers.checkpointed_blocks}")
    if levers.optimizer_state != "fp32":
        flags.append(f"--set memory.optimizer_state={levers.optimizer_state}")
    if levers.sharded:
        flags.append("--set distributed.strategy=fsdp")
        if not levers.reshard_after_forward:
            flags.append("--set distributed.reshard_after_forward=false")
    return " ".join(flags)


def fit_sentence(b: Breakdown, limit: int, micro_batch: int | None = None,
                 state_kinds: Sequence[str] = ("fp32", "4bit")) -> tuple[bool, str]:
    """(fits, in words) for the step at `micro_batch` (default: the measured) against
    `limit`: "fits: yes (72 % of the budget)", or what it needs and which levers would fit,
    with the `--set` flags of the first."""
    m = micro_batch or b.micro_batch
    # a sharded rank's peak is predicted (the measured step was one process's)
    peak = b.predict(b.levers, m) if m != b.micro_batch or b.divides(b.levers) else b.peak
    if peak <= limit:
        return True, f"fits: yes ({peak / limit:.0%} of the budget of {format_size(limit)})"
    words = f"does not fit: {format_size(peak)} of {format_size(limit)}"
    options = fitting_levers(b, m, limit, state_kinds)
    if not options:
        unknown = "" if b.measured_activations else " (activations not measured)"
        return False, f"{words}; no lever combination is predicted to fit{unknown}"
    n = len(b.blocks)
    alts = " or ".join(f"{lv.describe(n)} ({format_size(p)})" for lv, p in options[:3])
    return False, f"{words}; would fit with {alts}; e.g. {set_flags(options[0][0])}"
