"""Without the framework installed, its callback names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

_HIDE = """
import sys
for name in {names!r}:
    sys.modules[name] = None  # import of it fails, as if not installed
from redline.integrations.{module} import RedlineCallback
try:
    RedlineCallback()
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("module", "names", "extra"), [
    ("lightning", ["lightning", "lightning.pytorch", "lightning.pytorch.callbacks",
                   "pytorch_lightning", "pytorch_lightning.callbacks"], "lightning"),
    ("transformers", ["transformers"], "transformers"),
])
def test_a_missing_framework_names_the_extra(module: str, names: list[str], extra: str) -> None:
    out = subprocess.run([sys.executable, "-c", _HIDE.format(names=names, module=module)],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("MissingExtra"), out.stdout + out.stderr
    assert f"pip install 'redline[{extra}]'" in out.stdout
