"""The `telemetry` section: what a run records, where to, and how often."""

from __future__ import annotations

from dataclasses import dataclass

from redline.errors import require
from redline.telemetry.sinks import check_name
from redline.telemetry.sinks.wandb import MODES as WANDB_MODES


@dataclass(frozen=True)
class TelemetryConfig:
    """Windows of training metrics, hardware samples, and the trackers that receive them."""

    log_every: int = 50
    """Steps per window: one record per window to metrics.jsonl and every tracker."""
    trackers: tuple[str, ...] = ("jsonl",)
    """Sinks (telemetry/sinks): jsonl, console, tensorboard, wandb, a name registered in
    the entry-point group `redline.sinks`, or package.module:Class / path/file.py:Class."""
    system_every_s: float = 2.0
    """Hardware sampling period (slow metrics: 5x longer)."""
    peak_flops: float | None = None
    """FLOP/s that MFU divides by; null: the device table, or a measured matmul on CPU."""
    wandb_mode: str | None = None
    """online | offline | disabled; null: W&B's own default (WANDB_MODE, else online)."""
    wandb_project: str | None = None
    """The W&B project; null: "redline"."""
    wandb_group: str | None = None
    """W&B run group; null: none (redline study puts each study's runs in one group)."""

    def __post_init__(self) -> None:
        require(self.log_every >= 1, "telemetry.log_every", self.log_every, "an integer >= 1")
        require(self.system_every_s > 0, "telemetry.system_every_s", self.system_every_s,
                "a positive number of seconds")
        require(self.peak_flops is None or self.peak_flops > 0, "telemetry.peak_flops",
                self.peak_flops, "a positive number of FLOP/s or null")
        require(self.wandb_mode is None or self.wandb_mode in WANDB_MODES,
                "telemetry.wandb_mode", self.wandb_mode,
                "null or one of " + ", ".join(WANDB_MODES))
        # a YAML list arrives as a list; repeated names count once
        object.__setattr__(self, "trackers", tuple(dict.fromkeys(self.trackers)))
        for name in self.trackers:
            require(isinstance(name, str), "telemetry.trackers", name, "a list of names")
            check_name(name)

    @property
    def sink_options(self) -> dict[str, str | None]:
        """What the sinks read from this section (SinkContext.options)."""
        return {"wandb_mode": self.wandb_mode, "wandb_project": self.wandb_project,
                "wandb_group": self.wandb_group}
