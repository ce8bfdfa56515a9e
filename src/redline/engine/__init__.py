"""The Engine: one optimizer step over one batch, from your own loop or the trainer's.

`step.py` is the step itself (micro-batches accumulated exactly, a step the OOM guard
redoes), `update.py` the update that ends it (clip, skip a non-finite one, schedule; no
host read), `ranks.py` what it does across ranks (DDP's and FSDP's gradient sync, the
agreement that lets every rank redo a step together), `config.py` its settings.
"""

from redline.engine.config import CHECKED_STEPS, EngineConfig, LossFn
from redline.engine.step import Engine

__all__ = ["CHECKED_STEPS", "Engine", "EngineConfig", "LossFn"]
