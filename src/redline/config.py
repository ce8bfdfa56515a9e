"""RunConfig: every setting of a run, typed, validated, loaded from YAML and `--set`.

Every key is optional. Precedence: dataclass defaults < YAML file < `--set key=value`
(and the CLI shorthands, which are `--set` under another name). Each error names the key,
the value and what is allowed, as one sentence; its type is `ConfigError` (a ValueError),
which the CLI turns into exit code 2.

Each mechanism owns its section (precision.PrecisionConfig, data.DataConfig,
memory.config.MemoryConfig, checkpoint.CheckpointConfig, telemetry.config.TelemetryConfig,
inspector.InspectConfig)
and validates names against its own registry; this module composes them with the
recipe (`train`) and loads the whole. A RunConfig is frozen once validated: a workflow
that resolves a value (the batch search's micro-batch, say) makes a new one with
`updated`, which validates again.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from redline.checkpoint import CheckpointConfig
from redline.data import DataConfig
from redline.distributed import DistributedConfig
from redline.errors import ConfigError, require
from redline.inspector import InspectConfig
from redline.memory.config import MemoryConfig
from redline.precision import PrecisionConfig
from redline.telemetry.config import TelemetryConfig

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "InspectConfig", "MemoryConfig",
           "PrecisionConfig", "RunConfig", "TelemetryConfig", "TrainConfig", "load_config",
           "parse_override", "set_dotted"]


@dataclass(frozen=True)
class TrainConfig:
    """The `train` section: the recipe (how many steps, on what batch, at what learning rate)."""

    steps: int = 1000
    """Optimizer steps; the run ends at whichever of steps and epochs comes first."""
    epochs: int | None = None
    """Passes over the training set; null: no limit."""
    batch_size: int | str = 16
    """The micro-batch (samples per forward/backward), or "auto" to fill memory.target."""
    effective_batch_size: int | None = None
    """Samples per optimizer step, reached by gradient accumulation; null: batch_size."""
    eval_batch_size: int | None = None
    """Samples per evaluation batch; null: batch_size (keep it at or below the micro-batch
    on a CPU without a budget: evaluation batches are not checked against the memory
    available)."""
    lr: float = 2.0e-4
    """AdamW learning rate at the effective batch (see lr_scaling)."""
    lr_scaling: str = "none"
    """How lr follows a changed effective batch: none | linear | sqrt."""
    lr_reference_batch: int | None = None
    """The effective batch lr was tuned for; null: the configured one."""
    grow_effective_batch: bool = False
    """With batch_size auto (and in redline tune): let the effective batch grow to the
    fastest micro-batch, lr following lr_scaling (printed old -> new); false: the effective
    batch is kept (effective_batch_size, else the batch the run would have had)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    schedule: str = "constant"
    """The learning-rate schedule after warm-up: constant | cosine | linear (both decay to 0
    at the last step)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; null: no clipping."""
    on_nonfinite: str = "skip"
    """A step whose loss or gradients are not finite: skip (its update is not applied,
    counted in skipped_steps), stop (the run ends, naming the step), warn (applied)."""
    nonfinite_patience: int = 10
    """With skip: this many non-finite steps in a row end the run; 0: never. (fp16's loss
    scaler skipping overflowed gradients of a finite loss is not counted, unless it skips
    more than half of the last 20 updates: then it warns, and its skips count.)"""
    eval_every: int = 200
    """Steps between evaluations; 0: only at the end."""
    eval_batches: int | None = None
    """Evaluation batches per evaluation; null: the whole evaluation set."""
    seed: int = 0
    """Seeds python, numpy and torch before the model is built; fixes the data order."""
    samples: int = 5
    """Fixed evaluation inputs whose outputs (Task.samples) the run saves at its end, for
    the report (RUN_DIR/samples/); 0: none."""

    SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "cosine", "linear")
    LR_SCALING: ClassVar[tuple[str, ...]] = ("none", "linear", "sqrt")
    ON_NONFINITE: ClassVar[tuple[str, ...]] = ("skip", "stop", "warn")

    def __post_init__(self) -> None:
        require(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        require(self.epochs is None or self.epochs >= 1, "train.epochs", self.epochs,
                "an integer >= 1 or null")
        require(self.batch_size == "auto" or (isinstance(self.batch_size, int)
                and self.batch_size >= 1), "train.batch_size", self.batch_size,
                "an integer >= 1 or 'auto'")
        require(self.lr_scaling in self.LR_SCALING, "train.lr_scaling", self.lr_scaling,
                "one of " + ", ".join(self.LR_SCALING))
        require(self.lr_reference_batch is None or self.lr_reference_batch >= 1,
                "train.lr_reference_batch", self.lr_reference_batch,
                "an integer >= 1 or null")
        if (self.batch_size == "auto" and self.grow_effective_batch
                and self.lr_scaling != "none"
                and not (self.lr_reference_batch or self.effective_batch_size)):
            raise ConfigError(f"train.lr_scaling {self.lr_scaling} with batch_size auto and "
                              "grow_effective_batch needs the batch train.lr was tuned for: "
                              "set train.lr_reference_batch")
        if self.effective_batch_size is not None and isinstance(self.batch_size, int):
            require(self.effective_batch_size >= self.batch_size,
                    "train.effective_batch_size", self.effective_batch_size,
                    f"null or at least train.batch_size ({self.batch_size})")
        require(self.eval_batch_size is None or self.eval_batch_size >= 1,
                "train.eval_batch_size", self.eval_batch_size, "an integer >= 1 or null")
        require(self.lr > 0, "train.lr", self.lr, "a positive number")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        require(self.schedule in self.SCHEDULES, "train.schedule", self.schedule,
                "one of " + ", ".join(self.SCHEDULES))
        require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, ">= 0")
        require(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip",
                self.grad_clip, "a positive number or null (no clipping)")
        require(self.on_nonfinite in self.ON_NONFINITE, "train.on_nonfinite",
                self.on_nonfinite, "one of " + ", ".join(self.ON_NONFINITE))
        require(self.nonfinite_patience >= 0, "train.nonfinite_patience",
                self.nonfinite_patience, ">= 0 (0: never stop)")
        require(self.eval_every >= 0, "train.eval_every", self.eval_every,
                ">= 0 (0: only at the end)")
        require(self.eval_batches is None or self.eval_batches >= 1, "train.eval_batches",
                self.eval_batches, "an integer >= 1 or null")
        require(self.samples >= 0, "train.samples", self.samples, "an integer >= 0 (0: none)")

    @property
    def auto_batch(self) -> bool:
        return self.batch_size == "auto"

    @property
    def micro_batch(self) -> int:
        assert isinstance(self.batch_size, int), "batch_size: auto is resolved before use"
        return self.batch_size

    @property
    def samples_per_step(self) -> int:
        return self.effective_batch_size or self.micro_batch


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Immutable: `updated({...})` returns a changed, validated copy."""

    task: str | None = None
    """A built-in name, package.module:Class or path/file.py:Class."""
    task_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the task's constructor."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The recipe: how many steps, on what batch, at what learning rate."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """The number format the run trains in, and the model's layout and compilation."""
    data: DataConfig = field(default_factory=DataConfig)
    """How the DataLoader feeds the step."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The memory budget, what `batch_size: auto` fills, and the OOM guard."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """How often the run saves what it needs to resume."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Under torchrun: DDP or FSDP2 sharding over the ranks."""
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    """Windows of training metrics, hardware samples, and the trackers that receive them."""
    inspect: InspectConfig = field(default_factory=InspectConfig)
    """Per-layer statistics of parameters, gradients and activations (RUN_DIR/stats/)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able data (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, "")

    def updated(self, values: dict[str, Any]) -> RunConfig:
        """A copy with dotted keys changed (e.g. {"train.lr": 1e-3}), validated like YAML."""
        data = self.to_dict()
        for key, value in values.items():
            set_dotted(data, key, value)
        return RunConfig.from_dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file at `path`, then each `section.key=value` override."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path else {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return RunConfig.from_dict(data)


def parse_override(item: str) -> tuple[str, Any]:
    """'train.steps=50' -> ('train.steps', 50); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.steps=50), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; ConfigError (one sentence: the problem and the
    fix) for a missing path, a directory, an unreadable file or one not in UTF-8."""
    if path.is_dir():
        inside = path / "config.yaml"
        fix = (f"pass {str(inside)!r} (the run's config)" if inside.is_file() else
               "pass the YAML file itself")
        raise ConfigError(f"--config {str(path)!r} is a directory, not a file; {fix}")
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start} "
                          f"is 0x{e.object[e.start]:02x}); save it as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read "
                          f"({e.strerror or type(e).__name__}); check its permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, "
                          f"got a {type(data).__name__}")
    return data


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown_key(prefix, str(key), names))
        hint = hints[key]
        full = prefix + key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, full + ".")
        else:
            kwargs[key] = _coerce(full, value, hint)
    return cls(**kwargs)


def _unknown_key(prefix: str, key: str, names: list[str]) -> str:
    where = f"section {prefix.rstrip('.')!r}" if prefix else "the config"
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return (f"unknown config key {prefix + key!r}{hint} "
            f"(valid keys in {where}: {', '.join(names)})")


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               type(None): "null", list: "a list", tuple: "a list", dict: "a mapping"}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (Union, types.UnionType) else (hint,)
    for opt in options:
        base = typing.get_origin(opt) or opt
        if base is Any:
            return value
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, bool):
            continue
        if base is float and isinstance(value, str):
            try:  # YAML 1.1 reads "2e-4" as a string; accept it as the number it is
                return float(value)
            except ValueError:
                continue
        if base is tuple and isinstance(value, list):
            value = tuple(value)
        if isinstance(value, base):
            if base in (list, tuple):
                item = (typing.get_args(opt) or (Any,))[0]
                if item is not Any and not all(isinstance(v, item) for v in value):
                    continue
            return value
    kinds = [typing.get_origin(o) or o for o in options]
    if (list in kinds or tuple in kinds) and isinstance(value, str):  # "a,b" on the CLI
        items = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(items) if tuple in kinds else items
    words = " or ".join(_TYPE_WORDS.get(typing.get_origin(o) or o, str(o)) for o in options)
    raise ConfigError(f"{key} must be {words}, got {value!r}")
