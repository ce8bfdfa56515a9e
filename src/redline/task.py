"""The user's side of redline: a Task, and how a task name becomes one.

A task is everything redline needs to build, and re-build, a training job: tuning and
studies need a fresh model per trial, so a task hands out factories rather than objects.

    class Task(Protocol):
        name: str
        def build_model(self) -> nn.Module: ...
        def train_data(self) -> Dataset: ...
        def eval_data(self) -> Dataset | None: ...
        def loss(self, model, batch) -> Tensor: ...             # mean over the batch's samples
        def evaluate(self, model, loader) -> dict[str, float]: ...   # optional
        def samples(self, model, batch) -> list[Sample]: ...    # optional
        def series(self, model, batch) -> dict[str, Tensor]: ... # optional
        def optimizer(self, model) -> Optimizer | None: ...     # optional

`loss` must return the *mean* over the samples of the batch it is given: the Engine
splits a batch into micro-batches and weights each micro-batch's loss by its share of
the samples, which gives the full-batch gradient only for a mean.

`series`, if a task has it, is called on the steps that `inspect.every` inspects, under
no_grad with the training RNG forked, and returns named values to record with the layer
statistics: 0-d tensors are loss components, 1-d tensors series (sr3-tiny: the loss per
diffusion-timestep bucket, and the noise schedule). `samples` turns a batch of fixed
evaluation inputs into what a report shows (images as HxW or HxWx3 arrays, texts).
`optimizer`, if a task has it and it returns one, is the optimizer to train `model` with
(the Lightning adapter hands over the module's `configure_optimizers`); otherwise redline
builds fused AdamW at train.lr (build.py).

A task spec is one of:
  - a built-in short name (`redline train --help` lists them),
  - `package.module:Class`,
  - `path/to/file.py:Class` (imported as the module named after the file, so its classes
    reach DataLoader workers however they are started: plugins.py),
  - a name registered by an installed package in the entry-point group `redline.tasks`.

A spec that names nothing, or task_args the constructor does not take, is bad input
(TaskError). An exception raised by the task's own code, its constructor included, is not:
it propagates with its traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from redline.errors import UserError
from redline.plugins import entry_point_targets, load_target

ENTRY_POINT_GROUP = "redline.tasks"

# Built-in tasks: short name -> "module:factory". The factory is called with task_args.
BUILTIN_TASKS: dict[str, str] = {
    "sr3-tiny": "redline.examples.sr3:SR3Task",
    "sst-tiny": "redline.examples.sst:SSTTask",
    "reportgen-tiny": "redline.examples.reportgen:ReportGenTask",
}


class TaskError(UserError):
    """A task spec that cannot be resolved; the message says what to change."""


@dataclass
class Sample:
    """One generated example for reports: named images and/or named texts, and its metrics.

    Images are HxW (grey) or HxWx3 arrays, float in [0, 1] or uint8. `metrics` are this
    sample's own scores (e.g. its PSNR, or its BLEU against the reference text).
    """

    title: str
    images: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def build_model(self) -> nn.Module: ...

    def train_data(self) -> Dataset: ...

    def eval_data(self) -> Dataset | None: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]: ...

    def samples(self, model: nn.Module, batch: Any) -> list[Sample]: ...

    def series(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer | None: ...


class TaskBase:
    """Optional base class: defaults for the optional parts of the protocol."""

    name: str = "task"

    def eval_data(self) -> Dataset | None:
        return None

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        return {}

    def samples(self, model: nn.Module, batch: Any) -> list[Sample]:
        return []

    def series(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return {}

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer | None:
        return None


_REQUIRED = ("build_model", "train_data", "loss")
_OPTIONAL_DEFAULTS: dict[str, Callable[..., Any]] = {
    "eval_data": TaskBase.eval_data,
    "evaluate": TaskBase.evaluate,
    "samples": TaskBase.samples,
    "series": TaskBase.series,
    "optimizer": TaskBase.optimizer,
}


def available_tasks() -> dict[str, str]:
    """Short name -> target, built-ins first, then those registered by entry points."""
    tasks = dict(BUILTIN_TASKS)
    for name, target in entry_point_targets(ENTRY_POINT_GROUP).items():
        tasks.setdefault(name, target)
    return tasks


def resolve_task(spec: str, task_args: Mapping[str, Any] | None = None) -> Task:
    """Build the task named by `spec` with keyword arguments `task_args`."""
    factory = _load_factory(spec)
    kwargs = dict(task_args or {})
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise TaskError(f"task {spec!r} does not accept task_args {kwargs}: {e}") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    task = factory(**kwargs)  # the user's code: its exceptions keep their traceback
    _check_protocol(spec, task)
    return task


def _load_factory(spec: str) -> Callable[..., Any]:
    known = available_tasks()
    if spec in known:
        return load_target(known[spec], spec, TaskError, "task")
    if ":" not in spec:
        names = ", ".join(sorted(known))
        raise TaskError(
            f"unknown task {spec!r}; built-in tasks are: {names}; "
            "or give 'package.module:Class' or 'path/to/file.py:Class'"
        )
    return load_target(spec, spec, TaskError, "task")


def _check_protocol(spec: str, task: Any) -> None:
    missing = [m for m in _REQUIRED if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(f"task {spec!r} is missing required method(s): {', '.join(missing)}")
    for method, default in _OPTIONAL_DEFAULTS.items():
        if not callable(getattr(task, method, None)):
            setattr(task, method, default.__get__(task))
    if not isinstance(getattr(task, "name", None), str):
        task.name = spec.rpartition(":")[2] or spec
