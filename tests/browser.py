"""A real browser for the report's tests: Debian's headless Chromium, network cut off.

`render(html)` loads a file with every request sent to a dead proxy (so anything the page
fetched from the network fails), returns the DOM after the page's scripts ran and every
console message the page printed, and saves a screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
         "--proxy-bypass-list=<-loopback>", "--hide-scrollbars"]


def chromium() -> str:
    """The browser's path; fails in CI (.ci/run installs it), skips elsewhere."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("no chromium: .ci/run installs it with apt-get install -y chromium")
    pytest.skip("no chromium here (apt-get install -y chromium)")


def render(html: Path, screenshot: Path) -> tuple[str, list[str]]:
    """(the DOM after load, the page's console messages); writes `screenshot`."""
    browser, url = chromium(), html.resolve().as_uri()
    dom = subprocess.run([browser, *FLAGS, "--enable-logging=stderr", "--v=0",
                          "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    subprocess.run([browser, *FLAGS, "--window-size=1280,3000", f"--screenshot={screenshot}",
                    url], capture_output=True, timeout=120, check=True)
    return dom.stdout, console


def external_references(html: str) -> list[str]:
    """Every src/href that points off the page (a network fetch when opened)."""
    return re.findall(r"""(?:src|href)\s*=\s*["']((?:https?:)?//[^"']+)""", html)
