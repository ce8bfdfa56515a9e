"""What the CLI hands to the workflows: tune's options and tuned config, the exit code of
a signal, the launch's rank arguments, the study's precision list, doctor's run check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from redline.config import ConfigError, load_config
from redline.diagnose.doctor import RunDirMissing, diagnose_run
from redline.errors import UserError
from redline.run.launch import launch, rank_argv
from redline.run.signals import exit_code
from redline.study.matrix import parse_precisions
from redline.tuning.tune import DEFAULT_BUDGET_S, FACTORS
from redline.tuning.workflow import Tuned, TuneOptions, parse_factors, write_tuned


@pytest.mark.parametrize(("interrupted", "code"), [
    (None, 0), ("SIGTERM", 143), ("SIGINT", 130), (15, 143), (2, 130)])
def test_a_signal_exits_as_a_shell_reports_it_and_no_signal_exits_0(
        interrupted: str | int | None, code: int) -> None:
    assert exit_code(interrupted) == code


def test_factors_default_to_all_and_keep_the_order_given() -> None:
    assert parse_factors(None) == FACTORS
    assert parse_factors(" batch, precision ,") == ("batch", "precision")


@pytest.mark.parametrize(("text", "named"), [("batch,speed", "speed"), (",", "(none)")])
def test_an_unknown_or_empty_factor_list_is_refused_naming_it(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown factor {re.escape(named)}; choose from"):
        parse_factors(text)


def _flags(**changed: object) -> dict[str, object]:
    flags: dict[str, object] = {"factors": None, "budget_s": None, "quality_steps": None,
                                "batch_only": False, "no_cache": False, "output": None,
                                "keep_budget": False}
    return {**flags, **changed}


def test_tune_options_take_the_defaults_and_the_flags() -> None:
    assert TuneOptions.from_flags(**_flags()) == TuneOptions(FACTORS, DEFAULT_BUDGET_S)  # type: ignore[arg-type]
    options = TuneOptions.from_flags(**_flags(budget_s=30.0, no_cache=True, factors="batch"))  # type: ignore[arg-type]
    assert (options.budget_s, options.cached, options.factors) == (30.0, False, ("batch",))


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("budget_s", 0.0, "--budget-s 0: give a positive number"),
    ("budget_s", -5.0, "--budget-s -5: give a positive number"),
    ("quality_steps", 1, "--quality-steps 1: give at least 2 steps")])
def test_tune_options_out_of_range_are_refused_in_a_sentence(flag: str, value: object,
                                                             says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        TuneOptions.from_flags(**_flags(**{flag: value}))  # type: ignore[arg-type]


def test_the_tuned_config_drops_the_budget_and_makes_a_task_file_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["task=tasks/mine.py:Mine", "memory.budget=2GiB"])
    out, dropped = write_tuned(config, "mine")
    written = yaml.safe_load(out.read_text())
    assert (out, dropped) == (Path("mine-tuned.yaml"), True)
    assert written["task"] == f"{(tmp_path / 'tasks' / 'mine.py').resolve()}:Mine"
    assert written["memory"]["budget"] is None


def test_the_tuned_config_keeps_the_budget_when_asked_and_a_named_task_as_given(
        tmp_path: Path) -> None:
    config = load_config(None, ["task=sr3-tiny", "memory.budget=2GiB"])
    out, dropped = write_tuned(config, "sr3-tiny", str(tmp_path / "t.yaml"), keep_budget=True)
    written = yaml.safe_load(out.read_text())
    assert (out, dropped) == (tmp_path / "t.yaml", False)
    assert (written["task"], written["memory"]["budget"]) == ("sr3-tiny", "2GiB")


def test_a_tune_result_as_json_names_the_written_config() -> None:
    class Report:
        def to_dict(self) -> dict[str, object]:
            return {"speedup": 1.5}

    tuned = Tuned(Path("x-tuned.yaml"), False, report=Report())  # type: ignore[arg-type]
    assert tuned.to_dict() == {"speedup": 1.5, "config": "x-tuned.yaml"}


@pytest.mark.parametrize("argv", [
    ["train", "sr3-tiny", "--nproc", "2", "--steps", "5"],
    ["train", "sr3-tiny", "--nproc=2", "--steps", "5"]])
def test_each_rank_gets_every_argument_but_nproc(argv: list[str]) -> None:
    assert rank_argv(argv) == ["train", "sr3-tiny", "--steps", "5"]


def test_a_launch_of_no_processes_is_refused() -> None:
    with pytest.raises(ConfigError, match="--nproc 0: give a number of processes >= 1"):
        launch(0, ["train", "--nproc", "0"])


def test_a_launch_inside_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="inside a torchrun launch"):
        launch(2, ["train", "--nproc", "2"])


def test_the_study_precision_list_defaults_to_fp32() -> None:
    assert parse_precisions(None) == ["fp32"]
    assert parse_precisions("fp32, bf16-mixed,") == ["fp32", "bf16-mixed"]


def test_doctor_on_a_missing_run_directory_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(RunDirMissing, match="does not exist") as e:
        diagnose_run(str(tmp_path / "nowhere"))
    assert isinstance(e.value, UserError)
