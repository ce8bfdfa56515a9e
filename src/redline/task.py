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

`loss` must return the *mean* over the samples of the batch it is given: the Engine
splits a batch into micro-batches and weights each micro-batch's loss by its share of
the samples, which gives the full-batch gradient only for a mean.

A task spec is one of:
  - a built-in short name (`redline train --help` lists them),
  - `package.module:Class`,
  - `path/to/file.py:Class`,
  - a name registered by an installed package in the entry-point group `redline.tasks`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ENTRY_POINT_GROUP = "redline.tasks"

# Built-in tasks: short name -> "module:factory". The factory is called with task_args.
BUILTIN_TASKS: dict[str, str] = {
    "sr3-tiny": "redline.examples.sr3:SR3Task",
}


class TaskError(ValueError):
    """A task spec that cannot be resolved; the message says what to change."""


@dataclass
class Sample:
    """One generated example for reports: named images and/or named texts.

    Images are HxW (grey) or HxWx3 arrays, float in [0, 1] or uint8.
    """

    title: str
    images: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def build_model(self) -> nn.Module: ...

    def train_data(self) -> Dataset: ...

    def eval_data(self) -> Dataset | None: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]: ...

    def samples(self, model: nn.Module, batch: Any) -> list[Sample]: ...


class TaskBase:
    """Optional base class: defaults for the optional parts of the protocol."""

    name: str = "task"

    def eval_data(self) -> Dataset | None:
        return None

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        return {}

    def samples(self, model: nn.Module, batch: Any) -> list[Sample]:
        return []


_REQUIRED = ("build_model", "train_data", "loss")
_OPTIONAL_DEFAULTS: dict[str, Callable[..., Any]] = {
    "eval_data": TaskBase.eval_data,
    "evaluate": TaskBase.evaluate,
    "samples": TaskBase.samples,
}


def available_tasks() -> dict[str, str]:
    """Short name -> target, built-ins first, then those registered by entry points."""
    tasks = dict(BUILTIN_TASKS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        tasks.setdefault(ep.name, ep.value)
    return tasks


def resolve_task(spec: str, task_args: Mapping[str, Any] | None = None) -> Task:
    """Build the task named by `spec` with keyword arguments `task_args`."""
    factory = _load_factory(spec)
    try:
        inspect.signature(factory).bind(**dict(task_args or {}))
    except TypeError as e:
        raise TaskError(
            f"task {spec!r} does not accept task_args {dict(task_args or {})}: {e}"
        ) from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    try:
        task = factory(**dict(task_args or {}))
    except (TypeError, ValueError) as e:
        raise TaskError(f"task {spec!r} rejected its task_args: {e}") from None
    _check_protocol(spec, task)
    return task


def _load_factory(spec: str) -> Callable[..., Any]:
    known = available_tasks()
    if spec in known:
        return _import_target(known[spec], spec)
    if ":" not in spec:
        names = ", ".join(sorted(known))
        raise TaskError(
            f"unknown task {spec!r}; built-in tasks are: {names}; "
            "or give 'package.module:Class' or 'path/to/file.py:Class'"
        )
    return _import_target(spec, spec)


def _import_target(target: str, spec: str) -> Callable[..., Any]:
    module_part, _, attr = target.rpartition(":")
    if not module_part or not attr:
        raise TaskError(f"task {spec!r} must look like 'package.module:Class' or 'file.py:Class'")
    if module_part.endswith(".py"):
        module = _import_file(Path(module_part), spec)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as e:
            raise TaskError(f"task {spec!r}: cannot import module {module_part!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TaskError(
            f"task {spec!r}: module {module_part!r} has no attribute {attr!r}") from None


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise TaskError(f"task {spec!r}: file {str(path)!r} does not exist")
    name = f"redline_user_task_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    module_spec.loader.exec_module(module)
    return module


def _check_protocol(spec: str, task: Any) -> None:
    missing = [m for m in _REQUIRED if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(f"task {spec!r} is missing required method(s): {', '.join(missing)}")
    for method, default in _OPTIONAL_DEFAULTS.items():
        if not callable(getattr(task, method, None)):
            setattr(task, method, default.__get__(task))
    if not isinstance(getattr(task, "name", None), str):
        task.name = spec.rpartition(":")[2] or spec
