"""The CPU storage tracker: live tensor bytes and their peak, and a budget that raises OOM.

CPU has nothing comparable, so `MemoryTracker` counts for itself: a TorchDispatchMode sees
every aten op (forward, backward, optimizer) after autograd has decomposed it, and adds
the bytes of each *new* storage among the op's outputs.

The hard part is knowing when a storage dies, since most storages are only ever held by
C++ (autograd's saved tensors, a view's base) and never by a Python name. PyTorch
preserves a storage's Python object for as long as its C++ StorageImpl lives: once
`untyped_storage()` has created it, the object is owned by the StorageImpl when Python
drops it and is deallocated exactly when the StorageImpl is (verified on torch 2.13:
same `id` on every call, a weakref callback fires on the last view's deletion, and on a
tensor saved for backward only when backward frees the graph). So a weakref callback on
the storage object is a free notification, and `id(storage)` is a stable key while it
lives (the callback removes the key before the address can be reused).

What counts as new: an op whose schema says no return aliases an input returns fresh
storages. A view op returns an input's storage: known (tracked already) or older than the
tracker (part of the baseline), so never new. In-place and `out=` ops may grow a storage
(`resize_`): for those the inputs' storage sizes are read before the op and only the growth
counts. Bytes a kernel allocates and frees internally (scratch space) are not seen.

FSDP2 frees a block's gathered parameters by resizing their storage to 0 and allocates
them again by resizing it back, in place, outside any op: the trackers entered on the
thread hear of each resize (`_torch_compat.on_fsdp_storage_resize`), count it like an
op's growth or a free, and a budget refuses a growth past it as it refuses an op's.

Code that torch.compile wrapped runs eagerly while the tracker is entered: dynamo skips
a frame it meets under a dispatch mode (and stays skipped), and one compiled with
fullgraph=True, like torchao's low-bit AdamW step, raises instead. Run eagerly, its ops
are seen and counted; untracked calls later compile as before. The same holds for a
torch.compile'd model's forward.

Finalizers may run at any point: inside an op, during garbage collection in the middle of
our own bookkeeping, or on another thread. So a callback never touches a counter; it
only unlinks its key and appends its ref to a deque (one atomic C call each), and the
counters are settled under a lock by whoever next reads them.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from typing import Any

import torch

from redline._torch_compat import (
    TorchDispatchMode,
    compiled_runs_eagerly,
    on_fsdp_storage_resize,
    op_name_and_return_aliases,
    plain_tensors,
    tree_leaves,
)
from redline.memory.sizes import format_size


class _StorageRef(weakref.ref):  # type: ignore[type-arg]
    """A weakref to a tracked storage object that remembers what the tracker counted for it."""

    __slots__ = ("key", "nbytes", "size")
    key: int     # id() of the storage object while it lives
    nbytes: int  # bytes this storage contributes to the tracker (0 after a re-base)
    size: int    # the storage's nbytes() when last seen, to notice growth


# Per op: 0 = every return is fresh; 1 = every return is a read-only view of an input;
# 2 = something may be written or resized (in-place, out=, set_) or returns are mixed.
_FRESH, _VIEW, _MUTATING = 0, 1, 2
_OP_KIND: dict[Any, int] = {}
# Ops whose schema claims fresh returns that in fact alias an input (the list torch's own
# SchemaCheckMode exempts): checked against their inputs like a mutating op.
_UNANNOTATED_ALIASES = {
    "aten::_unsafe_view", "aten::unsafe_split", "aten::unsafe_split_with_sizes",
}


def _op_kind(func: Any) -> int:
    kind = _OP_KIND.get(func)
    if kind is None:
        name, returns = op_name_and_return_aliases(func)
        if name in _UNANNOTATED_ALIASES:
            kind = _MUTATING
        elif all(a is None for a in returns):
            kind = _FRESH
        elif all(a is False for a in returns):
            kind = _VIEW
        else:
            kind = _MUTATING
        _OP_KIND[func] = kind
    return kind


def _storage_of(obj: Any) -> torch.UntypedStorage | None:
    """The CPU storage behind a tensor output, or None for what the tracker does not count."""
    if not isinstance(obj, torch.Tensor) or not obj.is_cpu or obj.layout is not torch.strided:
        return None  # meta, CUDA and other devices, sparse and mkldnn layouts: not CPU bytes
    return obj.untyped_storage()


def _storages_of(obj: Any) -> list[torch.UntypedStorage]:
    """The CPU storages holding a tensor output's bytes: its own, or for a wrapper subclass
    (a DTensor: this rank's shard) the tensors it wraps, whose wrapper's own storage holds
    none (counting it counted a sharded tensor at its global size)."""
    if type(obj) is torch.Tensor or not isinstance(obj, torch.Tensor):
        s = _storage_of(obj)
        return [s] if s is not None else []
    return [s for t in plain_tensors(obj) if (s := _storage_of(t)) is not None]


def _input_sizes(args: Any, kwargs: Any) -> dict[int, int]:
    # Aten arguments are flat (tensors, storages, scalars, lists of those): a plain walk is
    # ~10x cheaper than pytree on this per-op path.
    sizes: dict[int, int] = {}
    for arg in (*args, *kwargs.values()):
        for leaf in arg if isinstance(arg, (list, tuple)) else (arg,):
            for s in [leaf] if isinstance(leaf, torch.UntypedStorage) else _storages_of(leaf):
                sizes[id(s)] = s.nbytes()  # (a storage: set_)
    return sizes


class _Entered(threading.local):
    def __init__(self) -> None:
        self.trackers: list[MemoryTracker] = []  # entered on this thread, innermost last


_entered = _Entered()


def _on_resize(storage: torch.UntypedStorage, old: int, new: int) -> None:
    """FSDP resized `storage` in place (module docstring): every tracker entered here counts
    it (a budget's may raise before the growth happens)."""
    if torch.distributed.is_available() and _entered.trackers:
        for tracker in list(_entered.trackers):
            tracker._resized(storage, old, new)


class MemoryTracker(TorchDispatchMode):
    """CPU: counts the bytes of live tensor storages allocated while active, and their peak.

    `current` is `baseline` plus the bytes of storages allocated inside (and still alive,
    whether or not the tracker is still entered). Storages that existed before it are the
    caller's `baseline`; their frees are not seen. With `budget` set, an op whose new
    storages would take `current` past it has its outputs dropped and raises a genuine
    `torch.OutOfMemoryError` worded like the CPU allocator's own error, so every tool that
    recognises a real OOM recognises this one. Tracking costs ~1.4-2x step time (more for
    many small ops): use it for probes and budget emulation, not on every step of a real
    run. Enter it per thread with `with tracker:`; nested entries count, they do not stack.
    """

    def __init__(self, budget: int | None = None, baseline: int = 0) -> None:
        super().__init__()
        if budget is not None and budget <= 0:
            raise ValueError(f"memory budget must be a positive number of bytes, got {budget!r}")
        self.budget = budget
        self._baseline = int(baseline)
        self._live = 0  # bytes of tracked storages, settled under _lock
        self._peak = self._baseline
        self._refs: dict[int, _StorageRef] = {}
        self._freed: deque[_StorageRef] = deque()  # appended by finalizers, drained under lock
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread entry depth: the mode stack is per thread
        self._callback = self._on_free  # one bound method for every ref, not one per storage

    # ---- counters -------------------------------------------------------------------------

    @property
    def current(self) -> int:
        """Baseline plus the bytes of live tracked storages."""
        with self._lock:
            self._drain()
            return self._baseline + self._live

    @property
    def peak(self) -> int:
        """The highest `current` since construction or the last `reset_peak()`."""
        return self._peak

    @property
    def baseline(self) -> int:
        return self._baseline

    def reset_peak(self) -> None:
        with self._lock:
            self._drain()
            self._peak = self._baseline + self._live

    def set_baseline(self, baseline: int) -> None:
        """Re-base: `current` becomes `baseline` exactly, which is taken to include every
        storage alive now (e.g. `live_tensor_bytes(model, optimizer)` after
        `zero_grad(set_to_none=True)`). Tracked storages alive now stop counting, so their
        later frees are not subtracted twice; new allocations count from here."""
        with self._lock:
            for ref in list(self._refs.values()):
                ref.nbytes = 0  # a late finalizer for it then subtracts nothing
            self._drain()
            self._live = 0
            self._baseline = int(baseline)
            self._peak = max(self._peak, self._baseline)

    def _drain(self) -> None:
        # Caller holds the lock. A ref's nbytes is read now, not when it was queued, so a
        # re-base that zeroed it in between is respected.
        freed = self._freed
        while freed:
            self._live -= freed.popleft().nbytes

    def _resized(self, storage: torch.UntypedStorage, old: int, new: int) -> None:
        """A storage resized in place outside any op, from `old` to `new` bytes. One the
        tracker knows is re-counted; an older one (the baseline holds it at `old`) counts
        its growth, and a shrink below what it counted is not seen."""
        with self._lock:
            self._drain()
            ref = self._refs.get(id(storage))
            counted = ref.nbytes if ref is not None else 0
            delta = max(new - old, -counted)
            if self.budget is not None and delta > 0 and \
                    self._baseline + self._live + delta > self.budget:
                raise torch.OutOfMemoryError(
                    "DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                    f"{delta} bytes (redline CPU memory budget {format_size(self.budget)}: "
                    f"{format_size(self._baseline + self._live)} in use, FSDP's all-gather)")
            if ref is None and delta > 0:
                ref = _StorageRef(storage, self._callback)
                ref.key, ref.nbytes, ref.size = id(storage), 0, old
                self._refs[ref.key] = ref
            if ref is not None:
                ref.nbytes += delta
                ref.size = new
            self._live += delta
            self._peak = max(self._peak, self._baseline + self._live)

    def _on_free(self, ref: _StorageRef) -> None:
        # Runs inside the storage's deallocation, anywhere: no lock, no counter, no allocation
        # that could re-enter us; dict.pop and deque.append are single atomic C calls.
        self._refs.pop(ref.key, None)
        self._freed.append(ref)

    # ---- entering -------------------------------------------------------------------------

    def __enter__(self) -> MemoryTracker:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            # compiled code runs eagerly while tracked (module docstring)
            eager = compiled_runs_eagerly()
            eager.__enter__()
            try:
                super().__enter__()
            except BaseException:
                eager.__exit__(None, None, None)
                raise
            self._local.eager = eager
            on_fsdp_storage_resize(_on_resize)
            _entered.trackers.append(self)
        self._local.depth = depth + 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            if self in _entered.trackers:
                _entered.trackers.remove(self)
            try:
                super().__exit__(*exc_info)
            finally:
                self._local.eager.__exit__(None, None, None)
                del self._local.eager

    # ---- the op hook ----------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        kind = _op_kind(func)
        before = _input_sizes(args, kwargs) if kind == _MUTATING else None
        out = func(*args, **kwargs)

        new, grown, added = self._scan(out, kind, before)
        if not new and not grown:
            return out

        with self._lock:
            self._drain()
            in_use = self._baseline + self._live
            if self.budget is not None and added > 0 and in_use + added > self.budget:
                # Nothing is registered yet: dropping our references frees the new storages
                # (the traceback will hold this frame, so its locals must not hold them).
                del out, new
                raise torch.OutOfMemoryError(
                    "DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                    f"{added} bytes (redline CPU memory budget {format_size(self.budget)}: "
                    f"{format_size(in_use)} in use, op {func})"
                )
            for ref, size in grown:
                ref.nbytes += size - ref.size
                ref.size = size
            for storage, counted, size in new:
                ref = _StorageRef(storage, self._callback)
                ref.key, ref.nbytes, ref.size = id(storage), counted, size
                self._refs[ref.key] = ref
            self._live += added
            self._peak = max(self._peak, self._baseline + self._live)
        return out

    def _scan(
        self, out: Any, kind: int, before: dict[int, int] | None
    ) -> tuple[list[tuple[torch.UntypedStorage, int, int]], list[tuple[_StorageRef, int]], int]:
        """New storages among the outputs as (storage, bytes to count, size), known ones
        whose size changed as (ref, new size), and the bytes all of that adds."""
        if isinstance(out, torch.Tensor):
            leaves: list[Any] = [out]
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            leaves = list(out)
        else:
            leaves = tree_leaves(out)
        new: list[tuple[torch.UntypedStorage, int, int]] = []
        grown: list[tuple[_StorageRef, int]] = []
        seen: set[int] = set()
        added = 0
        for s in [st for leaf in leaves for st in _storages_of(leaf)]:
            if id(s) in seen:
                continue
            seen.add(id(s))
            size = s.nbytes()
            ref = self._refs.get(id(s))
            if ref is not None:  # already counted: only a resize changes anything
                if kind != _FRESH and ref.size != size:
                    grown.append((ref, size))
                    added += size - ref.size
            elif kind == _VIEW:
                continue  # a view of a storage older than the tracker: the baseline's
            elif before is not None and id(s) in before:
                if size > before[id(s)]:  # an older storage grown in place: count the growth
                    new.append((s, size - before[id(s)], size))
                    added += size - before[id(s)]
            elif size:
                new.append((s, size, size))
                added += size
        return new, grown, added
