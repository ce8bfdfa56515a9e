from __future__ import annotations

import random
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch

from redline.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_latest,
    save_checkpoint,
    verify,
)
from redline.rng import rng_state, set_rng_state


def _payload(v: float) -> dict[str, object]:
    return {"model": {"w": torch.full((3,), v)}}


def test_keeps_the_newest_k_and_leaves_no_temp_files(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, _payload(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030.pt",
                                                            "step-00000040.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030.pt",
                                                          "step-00000040.pt"]
    _, payload = load_latest(tmp_path)  # type: ignore[misc]
    assert payload["step"] == 40 and payload["model"]["w"][0] == 40.0


def test_a_corrupt_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _payload(1), keep=3)
    newest = save_checkpoint(tmp_path, 2, _payload(2), keep=3)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    skipped: list[str] = []
    path, payload = load_latest(tmp_path, on_skip=lambda p, why: skipped.append(why))  # type: ignore[misc]
    assert payload["step"] == 1 and path.name == "step-00000001.pt"
    assert len(skipped) == 1 and "truncated or corrupt" in skipped[0]


def test_all_corrupt_is_a_clear_error_and_empty_is_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path) is None
    (tmp_path / "step-00000005.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoint"):
        load_latest(tmp_path)


def test_rng_states_round_trip() -> None:
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 3, {**_payload(3), "rng": rng_state()}, keep=1)
    torch.load(path, weights_only=True)  # would raise on any non-plain object


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_tensor_fail_verification_and_fall_back(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, _payload(1), keep=3)
    newest = save_checkpoint(tmp_path, 2, {"model": {"w": torch.arange(4096.0)}}, keep=3)
    raw = newest.read_bytes()
    _flip(newest, raw.index(torch.arange(4096.0)[1000:1002].numpy().tobytes()))
    assert torch.load(newest, weights_only=True)["step"] == 2  # torch does not notice
    with pytest.raises(CheckpointError, match=r"record '.*/data/0' fails its CRC-32 check"):
        verify(newest)
    skipped: list[str] = []
    _, payload = load_latest(tmp_path, on_skip=lambda p, why: skipped.append(why))  # type: ignore[misc]
    assert payload["step"] == 1 and "CRC-32" in skipped[0]
    assert list_checkpoints(tmp_path, unreadable=True)[0].name == newest.name


def test_an_interrupted_save_leaves_no_temporary_file_and_the_previous_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = save_checkpoint(tmp_path, 1, _payload(1), keep=3)

    def interrupted(obj: object, f: BinaryIO) -> None:
        f.write(b"PK partial")
        try:  # as torch's zip writer reports a KeyboardInterrupt raised inside its write
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _payload(2), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [before.name]
    monkeypatch.undo()
    assert load_latest(tmp_path)[1]["step"] == 1  # type: ignore[index]
