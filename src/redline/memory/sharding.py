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
optimizer steps. `reshard_after_forward` is a bool only: an integer makes FSDP build a
process group per module (pytorch #147179).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from redline._torch_compat import tree_leaves, view_version
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

    def _hook(self, module: nn.Module, args: object, output: object) -> None:
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
