"""Data loading that can resume mid-epoch exactly.

The order of samples is a pure function of (seed, epoch): each epoch is a permutation
drawn from a generator seeded with both, so a resumed run rebuilds the same permutation
and skips the batches it had already consumed, without reading them. The sampler runs in
the main process, so this holds with any number of loader workers, provided the dataset
returns the same item for the same index (the Task's datasets must be deterministic).

Under torchrun every rank draws the same permutation and takes its own contiguous share
of each batch (rank r of W: samples r*B/W to (r+1)*B/W of a batch of B): together the
ranks consume exactly the batches a single process would, in the same order, so the
position in the data is one (epoch, batch) pair for the whole run and a resumed run
continues it on any rank.

A `TensorDataset` is read a batch at a time in the main process (`TensorBatches`): one
gather per tensor instead of a `__getitem__` per sample and a stack, the same values in
the same container as the DataLoader's default collation, 4-10x less time on the
training thread (measured on one CPU thread: a batch of 32 3x16x16 images 100 -> 25 us,
of 160 rows of 128 floats 410 -> 42 us; on a 2-4 ms step that is 2-20 % of it). Other
datasets, and loader workers, load as the DataLoader does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from redline.batch import collate_of
from redline.errors import ConfigError, require


@dataclass(frozen=True)
class DataConfig:
    """The `data` section: how the DataLoader feeds the step."""

    num_workers: int | str = 0
    """Loader worker processes, or "auto": chosen by measurement when training starts
    (tuning/loader_choice.py: 0 unless workers make the step measurably faster)."""
    pin_memory: bool | str = "auto"
    """Page-locked host batches for fast copies; "auto": on for CUDA."""
    persistent_workers: bool | str = "auto"
    """Keep workers across epochs; "auto": on when num_workers > 0."""
    prefetch_factor: int = 2
    """Batches each worker loads ahead."""

    def __post_init__(self) -> None:
        require(self.num_workers == "auto" or (isinstance(self.num_workers, int)
                and self.num_workers >= 0), "data.num_workers", self.num_workers,
                "an integer >= 0 or 'auto'")
        for key in ("pin_memory", "persistent_workers"):
            value = getattr(self, key)
            require(isinstance(value, bool) or value == "auto", f"data.{key}", value,
                    "true, false or 'auto'")
        require(self.prefetch_factor >= 1, "data.prefetch_factor", self.prefetch_factor,
                "an integer >= 1")


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a seeded per-epoch permutation, starting at batch `start_batch`; with
    `world` > 1, rank `rank`'s share of each (the module docstring)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int = 0,
                 start_batch: int = 0, rank: int = 0, world: int = 1) -> None:
        if num_samples < batch_size:
            raise ConfigError(f"the training set has {num_samples} samples, fewer than one "
                             f"batch of {batch_size}; lower train.batch_size or "
                             "train.effective_batch_size")
        assert batch_size % world == 0, "build.py checks the batch divides among the ranks"
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        share = batch_size // world
        self._share = slice(rank * share, (rank + 1) * share)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Where the next iteration starts; call before each `iter(loader)`."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_samples // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order(self.epoch)
        for b in range(self.start_batch, self.num_samples // self.batch_size):
            yield order[b * self.batch_size:(b + 1) * self.batch_size][self._share]

    def indices(self, epoch: int, batch: int) -> list[int]:
        """The samples of batch `batch` of `epoch`, as an iteration would yield them."""
        return self._order(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size][
            self._share]

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()


def loader_options(cfg: DataConfig, device_kind: str) -> dict[str, Any]:
    """DataLoader keyword arguments with the 'auto' settings resolved for this machine."""
    # "auto" is measured when training starts (loader_choice.py); a job built before that (the
    # batch search's trials, a dry run) loads in the main process.
    workers = 0 if cfg.num_workers == "auto" else cfg.num_workers
    assert isinstance(workers, int)
    pin = cfg.pin_memory if cfg.pin_memory != "auto" else device_kind == "cuda"
    persistent = cfg.persistent_workers if cfg.persistent_workers != "auto" else workers > 0
    opts: dict[str, Any] = {"num_workers": workers, "pin_memory": bool(pin)}
    if workers > 0:
        opts["persistent_workers"] = bool(persistent)
        opts["prefetch_factor"] = cfg.prefetch_factor
    return opts


def train_loader(dataset: Dataset, batch_size: int, seed: int,
                 options: dict[str, Any], rank: int = 0, world: int = 1) -> DataLoader:
    """A loader whose `batch_sampler.set_position(epoch, start_batch)` picks where it starts;
    `batch_size` is the whole step's, of which this rank reads its share.

    Each `iter(loader)` re-reads the sampler in the main process, so persistent workers
    are kept across epochs and the order stays exact.
    """
    sampler = EpochBatchSampler(len(dataset), batch_size, seed,  # type: ignore[arg-type]
                                rank=rank, world=world)
    batched = type(dataset) is TensorDataset and not options.get("num_workers")
    # Each iter(loader) draws the workers' base seed from this generator; without one it
    # would draw from the global RNG and shift the training stream on every resume.
    return DataLoader(TensorBatches(dataset) if batched else dataset,  # type: ignore[arg-type]
                      batch_sampler=sampler, generator=torch.Generator(),
                      collate_fn=_the_batch if batched else collate_of(dataset), **options)


class TensorBatches(Dataset):
    """A TensorDataset that the DataLoader reads a batch at a time (module docstring):
    `__getitems__(indices)` returns the batch, already collated, as the only item."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[list[torch.Tensor]]:
        rows = torch.as_tensor(indices)
        # a list, as default_collate makes of a batch of tuples
        return [[t.index_select(0, rows) for t in self.dataset.tensors]]


def _the_batch(items: list[Any]) -> Any:
    """TensorBatches' collation: its one item is the batch."""
    return items[0]


def iterate_from(loader: DataLoader, epoch: int, start_batch: int) -> Iterator[Any]:
    """Batches of `epoch` from `start_batch` on; worker seeds depend on (seed, epoch) only."""
    sampler = loader.batch_sampler
    assert isinstance(sampler, EpochBatchSampler) and loader.generator is not None
    sampler.set_position(epoch, start_batch)
    loader.generator.manual_seed(sampler.seed * 1_000_003 + epoch + 1)
    return iter(loader)


def eval_loader(dataset: Dataset, batch_size: int, options: dict[str, Any]) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      collate_fn=collate_of(dataset), **options)


class LimitedLoader:
    """The first `limit` batches of a loader (all when limit is None), with a length."""

    def __init__(self, loader: Any, limit: int | None) -> None:
        self.loader, self.limit = loader, limit
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader) if self.limit is None else min(self.limit, len(self.loader))

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if self.limit is not None and i >= self.limit:
                return
            yield batch
