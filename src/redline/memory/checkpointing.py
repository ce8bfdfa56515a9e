"""Activation checkpointing per block: keep less of the forward, recompute it in backward.

A block (memory/blocks.py) normally keeps every tensor its backward needs until backward
reaches it, so a step's activation memory is the sum over blocks. Checkpointing a block
runs its forward under `torch.utils.checkpoint` (non-reentrant):

- full: the block keeps only its inputs; backward runs its forward again first (one more
  forward of the block: about a third more compute for the block).
- selective: the block keeps the outputs of its matmuls and attention (the expensive ops)
  and recomputes the rest (norms, activations, elementwise ops: cheap to redo, and
  together often half the bytes), through `create_selective_checkpoint_contexts`.

Non-reentrant checkpointing is an autograd feature, not a change to the model: the
parameters, their names and the state_dict are the model's own (a checkpoint saved with
any mode loads with any other), and it composes with what redline does around a step: the
OOM guard's redo (a failed attempt's saved tensors go with its graph), the non-finite
skip, fp8's converted Linears, and `torch.compile`. RNG: the recompute replays the
forward's random draws (`preserve_rng_state`), so dropout masks match and the gradient is
the one without checkpointing.

State a forward changes is the exception: a BatchNorm in training mode updates its running
mean, variance and batch count on every forward, so the recompute would count each batch
twice (measured: running_mean moved by twice the momentum, num_batches_tracked 2 per step).
The recompute therefore puts the block's BatchNorm statistics back as the forward left
them (a copy of two vectors and a count per BatchNorm; the recompute's output is the
forward's, since training normalises by the batch's own statistics): updated once. Under
`torch.compile` the compiler recomputes from its traced graph, whose buffer updates happen
once, and takes only dispatch-mode contexts, so there the recompute runs as traced.

`Checkpointing` installs itself once on the blocks (an instance-level `forward` that
dispatches on the current mode) and can be switched in place: the memory breakdown
measures each mode on one built model, and the plan's `checkpointed_blocks` checkpoints
only the first N blocks. Without grad (evaluation, `torch.no_grad`) a block runs plainly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from redline.memory.blocks import Block

MODES = ("none", "selective", "full")

# What selective checkpointing keeps: the matmul-like ops (their recompute is the cost
# worth avoiding). Looked up by name, since some exist only in some builds.
_SAVED_NAMES = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_mm",
                "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention")
SAVED_OPS = frozenset(getattr(torch.ops.aten, n) for n in _SAVED_NAMES
                      if hasattr(torch.ops.aten, n))


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)
    return (CheckpointPolicy.MUST_SAVE if packet in SAVED_OPS
            else CheckpointPolicy.PREFER_RECOMPUTE)


class _CompileNotice(logging.Filter):
    """torch logs, once per process, that a checkpoint under torch.compile was given a
    context_fn and should hold no in-place ops. Said of this module's selective policy it is
    noise a user cannot act on: with in-place ops in a block (relu_ on a saved matmul output,
    add_) the compiled gradient equals the eager one (checked on torch 2.13), and the
    checkpointing tests compare compiled against eager. REDLINE_VERBOSE=1 keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


if os.environ.get("REDLINE_VERBOSE", "").strip() in ("", "0"):
    logging.getLogger("torch._higher_order_ops.wrap").addFilter(_CompileNotice())


def _selective_context() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_policy)


@contextlib.contextmanager
def _statistics_kept(norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Whatever `norms` do to their running statistics inside is undone on the way out."""
    kept = [[b.clone() for b in _statistics(norm)] for norm in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, saved in zip(norms, kept, strict=True):
                for buffer, value in zip(_statistics(norm), saved, strict=True):
                    buffer.copy_(value)


def _statistics(norm: nn.modules.batchnorm._BatchNorm) -> list[torch.Tensor]:
    return [b for b in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
            if b is not None]


def _contexts_keeping_statistics(norms: Sequence[nn.modules.batchnorm._BatchNorm],
                                 selective: bool) -> tuple[Any, Any]:
    """Checkpoint contexts (selective or not) whose recompute leaves `norms`' statistics
    as the forward left them."""
    forward, recompute = (_selective_context() if selective
                          else (contextlib.nullcontext(), contextlib.nullcontext()))

    @contextlib.contextmanager
    def both() -> Iterator[None]:
        with _statistics_kept(norms), recompute:
            yield

    return forward, both()


class Checkpointing:
    """Checkpointing installed on `blocks`, in `mode` on the first `count` of them (None:
    all). `set` switches both in place; `remove` restores the blocks' own forward."""

    def __init__(self, blocks: Sequence[Block], mode: str = "none",
                 count: int | None = None) -> None:
        self.blocks = list(blocks)
        self.mode, self.count = "none", None
        self._installed: list[Block] = []
        # per block: the BatchNorms whose running statistics the recompute must not update
        self._norms = [[m for m in block.module.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        and m.track_running_stats] for block in self.blocks]
        for index, block in enumerate(self.blocks):
            module = block.module
            assert "forward" not in vars(module), f"block {block.name} already wrapped"
            module.forward = functools.partial(self._forward, index,  # type: ignore[method-assign]
                                               module.forward)
            self._installed.append(block)
        self.set(mode, count)

    def set(self, mode: str, count: int | None = None) -> None:
        """Checkpoint the first `count` blocks (None: all) in `mode` (none|selective|full)."""
        if mode not in MODES:
            raise ValueError(f"checkpointing mode must be one of {', '.join(MODES)}, "
                             f"got {mode!r}")
        if count is not None and count < 0:
            raise ValueError(f"the number of checkpointed blocks must be >= 0, got {count}")
        self.mode, self.count = mode, count

    @property
    def checkpointed(self) -> int:
        """How many blocks are checkpointed now."""
        if self.mode == "none":
            return 0
        return len(self.blocks) if self.count is None else min(self.count, len(self.blocks))

    def mode_of(self, index: int) -> str:
        """The mode block `index` runs in."""
        return self.mode if index < self.checkpointed else "none"

    def remove(self) -> None:
        """The blocks' own forward back."""
        for block in self._installed:
            del block.module.forward
        self._installed = []

    def _forward(self, index: int, forward: Callable[..., Any], *args: Any,
                 **kwargs: Any) -> Any:
        mode = self.mode_of(index)
        if mode == "none" or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        norms = self._norms[index]
        if norms and not torch.compiler.is_compiling():
            context: Callable[[], tuple[Any, Any]] = functools.partial(
                _contexts_keeping_statistics, norms, mode == "selective")
            return checkpoint(forward, *args, use_reentrant=False, context_fn=context,
                              **kwargs)
        if mode == "full":
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=_selective_context, **kwargs)
