"""Atomic writes and the removal of a killed writer's temporary files (redline.files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from redline.errors import StorageError
from redline.files import atomic_file, atomic_write_text, remove_orphans, temp_path


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.html"
    atomic_write_text(target, "old")
    atomic_write_text(target, "néw")
    assert target.read_text(encoding="utf-8") == "néw"
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "previous")
    with pytest.raises(KeyboardInterrupt), atomic_file(target, "config") as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == [
        "config.yaml"]


def test_a_storage_fault_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match=r"cannot write report .*file/report\.html"):
        atomic_write_text(blocker / "report.html", "x", "report")


def test_only_temporary_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)
    orphan = tmp_path / f".step-00000004.pt.tmp-{dead}"
    live = tmp_path / f".report.html.tmp-{os.getppid()}"  # a live process is writing it
    other = [tmp_path / "notes.tmp", tmp_path / f"step.tmp-{dead}", tmp_path / "step-1.pt"]
    for path in (orphan, live, *other):
        path.write_text("x")
    assert remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and all(p.exists() for p in other)
    assert remove_orphans(tmp_path / "absent") == []


def test_the_temporary_name_is_beside_the_target() -> None:
    assert temp_path("/a/b/c.yaml") == Path(f"/a/b/.c.yaml.tmp-{os.getpid()}")
