"""The `memory` section: the budget a run fills, how it survives running out, and the
levers that make a model fit (activation checkpointing, low-bit optimizer states)."""

from __future__ import annotations

from dataclasses import dataclass

from redline.errors import ConfigError, require
from redline.memory.sizes import parse_size

CHECKPOINTING = ("none", "selective", "full", "auto")
OPTIMIZER_STATES = ("fp32", "8bit", "4bit", "cpu-offload")


@dataclass(frozen=True)
class MemoryConfig:
    """What `batch_size: auto` fills, what the OOM guard does, and the memory levers."""

    budget: int | str | None = None
    """A size like 2GiB. On CPU a tracked budget that raises a real OutOfMemoryError (every
    op tracked, slower); on CUDA a cap below the device's memory. null: the device's memory
    (on CPU: the memory available when the run starts, see memory/probe.py)."""
    target: float = 0.85
    """Share of the budget that `batch_size: auto` and the memory plan fill."""
    oom_guard: bool = True
    """Redo a step with smaller micro-batches after an out-of-memory error."""
    grow_after: int = 100
    """Clean steps before the guard tries a larger micro-batch again; 0: never."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward instead of keeping them, per block (the repeated
    children of the model's ModuleList/Sequential containers, or memory.checkpoint_blocks):
    none; selective (a block keeps its matmul outputs and recomputes the rest); full (a
    block keeps only its input); auto (the memory plan checkpoints the fewest blocks that
    make the step fit memory.target, and none when it fits already)."""
    checkpoint_blocks: str | None = None
    """A glob over module names (e.g. "layers.*", "encoder.blocks.*") naming the blocks to
    checkpoint, instead of finding them; null: found automatically (memory/blocks.py)."""
    checkpointed_blocks: int | None = None
    """How many of the blocks are checkpointed, the first ones in order (the plan writes
    this); null: all of them."""
    optimizer_state: str = "fp32"
    """How redline's AdamW keeps its state (memory/optimizer_state.py): fp32 (8 bytes
    per parameter); 8bit / 4bit (torchao AdamW8bit / AdamW4bit, block-quantized, about 2 /
    1 byte per parameter; the parameters drift slightly from fp32 AdamW's, see
    docs/memory.md); cpu-offload (torchao CPUOffloadOptimizer: the state and the update on
    the host; CUDA only). A task's own optimizer is kept, and any value but fp32 is then
    refused. No bf16: bf16 moments rounded to nearest stall (memory/optimizer_state.py)."""

    def __post_init__(self) -> None:
        try:
            parse_size(self.budget, name="memory.budget")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        require(0 < self.target <= 1, "memory.target", self.target,
                "a fraction in (0, 1], e.g. 0.85")
        require(self.grow_after >= 0, "memory.grow_after", self.grow_after,
                ">= 0 (0: never grow back)")
        require(self.activation_checkpointing in CHECKPOINTING,
                "memory.activation_checkpointing", self.activation_checkpointing,
                "one of " + ", ".join(CHECKPOINTING))
        require(self.optimizer_state in OPTIMIZER_STATES, "memory.optimizer_state",
                self.optimizer_state, "one of " + ", ".join(OPTIMIZER_STATES))
        require(self.checkpointed_blocks is None or (
            isinstance(self.checkpointed_blocks, int) and self.checkpointed_blocks >= 0),
            "memory.checkpointed_blocks", self.checkpointed_blocks,
            "a number of blocks >= 0, or null for all")
        require(self.checkpoint_blocks is None or (
            isinstance(self.checkpoint_blocks, str) and self.checkpoint_blocks.strip()),
            "memory.checkpoint_blocks", self.checkpoint_blocks,
            'a glob over module names such as "layers.*", or null')

    @property
    def budget_bytes(self) -> int | None:
        return parse_size(self.budget, name="memory.budget")

    @property
    def levers(self) -> bool:
        """Whether any memory lever is on (or left to the plan: auto)."""
        return self.activation_checkpointing != "none" or self.optimizer_state != "fp32"
