from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import TensorDataset

from redline.config import ConfigError, DataConfig
from redline.data import (
    EpochBatchSampler,
    TensorBatches,
    iterate_from,
    loader_options,
    train_loader,
)


def test_order_depends_only_on_seed_and_epoch() -> None:
    a = list(EpochBatchSampler(100, 8, seed=1))
    assert a == list(EpochBatchSampler(100, 8, seed=1))
    assert a != list(EpochBatchSampler(100, 8, seed=2))
    assert a != list(EpochBatchSampler(100, 8, seed=1, epoch=1))
    assert len(a) == 12
    assert all(len(b) == 8 for b in a)
    assert len(set(itertools.chain(*a))) == 96  # a permutation, last partial batch dropped


def test_resuming_mid_epoch_continues_with_the_next_batch() -> None:
    full = list(EpochBatchSampler(100, 8, seed=3, epoch=2))
    sampler = EpochBatchSampler(100, 8, seed=3)
    sampler.set_position(epoch=2, start_batch=5)
    assert list(sampler) == full[5:] and len(sampler) == len(full) - 5


def test_too_small_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fewer than one batch of 16"):
        EpochBatchSampler(10, 16, seed=0)


def test_loader_options_resolve_auto() -> None:
    cpu = loader_options(DataConfig(), "cpu")
    assert cpu == {"num_workers": 0, "pin_memory": False}
    cuda = loader_options(DataConfig(num_workers=2), "cuda")
    assert cuda["pin_memory"] is True and cuda["persistent_workers"] is True
    assert cuda["prefetch_factor"] == 2


class _PerSample(TensorDataset):
    """A TensorDataset subclass: read sample by sample, as the DataLoader does."""


def test_a_tensor_dataset_read_a_batch_at_a_time_gives_the_per_sample_loaders_batches(
) -> None:
    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    options = {"num_workers": 0, "pin_memory": False}
    fast = train_loader(TensorDataset(x, y), 8, seed=5, options=options)
    slow = train_loader(_PerSample(x, y), 8, seed=5, options=options)
    assert isinstance(fast.dataset, TensorBatches) and not isinstance(slow.dataset,
                                                                     TensorBatches)
    for epoch, start in ((0, 0), (1, 3)):  # a fresh epoch, and a resume mid-epoch
        got = list(iterate_from(fast, epoch, start))
        want = list(iterate_from(slow, epoch, start))
        assert len(got) == len(want) == 8 - start
        for a, b in zip(got, want, strict=True):
            assert type(a) is type(b) is list
            assert all(torch.equal(p, q) and p.dtype == q.dtype for p, q in zip(a, b,
                                                                               strict=True))


def test_a_task_collate_wraps_a_dataset_and_default_collates_failure_is_one_sentence() -> None:
    import pickle

    from redline.batch import BatchingError, Collated, collate_of, first_samples
    from redline.data import eval_loader, train_loader

    ragged = [torch.ones(n) for n in (1, 2, 3, 1)]
    with pytest.raises(BatchingError, match="give the task a collate_fn") as raised:
        first_samples(ragged, 2)  # type: ignore[arg-type]
    assert raised.value.__cause__ is None and "equal size" in str(raised.value)
    with pytest.raises(BatchingError):
        next(iter(eval_loader(ragged, 2, {})))  # type: ignore[arg-type]

    padded = Collated(TensorDataset(torch.arange(4.0)), _count)
    assert collate_of(padded) is _count and padded.tensors[0].shape == (4,)  # forwarded
    assert next(iter(train_loader(padded, 2, seed=0, options={}))) == 2  # no batched path
    copy = pickle.loads(pickle.dumps(padded))  # loader workers get it pickled
    assert len(copy) == 4 and copy.collate_fn is _count


def _count(samples: list) -> int:
    return len(samples)
