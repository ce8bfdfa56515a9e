"""The built-in `sr3-tiny` example task: data, loss, sampling, metrics, precision."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

pytest.importorskip("skimage")
pytest.importorskip("sklearn")
pytest.importorskip("torchmetrics")

from redline.examples import sr3
from redline.examples.sr3 import HELD_OUT, SR3Task
from redline.task import Sample, resolve_task

SMALL = {
    "size": 32,
    "channels": 8,
    "num_train_crops": 64,
    "num_eval_crops": 4,
    "sample_steps": 4,
}


@pytest.fixture(scope="module")
def task() -> SR3Task:
    return SR3Task(**SMALL)


@pytest.fixture()
def model(task: SR3Task) -> torch.nn.Module:
    torch.manual_seed(0)
    return task.build_model()


def _batch(dataset: torch.utils.data.Dataset, n: int) -> dict[str, torch.Tensor]:
    return default_collate([dataset[i] for i in range(n)])


def test_resolves_by_builtin_name() -> None:
    task = resolve_task("sr3-tiny", SMALL)
    assert isinstance(task, SR3Task)
    assert task.name == "sr3-tiny"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"size": 30}, "size"),
        ({"size": 36, "scale": 8}, "size"),
        ({"size": 512}, "size"),
        ({"size": True}, "size"),
        ({"scale": 5}, "scale"),
        ({"channels": 12}, "channels"),
        ({"num_train_crops": 0}, "num_train_crops"),
        ({"sample_steps": 0}, "sample_steps"),
        ({"train_timesteps": 10, "sample_steps": 20}, "sample_steps"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{argument} must be"):
        SR3Task(**kwargs)


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        SR3Task(32)  # type: ignore[misc]


def test_train_items_are_deterministic_with_right_shapes_and_range(task: SR3Task) -> None:
    data = task.train_data()
    assert len(data) == 64
    for i in (0, 7, 63):
        first, again = data[i], data[i]
        rebuilt = SR3Task(**SMALL).train_data()[i]
        for key in ("lr", "hr"):
            assert torch.equal(first[key], again[key])
            assert torch.equal(first[key], rebuilt[key])
        assert first["hr"].shape == (3, 32, 32) and first["lr"].shape == (3, 8, 8)
        assert first["hr"].dtype == torch.float32 and first["lr"].dtype == torch.float32
        assert first["hr"].min() >= -1.0 and first["hr"].max() <= 1.0
        # the low-res input is the 4x area-downsampled high-res crop
        down = F.interpolate(first["hr"][None], size=(8, 8), mode="area")[0]
        torch.testing.assert_close(first["lr"], down, atol=1e-5, rtol=0)
    with pytest.raises(IndexError):
        data[64]


def test_items_depend_on_seed_and_index_only(task: SR3Task) -> None:
    data = task.train_data()
    longer = SR3Task(**{**SMALL, "num_train_crops": 128}).train_data()
    other_seed = SR3Task(**{**SMALL, "seed": 1}).train_data()
    # the global RNG must not matter
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(data[5]["hr"], longer[5]["hr"])
    assert any(not torch.equal(data[i]["hr"], other_seed[i]["hr"]) for i in range(4))
    # both flip states occur, so augmentation is actually on
    assert len({data.locate(i)[3] for i in range(64)}) == 2


def test_eval_crops_come_only_from_held_out_images(task: SR3Task) -> None:
    train, evaluation = task.train_data(), task.eval_data()
    assert len(evaluation) == 4
    assert not set(HELD_OUT) & set(train.names)
    assert all(train.locate(i)[0] not in HELD_OUT for i in range(len(train)))
    images = sr3.load_images()
    for i in range(len(evaluation)):
        name, top, left, flip = evaluation.locate(i)
        assert name in HELD_OUT and not flip
        expected = images[name][top : top + 32, left : left + 32].transpose(2, 0, 1) * 2 - 1
        torch.testing.assert_close(evaluation[i]["hr"], torch.from_numpy(expected))
        assert evaluation[i]["lr"].shape == (3, 8, 8)
    # evaluation crops are the same whatever the training seed
    assert evaluation.locate(0) == SR3Task(**{**SMALL, "seed": 7}).eval_data().locate(0)


@pytest.mark.slow
def test_loss_is_a_finite_float32_scalar_and_backpropagates(
    task: SR3Task, model: torch.nn.Module
) -> None:
    batch = _batch(task.train_data(), 4)
    loss = task.loss(model, batch)
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.isfinite(loss) and 0.0 < loss.item() < 1.0
    assert loss.requires_grad
    loss.backward()
    assert model.conv_out.weight.grad is not None
    assert model.conv_out.weight.grad.abs().sum() > 0


def test_loss_draws_from_the_global_rng(task: SR3Task, model: torch.nn.Module) -> None:
    # exact resume restores the global generator; the loss must use it, not a private one
    batch = _batch(task.train_data(), 4)
    torch.manual_seed(5)
    first = task.loss(model, batch)
    torch.manual_seed(5)
    assert torch.equal(task.loss(model, batch), first)
    assert not torch.equal(task.loss(model, batch), first)


class _Oracle(torch.nn.Module):
    """Knows the clean images: returns the exact v for `hr` under the documented schedule."""

    def __init__(self, hr: torch.Tensor) -> None:
        super().__init__()
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        self.hr = hr.double()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal = self.alpha_bar[t].sqrt().view(-1, 1, 1, 1)
        spread = (1.0 - self.alpha_bar[t]).sqrt().view(-1, 1, 1, 1)
        eps = (x_t.double() - signal * self.hr) / spread
        return (signal * eps - spread * self.hr).float()


def test_loss_and_sampler_agree_on_the_parameterisation(task: SR3Task) -> None:
    # A perfect denoiser must score ~0 loss and DDIM must return its clean images exactly:
    # this pins the schedule and the v <-> eps <-> x0 algebra in both places.
    batch = _batch(task.eval_data(), 4)
    oracle = _Oracle(batch["hr"])
    assert task.loss(oracle, batch).item() < 1e-8
    generated = task.super_resolve(oracle, batch["lr"])
    torch.testing.assert_close(generated, batch["hr"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_evaluate_reports_four_finite_metrics(task: SR3Task, model: torch.nn.Module) -> None:
    model.eval()
    # 3 + 1: a ragged last batch. Listed up front because iterating a DataLoader draws its
    # worker seed from the global RNG, which would hide what evaluate() itself draws.
    loader = list(DataLoader(task.eval_data(), batch_size=3))
    rng_before = torch.get_rng_state()
    metrics = task.evaluate(model, loader)
    assert set(metrics) == {"psnr", "ssim", "psnr_bicubic", "ssim_bicubic"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["psnr_bicubic"] > 15.0
    assert -1.0 <= metrics["ssim"] <= 1.0 and 0.0 < metrics["ssim_bicubic"] <= 1.0
    # evaluation neither consumes the training RNG stream nor varies between calls
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert task.evaluate(model, loader) == metrics
    # metrics are computed in float32 even when the caller runs under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = task.evaluate(model, loader)
    assert under_autocast["psnr_bicubic"] == pytest.approx(metrics["psnr_bicubic"], abs=1e-4)
    assert under_autocast["ssim_bicubic"] == pytest.approx(metrics["ssim_bicubic"], abs=1e-4)


@pytest.mark.slow
def test_samples_are_unit_range_images_of_the_right_shapes(
    task: SR3Task, model: torch.nn.Module
) -> None:
    model.eval()
    batch = _batch(task.eval_data(), 4)
    batch = {k: torch.cat([v, v[:1]]) for k, v in batch.items()}
    samples = task.samples(model, batch)  # one per input: the caller picks how many
    assert len(samples) == 5
    expected = {"low-res": (8, 8, 3), "bicubic": (32, 32, 3), "generated": (32, 32, 3)}
    expected["high-res"] = (32, 32, 3)
    for i, sample in enumerate(samples):
        assert isinstance(sample, Sample) and sample.title == f"eval crop {i}"
        assert {k: v.shape for k, v in sample.images.items()} == expected
        for image in sample.images.values():
            assert isinstance(image, np.ndarray) and image.dtype == np.float32
            assert image.min() >= 0.0 and image.max() <= 1.0
        hr = sample.images["high-res"].astype(np.float64)
        mse = ((sample.images["bicubic"] - hr) ** 2).mean()
        assert sample.metrics["psnr_bicubic"] == pytest.approx(10 * np.log10(1 / mse), abs=0.05)
        assert set(sample.metrics) == {"psnr", "psnr_bicubic"}


@pytest.mark.slow
def test_series_are_the_loss_per_timestep_bucket_and_the_schedule(
    task: SR3Task, model: torch.nn.Module
) -> None:
    series = task.series(model, _batch(task.train_data(), 4))
    losses, schedule = series["loss_by_timestep_bucket"], series["noise_schedule"]
    assert losses.shape == schedule.shape == (5,) and torch.isfinite(losses).all()
    assert (schedule.diff() > 0).all() and 0 < schedule[0] < schedule[-1] < 1  # noisier later


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_under_cpu_autocast(task: SR3Task, model: torch.nn.Module, dtype: torch.dtype) -> None:
    batch = _batch(task.train_data(), 2)
    with torch.autocast("cpu", dtype=dtype):
        loss = task.loss(model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.slow
def test_model_cast_to_bfloat16_runs_loss_and_sampling(
    task: SR3Task, model: torch.nn.Module
) -> None:
    model = model.to(torch.bfloat16)
    batch = _batch(task.train_data(), 2)
    loss = task.loss(model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    generated = task.super_resolve(model.eval(), batch["lr"])
    assert generated.shape == (2, 3, 32, 32) and generated.dtype == torch.float32
    assert generated.min() >= -1.0 and generated.max() <= 1.0


def test_missing_optional_dependencies_name_the_extra(
    task: SR3Task, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchmetrics.functional.image", None)
    with pytest.raises(ImportError, match=r"redline\[examples\]"):
        task.evaluate(model, [])
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match=r"redline\[examples\]"):
        sr3._read_images()
