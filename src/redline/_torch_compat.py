"""torch's private APIs, behind one door: every one redline uses, and why.

torch promises nothing about a name that starts with an underscore: a minor release may
rename it, change what it does, or remove it. Each use is here, with the behaviour it
relies on, and tests/unit/test_torch_compat.py checks that behaviour on the installed
torch, so an upgrade that breaks one fails a unit test instead of silently changing a
run (DDP's gradients above all). Public torch APIs stay where they are used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

__all__ = [
    "PYTREE_LOGGER", "TorchDispatchMode", "arm_all_reduce", "compiled_runs_eagerly",
    "dcp_metadata_globals", "default_store", "dump_memory_snapshot", "fake_tensor_mode",
    "foreach_copy_", "foreach_norm", "found_inf_given", "has_running_stats",
    "on_fsdp_storage_resize", "op_name_and_return_aliases", "plain_tensors",
    "record_memory_history", "reset_fsdp_step", "supports_found_inf", "tree_flatten",
    "tree_leaves", "tree_unflatten", "unwrap_compiled", "uses_batch_statistics",
    "view_version", "weights_only_unpickle",
]

# --- pytree: a batch of any structure (batch.py) and an op's outputs (memory/tracker.py).
# torch has no public pytree module; this one is what torch.compile, DDP and
# `register_dataclass` use, so a class a user registers there is a batch redline can
# split. Relied on: tree_flatten(tree, is_leaf=) -> (leaves, spec), tree_unflatten
# (leaves, spec) rebuilds the same structure, tree_leaves(tree) the leaves in that order.
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
tree_leaves = _pytree.tree_leaves
# fp8.py quiets this logger while torchao imports (its deprecation notices): the module's
# name, since it logs under `logging.getLogger(__name__)`.
PYTREE_LOGGER = _pytree.__name__

# --- TorchDispatchMode (imported above): the CPU memory tracker (memory/tracker.py) sees
# every aten op with its outputs, below autograd, which no public hook does. Relied on: a subclass's
# __torch_dispatch__(func, types, args, kwargs) is called for each op run while the mode
# is entered, and returning func(*args, **kwargs) runs it.


def op_name_and_return_aliases(func: Any) -> tuple[str, list[bool | None]]:
    """An aten op's schema name (`aten::add_`) and, per return, None where it is fresh
    memory, False for a read-only view of an input, True where it may be written.

    The tracker (memory/tracker.py) decides from this, once per op, whether an output can
    be a new storage. Relied on: OpOverload._schema (a FunctionSchema) with `.name` and
    `.returns[i].alias_info` (None, or an object with `.is_write`)."""
    schema = func._schema
    return schema.name, [None if r.alias_info is None else bool(r.alias_info.is_write)
                         for r in schema.returns]


def on_fsdp_storage_resize(hook: Any) -> None:
    """Call `hook(storage, old_bytes, new_bytes)` before FSDP2 resizes a gathered
    parameter's storage in place (its alloc_storage / free_storage: how it frees a block's
    unsharded parameters after use and allocates them again for the next all-gather). No
    op reports these, so the CPU memory tracker would not see them; the hook may raise (an
    out-of-memory error) to stop the allocation. Installed once per hook. Relied on:
    torch.distributed.fsdp._fully_shard._fsdp_param's module functions alloc_storage(t)
    (resize t's storage to t.numel() * t.itemsize bytes) and free_storage(t) (to 0), called
    through its globals and _fsdp_param_group's (which imports alloc_storage by name)
    (tests/unit/test_sharding_plan.py: one rank; tests/distributed/sharded_peak.py: two)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    if hook in getattr(_fsdp_param, "_redline_hooks", ()):
        return
    if not hasattr(_fsdp_param, "_redline_hooks"):
        alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage
        hooks: list[Any] = []

        def alloc_storage(tensor: torch.Tensor) -> None:
            storage, size = tensor.untyped_storage(), tensor.numel() * tensor.itemsize
            if storage.size() != size:
                for h in hooks:
                    h(storage, storage.size(), size)
            alloc(tensor)

        def free_storage(tensor: torch.Tensor) -> None:
            storage = tensor.untyped_storage()
            if storage.size():
                for h in hooks:
                    h(storage, storage.size(), 0)
            free(tensor)

        _fsdp_param._redline_hooks = hooks
        _fsdp_param.alloc_storage, _fsdp_param.free_storage = alloc_storage, free_storage
        _fsdp_param_group.alloc_storage = alloc_storage
    _fsdp_param._redline_hooks.append(hook)


@contextmanager
def compiled_runs_eagerly() -> Iterator[None]:
    """While active, a function torch.compile wrapped runs its Python eagerly instead of
    compiling (or running what it compiled before). The CPU memory tracker enters it: a
    TorchDispatchMode active while dynamo traces makes it skip the frame, and a frame
    compiled with fullgraph=True (torchao's low-bit AdamW step) then raises "found no
    compiled frames"; eagerly, every op reaches the tracker, and later untracked calls
    still compile. Relied on: torch.compiler.set_stance("force_eager") as a context
    manager, nestable, restoring the previous stance on exit (public, but the interplay
    with a dispatch mode is not promised: tests/unit/test_torch_compat.py checks it)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def plain_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data: itself, or for a tensor subclass that
    wraps others (torchao's quantized optimizer states: codes, scales, a lookup table)
    the tensors it wraps, recursively, since a wrapper's own storage holds no bytes (an
    FSDP parameter, a DTensor: this rank's shard).
    Relied on: is_traceable_wrapper_subclass, and `__tensor_flatten__()` returning the
    names of the wrapped tensor attributes first."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):  # DTensor also names its device mesh
                yield from plain_tensors(inner)
    else:
        yield tensor


def view_version(tensor: torch.Tensor) -> int | None:
    """The version counter of `tensor` if it is a view of another tensor, else None: an
    in-place change bumps it (memory/sharding.ViewWatch). Relied on: `Tensor._base` (the
    viewed tensor, None for a non-view) and `Tensor._version` (bumped by in-place ops)."""
    return None if tensor._base is None else tensor._version


def reset_fsdp_step(root: nn.Module) -> None:
    """FSDP2's state after a forward or backward that raised, as the next step needs it:
    `FSDPModule.reset_iter_state()` on the root (public: reshards every unit, waits for
    collectives in flight, clears the iteration's trackers), then the gradients the
    aborted micro-batches accumulated unsharded under set_requires_gradient_sync(False)
    dropped, which it leaves behind when they need no cast (fp32: each FSDPParam keeps
    them in `_unsharded_param.grad`; a cast keeps `unsharded_accumulated_grad`), and
    which the next synchronising backward would otherwise reduce into the redone step.
    Before the first forward there is nothing to reset (and reset_iter_state would fail on
    state FSDP builds lazily then). Relied on: `fully_shard.state(module)._is_root` (None
    until that lazy init), `._fsdp_param_groups[i].fsdp_params`, those two attributes, and
    reset_iter_state; tests/unit/test_torch_compat.py checks it."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if fully_shard.state(root)._is_root is None:  # no forward yet (FSDP inits lazily)
        return
    root.reset_iter_state()  # type: ignore[operator]
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in fully_shard.state(module)._fsdp_param_groups:
            for param in group.fsdp_params:
                param.unsharded_accumulated_grad = None
                unsharded = getattr(param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None


def fake_tensor_mode() -> Any:
    """A FakeTensorMode that makes plain tensors fake on first use (telemetry/flops.py
    counts a step's FLOPs on shapes alone, no memory). No public API builds one. Relied on:
    FakeTensorMode(allow_non_fake_inputs=True), its `from_tensor`, and entering it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


# --- Foreach kernels: one launch for a list of tensors, where a Python loop would launch
# one per tensor (the engine's per-step buffer save, the inspector's norms). Relied on:
# torch._foreach_copy_(dst, src) copies src[i] into dst[i] in place; torch._foreach_norm
# (tensors) returns the L2 norm of each.
def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) for every i, in one fused call (the engine's BatchNorm
    statistics, saved at each step's start and restored for a redo)."""
    torch._foreach_copy_(dst, src)


def foreach_norm(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The L2 norm of each tensor, in one fused call (stats.py)."""
    return tuple(torch._foreach_norm(list(tensors)))


# --- Normalisation layers. torch's BatchNorm classes (1d/2d/3d, Lazy*, SyncBatchNorm)
# share the private base _BatchNorm; those and the InstanceNorms share _NormBase, which
# holds the running statistics. Relied on: those base classes, and that a _NormBase's
# running statistics are its own buffers.
def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether `module` normalises (in training mode) with the statistics of the batch it
    sees: split into micro-batches, it sees each one's (engine/step.py says so once)."""
    return isinstance(module, _BatchNorm)


def has_running_stats(module: nn.Module) -> bool:
    """Whether `module` is a normalisation layer whose buffers (running statistics) its
    forward changes: a redone step restores them (engine/step.py)."""
    return isinstance(module, _NormBase)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped (`model` itself when it is not compiled). Relied on:
    OptimizedModule keeps the original module as `_orig_mod`."""
    return getattr(model, "_orig_mod", model)


# --- Optimizers that take an inf flag. GradScaler hands a "fused" optimizer (AdamW/Adam/
# SGD with fused=True) its inf flag instead of reading it on the host, and the fused kernel
# skips the update, step count included, on the device. The engine does the same for a
# non-finite gradient norm (train.on_nonfinite: skip) without a host read.
def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` attribute. Relied on: torch marks
    such optimizers `_step_supports_amp_scaling = True` (what GradScaler.step reads)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


@contextmanager
def found_inf_given(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> Iterator[None]:
    """While active, `optimizer.step()` skips its update where `flag` (a float32 scalar on
    the parameters' device) is nonzero. Relied on: a fused optimizer's step reads
    `self.found_inf` when present, as GradScaler.step sets it (torch/amp/grad_scaler.py)."""
    optimizer.found_inf = flag  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del optimizer.found_inf  # type: ignore[attr-defined]


# --- DistributedDataParallel's reducer.
def arm_all_reduce(model: nn.Module) -> None:
    """Make the next backward of DDP-wrapped `model` (compiled or not) all-reduce the
    gradients, after a forward that ran under `no_sync`.

    The engine runs every forward under no_sync, so a forward the ranks then abandon (an
    out-of-memory error elsewhere) leaves DDP expecting no backward; once the ranks agree,
    this does what DDP's forward does outside no_sync (its _pre_forward and _post_forward,
    torch 2.x, with find_unused_parameters=False as job/build.py wraps), after the forward
    instead. Relied on: `require_backward_grad_sync` / `require_forward_param_sync`, and
    `reducer.prepare_for_forward()` then `reducer.prepare_for_backward([])` arming
    exactly one all-reduce of every bucket in the next backward."""
    ddp = unwrap_compiled(model)
    ddp.require_backward_grad_sync = True
    ddp.require_forward_param_sync = True
    ddp.reducer.prepare_for_forward()  # type: ignore[operator]
    ddp.reducer.prepare_for_backward([])  # type: ignore[operator]


def default_store() -> Any:
    """The key-value store the default process group was set up with (torchrun's TCP
    store), or None. distributed.py publishes a failing rank's name on it, where a
    collective cannot carry it (the collective is what failed). Relied on:
    distributed_c10d._get_default_store() returning a Store with set/get/add/check."""
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no store to reach: failures are reported without naming the rank
        return None



# --- The CUDA allocator's history: an out-of-memory error at a micro-batch of 1 leaves a
# snapshot for https://pytorch.org/memory_viz (run/oom.py). Relied on:
# torch.cuda.memory._record_memory_history(enabled="all" | None) and
# torch.cuda.memory._dump_snapshot(path) writing the pickle memory_viz reads. CUDA only.
def record_memory_history(on: bool) -> None:
    """Start (or stop) recording the CUDA allocator's events and their stacks."""
    torch.cuda.memory._record_memory_history(enabled="all" if on else None)


def dump_memory_snapshot(path: str) -> None:
    """Write the recorded history and the allocator's state to `path` (a pickle)."""
    torch.cuda.memory._dump_snapshot(path)


# --- Sharded checkpoints' metadata (checkpoint_sharded.py): DCP pickles its `.metadata`
# file with plain pickle and reads it with pickle.load, which runs any global it names.
# redline reads it with torch's weights-only unpickler instead, allowing only the classes
# DCP's metadata is made of. Relied on: torch._weights_only_unpickler.load(file) honouring
# torch.serialization.safe_globals, raising pickle.UnpicklingError for any other global;
# the private names DCP pickles: filesystem._StorageInfo, metadata._MEM_FORMAT_ENCODING,
# serialization._get_layout.
def dcp_metadata_globals() -> list[Any]:
    """The globals a DCP `.metadata` pickle may name (torch 2.13's FileSystemWriter)."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    return [metadata.Metadata, metadata.MetadataIndex, metadata.StorageMeta,
            metadata.TensorProperties, metadata.TensorStorageMetadata,
            metadata.BytesStorageMetadata, metadata.ChunkStorageMetadata,
            metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo,
            torch.serialization._get_layout, torch.Size, pathlib.PosixPath,
            pathlib.WindowsPath]


def weights_only_unpickle(file: Any, allowed: list[Any]) -> Any:
    """Unpickle `file` with torch's weights-only unpickler, `allowed` added to its globals."""
    from torch import _weights_only_unpickler

    with torch.serialization.safe_globals(allowed):
        return _weights_only_unpickler.load(file)
