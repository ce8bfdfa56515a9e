"""redline: PyTorch training at the limit of the hardware, safely, with the evidence."""

__version__ = "0.1.0"

from redline.config import RunConfig, load_config
from redline.engine import Engine
from redline.events import Callback, Event, State
from redline.task import Sample, Task, TaskBase

__all__ = ["Callback", "Engine", "Event", "RunConfig", "Sample", "State", "Task", "TaskBase",
           "Trainer", "__version__", "load_config"]


def __getattr__(name: str) -> object:
    if name == "Trainer":  # the trainer pulls in the workflows; import it on first use
        from redline.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'redline' has no attribute {name!r}")
