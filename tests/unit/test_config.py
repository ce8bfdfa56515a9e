from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from redline.config import ConfigError, RunConfig, load_config, parse_override


def test_defaults_match_design() -> None:
    c = RunConfig()
    assert c.train.steps == 1000 and c.train.batch_size == 16 and c.train.lr == 2e-4
    assert c.precision.name == "fp32" and c.telemetry.trackers == ("jsonl",)
    assert c.train.samples_per_step == 16


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("task: sr3-tiny\ntrain:\n  steps: 10\n  lr: 2e-4\n"
                 "precision:\n  name: bf16-mixed\n")
    c = load_config(f, ["train.steps=20", "task_args.size=32", "telemetry.trackers=jsonl,console"])
    assert c.task == "sr3-tiny" and c.train.steps == 20 and c.train.lr == pytest.approx(2e-4)
    assert isinstance(c.train.lr, float)
    assert c.precision.name == "bf16-mixed" and c.task_args == {"size": 32}
    assert c.telemetry.trackers == ("jsonl", "console")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    c = load_config(None, ["train.steps=7", "train.grad_clip=null", "task=x.py:T"])
    again = RunConfig.from_dict(yaml.safe_load(c.to_yaml()))
    assert again == c


@pytest.mark.parametrize(("override", "words"), [
    ("train.stepz=3", ["train.stepz", "did you mean 'train.steps'"]),
    ("bogus=1", ["'bogus'", "valid keys"]),
    ("train.steps=abc", ["train.steps", "integer", "'abc'"]),
    ("train.steps=0", ["train.steps", ">= 1", "0"]),
    ("train.steps=true", ["train.steps", "integer"]),
    ("train.lr=-1", ["train.lr", "positive"]),
    ("precision.name=fp9", ["precision.name", "fp32", "bf16-mixed", "'fp9'"]),
    ("data.num_workers=many", ["data.num_workers", "'auto'"]),
    ("telemetry.trackers=[jsonl,nope]", ["telemetry.trackers", "console", "'nope'"]),
    ("train.effective_batch_size=4", ["train.effective_batch_size", "batch_size (16)"]),
    ("train.schedule=exp", ["train.schedule", "cosine"]),
    ("train=3", ["train", "mapping"]),
    ("train.batch_size=big", ["train.batch_size", "'auto'", "'big'"]),
    ("memory.budget=lots", ["memory.budget", "2GiB", "'lots'"]),
    ("memory.target=1.5", ["memory.target", "(0, 1]"]),
    ("train.lr_scaling=cubic", ["train.lr_scaling", "sqrt"]),
])
def test_bad_values_name_key_value_and_allowed(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_auto_batch_and_memory_sizes() -> None:
    c = load_config(None, ["train.batch_size=auto", "memory.budget=2GiB"])
    assert c.train.auto_batch and c.memory.budget_bytes == 2 * 2**30
    assert load_config(None, ["memory.budget=1500000"]).memory.budget_bytes == 1_500_000


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["task=a", "task.x=1"])


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_a_config_file_not_in_utf8_or_a_directory_says_so_and_how_to_fix_it(
        tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  steps: 5  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 24 is 0xe9\); save it"):
        load_config(latin)
    with pytest.raises(ConfigError, match="is a directory, not a file; pass the YAML file"):
        load_config(tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"pass '.*config\.yaml' \(the run's config\)"):
        load_config(tmp_path)


def test_a_validated_config_is_immutable_and_updates_revalidate() -> None:
    c = load_config(None, ["train.steps=7"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.steps = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.telemetry = c.telemetry  # type: ignore[misc]
    changed = c.updated({"train.batch_size": 8, "telemetry.trackers": ["jsonl", "console"]})
    assert (changed.train.batch_size, c.train.batch_size) == (8, 16)
    assert changed.telemetry.trackers == ("jsonl", "console") and changed.train.steps == 7
    with pytest.raises(ConfigError, match=r"train\.effective_batch_size"):
        c.updated({"train.effective_batch_size": 4})  # below batch_size 16: refused again
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        c.updated({"train.stepz": 1})
    assert yaml.safe_load(changed.to_yaml())["telemetry"]["trackers"] == ["jsonl", "console"]


def test_user_sinks_are_checked_where_they_point(tmp_path: Path) -> None:
    sink = tmp_path / "my_sink.py"
    sink.write_text("class MySink: ...\n")
    ok = load_config(None, [f"telemetry.trackers=[jsonl, {sink}:MySink]"])
    assert ok.telemetry.trackers == ("jsonl", f"{sink}:MySink")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, ["telemetry.trackers=[jsonl, nowhere.py:MySink]"])
    with pytest.raises(ConfigError, match=r"cannot find module .no_such_pkg\.sinks."):
        load_config(None, ["telemetry.trackers=[no_such_pkg.sinks:Sink]"])


def test_the_configuration_reference_lists_every_key_at_its_default() -> None:
    """docs/configuration.md's defaults block: every key, each default true."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    block = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    documented = yaml.safe_load(block)
    defaults = RunConfig().to_dict()
    for section_name, values in defaults.items():
        if not isinstance(values, dict) or section_name == "task_args":
            continue
        assert set(documented[section_name]) == set(values), section_name
    assert set(documented) == set(defaults)
    documented["task"] = None  # the block shows an example task; its default is none
    assert RunConfig.from_dict(documented).to_dict() == defaults
