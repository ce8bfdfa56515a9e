"""The one batch helper: count, split, slice, move and cast a batch of any structure.

A batch is whatever the DataLoader yields: tensors nested in tuples, lists, dicts,
namedtuples, or any class registered with `torch.utils._pytree` (dataclasses through
`pytree.register_dataclass`). Every walk over a batch in redline goes through `_flatten`
here, so the Engine, the precision policies, the FLOP counter and the batch search all
agree on what a batch holds:

- a tensor with a dim 0 is per-sample data: split along dim 0;
- a list or tuple of plain values (strings, numbers, None), e.g. a batch of captions, is
  per-sample data too: one entry per sample, sliced like a tensor;
- everything else (a 0-d tensor, a number, a string) is shared by all samples and passed
  through unchanged to every micro-batch.

Every per-sample leaf must have the same number of samples; `size` checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from redline._torch_compat import tree_flatten, tree_unflatten
from redline.errors import UserError

_PLAIN = (str, bytes, int, float, bool, complex, type(None))


def _is_per_sample_list(obj: Any) -> bool:
    # A list/tuple of plain values holds one entry per sample; one holding tensors or
    # containers is structure to recurse into. Namedtuples are always structure.
    return (type(obj) in (list, tuple) and len(obj) > 0
            and all(isinstance(v, _PLAIN) for v in obj))


def _flatten(batch: Any) -> tuple[list[Any], Any]:
    return tree_flatten(batch, is_leaf=_is_per_sample_list)


def _leaf_size(leaf: Any) -> int | None:
    if isinstance(leaf, torch.Tensor):
        return leaf.shape[0] if leaf.dim() > 0 else None
    if _is_per_sample_list(leaf):
        return len(leaf)
    return None


def size(batch: Any) -> int:
    """Number of samples: dim 0 of the per-sample leaves, which must agree."""
    sizes = {n for leaf in _flatten(batch)[0] if (n := _leaf_size(leaf)) is not None}
    if not sizes:
        raise ValueError("batch has no tensor or per-sample list to split along dim 0")
    if len(sizes) > 1:
        raise ValueError(f"batch tensors disagree on the batch dimension (dim 0): {sorted(sizes)}")
    return sizes.pop()


def leading_size(batch: Any) -> int | None:
    """Dim 0 of the first per-sample leaf: the hot path's batch size, without a full walk.

    The common batches (a tensor; a tuple or list starting with a tensor) are answered
    with one or two isinstance checks; anything else takes the general walk. Whether all
    leaves agree is checked by `size`, when the batch is actually split.
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if type(batch) in (tuple, list) and batch and isinstance(first := batch[0], torch.Tensor) \
            and first.dim() > 0:
        return first.shape[0]
    for leaf in _flatten(batch)[0]:
        if (n := _leaf_size(leaf)) is not None:
            return n
    return None


def slice(batch: Any, start: int, stop: int) -> Any:
    """Samples [start, stop) of every per-sample leaf; shared leaves unchanged."""
    leaves, spec = _flatten(batch)
    return tree_unflatten([_slice_leaf(v, start, stop) for v in leaves], spec)


def _slice_leaf(leaf: Any, start: int, stop: int) -> Any:
    if isinstance(leaf, torch.Tensor):
        return leaf[start:stop] if leaf.dim() > 0 else leaf
    if _is_per_sample_list(leaf):
        return type(leaf)(leaf[start:stop])
    return leaf


def split(batch: Any, micro_batch_size: int) -> list[tuple[Any, int]]:
    """Chunks of at most `micro_batch_size` samples along dim 0: [(chunk, n_samples)]."""
    n = size(batch)
    if micro_batch_size >= n:
        return [(batch, n)]
    return [(slice(batch, i, min(i + micro_batch_size, n)), min(micro_batch_size, n - i))
            for i in range(0, n, micro_batch_size)]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """The batch with `fn` applied to every tensor leaf."""
    leaves, spec = _flatten(batch)
    return tree_unflatten([fn(v) if isinstance(v, torch.Tensor) else v
                                  for v in leaves], spec)


def move(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Every tensor of the batch on `device` (non_blocking from pinned memory)."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))


def cast(batch: Any, dtype: torch.dtype) -> Any:
    """Every floating-point tensor in `dtype`; integer tensors (labels, ids) unchanged."""
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


def describe(batch: Any) -> str:
    """The batch's structure with shapes and dtypes instead of values (for fingerprints)."""
    leaves, spec = _flatten(batch)
    shown = [(tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor)
             else (type(v).__name__, len(v)) if _is_per_sample_list(v) else repr(v)
             for v in leaves]
    return f"{spec}|{shown}"


class BatchingError(UserError):
    """torch's default_collate cannot make one batch of a dataset's samples (e.g. sequences
    of different lengths): the task needs a collate_fn."""


def collate_of(dataset: Dataset) -> Callable[[list[Any]], Any]:
    """How `dataset`'s samples make one batch: its `collate_fn` attribute where it has one
    (the task's hook: build.py hands a task's datasets out as `Collated`; else the
    dataset's own, as the Lightning adapter's carry their loader's), torch's
    default_collate otherwise, its failure explained (BatchingError). Every loader redline
    builds, and first_samples, use it, so a probe batch is batched as training's are."""
    return getattr(dataset, "collate_fn", None) or _default_collate


def _default_collate(samples: list[Any]) -> Any:
    try:
        return default_collate(samples)
    except (RuntimeError, TypeError) as e:
        # redline chose default_collate, not the user: one sentence rather than torch's
        # collate internals (a task's own collate_fn keeps its traceback)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BatchingError(
            f"torch's default_collate cannot batch the task's samples ({first}): give the "
            "task a collate_fn(samples) -> batch, e.g. one that pads variable-length "
            "sequences to the batch's longest (docs/train.md, Task hooks)") from None


class Collated(Dataset):
    """`dataset`, batched by `collate_fn` (collate_of reads it): how build.py hands out a
    task's datasets when the task gives a collate hook. Everything else is the dataset's."""

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.dataset, self.collate_fn = dataset, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        # the dataset's own attributes (and its batched __getitems__, which the DataLoader
        # looks up by name); other dunders are not forwarded, so pickling (workers) works
        if name == "dataset" or (name.startswith("__") and name != "__getitems__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def first_samples(dataset: Dataset, n: int) -> Any:
    """A collated batch of the dataset's first `n` samples (wrapping round a small one),
    by `collate_of(dataset)`."""
    count = len(dataset)  # type: ignore[arg-type]
    return collate_of(dataset)([dataset[i % count] for i in range(n)])
