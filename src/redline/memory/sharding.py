"""FSDP2 sharding: each block, then the root, split over the ranks with `fully_shard`.

A sharded rank holds 1/N of every parameter (a `DTensor`), its gradient and its optimizer
state. Before a block's forward FSDP all-gathers the block's parameters, and frees them
after it (`reshard_after_forward`, the default) or keeps them until its backward; after
the block's backward it reduce-scatters the gradients. Sharding the blocks one by one is
what bounds the gathered memory to about one block at a time: the root's own parameters
(embeddings, a head) are gathered for the whole step.

The order is fixed, because the other order breaks silently: activation checkpointing is
installed on the blocks first (memory/checkpointing.py), then the blocks are sharded,
then the root, and only then is the optimizer built, over the sharded parameters (an
optimizer built before `fully_shard` holds the replaced, unsharded tensors and updates
nothing the model uses; accelerate #3394). job/build.py follows it; `is_sharded` tells a
model the user sharded in their own loop.

Mixed precision is FSDP's `MixedPrecisionPolicy`: for bf16-mixed and fp16-mixed the
gathered parameters are cast to the low-precision type for compute and the gradients are
reduced in fp32 (`reduce_dtype`), so the sharded fp32 master weights are what the
optimizer steps. Autocast stays on with the policy (the precision's forward_context):
the policy sets the dtype the gathered weights arrive in, autocast which ops run in it,
and it keeps the ops on its fp32 list (norms, softmax, the loss) in fp32, so a sharded
bf16-mixed step computes each op in the dtype an unsharded one does; its casts of
weights already in bf16 are no-ops. `reshard_after_forward` is a bool only: an integer
makes FSDP build a process group per module (pytorch #147179).

What composes with it (checked on torch 2.13 CPU, 2 ranks): activation checkpointing
(installed first, as above); memory.optimizer_state 8bit (torchao's AdamW8bit steps the
DTensor shards); precision.compile (the sharded root is compiled; FSDP's own hooks run
outside the graph). torchao's 4-bit AdamW fails on the shards and is refused
(job/build.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from redline._torch_compat import reset_fsdp_step, tree_leaves, view_version
from redline.memory.blocks import Block

# precision name -> the dtype FSDP casts gathered parameters to for compute
_PARAM_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2 (`fully_shard` on it or on any submodule)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters())


def plain_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's value as a plain tensor (a replicated one, like the global gradient
    norm `clip_grad_norm_` returns over sharded gradients, is already whole on every rank:
    its local tensor, no collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(tensor, DTensor):
        return tensor
    if all(isinstance(p, Replicate) for p in tensor.placements):
        return tensor.to_local()
    return tensor.full_tensor()  # a collective on the model's group, every rank calls it


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise where `optimizer` holds tensors that are not `model`'s parameters: an
    optimizer built before `fully_shard` holds the unsharded tensors the model no longer
    uses, and would step them while the model trains nothing (accelerate #3394)."""
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(
            "the optimizer holds tensors that are not the sharded model's parameters: "
            "build it after fully_shard (which replaces each parameter by its shard), "
            "e.g. torch.optim.AdamW(model.parameters()) once the model is sharded")


