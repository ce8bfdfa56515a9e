"""The `memory` section: the budget a run fills and how it survives running out."""

from __future__ import annotations

from dataclasses import dataclass

from redline.errors import ConfigError, require
from redline.memory.sizes import parse_size


@dataclass(frozen=True)
class MemoryConfig:
    """What `batch_size: auto` fills and what the OOM guard does."""

    budget: int | str | None = None
    """A size like 2GiB. On CPU a tracked budget that raises a real OutOfMemoryError (every
    op tracked, slower); on CUDA a cap below the device's memory. null: the device's memory
    (on CPU: the memory available when the run starts, see memory/probe.py)."""
    target: float = 0.85
    """Share of the budget that `batch_size: auto` fills."""
    oom_guard: bool = True
    """Redo a step with smaller micro-batches after an out-of-memory error."""
    grow_after: int = 100
    """Clean steps before the guard tries a larger micro-batch again; 0: never."""

    def __post_init__(self) -> None:
        try:
            parse_size(self.budget, name="memory.budget")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        require(0 < self.target <= 1, "memory.target", self.target,
                "a fraction in (0, 1], e.g. 0.85")
        require(self.grow_after >= 0, "memory.grow_after", self.grow_after,
                ">= 0 (0: never grow back)")

    @property
    def budget_bytes(self) -> int | None:
        return parse_size(self.budget, name="memory.budget")
