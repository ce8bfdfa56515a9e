"""Sharded checkpoints (checkpoint_sharded.py) in one process: a plain model and AdamW,
no process group (what a single-process run with distributed.strategy fsdp writes).
The multi-process cases (2 ranks -> 1, 1 -> 2, kill -9) are in
tests/e2e/test_fsdp_checkpoint_cli.py."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from redline import checkpoint_sharded as sharded
from redline.checkpoint import (
    NONFINITE,
    UNREADABLE,
    CheckpointError,
    check_resumable,
    list_checkpoints,
    load_latest,
    save_checkpoint,
)
from redline.cli import main as cli
from redline.config import ConfigError
from redline.errors import StorageError
from redline.run import resume
from redline.run.export import export
from redline.run.rundir import remove_orphans


def _from_main(fn: Any) -> Any:  # a single process's Comm.from_main
    return fn()


def _trained(seed: int = 0, steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(3, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _save(directory: Path, step: int, model: nn.Module, optimizer: Any, keep: int = 3,
          finite: bool = True) -> Path:
    return sharded.save_sharded(directory, step, model, optimizer,
                                {"world_size": 1, "epoch": 0, "config": {}}, keep,
                                _from_main, finite=finite)


def test_a_saved_directory_loads_back_exactly_into_a_fresh_model(tmp_path: Path) -> None:
    model, optimizer = _trained()
    path = _save(tmp_path, 2, model, optimizer)
    assert path.name == "step-00000002" and path.is_dir()
    assert list_checkpoints(tmp_path) == [path]
    state = torch.load(path / sharded.STATE, weights_only=True)
    assert state["step"] == 2 and state["sharded"] and ".metadata" in state["files"]
    fresh, fresh_opt = _trained(seed=1, steps=1)
    sharded.load_into(path, fresh, fresh_opt)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    for pid in saved:
        for key, value in saved[pid].items():
            assert torch.equal(value, loaded[pid][key]), (pid, key)


def test_rotation_keeps_the_newest_and_nonfinite_goes_aside(tmp_path: Path) -> None:
    model, optimizer = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, optimizer, keep=2)
    aside = _save(tmp_path, 4, model, optimizer, keep=2, finite=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert aside == tmp_path / NONFINITE / "step-00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == [NONFINITE, "step-00000002",
                                                          "step-00000003"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "metadata"])
def test_a_damaged_or_missing_file_falls_back_to_the_previous(tmp_path: Path,
                                                              damage: str) -> None:
    model, optimizer = _trained()
    _save(tmp_path, 1, model, optimizer)
    newest = _save(tmp_path, 2, model, optimizer)
    shard = newest / "__0_0.distcp"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:50])
    elif damage == "delete":
        shard.unlink()
    else:
        (newest / ".metadata").unlink()
    skipped: list[str] = []
    found = load_latest(tmp_path, on_skip=lambda p, why: skipped.append(why), load=resume.read)
    assert found is not None and found[0].name == "step-00000001"
    assert len(skipped) == 1 and "step-00000002" in skipped[0]
    assert (tmp_path / UNREADABLE / "step-00000002").is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]


def test_an_interrupted_write_leaves_no_directory_and_the_previous_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _trained()
    _save(tmp_path, 1, model, optimizer)

    def stop(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # a second Ctrl-C while DCP writes

    monkeypatch.setattr(sharded.SafeWriter, "finish", stop)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_a_full_disk_is_a_storage_error_and_leaves_the_previous_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _trained()
    _save(tmp_path, 1, model, optimizer)

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sharded, "_write_state", full)
    with pytest.raises(StorageError, match=r"cannot write checkpoint .*step-00000002.*space"):
        _save(tmp_path, 2, model, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    monkeypatch.undo()
    _save(tmp_path, 1, model, optimizer)  # the same step again replaces it whole
    assert resume.read(tmp_path / "step-00000001")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_a_killed_writers_temporary_directory_is_no_checkpoint_and_is_removed(
        tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    model, optimizer = _trained()
    _save(checkpoints, 1, model, optimizer)
    dead = 2**22 + 12345  # above the default pid_max: no live process has it
    left = checkpoints / f".step-00000002.tmp-{dead}"
    left.mkdir()
    (left / "__0_0.distcp").write_bytes(b"half")
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000001"]
    assert remove_orphans(tmp_path) == [left]
    assert not left.exists()


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def test_metadata_naming_another_global_is_refused_with_one_sentence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, optimizer = _trained()
    path = _save(tmp_path, 1, model, optimizer)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(CheckpointError) as e:
        sharded.read_metadata(path / ".metadata")
    message = str(e.value)
    assert "names code outside torch.distributed.checkpoint" in message
    assert "\n" not in message and message.count(";") == 1
    assert not (tmp_path / "pwned").exists()


def test_strategy_may_not_change_on_resume_but_reshard_after_forward_may() -> None:
    saved = {"distributed": {"strategy": "fsdp", "reshard_after_forward": True}}
    check_resumable(saved, {"distributed": {"strategy": "fsdp",
                                            "reshard_after_forward": False}}, Path("s"))
    with pytest.raises(CheckpointError, match=r"distributed\.strategy='fsdp'.*same setting"):
        check_resumable(saved, {"distributed": {"strategy": "ddp",
                                                "reshard_after_forward": True}}, Path("s"))


@pytest.mark.parametrize("form", ["sharded", "file"])
def test_export_writes_the_bare_models_state_dict_from_either_form(tmp_path: Path,
                                                                   form: str) -> None:
    model, optimizer = _trained()
    checkpoints = tmp_path / "run" / "checkpoints"
    if form == "sharded":
        _save(checkpoints, 2, model, optimizer)
    else:  # what a DDP run's rank 0 might hold: the wrapper's keys
        wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
        save_checkpoint(checkpoints, 2, {"model": wrapped}, keep=3)
    assert cli(["export", str(tmp_path / "run"), "--to", str(tmp_path / "m.pt")]) == 0
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    fresh, _ = _trained(seed=1, steps=0)
    fresh.load_state_dict(state)  # strict: the bare model's keys
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_export_skips_a_damaged_checkpoint_and_picks_a_step(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    old, old_opt = _trained(steps=1)
    _save(checkpoints, 1, old, old_opt)
    model, optimizer = _trained(steps=2)
    newest = _save(checkpoints, 2, model, optimizer)
    (newest / "__0_0.distcp").write_bytes(b"x")
    source, _ = export(tmp_path, tmp_path / "m.pt")
    assert source.name == "step-00000001" and newest.is_dir()  # read only, not moved
    with pytest.raises(ConfigError, match="no checkpoint of step 5; choose one of 1, 2"):
        export(tmp_path, tmp_path / "m.pt", step=5)


@pytest.mark.parametrize("case", ["no run dir", "no checkpoint", "no parent", "a directory"])
def test_export_bad_input_is_one_sentence_and_exit_2(tmp_path: Path, case: str,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    run, to = tmp_path / "run", tmp_path / "m.pt"
    if case != "no run dir":
        run.mkdir()
    if case in ("no parent", "a directory"):
        model, optimizer = _trained(steps=1)
        _save(run / "checkpoints", 1, model, optimizer)
        to = tmp_path / "missing" / "m.pt" if case == "no parent" else tmp_path
    assert cli(["export", str(run), "--to", str(to)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("redline: error: ") and "\n" not in err
    assert not (tmp_path / "m.pt").exists()
