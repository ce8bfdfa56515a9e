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
            "Event": "redline.events", "State": "redline.events", "Sample": "redline.task",
            "Task": "redline.task", "TaskBase": "redline.task", "Trainer": "redline.trainer"}

__all__ = ["Callback", "Engine", "Event", "RunConfig", "Sample", "State", "Task", "TaskBase",
           "Trainer", "__version__", "load_config"]

if TYPE_CHECKING:
    from redline.config import RunConfig, load_config
    from redline.engine import Engine
    from redline.events import Callback, Event, State
    from redline.task import Sample, Task, TaskBase
    from redline.trainer import Trainer


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'redline' has no attribute {name!r}")
