"""Third-party import noise, silenced for every command: lines a user cannot act on.

torchao, imported by anything (fp8 here, but also Lightning, transformers or a user's
task), logs a line per compiled extension it cannot load on this torch and torch's pytree
module logs a deprecation notice for each Enum torchao registers: four lines of warnings
before every command's first line, fp32 included. `quiet_third_party` raises those loggers
to ERROR and ignores the Python warnings those packages' imports issue about torch's
private APIs, for the whole process (the CLI calls it before it imports anything else);
errors still show. `REDLINE_VERBOSE=1` leaves them all as they are.
"""

from __future__ import annotations

import logging
import os
import warnings

# loggers whose import-time warnings are noise: torchao's own, and torch.utils._pytree's
# (torchao registers Enums there; the module logs under logging.getLogger(__name__))
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")
# Python warnings third-party packages issue about torch's pytree API
NOISY_WARNINGS = (r".*_register_pytree_node.* is deprecated",
                  r".*register_constant\(\) on Enum subclasses is deprecated",
                  r".*isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's


def quiet_third_party() -> bool:
    """Silence the module docstring's noise unless REDLINE_VERBOSE is set; whether it did."""
    if os.environ.get("REDLINE_VERBOSE", "").strip() not in ("", "0"):
        return False
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.ERROR:
            logger.setLevel(logging.ERROR)
    for message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", module=r"torchao(\..*)?$")
    return True