def shard_model(model: nn.Module, blocks: Sequence[Block], precision: str, *,
                reshard_after_forward: bool = True, mesh: object = None) -> nn.Module:
    """`fully_shard` every block, then the root (module docstring); `precision`: the
    precision policy's name (bf16-mixed and fp16-mixed set FSDP's MixedPrecisionPolicy).
    `mesh`: a 1-D DeviceMesh over the ranks (None: all of them, on the model's device).
    Returns the root, which FSDP changed in place (its class is now FSDP's subclass)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    assert isinstance(reshard_after_forward, bool), "an int would make a group per module"
    low = _PARAM_DTYPES.get(precision)
    policy = (MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
              if low is not None else MixedPrecisionPolicy())
    settings = {"mp_policy": policy, **({"mesh": mesh} if mesh is not None else {})}
    for block in blocks:
        fully_shard(block.module, reshard_after_forward=reshard_after_forward, **settings)
    # FSDP keeps the root's parameters gathered from forward to backward whatever this
    # says (they would be gathered again at once): the root's own layers are small
    fully_shard(model, reshard_after_forward=reshard_after_forward, **settings)
    return model


class ViewWatch:
    """Turns FSDP2's "returned a view tensor" warning into a check of what it warns about.

    FSDP registers its pre-backward hook (which all-gathers the unit's parameters for
    backward and queues the root's end-of-backward work) on each unit's outputs. An output
    that is a view, as `nn.Linear` returns for a 3-D input (a language model's head), loses
    that hook if it is then changed in place (`logits += bias`), and backward runs with
    the wrong parameters. FSDP warns for every view output, changed or not: nearly every
    transformer, on every run. The view itself is harmless; the in-place change is not.
    So the warning is silenced and each view output's version counter is kept: `check()`,
    after the loss, raises where one was changed in place. A forward hook per unit and one
    integer read per view output: no device work.
    """

    def __init__(self, model: nn.Module) -> None:
        import warnings

        from torch.distributed.fsdp import FSDPModule

        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
        self._seen: list[tuple[torch.Tensor, int, str]] = []
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()
                         if isinstance(m, FSDPModule)]

    @torch.compiler.disable  # host-side bookkeeping: never traced into a graph
    def _hook(self, module: nn.Module, args: object, output: object) -> None:
        if not torch.is_grad_enabled():  # evaluation: no backward, no hook to lose
            return
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                version = view_version(t)
                if version is not None:
                    self._seen.append((t, version, type(module).__name__))

    def check(self) -> None:
        """Raise if a unit's view output was changed in place since its forward."""
        seen, self._seen = self._seen, []
        for t, version, name in seen:
            if view_version(t) != version:
                raise RuntimeError(
                    f"an output of the FSDP-sharded {name} was changed in place (e.g. "
                    "`out += y`): it is a view, so FSDP's pre-backward hook is lost and its "
                    "gradients would be wrong; use an out-of-place op (`out = out + y`) or "
                    "`.clone()` the output first")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class UnitBoundaries:
    """Calls `at_boundary()` at each FSDP unit's forward and backward start, before FSDP's
    own hooks there issue the unit's all-gather (and, in backward, the prefetch of the
    next unit's): the OOM guard's agreement point under sharding (engine/ranks.py).

    Forward: a forward pre-hook registered with prepend=True after fully_shard's own
    (which is prepended too) runs first. Backward: FSDP's pre-backward is a tensor hook it
    puts on each unit's outputs in its forward hook; a forward hook of ours prepended to
    it puts our tensor hook there first, and a tensor's hooks run in the order they were
    registered. Activation checkpointing's recomputed forward passes the forward
    boundaries again, on every rank alike. Every rank thus passes the same boundaries in
    the same order, and between two of them runs no collective but the unit's own
    (issued after the boundary), so a rank that failed in between is heard from, by the
    others, at their next boundary.
    """

    def __init__(self, model: nn.Module, at_boundary: Callable[[], None]) -> None:
        from torch.distributed.fsdp import FSDPModule

        self._at = at_boundary
        self._handles = []
        for m in model.modules():
            if isinstance(m, FSDPModule):
                self._handles += [m.register_forward_pre_hook(self._pre, prepend=True),
                                  m.register_forward_hook(self._post, prepend=True)]

    @torch.compiler.disable  # host-side bookkeeping: never traced into a graph
    def _pre(self, module: nn.Module, args: object) -> None:
        self._at()

    @torch.compiler.disable  # host-side bookkeeping: never traced into a graph
    def _post(self, module: nn.Module, args: object, output: object) -> None:
        if not torch.is_grad_enabled():
            return
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._pre_backward)

    @torch.compiler.disable  # host-side bookkeeping: never traced into a graph
    def _pre_backward(self, grad: torch.Tensor) -> None:
        self._at()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def reset_after_abort(model: nn.Module) -> None:
    """FSDP's state after a forward or backward that raised (an out-of-memory error, or a
    peer's): every unit resharded, no collective pending, the accumulated unsharded
    gradients dropped (_torch_compat.reset_fsdp_step), so the step can be redone."""
    from torch.distributed.fsdp import FSDPModule

    root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)
    if root is not None:
        reset_fsdp_step(root)


class CollectiveClock:
    """Seconds this rank spent in FSDP's all-gathers and reduce-scatters, so far: the
    step's communication, as telemetry shows it per rank (`comm_pct`, ranks.jsonl).

    Measured around each collective, with FSDP's public custom-comm hooks
    (`set_custom_all_gather`, `set_custom_reduce_scatter`) running the same calls its
    defaults run. On a CPU (gloo) FSDP issues them synchronously, so the time around the
    call is the collective's; on a GPU they run on FSDP's own streams and the host only
    launches them, so the clock is installed on CPU meshes only (job/build.py).
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def install(self, model: nn.Module) -> CollectiveClock:
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_custom_all_gather(_TimedComm(self, "all_gather"))  # type: ignore[arg-type]
                m.set_custom_reduce_scatter(_TimedComm(self, "reduce_scatter"))  # type: ignore[arg-type]
        return self


class _TimedComm:
    """FSDP's default all-gather or reduce-scatter (torch 2.13's DefaultAllGather and
    DefaultReduceScatter: a plain buffer, then the `*_single` collective), timed."""

    def __init__(self, clock: CollectiveClock, kind: str) -> None:
        self.clock, self.kind = clock, kind

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device
                 ) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any,
                 op: Any = None, async_op: bool = False) -> Any:
        import torch.distributed as dist

        t = time.perf_counter()
        try:
            if self.kind == "all_gather":
                return dist.all_gather_single(output_tensor, input_tensor, group=group,
                                              async_op=async_op)
            return dist.reduce_scatter_single(output=output_tensor, input=input_tensor,
                                              group=group, op=op, async_op=async_op)
        finally:
            self.clock.seconds += time.perf_counter() - t
