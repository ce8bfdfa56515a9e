"""The docs say what the code does: the README's commands parse, its links lead somewhere,
the configuration reference is the one generated from the config classes, and the guides'
code blocks run as written (docs/own-loop.md), in order, in a temp directory."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
from pathlib import Path

import pytest

from redline import config_reference
from redline.config import RunConfig
from redline.precision import PRECISIONS

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def cli_parser() -> argparse.ArgumentParser:
    """The CLI's real argparse parser (the one place to change if cli.py renames it)."""
    from redline import cli

    return cli._parser()


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
def test_the_own_loop_guide_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    blocks = python_blocks(DOCS / "own-loop.md")
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    for block in blocks:
        exec(compile(block, "docs/own-loop.md", "exec"), namespace)
    rows = [json.loads(line) for line in
            (tmp_path / "runs" / "own-loop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30, 40]
    assert [r["step"] for r in rows if "eval/loss" in r] == [20, 40]
    assert all(r["mfu"] for r in rows if "loss" in r)
    assert (tmp_path / "runs" / "own-loop" / "report.html").is_file()
    assert os.listdir(tmp_path / "runs" / "own-loop-stats" / "stats" / "layers")


@pytest.mark.slow
def test_the_own_loop_guide_runs_under_torchrun(tmp_path: Path) -> None:
    import subprocess
    import sys

    (script,) = re.findall(r"```python torchrun\n(.*?)```", (DOCS / "own-loop.md").read_text(),
                           flags=re.S)
    (tmp_path / "train_ddp.py").write_text(script)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "train_ddp.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    run = tmp_path / "runs" / "own-loop-ddp"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert all(r["dist/world_size"] == 2 and r["accumulation_steps"] == 2 for r in rows)
    ranks = [json.loads(line) for line in (run / "ranks.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0] * 4 + [1] * 4


def redline_commands(path: Path) -> list[list[str]]:
    """Each `redline ...` command of a page's shell blocks: every line of a ```bash block,
    the `$ ` lines of a ```console block (the rest is output); comments dropped."""
    commands = []
    for lang, block in re.findall(r"```(bash|console)\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            words = shlex.split(line, comments=True)
            if words[:1] == ["redline"]:
                commands.append(words[1:])
    return commands


def test_every_redline_command_in_the_readme_and_the_manual_parses() -> None:
    assert len(redline_commands(README)) >= 10, "the README's quick start shows the commands"
    parser = cli_parser()
    for argv in [c for page in [README, *DOCS.glob("*.md")] for c in redline_commands(page)]:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as e:  # --help exits 0; a refused command exits 2
            if e.code != 0:
                pytest.fail(f"the README shows a command the CLI refuses: "
                            f"redline {shlex.join(argv)}")


def test_a_wrong_command_is_caught_by_the_check(tmp_path: Path) -> None:
    """The check above can fail: a misspelled flag does not parse; output is not a command."""
    page = tmp_path / "page.md"
    page.write_text("```console\n$ redline train sr3-tiny --stepz 5  # wrong\n"
                    "redline 0.1.0  python 3.11\n```\n")
    (argv,) = redline_commands(page)
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        cli_parser().parse_args(argv)


def test_every_link_from_the_readme_into_docs_exists() -> None:
    links = re.findall(r"\]\(((?:docs/)[^)#\s]*)", README.read_text())
    assert links, "the README links the manual"
    for link in links:
        assert (ROOT / link).exists(), link
    for page in DOCS.glob("*.md"):  # and the manual's pages link each other truly
        for link in re.findall(r"\]\(([\w./-]+\.md)\)", page.read_text()):
            assert (page.parent / link).exists() or (ROOT / link).exists(), (page.name, link)


def test_the_configuration_reference_is_generated_from_the_config_classes() -> None:
    written = (DOCS / "configuration.md").read_text()
    assert written == config_reference.reference(), (
        "regenerate it: python -m redline.config_reference > docs/configuration.md")


def test_every_config_key_is_documented_with_its_meaning() -> None:
    documented = {key: meaning for key, _, _, meaning in config_reference.rows(RunConfig)}

    def keys(data: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in data.items():
            nested = isinstance(v, dict) and k != "task_args"
            out |= keys(v, prefix + k + ".") if nested else {prefix + k}
        return out

    assert set(documented) == keys(RunConfig().to_dict())
    assert all(len(meaning) > 10 for meaning in documented.values()), documented
    page = (DOCS / "configuration.md").read_text()
    assert all(f"`{key}`" in page for key in documented)
    assert all(name in documented["precision.name"] for name in PRECISIONS)


def test_a_field_without_a_docstring_is_refused() -> None:
    from dataclasses import dataclass

    @dataclass
    class Section:
        documented: int = 1
        """What it is."""
        bare: int = 2

    assert config_reference.field_docs(Section) == {"documented": "What it is."}
    with pytest.raises(AssertionError, match="bare"):
        config_reference.rows(Section)


def test_the_defaults_block_is_every_key_at_its_default() -> None:
    import yaml

    page = (DOCS / "configuration.md").read_text()
    block = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert RunConfig.from_dict(yaml.safe_load(block)) == RunConfig()
