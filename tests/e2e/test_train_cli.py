"""The CLI as a user runs it, in a temporary directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from redline.task import resolve_task
from redline.telemetry.jsonl import read_jsonl

from ..conftest import TOY, run_cli

pytestmark = pytest.mark.slow  # CLI runs in subprocesses: seconds each


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_train_a_users_file_task_writes_the_run_directory(tmp_path: Path) -> None:
    out = run_cli(["train", TOY, "--steps", "30", "--json", "--run-dir", "run",
                   "--set", "telemetry.log_every=7", "--set", "train.eval_every=20",
                   "--set", "checkpoint.every=10", "--set", "checkpoint.keep=2"], tmp_path)
    assert out.returncode == 0, out.stderr
    result = _last_json(out.stdout)
    assert result["steps"] == 30 and result["samples"] == 30 * 16
    assert result["precision"] == "fp32" and result["run_dir"] == "run"
    assert result["final_loss"] > 0 and "mae" in result["eval"] and "loss" in result["eval"]

    run = tmp_path / "run"
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "events.jsonl"):
        assert (run / name).is_file(), name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["task"] == TOY and config["train"]["steps"] == 30
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"]["kind"] == "cpu"

    train_rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train_rows] == [7, 14, 21, 28, 30]
    for r in train_rows:
        assert r["samples_per_s"] > 0 and r["step_time_s"] > 0 and r["lr"] == pytest.approx(2e-4)
    eval_rows = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in eval_rows] == [20, 30]
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert events[0] == "run_start" and "checkpoint_saved" in events

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000020.pt", "step-00000030.pt"]  # keep=2
    # A checkpoint is plain PyTorch: its "model" entry loads into the task's model.
    state = torch.load(run / "checkpoints" / ckpts[-1], weights_only=True)
    resolve_task(TOY).build_model().load_state_dict(state["model"])


@pytest.mark.parametrize(("args", "words"), [
    (["train", TOY, "--set", "train.stepz=5"], ["train.stepz", "train.steps"]),
    (["train", "sr4-tiny"], ["unknown task 'sr4-tiny'", "sr3-tiny"]),
    (["train", TOY, "--precision", "tf32"], ["tf32", "CUDA"]),
    (["train", TOY, "--precision", "fp9"], ["precision.name", "bf16-mixed"]),
    (["train", TOY, "--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
    (["train", TOY, "--batch-size", "0"], ["train.batch_size", ">= 1"]),
    (["train", TOY, "--set", "task_args.n=4"], ["fewer than one batch of 16"]),
    (["train", TOY, "--device", "cuda:7"], ["cuda:7"]),
    (["train"], ["no task given"]),
])
def test_bad_input_is_one_sentence_and_exit_2(tmp_path: Path, args: list[str],
                                               words: list[str]) -> None:
    out = run_cli([*args, "--steps", "2"] if "--steps" not in args else args, tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("redline: error: ")
    for w in words:
        assert w in lines[0]


def test_json_errors_are_json_too(tmp_path: Path) -> None:
    out = run_cli(["train", TOY, "--set", "train.lr=0", "--json"], tmp_path)
    assert out.returncode == 2
    assert "train.lr" in _last_json(out.stdout)["error"]


def test_a_finished_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    assert run_cli(["train", TOY, "--steps", "3", "--run-dir", "r"], tmp_path).returncode == 0
    again = run_cli(["train", TOY, "--steps", "3", "--run-dir", "r"], tmp_path)
    assert again.returncode == 2 and "--resume" in again.stderr
    changed = run_cli(["train", TOY, "--steps", "6", "--run-dir", "r", "--resume",
                       "--batch-size", "8"], tmp_path)
    assert changed.returncode == 2
    assert "train.batch_size=16" in changed.stderr and "train.batch_size=8" in changed.stderr
    longer = run_cli(["train", TOY, "--steps", "6", "--run-dir", "r", "--resume", "--json"],
                     tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert _last_json(longer.stdout)["resumed_from"] == 3
    assert _last_json(longer.stdout)["steps"] == 6


def test_resume_without_run_dir_takes_the_newest_run(tmp_path: Path) -> None:
    none = run_cli(["train", TOY, "--steps", "2", "--resume"], tmp_path)
    assert none.returncode == 2 and "no earlier run of 'toy'" in none.stderr
    first = run_cli(["train", TOY, "--steps", "2", "--json"], tmp_path)
    run_dir = _last_json(first.stdout)["run_dir"]
    assert run_dir.startswith("runs/toy-")
    more = run_cli(["train", TOY, "--steps", "4", "--resume", "--json"], tmp_path)
    assert more.returncode == 0, more.stderr
    assert _last_json(more.stdout)["run_dir"] == run_dir
    assert _last_json(more.stdout)["resumed_from"] == 2


def test_doctor(tmp_path: Path) -> None:
    out = run_cli(["doctor", "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    report = _last_json(out.stdout)
    assert report["ok"] is True and report["torch"] == torch.__version__
    assert report["precisions"]["fp32"] == "ok"
    if not torch.cuda.is_available():
        assert "CUDA" in report["precisions"]["tf32"] and report["device"]["kind"] == "cpu"
    plain = run_cli(["doctor"], tmp_path)
    assert plain.returncode == 0 and "ok: training can run here" in plain.stdout
    bad = run_cli(["doctor", "--device", "tpu"], tmp_path)
    assert bad.returncode == 1 and "BLOCKER" in bad.stdout


def test_help_explains(tmp_path: Path) -> None:
    out = run_cli(["train", "--help"], tmp_path)
    assert out.returncode == 0
    for word in ("sr3-tiny", "--resume", "--set", "examples:", "bf16-mixed"):
        assert word in out.stdout


def test_a_crash_in_user_code_keeps_the_completed_steps(tmp_path: Path) -> None:
    task = tmp_path / "crashy.py"
    task.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(TOY.split(':')[0]).parent)!r})\n"
        "from toy import ToyRegression\n\n"
        "class Crashy(ToyRegression):\n"
        "    calls = 0\n"
        "    def loss(self, model, batch):\n"
        "        Crashy.calls += 1\n"
        "        if Crashy.calls == int(os.environ.get('CRASH_AT', 0)):\n"
        "            raise RuntimeError('bug in user code')\n"
        "        return super().loss(model, batch)\n")
    out = run_cli(["train", "crashy.py:Crashy", "--steps", "20", "--run-dir", "r",
                   "--set", "train.eval_every=0"], tmp_path,
                  # call 1 counts FLOPs (on fake tensors, at start); call 14 is step 13's
                  env={"CRASH_AT": "14"})
    assert out.returncode == 1 and "bug in user code" in out.stderr  # the user's traceback
    assert "RuntimeError after step 12" in out.stderr
    assert (tmp_path / "r" / "checkpoints" / "step-00000012.pt").is_file()
    again = run_cli(["train", "crashy.py:Crashy", "--steps", "20", "--run-dir", "r", "--resume",
                     "--json", "--set", "train.eval_every=0"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert _last_json(again.stdout)["resumed_from"] == 12


def test_a_broken_import_in_the_users_task_keeps_its_traceback(tmp_path: Path) -> None:
    """The user's own import failing is their bug (exit 1, traceback), not bad input."""
    (tmp_path / "needs_pkg.py").write_text("import not_installed_anywhere\n\nclass T: ...\n")
    out = run_cli(["train", "needs_pkg.py:T", "--steps", "2"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback" in out.stderr and "not_installed_anywhere" in out.stderr


def test_a_missing_extra_is_one_sentence_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['tensorboard'] = None\n")
    out = run_cli(["train", TOY, "--steps", "2", "--tracker", "tensorboard"], tmp_path,
                  env={"PYTHONPATH": str(blocker)})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'redline[tensorboard]'" in lines[0]


def test_two_runs_cannot_write_one_run_directory(tmp_path: Path) -> None:
    """The second run is refused with the holder's pid; the first is untouched."""
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "redline", "train", TOY, "--steps", "60",
                              "--set", "task_args.sleep_s=0.03", "--run-dir", "shared",
                              "--set", "train.seed=7", "--no-progress"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "shared" / ".lock"
    deadline = time.monotonic() + 60
    while not (lock.is_file() and lock.read_text().strip()):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.02)
    second = run_cli(["train", TOY, "--steps", "60", "--run-dir", "shared",
                      "--set", "train.seed=8"], tmp_path)
    assert second.returncode == 2, second.stderr
    assert "in use by another redline run" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.wait(timeout=600) == 0, first.communicate()[1]
    steps = [r["step"] for r in read_jsonl(tmp_path / "shared" / "metrics.jsonl") if "loss" in r]
    assert steps == [50, 60]  # each once: only the first run wrote
    config = yaml.safe_load((tmp_path / "shared" / "config.yaml").read_text())
    assert config["train"]["seed"] == 7


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    from redline.run.rundir import latest_run_dir, new_run_dir

    made = [new_run_dir("toy", tmp_path / "runs") for _ in range(3)]
    assert len({p.name for p in made}) == 3 and all(p.is_dir() for p in made)
    assert latest_run_dir("toy", tmp_path / "runs") == made[-1]


@pytest.mark.parametrize("prepare", ["nothing", "an empty directory"])
def test_resume_of_something_that_is_not_a_run_is_bad_input(tmp_path: Path,
                                                            prepare: str) -> None:
    if prepare != "nothing":
        (tmp_path / "r").mkdir()
    out = run_cli(["train", TOY, "--steps", "2", "--run-dir", "r", "--resume"], tmp_path)
    assert out.returncode == 2, out.stderr
    words = "does not exist" if prepare == "nothing" else "holds no checkpoint"
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs mounted in tmp_path (root only: skipped elsewhere); unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_read_only_run_directory_is_one_sentence_and_keeps_what_it_holds(
        tmp_path: Path, small_disk: Path) -> None:
    first = run_cli(["train", TOY, "--steps", "4", "--run-dir", str(small_disk / "r")],
                    tmp_path)
    assert first.returncode == 0, first.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = run_cli(["train", TOY, "--steps", "8", "--run-dir", str(small_disk / "r"),
                   "--resume"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("redline: error: cannot write") and "Read-only file system" in line
    assert str(small_disk / "r") in line
    torch.load(small_disk / "r" / "checkpoints" / "step-00000004.pt", weights_only=True)


def test_a_disk_that_fills_mid_run_is_one_sentence_and_the_checkpoints_stay(
        tmp_path: Path, small_disk: Path) -> None:
    run = small_disk / "r"
    # about 600 KiB left: a few of these ~130 KiB checkpoints fit, then the disk is full
    (small_disk / "filler").write_bytes(b"\0" * (420 * 1024))
    out = run_cli(["train", TOY, "--steps", "60", "--run-dir", str(run), "--set",
                   "task_args.hidden=512", "--set", "checkpoint.every=5", "--set",
                   "checkpoint.keep=100", "--set", "train.eval_every=0"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("redline: error: cannot write checkpoint") and \
        "No space left on device" in last and "intact" in last
    saved = sorted((run / "checkpoints").glob("step-*.pt"))
    assert saved, "some checkpoints fit before the disk filled"
    for path in saved:
        torch.load(path, weights_only=True)  # each one complete


def test_micro_batches_through_batchnorm_are_said_once(tmp_path: Path) -> None:
    (tmp_path / "bn_task.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(TOY.split(':')[0]).parent)!r})\n"
        "from torch import nn\n"
        "from toy import ToyRegression\n\n"
        "class WithBatchNorm(ToyRegression):\n"
        "    def build_model(self):\n"
        "        return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),\n"
        "                             nn.Linear(32, 1))\n")
    out = run_cli(["train", "bn_task.py:WithBatchNorm", "--steps", "6", "--run-dir", "r",
                   "--batch-size", "8", "--set", "train.effective_batch_size=32"], tmp_path)
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if "BatchNorm" in line]
    assert len(notes) == 1 and "(1)" in notes[0] and "micro-batch of 8" in notes[0]
    assert "not the full-batch step" in notes[0]
    events = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl")
              if e["event"] == "batch_statistics"]
    assert [(e["layers"], e["micro_batch"], e["batch"]) for e in events] == [(["1"], 8, 32)]


NAN_TASK = (
    "import sys\n"
    f"sys.path.insert(0, {str(Path(TOY.split(':')[0]).parent)!r})\n"
    "from toy import ToyRegression\n\n"
    "class GoesNaN(ToyRegression):\n"
    "    calls = 0\n"
    "    def loss(self, model, batch):\n"
    "        loss = super().loss(model, batch)\n"
    "        if model.training:\n"
    "            GoesNaN.calls += 1  # call 1 counts FLOPs at start: call 31 is step 30\n"
    "            if GoesNaN.calls > 30:\n"
    "                return loss * float('nan')\n"
    "        return loss\n")


def _nan_run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    (tmp_path / "nan_task.py").write_text(NAN_TASK)
    out = run_cli(["train", "nan_task.py:GoesNaN", "--steps", "100", "--run-dir", "r",
                   "--set", "checkpoint.every=20", "--set", "train.eval_every=0", *extra],
                  tmp_path)
    return out, tmp_path / "r"


def _weights_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)["model"]
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def test_a_nan_loss_is_skipped_then_stops_the_run_and_keeps_finite_checkpoints(
        tmp_path: Path) -> None:
    out, run = _nan_run(tmp_path)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "steps in a row had non-finite loss or gradients" in last and "diverged" in last
    saved = sorted((run / "checkpoints").glob("step-*.pt"))
    assert saved and all(_weights_finite(p) for p in saved)  # NaN updates were skipped
    assert int(saved[-1].stem.split("-")[1]) == 50  # the window that saw 10 in a row
    windows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert windows[0]["skipped_steps"] == windows[0]["nonfinite_steps"] == 21
    assert windows[0]["first_nonfinite_step"] == 30
    assert windows[0]["loss"] == windows[0]["loss"]  # the finite steps' mean, not NaN
    found = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "nonfinite"]
    assert found[0]["step"] == 30 and "loss" in found[0]["where"]
    doctor = run_cli(["doctor", "r", "--json"], tmp_path)
    kinds = {f["kind"]: f["message"] for f in json.loads(doctor.stdout.splitlines()[-1])[
        "findings"]}
    assert "first at step 30" in kinds["nonfinite"] and "skipped" in kinds["nonfinite"]
    assert "after step 50 of 100 with stopping itself" in kinds["ended"]


def test_on_nonfinite_stop_names_the_step(tmp_path: Path) -> None:
    out, run = _nan_run(tmp_path, "--set", "train.on_nonfinite=stop",
                        "--set", "telemetry.log_every=5")
    assert out.returncode == 1, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("redline: error: the loss or gradients were not finite at step 30")
    assert all(_weights_finite(p) for p in (run / "checkpoints").glob("step-*.pt"))


def test_on_nonfinite_warn_applies_them_and_never_displaces_the_last_finite_checkpoint(
        tmp_path: Path) -> None:
    out, run = _nan_run(tmp_path, "--set", "train.on_nonfinite=warn",
                        "--set", "checkpoint.keep=2")
    assert out.returncode == 0, out.stderr
    assert "their updates were applied" in out.stderr
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    assert kept == ["step-00000020.pt"] and _weights_finite(run / "checkpoints" / kept[0])
    aside = sorted(p.name for p in (run / "checkpoints" / "nonfinite").glob("*.pt"))
    assert aside == ["step-00000040.pt", "step-00000060.pt", "step-00000080.pt",
                     "step-00000100.pt"]
    windows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert windows[0]["skipped_steps"] == 0 and windows[0]["nonfinite_steps"] == 21


LEAKY_TASK = (
    "import sys, torch\n"
    f"sys.path.insert(0, {str(Path(TOY.split(':')[0]).parent)!r})\n"
    "from toy import ToyRegression\n\n"
    "class Leaky(ToyRegression):\n"
    "    kept = []\n"
    "    def loss(self, model, batch):\n"
    "        loss = super().loss(model, batch)\n"
    "        if model.training:  # the classic: something of each step kept in a list\n"
    "            Leaky.kept.append(torch.ones(250_000))\n"
    "        return loss\n")


def test_memory_that_keeps_growing_is_reported_by_the_run_and_by_doctor(
        tmp_path: Path) -> None:
    (tmp_path / "leaky.py").write_text(LEAKY_TASK)
    out = run_cli(["train", "leaky.py:Leaky", "--steps", "120", "--run-dir", "r", "--set",
                   "telemetry.log_every=10", "--set", "train.eval_every=0"], tmp_path)
    assert out.returncode == 0, out.stderr
    warned = [line for line in out.stderr.splitlines() if "grew steadily" in line]
    assert len(warned) == 1 and "MiB per 1000 steps" in warned[0]
    doctor = run_cli(["doctor", "r"], tmp_path)
    assert "memory-growth" in doctor.stdout and "appended to a list" in doctor.stdout


# ---- Task hooks (issue 19, observed case 6) -------------------------------------------------

HOOKS = Path(__file__).resolve().parents[1] / "tasks" / "hookcases.py"


def _onecycle_lrs(steps: int, max_lr: float = 0.05) -> list[float]:
    """torch's own OneCycleLR over `steps` optimizer steps: the lr after each step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    lrs = []
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


def test_a_variable_length_task_with_a_collate_fn_trains_and_evaluates_each_set(
        tmp_path: Path) -> None:
    out = run_cli(["train", f"{HOOKS}:GRUTagger", "--steps", "12", "--run-dir", "run",
                   "--set", "task_args.eval_sets=2", "--set", "train.eval_every=6",
                   "--set", "telemetry.log_every=4", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(v == v and v < 10 for v in losses)
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [6, 12]
    for row in evals:  # each set's metrics under its own name; no unnamed set
        assert {"eval/short/loss", "eval/short/accuracy", "eval/long/loss",
                "eval/long/accuracy"} <= set(row)
        assert "eval/loss" not in row and "eval/accuracy" not in row
    assert "short/accuracy" in out.stdout  # the run's summary names the sets too


def test_a_task_optimizer_and_its_onecycle_schedule_set_the_lr_shown_everywhere(
        tmp_path: Path) -> None:
    # accumulation 4: the schedule must advance once per optimizer step, not per micro-batch
    out = run_cli(["train", f"{HOOKS}:OneCycleRegression", "--steps", "20", "--run-dir", "run",
                   "--set", "train.effective_batch_size=32", "--set", "train.batch_size=8",
                   "--set", "telemetry.log_every=1", "--set", "telemetry.trackers=[jsonl,console]",
                   "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    logged = [r["lr"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert logged == pytest.approx(_onecycle_lrs(20), rel=1e-9)
    said = "task optimizer SGD sets lr 0.05; train.lr 0.0002 is not used"
    assert out.stderr.count(said) == 1
    line = next(x for x in out.stderr.splitlines() if x.startswith("step 5 | "))
    assert f"| lr {logged[4]:.3g}" in line  # the console line shows the schedule's lr
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"# {said}" in config and "OneCycleLR" in config
    assert yaml.safe_load(config)["train"]["lr"] == 0.0002  # still the config, re-runnable
    env = json.loads((tmp_path / "run" / "environment.json").read_text())["run"]
    assert env["optimizer"] == "SGD" and env["scheduler"] == "OneCycleLR"
    assert env["lr"] == pytest.approx(0.05 / 25)  # OneCycleLR starts at max_lr / 25

    plain = run_cli(["train", f"{HOOKS}:OneCycleRegression", "--steps", "4", "--run-dir",
                     "plain", "--set", "task_args.schedule=false",
                     "--set", "telemetry.log_every=2", "--set",
                     "telemetry.trackers=[jsonl,console]", "--no-progress"], tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "step 2 | " in plain.stderr and "| lr 0.05" in plain.stderr
    assert "| lr 0.0002" not in plain.stderr and plain.stderr.count(said) == 1
