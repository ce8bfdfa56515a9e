"""The user's side of redline: a Task, and how a task name becomes one.

A task is everything redline needs to build, and re-build, a training job: tuning and
studies need a fresh model per trial, so a task hands out factories rather than objects.

    class Task(Protocol):
        name: str
        def build_model(self) -> nn.Module: ...
        def train_data(self) -> Dataset: ...
        def eval_data(self) -> Dataset | dict[str, Dataset] | None: ...   # optional
        def loss(self, model, batch) -> Tensor: ...             # mean over the batch's samples
        def evaluate(self, model, loader) -> dict[str, float]: ...   # optional
        def samples(self, model, batch) -> list[Sample]: ...    # optional
        def series(self, model, batch) -> dict[str, Tensor]: ... # optional
        def optimizer(self, model) -> Optimizer | None: ...     # optional
        def scheduler(self, optimizer[, total_steps]) -> LRScheduler | None: ...  # optional
        def collate_fn(self, samples) -> batch: ...             # optional
        def eval_collate_fn(self, samples) -> batch: ...        # optional
        def flops_per_sample(self) -> float: ...                # optional
        metric_directions: Mapping[str, str]                    # optional

Each member's docstring, on `Task` below, says what redline does with it. `TaskBase`
supplies every optional member's default, and `resolve_task` gives a task that lacks an
optional method the same default; redline's own code reads an optional member through
`task_member`, never by guessing a name. A task member whose name is close to one of
these (`flops_per_sampel`) is almost surely a misspelling that would silently turn
something off, so `check_task` (resolve_task's, and the Trainer's for a task object it is
handed) warns once, on stderr, naming the member it resembles.

`loss` must return the *mean* over the samples of the batch it is given: the Engine
splits a batch into micro-batches and weights each micro-batch's loss by its share of
the samples, which gives the full-batch gradient only for a mean.

How samples become a batch, in every loader redline builds (training, evaluation, the dry
run, the batch search, the FLOP count): the task's `collate_fn` (`eval_collate_fn` for the
evaluation sets, where given), else a `collate_fn` attribute of the dataset itself (the
Lightning adapter's datasets carry their loader's), else torch's default_collate
(batch.collate_of; build.py hands the task's datasets out wrapped with the task's hook).

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

import difflib
import inspect
import sys
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
    """What redline reads from a task (module docstring); optional members say so."""

    name: str
    """The task's name: run directories are named after it (default: the class name)."""

    def build_model(self) -> nn.Module:
        """A freshly initialised model (tuning and studies build one per trial)."""
        ...

    def train_data(self) -> Dataset:
        """The training set: redline's own loader samples and batches it."""
        ...

    def eval_data(self) -> Dataset | Mapping[str, Dataset] | None:
        """Optional: the evaluation set, several named ones ({"short": ..., "long": ...}:
        metrics recorded per set as `eval/<set>/<metric>`), or None (no evaluation)."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss over `batch`'s samples (module docstring says why the mean)."""
        ...

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Optional: task metrics over the evaluation loader ({} by default)."""
        ...

    def samples(self, model: nn.Module, batch: Any) -> list[Sample]:
        """Optional: what a report shows for a batch of fixed evaluation inputs (images as
        HxW or HxWx3 arrays, texts), with each sample's own metrics."""
        ...

    def series(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Optional: named values recorded with the layer statistics on the steps that
        `inspect.every` inspects, under no_grad with the training RNG forked: 0-d tensors
        are loss components, 1-d tensors series (sr3-tiny: the loss per diffusion-timestep
        bucket, and the noise schedule)."""
        ...

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer | None:
        """Optional: the optimizer to train `model` with (the Lightning adapter hands over
        the module's `configure_optimizers`); None: fused AdamW at train.lr (job/build.py).
        Its own lr replaces train.lr (the run says so once, where they differ)."""
        ...

    def scheduler(self, optimizer: torch.optim.Optimizer
                  ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """Optional: a torch LR scheduler over `optimizer` (the run's optimizer: the task's
        own or redline's), replacing train.schedule and train.warmup_steps; None: those.
        Declared with a second parameter, `scheduler(optimizer, total_steps)`, it is also
        given the run's optimizer steps (what OneCycleLR needs). Stepped once per optimizer
        step, a skipped one (non-finite gradients, an fp16 overflow) included, as torch's
        own loop does; its state is kept in every checkpoint and resumed exactly."""
        ...

    def collate_fn(self, samples: list[Any]) -> Any:
        """Optional: how a list of samples becomes one batch (e.g. padding variable-length
        sequences to the batch's longest), for every loader redline builds; without it, a
        dataset's own `collate_fn` attribute, else torch's default_collate."""
        ...

    def eval_collate_fn(self, samples: list[Any]) -> Any:
        """Optional: `collate_fn` for the evaluation sets alone (default: `collate_fn`)."""
        ...

    def flops_per_sample(self) -> float:
        """Optional: the FLOPs of one sample's forward and backward, for MFU (e.g.
        telemetry.flops.analytic_transformer_flops, for shapes that vary); without it they
        are counted once on the first batch."""
        ...

    metric_directions: Mapping[str, str]
    """Optional: which way each evaluation metric is better, {"psnr": "max", "fid": "min"},
    for studies (judge.py); a metric not named here is judged by its name."""


class TaskBase:
    """Optional base class: defaults for the optional parts of the protocol."""

    name: str = "task"
    # None: not declared (FLOPs counted; directions judged by metric names). Class
    # attributes rather than methods, so that "not declared" is visible without calling.
    flops_per_sample: Callable[[], float] | None = None
    metric_directions: Mapping[str, str] | None = None
    scheduler: Callable[..., Any] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    eval_collate_fn: Callable[[list[Any]], Any] | None = None

    def eval_data(self) -> Dataset | Mapping[str, Dataset] | None:
        return None

    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        return {}

    def samples(self, model: nn.Module, batch: Any) -> list[Sample]:
        return []

    def series(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return {}

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer | None:
        return None


REQUIRED_METHODS = ("build_model", "train_data", "loss")
# The optional methods resolve_task fills in with TaskBase's defaults where a task lacks them.
_OPTIONAL_DEFAULTS: dict[str, Callable[..., Any]] = {
    "eval_data": TaskBase.eval_data,
    "evaluate": TaskBase.evaluate,
    "samples": TaskBase.samples,
    "series": TaskBase.series,
    "optimizer": TaskBase.optimizer,
}
OPTIONAL_MEMBERS = (*_OPTIONAL_DEFAULTS, "scheduler", "collate_fn", "eval_collate_fn",
                    "flops_per_sample", "metric_directions")
MEMBERS = ("name", *REQUIRED_METHODS, *OPTIONAL_MEMBERS)
# How close a name must be to a member's to be called a misspelling of it (difflib's
# ratio): `flops_per_sampel` 0.94, `evalute` 0.93, `schedular` 0.89; `sample_steps`
# (sr3's) 0.74 is not.
_MISSPELLING = 0.85
# Names a user reaches for that are too far from the member's to be caught by spelling
# (`collate` 0.82 against `collate_fn`): the name they meant.
_NEAR_MISSES = {"collate": "collate_fn", "collator": "collate_fn", "data_collator":
                "collate_fn", "eval_collate": "eval_collate_fn", "lr_scheduler": "scheduler",
                "configure_scheduler": "scheduler", "schedulers": "scheduler"}
_warned: set[tuple[type, str]] = set()


def task_member(task: Any, member: str) -> Any:
    """The task's optional `member` (a bound method or a value), or None where the task
    does not have it. `member` must be one of the protocol's: redline reads no other."""
    assert member in OPTIONAL_MEMBERS, f"{member!r} is not an optional Task member"
    return getattr(task, member, None)


def check_members(task: Any) -> list[str]:
    """Warn, once per task class and name, about each public member of `task` whose name
    is close to a protocol member it is not (`flops_per_sampel`): redline would ignore it.

    Returns the warnings given now (check_task calls it)."""
    said = []
    for name in _public_names(task):
        close = ([_NEAR_MISSES[name]] if name in _NEAR_MISSES else
                 difflib.get_close_matches(name, MEMBERS, n=1, cutoff=_MISSPELLING))
        if not close or (type(task), name) in _warned:
            continue
        _warned.add((type(task), name))
        said.append(f"redline: task {type(task).__name__}: {name!r} is not a Task member "
                    f"and is ignored; did you mean {close[0]!r}?")
        print(said[-1], file=sys.stderr, flush=True)
    return said


def _public_names(task: Any) -> list[str]:
    own = set(vars(task)) if hasattr(task, "__dict__") else set()
    for cls in type(task).__mro__:
        if cls not in (object, TaskBase) and cls.__module__ != "typing":
            own |= set(vars(cls))
    return sorted(n for n in own if not n.startswith("_") and n not in MEMBERS)


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
    return check_task(task, spec)


def check_task(task: Any, spec: str | None = None) -> Task:
    """`task`, checked against the protocol: TaskError for a missing required method; a
    missing optional method gets TaskBase's default, a missing name the spec's (or the
    class name); a near-miss member name is warned about (check_members). resolve_task
    calls it; so does whoever is handed a task object (the Trainer)."""
    _check_protocol(spec or type(task).__name__, task)
    check_members(task)
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
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(f"task {spec!r} is missing required method(s): {', '.join(missing)}")
    for method, default in _OPTIONAL_DEFAULTS.items():
        if not callable(getattr(task, method, None)):
            setattr(task, method, default.__get__(task))
    if not isinstance(getattr(task, "name", None), str):
        task.name = spec.rpartition(":")[2] or spec
