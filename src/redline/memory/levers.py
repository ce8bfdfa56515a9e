"""A combination of memory levers: what the memory plan chooses and the breakdown predicts.

`Levers` is the part of the `memory` config section the plan decides (activation
checkpointing, how many blocks, the optimizer's state), as one value the plan can
enumerate, predict (memory/breakdown.py), build (`updates()` into a config) and print.

Under N ranks the plan also decides how the model is spread (`strategy`: ddp keeps the
whole model on every rank; fsdp shards it, `reshard_after_forward` choosing whether each
block's gathered parameters are freed after its forward). `strategy` None: not planned
(one process, or a plan that leaves `distributed` as configured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redline.memory.config import MemoryConfig

# Bytes of AdamW state per trainable parameter element, on the device, for each
# memory.optimizer_state (two moments; the quantized kinds add one scale per block of
# 256 (8bit) or 128 (4bit) values, and 4bit's second moment is quantized the same).
# Tensors under 4096 elements keep fp32 states (torchao's rule), so a model of many small
# tensors needs more than this.
STATE_BYTES_PER_PARAM = {
    "fp32": 8.0,
    "8bit": 2.0 + 2 * 4 / 256,
    "4bit": 1.0 + 2 * 4 / 128,
    "cpu-offload": 0.0,
}

# Bytes of temporaries per element of the largest parameter while the optimizer steps it:
# torchao's low-bit step dequantizes the two moments and computes the update in float32
# (measured 24 on torch 2.13 CPU, eager as the CPU tracker runs it; a compiled step on
# CUDA fuses some away, so there it over-predicts). Fused fp32 AdamW: none measured.
STEP_BYTES_PER_ELEMENT = {"fp32": 0.0, "8bit": 24.0, "4bit": 24.0, "cpu-offload": 0.0}


@dataclass(frozen=True)
class Levers:
    """One combination: `checkpointing` none | selective | full, on the first
    `checkpointed_blocks` blocks (None: all), the optimizer's `optimizer_state`, and under
    N ranks the `strategy` (ddp | fsdp; None: not planned) with fsdp's
    `reshard_after_forward`."""

    checkpointing: str = "none"
    checkpointed_blocks: int | None = None
    optimizer_state: str = "fp32"
    strategy: str | None = None
    reshard_after_forward: bool = True

    @property
    def sharded(self) -> bool:
        """Whether the states are sharded over the ranks (fsdp)."""
        return self.strategy == "fsdp"

    @classmethod
    def of(cls, memory: MemoryConfig) -> Levers:
        """The levers `memory` sets (auto is the plan's to resolve: read as none)."""
        mode = memory.activation_checkpointing
        return cls("none" if mode == "auto" else mode,
                   memory.checkpointed_blocks, memory.optimizer_state)

    @property
    def none(self) -> bool:
        """No lever on: the step as the model is."""
        return (self.checkpointing == "none" or self.checkpointed_blocks == 0) and \
            self.optimizer_state == "fp32" and not self.sharded

    def updates(self) -> dict[str, Any]:
        """These levers as `RunConfig.updated` keys."""
        updates: dict[str, Any] = {
            "memory.activation_checkpointing": self.checkpointing,
            "memory.checkpointed_blocks": (None if self.checkpointing == "none"
                                           else self.checkpointed_blocks),
            "memory.optimizer_state": self.optimizer_state}
        if self.strategy is not None:
            updates.update({"distributed.strategy": self.strategy,
                            "distributed.reshard_after_forward": self.reshard_after_forward})
        return updates

    def describe(self, blocks: int | None = None) -> str:
        """In words, e.g. "full checkpointing of 4 of 12 blocks, 8bit optimizer state"."""
        parts = []
        if self.checkpointing != "none" and self.checkpointed_blocks != 0:
            n = self.checkpointed_blocks
            of = (f"{n} of {blocks} blocks" if n is not None and blocks is not None
                  else f"{n} blocks" if n is not None else "every block")
            parts.append(f"{self.checkpointing} checkpointing of {of}")
        if self.optimizer_state != "fp32":
            parts.append(f"{self.optimizer_state} optimizer state")
        if self.sharded:
            parts.append("fsdp" if self.reshard_after_forward
                         else "fsdp, gathered blocks kept to backward")
        lever = ", ".join(parts) or "no lever"
        return f"ddp, {lever}" if self.strategy == "ddp" else lever
