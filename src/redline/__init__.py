"""redline: PyTorch training at the limit of the hardware, safely, with the evidence.

The public names are imported on first use, so `import redline` (and the telemetry writer
process, which runs `python -m redline.telemetry.writer`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {"RunConfig": "redline.config", "load_config": "redline.config",
            "Engine": "redline.engine", "Callback": "redline.events",
            "Event": "redline.events", "Periodic": "redline.events", "State": "redline.events",
            "Sample": "redline.task", "Task": "redline.task", "TaskBase": "redline.task",
            "Telemetry": "redline.telemetry.session",
            "TelemetryConfig": "redline.telemetry.config", "Trainer": "redline.run.trainer",
            "build_job": "redline.job.build", "autobatch": "redline.tuning.autobatch"}

__all__ = ["Callback", "Engine", "Event", "Periodic", "RunConfig", "Sample", "State", "Task",
           "TaskBase", "Telemetry", "TelemetryConfig", "Trainer", "__version__", "autobatch",
           "build_job", "load_config"]

if TYPE_CHECKING:
    from redline.config import RunConfig, load_config
    from redline.engine import Engine
    from redline.events import Callback, Event, Periodic, State
    from redline.job.build import build_job
    from redline.run.trainer import Trainer
    from redline.task import Sample, Task, TaskBase
    from redline.telemetry.config import TelemetryConfig
    from redline.telemetry.session import Telemetry
    from redline.tuning.autobatch import autobatch


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'redline' has no attribute {name!r}")
