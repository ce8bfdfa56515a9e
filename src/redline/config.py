"""RunConfig: every setting of a run, typed, validated, loaded from YAML and `--set`.

Every key is optional. Precedence: dataclass defaults < YAML file < `--set key=value`
(and the CLI shorthands, which are `--set` under another name). Each error names the key,
the value and what is allowed, as one sentence; its type is `ConfigError` (a ValueError),
which the CLI turns into exit code 2.
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


class ConfigError(ValueError):
    """A configuration key, value or file is wrong; the message says which and how to fix it."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


@dataclass
class TrainConfig:
    _section: ClassVar[str] = "train"
    steps: int = 1000
    epochs: int | None = None  # the run ends at whichever of steps/epochs comes first
    batch_size: int | str = 16  # micro-batch: samples per forward/backward, or "auto"
    effective_batch_size: int | None = None  # samples per optimizer step; null: batch_size
    eval_batch_size: int | None = None  # null: batch_size
    lr: float = 2.0e-4
    lr_scaling: str = "none"  # how lr follows the effective batch: none | linear | sqrt
    lr_reference_batch: int | None = None  # batch lr was tuned for; null: the configured one
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    eval_every: int = 200  # 0: evaluate only at the end
    eval_batches: int | None = None  # null: the whole evaluation set
    seed: int = 0

    SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "cosine", "linear")
    LR_SCALING: ClassVar[tuple[str, ...]] = ("none", "linear", "sqrt")

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        _require(self.epochs is None or self.epochs >= 1, "train.epochs", self.epochs,
                 "an integer >= 1 or null")
        _require(self.batch_size == "auto" or (isinstance(self.batch_size, int)
                 and self.batch_size >= 1), "train.batch_size", self.batch_size,
                 "an integer >= 1 or 'auto'")
        _require(self.lr_scaling in self.LR_SCALING, "train.lr_scaling", self.lr_scaling,
                 "one of " + ", ".join(self.LR_SCALING))
        _require(self.lr_reference_batch is None or self.lr_reference_batch >= 1,
                 "train.lr_reference_batch", self.lr_reference_batch,
                 "an integer >= 1 or null")
        if self.effective_batch_size is not None and isinstance(self.batch_size, int):
            _require(self.effective_batch_size >= self.batch_size,
                     "train.effective_batch_size", self.effective_batch_size,
                     f"null or at least train.batch_size ({self.batch_size})")
        _require(self.eval_batch_size is None or self.eval_batch_size >= 1,
                 "train.eval_batch_size", self.eval_batch_size, "an integer >= 1 or null")
        _require(self.lr > 0, "train.lr", self.lr, "a positive number")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _require(self.schedule in self.SCHEDULES, "train.schedule", self.schedule,
                 "one of " + ", ".join(self.SCHEDULES))
        _require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, ">= 0")
        _require(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip",
                 self.grad_clip, "a positive number or null (no clipping)")
        _require(self.eval_every >= 0, "train.eval_every", self.eval_every,
                 ">= 0 (0: only at the end)")
        _require(self.eval_batches is None or self.eval_batches >= 1, "train.eval_batches",
                 self.eval_batches, "an integer >= 1 or null")

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


@dataclass
class PrecisionConfig:
    _section: ClassVar[str] = "precision"
    name: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        from redline.precision import PRECISIONS

        _require(self.name in PRECISIONS, "precision.name", self.name,
                 "one of " + ", ".join(PRECISIONS))


@dataclass
class DataConfig:
    _section: ClassVar[str] = "data"
    num_workers: int | str = 0  # or "auto"
    pin_memory: bool | str = "auto"
    persistent_workers: bool | str = "auto"
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        _require(self.num_workers == "auto" or (isinstance(self.num_workers, int)
                 and self.num_workers >= 0), "data.num_workers", self.num_workers,
                 "an integer >= 0 or 'auto'")
        for key in ("pin_memory", "persistent_workers"):
            value = getattr(self, key)
            _require(isinstance(value, bool) or value == "auto", f"data.{key}", value,
                     "true, false or 'auto'")
        _require(self.prefetch_factor >= 1, "data.prefetch_factor", self.prefetch_factor,
                 "an integer >= 1")


@dataclass
class MemoryConfig:
    _section: ClassVar[str] = "memory"
    budget: int | str | None = None  # e.g. 2GiB: a CPU budget, or a cap below device memory
    target: float = 0.85  # share of the budget (or device memory) that autobatch fills
    oom_guard: bool = True  # redo a step with smaller micro-batches after an OOM
    grow_after: int = 100  # clean steps before the guard tries a larger micro-batch again

    def __post_init__(self) -> None:
        from redline.memory.probe import parse_size

        try:
            parse_size(self.budget, name="memory.budget")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(0 < self.target <= 1, "memory.target", self.target,
                 "a fraction in (0, 1], e.g. 0.85")
        _require(self.grow_after >= 0, "memory.grow_after", self.grow_after,
                 ">= 0 (0: never grow back)")

    @property
    def budget_bytes(self) -> int | None:
        from redline.memory.probe import parse_size

        return parse_size(self.budget, name="memory.budget")


@dataclass
class CheckpointConfig:
    _section: ClassVar[str] = "checkpoint"
    every: int = 500  # 0: only at the end (and on SIGTERM/SIGINT)
    keep: int = 3

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, ">= 0 (0: only at the end)")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


@dataclass
class TelemetryConfig:
    _section: ClassVar[str] = "telemetry"
    log_every: int = 50
    trackers: list[str] = field(default_factory=lambda: ["jsonl"])
    system_every_s: float = 2.0  # hardware sampling period (slow metrics: ~5x longer)
    peak_flops: float | None = None  # FLOP/s for MFU; null: device table or CPU measurement
    wandb_mode: str | None = None  # online | offline | disabled; null: W&B's own default
    wandb_project: str | None = None  # null: "redline"

    TRACKERS: ClassVar[tuple[str, ...]] = ("jsonl", "console", "tensorboard", "wandb")
    WANDB_MODES: ClassVar[tuple[str, ...]] = ("online", "offline", "disabled")

    def __post_init__(self) -> None:
        _require(self.log_every >= 1, "telemetry.log_every", self.log_every, "an integer >= 1")
        _require(self.system_every_s > 0, "telemetry.system_every_s", self.system_every_s,
                 "a positive number of seconds")
        _require(self.peak_flops is None or self.peak_flops > 0, "telemetry.peak_flops",
                 self.peak_flops, "a positive number of FLOP/s or null")
        _require(self.wandb_mode is None or self.wandb_mode in self.WANDB_MODES,
                 "telemetry.wandb_mode", self.wandb_mode,
                 "null or one of " + ", ".join(self.WANDB_MODES))
        for t in self.trackers:
            _require(t in self.TRACKERS, "telemetry.trackers", t,
                     "a list of: " + ", ".join(self.TRACKERS))


@dataclass
class RunConfig:
    _section: ClassVar[str] = ""
    task: str | None = None
    task_args: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, "")


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
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
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
               type(None): "null", list: "a list", dict: "a mapping"}


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
        if isinstance(value, base):
            if base is list:
                (item,) = typing.get_args(opt) or (Any,)
                if item is not Any and not all(isinstance(v, item) for v in value):
                    continue
            return value
    if list in [typing.get_origin(o) or o for o in options] and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    words = " or ".join(_TYPE_WORDS.get(typing.get_origin(o) or o, str(o)) for o in options)
    raise ConfigError(f"{key} must be {words}, got {value!r}")
