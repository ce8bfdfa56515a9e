"""sst-tiny on the real OSTIA months: an honest split by time, land out of the loss and the
metrics, and baselines computed on the same points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("xarray")
pytest.importorskip("iris_sample_data")

from redline.examples.sst import SSTTask, load_ostia
from redline.task import TaskError


@pytest.fixture(scope="module")
def task() -> SSTTask:
    return SSTTask()


def test_the_data_is_the_real_ostia_band_and_the_split_is_by_time(task: SSTTask) -> None:
    sst, months = load_ostia()
    assert sst.shape == (54, 18, 432) and 0.2 < np.isnan(sst).mean() < 0.3
    assert str(months[0]) == "2006-04" and str(months[-1]) == "2010-09"
    assert task.train_months.max() < task.eval_months.min()  # never a later month in training
    assert str(task.eval_months[0]) == "2009-04" and len(task.eval_months) == 18
    assert len(task.train_data()) == 108 * len(task.train_months)  # windows 4 longitudes apart
    assert len(task.eval_data()) == 3 * 18


def test_land_is_out_of_the_loss(task: SSTTask) -> None:
    model = task.build_model()
    batch = torch.utils.data.default_collate([task.train_data()[i] for i in range(4)])
    before = task.loss(model, batch)
    land = batch["mask"] == 0
    assert land.any()
    batch["y"] = batch["y"].masked_fill(land, 1e3)  # nonsense on land changes nothing
    assert torch.equal(task.loss(model, batch), before)


@pytest.mark.slow
def test_an_untrained_model_is_persistence_and_the_baselines_are_the_same_points(
        task: SSTTask) -> None:
    loader = torch.utils.data.DataLoader(task.eval_data(), batch_size=16)
    metrics = task.evaluate(task.build_model(), loader)
    assert metrics["rmse"] == pytest.approx(metrics["rmse_persistence"], rel=1e-6)
    assert metrics["acc"] == pytest.approx(metrics["acc_persistence"], rel=1e-6)
    assert 0.1 < metrics["rmse_persistence"] < 1.0  # kelvin: monthly changes are tenths
    assert metrics["acc_climatology"] == pytest.approx(0.0, abs=1e-6)  # anomaly 0 everywhere


def test_samples_are_maps_with_their_error(task: SSTTask) -> None:
    batch = torch.utils.data.default_collate([task.eval_data()[i] for i in range(2)])
    samples = task.samples(task.build_model(), batch)
    assert len(samples) == 2
    assert set(samples[0].images) == {"last input month", "forecast", "truth", "error"}
    assert samples[0].images["truth"].shape == (54, 432, 3)
    assert samples[0].metrics["rmse_k"] > 0 and samples[0].title.startswith("2009-04")


def test_bad_task_args_are_one_sentence() -> None:
    with pytest.raises(TaskError, match="train_until"):
        SSTTask(train_until="2011-01")
    with pytest.raises(TaskError, match="patch"):
        SSTTask(patch=5)
