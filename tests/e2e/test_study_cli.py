"""`redline study` and `redline report` as a user runs them, and the report in a browser."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from redline.telemetry.jsonl import read_jsonl

from ..browser import external_references, render
from ..conftest import ROOT, TOY, run_cli

pytestmark = pytest.mark.slow

DIGITS = f"{ROOT / 'tests' / 'tasks' / 'studycases.py'}:Digits"
DEEP = ["--set", "task_args.depth=3", "--set", "task_args.hidden=128"]  # fp8 has layers to convert


def _study(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["study", TOY, "--precision", "fp32,bf16-mixed,fp8-emulated", "--seeds", "2",
                    "--steps", "12", "--run-dir", "study", "--json", "--no-progress",
                    "--set", "telemetry.log_every=4", "--set", "inspect.every=4", *DEEP,
                    *extra], tmp_path)


def test_a_study_judges_each_precision_and_writes_a_report_a_browser_renders(
        tmp_path: Path) -> None:
    out = _study(tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.splitlines()[-1])
    settings = {e["setting"]: e for e in summary["settings"]}
    assert list(settings) == ["fp32", "bf16-mixed", "fp8-emulated"]
    assert settings["fp32"]["seeds"] == 2 and settings["bf16-mixed"]["seeds"] == 1
    assert settings["fp8-emulated"]["emulated"] and not settings["fp32"]["emulated"]
    for name in ("bf16-mixed", "fp8-emulated"):
        verdicts = {m: v["verdict"] for m, v in settings[name]["metrics"].items()}
        assert set(verdicts) == {"loss", "mae"}, verdicts
        assert set(verdicts.values()) <= {"within noise", "better", "worse"}
        assert settings[name]["speedup"] > 0
    assert summary["recommendation"]["setting"] != "fp8-emulated"  # never for its speed
    study = tmp_path / "study"
    for run in ("fp32-s0", "fp32-s1", "bf16-mixed-s0", "fp8-emulated-s0"):
        assert (study / run / "metrics.jsonl").is_file(), run
        assert (study / run / "samples" / "samples.json").is_file(), run

    html_path = study / "report.html"
    html = html_path.read_text()
    assert external_references(html) == []
    dom, console = render(html_path, tmp_path / "report.png")
    assert console == []  # no error, no warning, nothing printed
    assert 'data-rendered="ok"' in dom
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert images == html.count("<img ")
    table = dom[dom.index('id="summary-table"'):]
    table = table[:table.index("</table>")]
    assert all(f'data-setting="{name}"' in table for name in settings)
    assert "within fp32's run-to-run noise" in table or "beyond noise" in table
    plots = re.findall(r'data-plot="([^"]+)"', dom)
    for title in ("training loss", "gradient norm", "evaluation: eval/mae"):
        assert title in plots
    for name in settings:
        assert f"{name}: grad norm by layer" in plots
    assert 'id="fp8-table"' in dom and "first Linear" in dom
    rows = re.findall(r'<tr data-sample="(\d+)"', dom)
    assert rows == ["0", "1", "2", "3", "4"]  # 5 fixed inputs
    sample_table = dom[dom.index('data-section="samples"'):]
    for name in settings:  # every setting's output beside each input
        assert sample_table.count(f'data-output="{name}"') == 5
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_rebuilds_for_a_run_and_refuses_what_is_neither(tmp_path: Path) -> None:
    train = run_cli(["train", TOY, "--steps", "8", "--run-dir", "r", "--no-progress",
                     "--set", "inspect.every=4", "--set", "telemetry.log_every=4"], tmp_path)
    assert train.returncode == 0, train.stderr
    out = run_cli(["report", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    dom, console = render(tmp_path / "r" / "report.html", tmp_path / "run.png")
    assert console == [] and 'data-rendered="ok"' in dom
    assert 'data-section="diagnosis"' in dom and "r: grad norm by layer" in dom
    assert len(re.findall(r'<tr data-sample=', dom)) == 5
    (tmp_path / "junk").mkdir()
    bad = run_cli(["report", "junk"], tmp_path)
    assert bad.returncode == 2 and "neither a run directory" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_killed_study_resumes_without_redoing_finished_runs(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "redline", "study", TOY, "--precision", "fp32,bf16-mixed",
            "--seeds", "2", "--steps", "16", "--run-dir", "study", "--no-progress",
            "--set", "task_args.sleep_s=0.05", "--set", "checkpoint.every=4",
            "--set", "telemetry.log_every=4"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    study = tmp_path / "study"
    deadline = time.monotonic() + 120
    # killed once the first run is done and the second has a checkpoint
    while time.monotonic() < deadline and not (
            (study / "outcomes" / "fp32-s0.json").is_file()
            and list((study / "fp32-s1" / "checkpoints").glob("step-*.pt"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=180)
    first = (study / "fp32-s0" / "metrics.jsonl").read_bytes()
    assert not (study / "outcomes" / "bf16-mixed-s0.json").exists()

    out = run_cli([*args[3:], "--resume", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (study / "fp32-s0" / "metrics.jsonl").read_bytes() == first  # not redone
    events = [e["event"] for e in read_jsonl(study / "fp32-s1" / "events.jsonl")]
    assert "resumed" in events  # continued from its checkpoint
    summary = json.loads(out.stdout.splitlines()[-1])
    assert [e["status"] for e in summary["settings"]] == ["finished", "finished"]
    again = run_cli(args[3:], tmp_path)  # the same directory without --resume
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.parametrize(("extra", "message"), [
    (["--precision", "fp32,fp12"], "unknown precision 'fp12'"),
    (["--precision", "fp32", "--vary", "train.bach_size=8,16"], "unknown config key"),
    (["--precision", "fp32", "--vary", "train.batch_size"], "--vary expects"),
    (["--precision", "fp32", "--run-dir", "elsewhere"], "is not a study directory"),
])
def test_bad_study_input_is_one_sentence_and_exit_2(tmp_path: Path, extra: list[str],
                                                     message: str) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
    out = run_cli(["study", TOY, "--steps", "2", *extra], tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine"


def test_with_wandb_a_studys_runs_share_a_group_and_log_their_samples(tmp_path: Path) -> None:
    from redline.telemetry.wandb_reader import find_run_files, iter_records, read_history

    out = run_cli(["study", TOY, "--precision", "fp32,bf16-mixed", "--seeds", "1", "--steps",
                   "4", "--run-dir", "s", "--no-progress", "--tracker", "wandb",
                   "--set", "telemetry.wandb_mode=offline", "--set", "telemetry.log_every=2"],
                  tmp_path, env={"WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr
    for run in ("fp32-s0", "bf16-mixed-s0"):
        (path,) = find_run_files(tmp_path / "s" / run)
        (info,) = (r.run for r in iter_records(path) if r.WhichOneof("record_type") == "run")
        assert info.run_group == "s"
        rows = read_history(path)
        assert any(r.get("samples/images.count") == 5 for r in rows)


def test_observed_case_3_fp8_that_changed_nothing_is_flagged_and_short_runs_get_curves(
        tmp_path: Path) -> None:
    """Issue 19, observed case 3: a BatchNorm CNN with its own SGD, no layer fp8 qualifies
    for, 40 steps under the default log_every 50. fp8-emulated was listed at 1.71x "within
    noise" although bit-identical to fp32, and every curve was a single dot."""
    out = run_cli(["study", DIGITS, "--precision", "fp32,bf16-mixed,fp8-emulated", "--seeds",
                   "2", "--steps", "40", "--run-dir", "study", "--json", "--no-progress"],
                  tmp_path)
    assert out.returncode == 0, out.stderr
    assert "telemetry.log_every 50 -> 2" in out.stderr  # said so
    summary = json.loads(out.stdout.splitlines()[-1])
    by = {e["setting"]: e for e in summary["settings"]}
    fp8 = by["fp8-emulated"]
    assert fp8["fp8_converted"] == 0 and "changed nothing" in fp8["changed_nothing"]
    assert summary["recommendation"]["setting"] != "fp8-emulated"
    assert summary["recommendation"]["excluded"]["fp8-emulated"] == "changed nothing"
    for e in by.values():  # timed side by side, in rounds, with a verdict on the speed
        assert e["samples_per_s_source"] == "interleaved rounds" and len(e["rates"]) >= 3
        assert e["speed"]["kind"] in ("reference", "faster", "slower", "within noise")
    study = tmp_path / "study"
    for run in ("fp32-s0", "fp32-s1", "bf16-mixed-s0", "fp8-emulated-s0"):
        losses = [r for r in read_jsonl(study / run / "metrics.jsonl") if "loss" in r]
        assert len(losses) >= 20, (run, len(losses))
    html = (study / "report.html").read_text()
    row = html[html.index('data-setting="fp8-emulated"'):]
    assert 'data-flag="changed-nothing"' in row[:row.index("</tr>")]
    dom, console = render(study / "report.html", tmp_path / "report.png")
    assert console == [] and 'data-rendered="ok"' in dom
    assert 'class="plots"' in dom  # the curves in a grid
