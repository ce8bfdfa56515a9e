from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import redline.task as task_mod
from redline.task import TaskError, available_tasks, resolve_task

from ..conftest import TOY


def test_builtin_names_are_listed_in_the_error() -> None:
    with pytest.raises(TaskError) as e:
        resolve_task("sr4-tiny")
    msg = str(e.value)
    assert "sr4-tiny" in msg and "sr3-tiny" in msg and "file.py:Class" in msg


def test_file_spec_loads_a_protocol_only_task() -> None:
    t = resolve_task(TOY, {"n": 64})
    assert t.name == "toy" and len(t.train_data()) == 64
    # optional methods that the file lacks get the protocol's defaults
    assert t.samples(t.build_model(), None) == []


def test_module_spec_and_task_args_errors() -> None:
    t = resolve_task("tests.tasks.toy:ToyRegression")
    assert t.name == "toy"
    with pytest.raises(TaskError, match="does not accept task_args"):
        resolve_task(TOY, {"width": 3})
    with pytest.raises(TaskError, match="rejected its task_args: n must be"):
        resolve_task(TOY, {"n": 0})


@pytest.mark.parametrize(("spec", "words"), [
    ("missing_file.py:T", "does not exist"),
    ("no_such_pkg.mod:T", "cannot import module"),
    (f"{TOY.split(':')[0]}:Nope", "has no attribute 'Nope'"),
    ("collections:OrderedDict", "missing required method"),
])
def test_bad_specs_say_what_is_wrong(spec: str, words: str) -> None:
    with pytest.raises(TaskError, match=words):
        resolve_task(spec)


def test_entry_point_group_registers_tasks(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    ep = EntryPoint(name="toy-ep", value="tests.tasks.toy:ToyRegression",
                    group=task_mod.ENTRY_POINT_GROUP)

    def fake_entry_points(group: str) -> list[EntryPoint]:
        return [ep] if group == task_mod.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(task_mod, "entry_points", fake_entry_points)
    assert available_tasks()["toy-ep"] == "tests.tasks.toy:ToyRegression"
    assert resolve_task("toy-ep", {"n": 32}).name == "toy"
