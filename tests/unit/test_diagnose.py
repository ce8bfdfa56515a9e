"""redline.diagnose: findings from synthetic run directories, one rule at a time."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from redline.diagnose import Finding, diagnose, render

CPU = {"device": {"kind": "cpu", "name": "cpu", "memory_total": 16 * 2**30,
                  "supports_bf16": False}, "precisions": {"bf16-mixed": "ok"}}
CUDA = {"device": {"kind": "cuda", "name": "NVIDIA H100", "memory_total": 80 * 2**30,
                   "supports_bf16": True}, "precisions": {"bf16-mixed": "ok"}}


def config(**over: Any) -> dict[str, Any]:
    """A resolved config; `over` maps dotted keys to values."""
    cfg: dict[str, Any] = {
        "train": {"batch_size": 8, "effective_batch_size": None},
        "precision": {"name": "bf16-mixed", "compile": False},
        "data": {"num_workers": 0, "pin_memory": "auto", "persistent_workers": "auto"},
        "memory": {"budget": None, "target": 0.85},
        "telemetry": {"log_every": 50},
    }
    for dotted, value in over.items():
        section, key = dotted.split(".")
        cfg[section][key] = value
    return cfg


ACCUMULATING = config(**{"train.effective_batch_size": 32})  # 4 micro-batches of 8 a step


def window(step: int, **over: Any) -> dict[str, Any]:
    """One healthy training window; `over` replaces keys (None removes one)."""
    row: dict[str, Any] = {"step": step, "time": 1000.0 + step, "loss": 1.0, "lr": 1e-3,
                           "samples_per_s": 400.0, "step_time_s": 0.02, "data_wait_pct": 2.0,
                           "mfu": None, "mem_pct": 80.0, "micro_batch": 8,
                           "redline/overhead_pct": 0.1, "redline/host_syncs": 0,
                           "skipped_steps": 0}
    row.update(over)
    return {k: v for k, v in row.items() if v is not None}


def windows(count: int = 5, **over: Any) -> list[dict[str, Any]]:
    return [window(10 * (i + 1), **over) for i in range(count)]


def make_run(root: Path, *, cfg: dict[str, Any] | None = None, env: dict[str, Any] | None = None,
             metrics: list[dict[str, Any]] | None = None,
             system: list[dict[str, Any]] | None = None,
             events: list[dict[str, Any]] | None = None) -> Path:
    """Write only the files given, as the trainer would."""
    root.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    if env is not None:
        (root / "environment.json").write_text(json.dumps(env))
    for name, rows in (("metrics", metrics), ("system", system), ("events", events)):
        if rows is not None:
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def healthy(root: Path, **kw: Any) -> Path:
    args: dict[str, Any] = {"cfg": config(), "env": CPU, "metrics": windows(), "system": [],
                            "events": []}
    args.update(kw)
    return make_run(root, **args)


def by_kind(findings: list[Finding]) -> dict[str, Finding]:
    return {f.kind: f for f in findings}


def test_healthy_run_is_ok(tmp_path: Path) -> None:
    findings, notes = diagnose(healthy(tmp_path))
    kinds = by_kind(findings)
    assert set(kinds) == {"ok", "telemetry-overhead"}
    assert "400.0 samples/s" in kinds["ok"].message and "20.0 ms" in kinds["ok"].message
    assert kinds["ok"].value == 400.0
    assert kinds["telemetry-overhead"].severity == "info"
    assert notes == []


def test_input_bound(tmp_path: Path) -> None:
    rows = [window(10, data_wait_pct=95.0)] + [window(10 * i, data_wait_pct=38.0)
                                               for i in range(2, 14)]
    f = by_kind(diagnose(healthy(tmp_path, metrics=rows))[0])["input-bound"]
    assert f.severity == "warning" and f.value == 38.0
    assert "38 %" in f.message and "12 windows" in f.message
    assert "data.num_workers (now 0)" in f.message
    assert "pin_memory" not in f.message  # CPU: pinning does not apply
    assert "ok" not in by_kind(diagnose(tmp_path)[0])


def test_input_bound_cuda_explicit_false_settings(tmp_path: Path) -> None:
    cfg = config(**{"data.pin_memory": False, "data.persistent_workers": False,
                    "data.num_workers": 2})
    run = healthy(tmp_path, cfg=cfg, env=CUDA, metrics=windows(data_wait_pct=20.0),
                  system=[{"time": 1020.0, "gpu/util_pct": 30.0}])
    kinds = by_kind(diagnose(run)[0])
    msg = kinds["input-bound"].message
    assert "(now 2)" in msg and "data.pin_memory: true" in msg
    assert "data.persistent_workers: true" in msg
    assert "host-bound" not in kinds  # a starved GPU is explained by the loader


@pytest.mark.parametrize("waits, flagged", [([5.0] * 5, False), ([9.9] * 4, False),
                                            ([90.0, 5.0, 5.0], False),  # warm-up skipped
                                            ([90.0, 5.0], True)])  # too few to skip one
def test_input_bound_thresholds(tmp_path: Path, waits: list[float], flagged: bool) -> None:
    rows = [window(10 * (i + 1), data_wait_pct=w) for i, w in enumerate(waits)]
    assert ("input-bound" in by_kind(diagnose(healthy(tmp_path, metrics=rows))[0])) is flagged


def test_host_bound(tmp_path: Path) -> None:
    system = [{"time": 1000.0 + t, "gpu/util_pct": 42.0, "cpu/util_pct": 99.0}
              for t in range(10, 51, 2)]
    run = healthy(tmp_path, env=CUDA, metrics=windows(**{"redline/host_syncs": 3}),
                  system=system, cfg=ACCUMULATING)
    f = by_kind(diagnose(run)[0])["host-bound"]
    assert f.severity == "warning" and f.value == 42.0
    assert "42 %" in f.message and "train.batch_size: auto" in f.message
    assert "precision.compile: true" in f.message and "3 per window" in f.message


def test_host_bound_negatives(tmp_path: Path) -> None:
    busy = [{"time": 1000.0 + t, "gpu/util_pct": 95.0} for t in range(10, 51, 2)]
    assert "host-bound" not in by_kind(
        diagnose(healthy(tmp_path / "a", env=CUDA, system=busy))[0])
    # Idle GPU before training (model build, autobatch) does not count.
    idle_before = [{"time": 900.0 + t, "gpu/util_pct": 0.0} for t in range(60)] + busy
    assert "host-bound" not in by_kind(
        diagnose(healthy(tmp_path / "b", env=CUDA, system=idle_before))[0])
    # On a CPU run, GPU utilisation does not apply.
    idle = [{"time": 1020.0, "gpu/util_pct": 10.0}]
    assert "host-bound" not in by_kind(diagnose(healthy(tmp_path / "c", system=idle))[0])


def test_host_bound_missing_evidence(tmp_path: Path) -> None:
    findings, notes = diagnose(healthy(tmp_path / "a", env=CUDA, system=[{"cpu/util_pct": 5}]))
    assert "host-bound" not in by_kind(findings)
    assert any("gpu/util_pct" in n for n in notes)
    system = [{"time": 1020.0, "gpu/util_pct": 10.0}]
    findings, notes = diagnose(healthy(tmp_path / "b", env=CUDA, system=system,
                                       metrics=windows(data_wait_pct=None)))
    assert "host-bound" not in by_kind(findings)
    assert any("cannot be told apart" in n for n in notes)


def test_cuda_inferred_from_gpu_samples_without_environment(tmp_path: Path) -> None:
    run = healthy(tmp_path, env=None, system=[{"gpu/util_pct": 20.0}])
    findings, notes = diagnose(run)
    assert "host-bound" in by_kind(findings)
    assert "environment.json is missing" in notes


@pytest.mark.parametrize("pct, severity", [(17.0, "warning"), (40.0, "info"), (70.0, None)])
def test_memory_headroom(tmp_path: Path, pct: float, severity: str | None) -> None:
    f = by_kind(diagnose(healthy(tmp_path, cfg=ACCUMULATING,
                                 metrics=windows(mem_pct=pct)))[0]).get("memory-headroom")
    if severity is None:
        assert f is None
        return
    assert f is not None and f.severity == severity and f.value == pct
    assert f"{pct:.0f} % of physical memory" in f.message and "micro-batch 8" in f.message
    assert "train.batch_size: auto" in f.message and "memory.target" in f.message
    on_gpu = healthy(tmp_path / "gpu", env=CUDA, metrics=windows(mem_pct=pct),
                     system=[{"gpu/util_pct": 99.0}], cfg=ACCUMULATING)
    assert f"{pct:.0f} % of the device" in by_kind(diagnose(on_gpu)[0])[
        "memory-headroom"].message


def test_memory_headroom_uses_the_peak_window(tmp_path: Path) -> None:
    rows = [*windows(4, mem_pct=20.0), window(50, mem_pct=60.0)]
    assert "memory-headroom" not in by_kind(diagnose(healthy(tmp_path, metrics=rows))[0])


def test_memory_headroom_from_peak_bytes(tmp_path: Path) -> None:
    rows = windows(mem_pct=None, mem_peak_bytes=4 * 2**30)  # 4 of 16 GiB
    f = by_kind(diagnose(healthy(tmp_path, metrics=rows, cfg=ACCUMULATING))[0])[
        "memory-headroom"]
    assert f.value == 25.0
    rows = windows(mem_pct=None)
    findings, notes = diagnose(healthy(tmp_path / "b", metrics=rows))
    assert "memory-headroom" not in by_kind(findings)
    assert any("mem_pct" in n for n in notes)


def test_memory_headroom_names_the_budget(tmp_path: Path) -> None:
    cfg = config(**{"memory.budget": "2GiB", "memory.target": 0.9,
                    "train.effective_batch_size": 32})
    f = by_kind(diagnose(healthy(tmp_path, cfg=cfg, metrics=windows(mem_pct=30.0)))[0])
    assert "of the memory budget" in f["memory-headroom"].message


def test_precision_fp32_on_bf16_gpu(tmp_path: Path) -> None:
    system = [{"time": 1020.0, "gpu/util_pct": 99.0}]
    run = healthy(tmp_path, cfg=config(**{"precision.name": "fp32"}), env=CUDA, system=system)
    f = by_kind(diagnose(run)[0])["precision"]
    assert f.severity == "info" and "bf16-mixed" in f.message and "20.0 ms" in f.message


def test_precision_fp32_on_bf16_cpu_is_only_a_suggestion(tmp_path: Path) -> None:
    env = {"device": {**CPU["device"], "supports_bf16": True}}
    run = healthy(tmp_path, cfg=config(**{"precision.name": "fp32"}), env=env)
    f = by_kind(diagnose(run)[0])["precision"]
    assert "measures it faster on this machine" in f.message


@pytest.mark.parametrize("name, env", [("fp32", CPU),  # no bf16 support
                                       ("bf16-mixed", CUDA),
                                       ("fp32", {"device": {**CUDA["device"]},
                                                 "precisions": {"bf16-mixed": "refused"}})])
def test_precision_negatives(tmp_path: Path, name: str, env: dict[str, Any]) -> None:
    run = healthy(tmp_path, cfg=config(**{"precision.name": name}), env=env)
    assert "precision" not in by_kind(diagnose(run)[0])


@pytest.mark.parametrize("skipped, flagged", [([0, 5, 20, 40], True),  # cumulative, 10 %
                                              ([0, 2, 3, 3], False),  # start-up noise
                                              ([10, 0, 10, 20], True)])  # per-window counts
def test_precision_fp16_skipped_steps(tmp_path: Path, skipped: list[int], flagged: bool) -> None:
    rows = [window(100 * (i + 1), skipped_steps=s) for i, s in enumerate(skipped)]
    run = healthy(tmp_path, cfg=config(**{"precision.name": "fp16-mixed"}), metrics=rows)
    f = by_kind(diagnose(run)[0]).get("precision")
    assert (f is not None) is flagged
    if f is not None:
        assert f.severity == "warning" and f"skipped {int(f.value or 0)} of 400" in f.message
        assert "lower train.lr" in f.message  # this CPU has no bf16 to switch to
    cuda_run = healthy(tmp_path / "cuda", cfg=config(**{"precision.name": "fp16-mixed"}),
                       env=CUDA, metrics=rows, system=[{"gpu/util_pct": 99.0}])
    f = by_kind(diagnose(cuda_run)[0]).get("precision")
    assert (f is not None) is flagged
    assert f is None or "switch to precision.name: bf16-mixed" in f.message


def test_skipped_steps_are_per_window_counts(tmp_path: Path) -> None:
    """Windows that skipped 0, 1, 1 and 2 steps skipped 4 in all, not 2 (the last count)."""
    rows = [window(10 * (i + 1), skipped_steps=s) for i, s in enumerate([0, 1, 1, 2])]
    run = healthy(tmp_path, cfg=config(**{"precision.name": "fp16-mixed"}), metrics=rows)
    f = by_kind(diagnose(run)[0])["precision"]
    assert f.value == 4.0 and "skipped 4 of 40 steps" in f.message


@pytest.mark.parametrize("pct, severity", [(0.8, "warning"), (0.1, "info")])
def test_telemetry_overhead(tmp_path: Path, pct: float, severity: str) -> None:
    run = healthy(tmp_path, metrics=windows(**{"redline/overhead_pct": pct}))
    findings = diagnose(run)[0]
    f = by_kind(findings)["telemetry-overhead"]
    assert f.severity == severity and f.value == pct and f"{pct:.2f} %" in f.message
    assert ("ok" in by_kind(findings)) is (severity == "info")
    if severity == "warning":
        assert "telemetry.log_every (now 50)" in f.message


def test_oom_retries(tmp_path: Path) -> None:
    events = [{"event": "run_start"},
              {"event": "micro_batch", "old": 32, "new": 16, "reason": "oom", "step": 3},
              {"event": "micro_batch", "old": 16, "new": 8, "reason": "oom", "step": 3},
              {"event": "micro_batch", "old": 8, "new": 12, "reason": "grow", "step": 90},
              {"event": "checkpoint_saved", "step": 100}]
    f = by_kind(diagnose(healthy(tmp_path, events=events))[0])["oom-retries"]
    assert f.severity == "info" and f.value == 2.0
    assert "2 times" in f.message and "final micro-batch 12" in f.message
    assert "oom-retries" not in by_kind(diagnose(healthy(tmp_path / "b"))[0])


def test_missing_files_and_keys(tmp_path: Path) -> None:
    # metrics only, with eval rows, a torn last line, and no optional telemetry keys
    run = make_run(tmp_path, metrics=[{"step": 10, "loss": 1.0},
                                      {"step": 10, "eval/loss": 0.5, "eval/time_s": 1.0}])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "lo')
    findings, notes = diagnose(run)
    assert [f.kind for f in findings] == ["ok"]
    assert "config.yaml is missing" in notes and "events.jsonl is missing" in notes
    assert any("data_wait_pct" in n for n in notes)
    assert any("precision.name" in n for n in notes)


def test_eval_rows_only_and_unreadable_config(tmp_path: Path) -> None:
    run = make_run(tmp_path, metrics=[{"step": 10, "eval/loss": 0.5}])
    (run / "config.yaml").write_text("train: [unclosed")
    (run / "environment.json").write_text("[1, 2]")
    findings, notes = diagnose(run)
    assert findings == []
    assert "metrics.jsonl has no training windows" in notes
    assert any(n.startswith("config.yaml could not be read") for n in notes)
    assert "environment.json does not hold a mapping" in notes


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        diagnose(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a redline run directory"):
        diagnose(tmp_path / "empty")


def test_every_message_is_one_sentence_with_a_number(tmp_path: Path) -> None:
    cfg = config(**{"precision.name": "fp32", "data.pin_memory": False,
                    "train.effective_batch_size": 32})
    rows = windows(data_wait_pct=30.0, mem_pct=12.0, **{"redline/overhead_pct": 0.9})
    events = [{"event": "micro_batch", "old": 16, "new": 8, "reason": "oom"}]
    findings, _ = diagnose(healthy(tmp_path, cfg=cfg, env=CUDA, metrics=rows, events=events,
                                   system=[{"gpu/util_pct": 20.0}]))
    assert {f.kind for f in findings} == {"input-bound", "memory-headroom", "precision",
                                          "telemetry-overhead", "oom-retries"}
    for f in findings:
        assert re.search(r"\d", f.message), f.message
        assert f.message.endswith(".") and not re.search(r"\.\s+[A-Z]", f.message), f.message


def test_render(tmp_path: Path) -> None:
    findings, notes = diagnose(healthy(tmp_path, metrics=windows(data_wait_pct=50.0),
                                       system=None))
    text = render(findings, notes)
    lines = text.splitlines()
    assert len(lines) == len(findings) + len(notes)
    assert lines[0].startswith("warning") and "input-bound" in lines[0]
    assert lines[-1] == "note     system.jsonl is missing"
    assert render([], []) == "no findings"


def test_a_run_that_ended_early_says_how_and_where_to_go_on(tmp_path: Path) -> None:
    start = {"event": "run_start", "step": 0, "max_steps": 100}
    saved = [{"event": "checkpoint_saved", "step": s} for s in (20, 40)]
    failed = healthy(tmp_path / "oom", events=[start, *saved, {
        "event": "failed", "step": 47, "error": "OutOfMemoryAtMinimum"}])
    f = by_kind(diagnose(failed)[0])["ended"]
    assert f.severity == "warning" and "after step 47 of 100" in f.message
    assert "out of memory even at a micro-batch of 1" in f.message and "step 40" in f.message
    signal = healthy(tmp_path / "sig", events=[start, *saved, {
        "event": "interrupted", "signal": "SIGTERM", "step": 41}])
    assert "stopped by SIGTERM at step 41" in by_kind(diagnose(signal)[0])["ended"].message
    killed = healthy(tmp_path / "killed", events=[start, *saved])  # windows end at step 50
    f = by_kind(diagnose(killed)[0])["ended"]
    assert "step 50 of 100" in f.message and "no word why" in f.message
    done = healthy(tmp_path / "done", events=[{**start, "max_steps": 50},
                                              {"event": "checkpoint_saved", "step": 50}])
    assert "ended" not in by_kind(diagnose(done)[0])


def test_non_finite_steps_are_reported_with_their_fate(tmp_path: Path) -> None:
    rows = [window(10 * (i + 1), nonfinite_steps=n, skipped_steps=n,
                   first_nonfinite_step=10 * i + 3 if n else None)
            for i, n in enumerate([0, 2, 5, 0])]
    events = [{"event": "nonfinite", "step": 13, "where": "output of net.2 (Linear)"}]
    f = by_kind(diagnose(healthy(tmp_path, metrics=rows, events=events))[0])["nonfinite"]
    assert f.value == 7.0 and "first at step 13" in f.message
    assert "output of net.2" in f.message and "7 of their updates were skipped" in f.message
    assert "nonfinite" not in by_kind(diagnose(healthy(tmp_path / "clean"))[0])


def test_memory_that_keeps_growing_is_a_finding(tmp_path: Path) -> None:
    leaking = [window(10 * (i + 1), mem_rss_bytes=300 * 2**20 + i * 4 * 2**20)
               for i in range(12)]
    f = by_kind(diagnose(healthy(tmp_path / "leak", metrics=leaking))[0])["memory-growth"]
    assert "400.0 MiB per 1000 steps" in f.message and "appended to a list" in f.message
    flat = [window(10 * (i + 1), mem_rss_bytes=300 * 2**20 + (i % 3) * 2**20)
            for i in range(12)]
    assert "memory-growth" not in by_kind(diagnose(healthy(tmp_path / "flat", metrics=flat))[0])


def test_advice_names_real_settings_the_run_did_not_already_use(tmp_path: Path) -> None:
    """Every 'set KEY: VALUE' is a real config key with another value than the run's,
    and every command named exists."""
    from redline.config import RunConfig

    cfg = config(**{"precision.name": "fp32", "data.pin_memory": False})
    cfg["precision"]["compile"] = True
    rows = windows(data_wait_pct=3.0, mem_pct=12.0)
    events = [{"event": "autobatch", "micro_batch": 8},
              {"event": "micro_batch", "old": 16, "new": 8, "reason": "oom"}]
    findings, _ = diagnose(healthy(tmp_path, cfg=cfg, env=CUDA, metrics=rows, events=events,
                                   system=[{"gpu/util_pct": 20.0}]))
    keys = RunConfig().to_dict()
    for f in findings:
        for key, value in re.findall(r"set ([a-z_]+\.[a-z_]+)(?::| to) ([\w.-]+)", f.message):
            section, name = key.split(".")
            assert name in keys[section], (key, f.message)
            assert str(cfg.get(section, {}).get(name)) != value, (key, f.message)
        for command in re.findall(r"redline (\w+)", f.message):
            assert command in ("train", "tune", "doctor"), f.message
    assert "precision.compile" not in by_kind(findings)["host-bound"].message
    assert "train.batch_size: auto" not in " ".join(f.message for f in findings)


def _ranks_run(root: Path, wait: float, loader: tuple[float, float]) -> Path:
    run = healthy(root, metrics=windows(**{"dist/world_size": 2, "dist/slowest_rank": 1,
                                           "dist/sync_wait_pct": wait}))
    rows = [{"step": w["step"], "rank": r, "step_time_s": 0.02, "data_wait_pct": loader[r]}
            for w in windows() for r in (0, 1)]
    (run / "ranks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_a_straggling_rank_is_named_with_its_loader_as_the_cause(tmp_path: Path) -> None:
    findings, _ = diagnose(_ranks_run(tmp_path, wait=30.0, loader=(1.0, 25.0)))
    found = by_kind(findings)["straggler"]
    assert found.severity == "warning" and found.value == 30.0
    assert "Rank 1 held up the others (2 ranks)" in found.message
    assert "raise data.num_workers" in found.message
    assert "ok" not in by_kind(findings)  # a warning: not "no bottleneck"


def test_ranks_that_keep_pace_get_an_info_and_no_straggler(tmp_path: Path) -> None:
    findings, _ = diagnose(_ranks_run(tmp_path, wait=3.0, loader=(1.0, 1.0)))
    kinds = by_kind(findings)
    assert "straggler" not in kinds and kinds["ranks"].severity == "info"
    assert "The 2 ranks kept pace" in kinds["ranks"].message


def test_a_single_process_run_has_no_ranks_finding(tmp_path: Path) -> None:
    kinds = by_kind(diagnose(healthy(tmp_path))[0])
    assert "ranks" not in kinds and "straggler" not in kinds


# ---- every rule against a run where its advice would be wrong (issue 19, case 7) --------

def lightning_config(accumulate: int = 1, precision: str = "fp32") -> dict[str, Any]:
    """config.yaml as the framework callbacks write it: the framework's own settings, and
    the redline names doctor reads."""
    return {"framework": {"name": "lightning", "accumulate": accumulate,
                          "precision": "32-true" if precision == "fp32" else precision},
            "precision": {"name": precision},
            "train": {"batch_size": 8, "effective_batch_size": 8 * accumulate}}


def hf_config(accumulate: int = 1, precision: str = "fp32") -> dict[str, Any]:
    cfg = lightning_config(accumulate, precision)
    cfg["framework"] = {"name": "transformers", "accumulate": accumulate, "precision": "no"}
    return cfg


SEARCH = {"event": "autobatch", "micro_batch": 4, "max_fit": 1500, "accumulation_steps": 1,
          "effective_batch_size": 4, "budget_bytes": 12 * 2**30, "budget_source": "test"}
START = {"event": "run_start", "step": 0, "max_steps": 50}

# rule -> runs in which its advice would be wrong: healthy()'s arguments over the default
WRONG: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "ended": [
        ("finished, its last step saved", {"events": [START, {
            "event": "checkpoint_saved", "step": 50}]}),
        ("a framework's loop ended it early (its own early stopping)", {
            "cfg": lightning_config(), "events": [{**START, "max_steps": 500},
                                                  {"event": "run_end", "step": 50}]}),
    ],
    "nonfinite": [
        ("fp16's scaler skipped overflowed updates of a finite loss: its business", {
            "cfg": config(**{"precision.name": "fp16-mixed"}),
            "metrics": windows(skipped_steps=1, nonfinite_steps=0)}),
    ],
    "memory_growth": [
        ("resident memory that wobbles but does not grow", {"metrics": [
            window(10 * (i + 1), mem_rss_bytes=300 * 2**20 + (i % 3) * 2**20)
            for i in range(12)]}),
    ],
    "input_bound": [
        ("a framework callback timed the wait across accumulated micro-batches: 226-324 %", {
            "cfg": lightning_config(4), "metrics": [window(10 * (i + 1), data_wait_pct=w)
                                                    for i, w in enumerate([324, 251, 226])]}),
        ("the loader waited less than the threshold", {"metrics": windows(data_wait_pct=4.0)}),
    ],
    "host_bound": [
        ("a CPU run: no device to starve", {"system": [{"gpu/util_pct": 5.0}],
                                           "env": CPU}),
        ("the GPU idled only before training (model build, batch search)", {
            "env": CUDA, "system": [{"time": 900.0 + t, "gpu/util_pct": 0.0} for t in range(60)]
            + [{"time": 1000.0 + t, "gpu/util_pct": 95.0} for t in range(10, 51, 2)]}),
    ],
    "memory_headroom": [
        ("the batch search chose below the largest fitting size, for speed", {
            "metrics": windows(mem_pct=2.0, micro_batch=4, mem_peak_bytes=2**28),
            "events": [SEARCH]}),
        ("the search took the largest size, capped by the training set, far below target", {
            "metrics": windows(mem_pct=2.0, micro_batch=1500, mem_peak_bytes=2**28),
            "events": [{**SEARCH, "micro_batch": 1500}],
            "cfg": config(**{"memory.target": 0.4})}),
        ("a resumed search, whose record lacks max_fit", {
            "metrics": windows(mem_pct=2.0), "events": [{"event": "autobatch",
                                                         "micro_batch": 8, "source": "x"}]}),
        ("no accumulation: a larger micro-batch would change the recipe", {
            "metrics": windows(mem_pct=10.0)}),
        ("a framework run without accumulation (memory.target is not its setting)", {
            "cfg": lightning_config(1), "metrics": windows(mem_pct=10.0)}),
    ],
    "precision": [
        ("fp16 start-up calibration: 3 skips in 400 steps", {
            "cfg": config(**{"precision.name": "fp16-mixed"}),
            "metrics": [window(100 * (i + 1), skipped_steps=s) for i, s in
                        enumerate([3, 0, 0, 0])]}),
        ("a short fp16 run whose scaler found its scale in 7 skips at the start", {
            "cfg": config(**{"precision.name": "fp16-mixed"}),
            "metrics": [window(20 * (i + 1), skipped_steps=s) for i, s in enumerate([7, 0])]}),
        ("fp32 on a device without bf16", {"cfg": config(**{"precision.name": "fp32"})}),
        ("bf16-mixed already", {"env": CUDA, "system": [{"gpu/util_pct": 99.0}]}),
    ],
    "oom_retries": [
        ("no size fitted at all: no batch size is the fix", {"events": [
            {"event": "micro_batch", "old": 2, "new": 1, "reason": "oom"},
            {"event": "failed", "error": "OutOfMemoryAtMinimum", "step": 0}]}),
        ("the guard only grew the micro-batch back", {"events": [
            {"event": "micro_batch", "old": 8, "new": 12, "reason": "grow"}]}),
    ],
    "straggler": [
        ("a single process", {}),
    ],
}


def test_the_table_covers_every_rule() -> None:
    from redline.diagnose import RULES

    assert {rule.__name__ for rule in RULES} == set(WRONG)


@pytest.mark.parametrize("rule_name, why, run", [
    (name, why, run) for name, cases in WRONG.items() for why, run in cases],
    ids=[f"{name}-{i}" for name, cases in WRONG.items() for i in range(len(cases))])
def test_every_rule_stays_silent_where_its_advice_would_be_wrong(
        tmp_path: Path, rule_name: str, why: str, run: dict[str, Any]) -> None:
    from redline.diagnose import RULES, load_evidence

    rule = next(r for r in RULES if r.__name__ == rule_name)
    assert rule(load_evidence(healthy(tmp_path, **run))) is None, why


def test_memory_target_advice_when_the_search_stopped_for_memory(tmp_path: Path) -> None:
    """The search took the largest size that fits, and it peaked near its target of a
    small memory.target: raising memory.target is what lets it try larger sizes."""
    budget = 12 * 2**30
    run = healthy(tmp_path, cfg=config(**{"memory.target": 0.3}),
                  metrics=windows(mem_pct=20.0, micro_batch=96,
                                  mem_peak_bytes=int(0.28 * budget)),
                  events=[{**SEARCH, "micro_batch": 96, "max_fit": 96}])
    f = by_kind(diagnose(run)[0])["memory-headroom"]
    assert "stopped at micro-batch 96 for memory" in f.message
    assert "raise memory.target (now 0.3)" in f.message


REDLINE_ONLY = ("data.", "memory.target", "batch_size: auto", "precision.name", "train.",
                "telemetry.", "redline train")


@pytest.mark.parametrize("make, words", [
    (lightning_config, ["DataLoader(num_workers=...)", "accumulate_grad_batches",
                        'Trainer(precision="bf16-mixed")', "torch.compile",
                        "RedlineCallback(log_every=...)", "Trainer.fit(..., ckpt_path"]),
    (hf_config, ["TrainingArguments(dataloader_num_workers=...)",
                 "gradient_accumulation_steps", "TrainingArguments(bf16=True)",
                 "TrainingArguments(torch_compile=True)", "RedlineCallback(log_every=...)",
                 "resume_from_checkpoint"]),
])
def test_framework_runs_are_advised_in_the_frameworks_own_settings(
        tmp_path: Path, make: Any, words: list[str]) -> None:
    """Lightning's and HF's runs: every piece of advice names the framework's setting,
    never a redline-only key (config.yaml as the callbacks write it)."""
    rows = windows(data_wait_pct=40.0, mem_pct=12.0, nonfinite_steps=1,
                   **{"redline/overhead_pct": 0.9})
    events = [{**START, "max_steps": 500}, {"event": "failed", "step": 50, "error": "X"}]
    loader = healthy(tmp_path / "loader", cfg=make(4), env=CUDA, metrics=rows, events=events,
                     system=[{"gpu/util_pct": 20.0}])
    starved = healthy(tmp_path / "host", cfg=make(4), env=CUDA, metrics=windows(mem_pct=12.0),
                      system=[{"gpu/util_pct": 20.0}])
    fp32 = healthy(tmp_path / "fp32", cfg=make(1), env=CUDA, metrics=windows(),
                   system=[{"gpu/util_pct": 99.0}])
    found = [f for run in (loader, starved, fp32) for f in diagnose(run)[0]]
    text = " ".join(f.message for f in found)
    kinds = {f.kind for f in found}
    assert {"input-bound", "host-bound", "memory-headroom", "precision", "ended",
            "nonfinite", "telemetry-overhead"} <= kinds
    for word in words:
        assert word in text, word
    for key in REDLINE_ONLY:
        assert key not in text, (key, text)


def test_a_framework_config_written_before_its_mapping_still_names_the_framework(
        tmp_path: Path) -> None:
    """The landed callbacks wrote `framework: lightning` (a string): still a framework."""
    cfg = {"framework": "lightning", "trainer": {"accumulate_grad_batches": 4}}
    f = by_kind(diagnose(healthy(tmp_path, cfg=cfg, metrics=windows(data_wait_pct=40.0,
                                                                    mem_pct=10.0)))[0])
    assert "DataLoader(num_workers=...)" in f["input-bound"].message
    assert "accumulate_grad_batches" in f["memory-headroom"].message
    cfg = {"framework": "transformers", "training_args": {"gradient_accumulation_steps": 1}}
    f = by_kind(diagnose(healthy(tmp_path / "hf", cfg=cfg, metrics=windows(mem_pct=10.0)))[0])
    assert "memory-headroom" not in f  # no accumulation: a larger batch is a recipe change


def test_own_loop_runs_are_told_about_their_own_loader(tmp_path: Path) -> None:
    """No config.yaml (Telemetry in one's own loop): the loader is theirs, not redline's."""
    f = by_kind(diagnose(healthy(tmp_path, cfg=None, metrics=windows(data_wait_pct=40.0)))[0])
    assert "your DataLoader's num_workers" in f["input-bound"].message
    assert "data.num_workers" not in f["input-bound"].message


def test_loader_advice_follows_a_measured_worker_count(tmp_path: Path) -> None:
    """num_workers: auto measured its count as the fastest: more workers is not the fix."""
    events = [{"event": "loader_auto", "settings": {"num_workers": 2},
               "reasons": {"num_workers": "2 measured fastest"}}]
    f = by_kind(diagnose(healthy(tmp_path, cfg=config(**{"data.num_workers": 2}),
                                 metrics=windows(data_wait_pct=40.0), events=events))[0])
    assert "measured 2 as the fastest count" in f["input-bound"].message
    assert "raise data.num_workers" not in f["input-bound"].message
