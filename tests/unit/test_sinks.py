"""Telemetry sinks, each driven through the writer's loop and read back from what it wrote."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from redline.errors import ConfigError
from redline.telemetry.jsonl import read_jsonl
from redline.telemetry.sinks import BUILTIN_SINKS, Sink, SinkContext, make_sinks
from redline.telemetry.sinks.console import ConsoleSink, format_record
from redline.telemetry.sinks.jsonl import JsonlSink
from redline.telemetry.writer import serve

T0 = 1_790_000_000.0
Step = tuple[str, dict[str, Any]] | str | Callable[[], None]


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # W&B must never reach a server (or print) from the tests
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def metrics(step: int, n: int = 3) -> dict[str, Any]:
    values = {f"m{i}": step / 10 + i / 7 for i in range(n)}
    return {"step": step, "time": T0 + step, "loss": 1.0 / step, "lr": 1e-3, **values}


def system(step: int | None, t: float) -> dict[str, Any]:
    return {"time": T0 + t, "step": step, "sys/cpu_pct": 10.0 + t, "sys/rss_mb": 500.0 + t}


class _Outbox(io.StringIO):
    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


def feed(sinks: list[Sink], script: list[Step]) -> list[dict[str, Any]]:
    """Run the writer's loop in this process over `script`: records, "flush" (wait until
    everything before it is written) and callables (run after the flush before them)."""
    out = _Outbox()

    def lines() -> Iterator[str]:
        flushes = 0
        for item in script:
            if item == "flush":
                flushes += 1
                yield json.dumps({"flush": flushes}) + "\n"
            elif callable(item):
                deadline = time.monotonic() + 30
                while {"flushed": flushes} not in out.messages() and time.monotonic() < deadline:
                    time.sleep(0.01)
                item()
            else:
                yield json.dumps(list(item)) + "\n"
        yield "null\n"

    serve({"trackers": [], "sampler": None}, lines(), out,  # type: ignore[arg-type]
          make=lambda spec, say: sinks)
    return out.messages()


def test_jsonl_sink_writes_one_file_per_stream(tmp_path: Path) -> None:
    records = [("metrics", metrics(s)) for s in (10, 20)] + [("system", system(None, 1.5))]
    feed([JsonlSink(tmp_path)], records)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [metrics(10), metrics(20)]
    assert read_jsonl(tmp_path / "system.jsonl") == [system(None, 1.5)]


def test_console_sink_prints_metrics_lines_only() -> None:
    out = io.StringIO()
    feed([ConsoleSink(out)], [("metrics", metrics(10)), ("system", system(3, 1.0)),
                              ("metrics", metrics(20))])
    assert out.getvalue().splitlines() == [format_record(metrics(10)),
                                           format_record(metrics(20))]


def test_tensorboard_sink_values_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from redline.telemetry.sinks.tensorboard import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tb")
    flushes = 0
    real_flush = sink._writer.flush

    def counting_flush() -> None:
        nonlocal flushes
        flushes += 1
        real_flush()

    sink._writer.flush = counting_flush  # type: ignore[method-assign]
    records = [metrics(s, n=5) for s in (10, 20, 30)]
    sink.write("metrics", records)
    assert flushes == 1  # three records, 21 scalars: one flush for the batch
    sink.write("system", [system(None, 1.0), system(None, 2.0), system(40, 3.0)])
    sink.close()

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in ("loss", "lr", "m0", "m4"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [10, 20, 30]
        # event files hold float32 values, and the record's time as wall time
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)
        assert [e.wall_time for e in events] == [r["time"] for r in records]
    cpu = acc.Scalars("sys/cpu_pct")
    assert [(e.step, e.value) for e in cpu] == [(0, 11.0), (1, 12.0), (40, 13.0)]


def wandb_sink(run_dir: Path, **kwargs: Any) -> Any:
    pytest.importorskip("wandb")
    from redline.telemetry.sinks.wandb import WandbSink

    return WandbSink(run_dir, mode="offline", **kwargs)


@pytest.mark.slow
def test_wandb_offline_history_read_back(tmp_path: Path) -> None:
    from redline.telemetry.wandb_reader import find_run_files, iter_records, read_history

    sink = wandb_sink(tmp_path / "run", name="trial")
    script: list[Step] = []
    for batch in ([("system", system(None, 0.5))],  # before any metrics: W&B's first row
                  [("metrics", metrics(10, n=15))],
                  [("system", system(12, 1.0)), ("system", system(None, 2.0))],
                  [("metrics", metrics(20, n=15))]):
        script += [*batch, "flush"]  # one writer batch per group, as windows arrive
    feed([sink], script)
    (path,) = find_run_files(tmp_path / "run")
    assert path.name == f"run-{sink.run_id}.wandb"
    runs = [r.run for r in iter_records(path) if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_id == sink.run_id and runs[0].display_name == "trial"

    rows = read_history(path)
    assert [row["_step"] for row in rows] == [0, 10, 20]
    for row, step in zip(rows[1:], (10, 20), strict=True):
        expected = {k: v for k, v in metrics(step, n=15).items() if k not in ("step", "time")}
        assert {k: row[k] for k in expected} == expected
    # samples never move W&B's step (a step-12 sample must not make W&B drop a late
    # step-10 window): they join the open row, i.e. the latest metrics step, and one
    # batch of samples keeps the newest value per name
    assert rows[0]["sys/cpu_pct"] == 10.5
    assert (rows[1]["sys/cpu_pct"], rows[1]["sys/rss_mb"]) == (12.0, 502.0)
    assert "sys/cpu_pct" not in rows[2]


@pytest.mark.slow
def test_wandb_second_session_continues_same_run_id(tmp_path: Path) -> None:
    from redline.telemetry.wandb_reader import find_run_files, iter_records, read_history

    first = wandb_sink(tmp_path)
    feed([first], [("metrics", metrics(s)) for s in (10, 20)])
    second = wandb_sink(tmp_path, run_id=first.run_id)
    assert second.run_id == first.run_id
    feed([second], [("metrics", metrics(30))])
    # offline there is no server to resume from: the second session writes its own file
    # under the same run id, and `wandb sync` uploads both into that one run
    files = find_run_files(tmp_path)
    assert [f.name for f in files] == [f"run-{first.run_id}.wandb"] * 2
    for f in files:
        (run,) = (r.run for r in iter_records(f) if r.WhichOneof("record_type") == "run")
        assert run.run_id == first.run_id
    rows = read_history(tmp_path)  # a directory: its files, oldest first
    assert [(r["_step"], r["loss"]) for r in rows] == [(10, 0.1), (20, 0.05), (30, 1 / 30)]


def test_failing_sink_is_disabled_and_others_keep_receiving(tmp_path: Path) -> None:
    wandb = wandb_sink(tmp_path / "run")
    out = io.StringIO()
    sinks: list[Sink] = [JsonlSink(tmp_path / "run"), wandb, ConsoleSink(out)]
    said = feed(sinks, [("metrics", metrics(10)), "flush",
                        wandb._run.finish,  # as if W&B went away: every later log raises
                        ("metrics", metrics(20)), ("metrics", metrics(30))])
    failed = [m["failed"] for m in said if "failed" in m]
    assert [name for name, _ in failed] == ["wandb"]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [10, 20, 30]
    assert len(out.getvalue().splitlines()) == 3
    assert said[-1] == {"closed": True}


def test_make_sinks_by_name(tmp_path: Path) -> None:
    sinks = make_sinks(["jsonl", "console", "jsonl"], SinkContext(tmp_path))
    assert [s.name for s in sinks] == ["jsonl", "console"]
    assert isinstance(sinks[0], JsonlSink) and isinstance(sinks[1], ConsoleSink)
    for s in sinks:
        s.close()


def test_make_sinks_unknown_name_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'mlflow'") as info:
        make_sinks(["jsonl", "mlflow"], SinkContext(tmp_path))
    assert all(name in str(info.value) for name in BUILTIN_SINKS)


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_make_sinks_missing_package_names_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    with pytest.raises(ImportError, match=rf"pip install 'redline\[{package}\]'"):
        make_sinks(["jsonl", package], SinkContext(tmp_path))


def test_wandb_reader_crosses_blocks_and_stops_at_a_torn_tail(tmp_path: Path) -> None:
    from redline.telemetry.wandb_reader import find_run_files, read_history

    sink = wandb_sink(tmp_path / "run")
    feed([sink], [("metrics", metrics(s, n=15)) for s in range(1, 401)])
    (path,) = find_run_files(tmp_path / "run")
    data = path.read_bytes()
    assert len(data) > 3 * 32 * 1024  # records split across blocks, padded block tails
    rows = read_history(path)
    assert [r["_step"] for r in rows] == list(range(1, 401))
    assert [r["m14"] for r in rows] == [metrics(s, n=15)["m14"] for s in range(1, 401)]

    torn = tmp_path / "torn.wandb"  # a writer killed mid-append
    torn.write_bytes(data[: len(data) * 2 // 3])
    partial = read_history(torn)
    assert 0 < len(partial) < 400 and partial == rows[: len(partial)]

    corrupt = bytearray(data)
    # a flipped byte inside a record (a key's name) is corruption, not a torn tail
    corrupt[data.index(b"m14", len(data) // 2)] ^= 0xFF
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="checksum"):
        read_history(bad)


def test_the_entry_point_group_registers_sinks(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    import redline.plugins as plugins
    from redline.telemetry.config import TelemetryConfig
    from redline.telemetry.sinks import ENTRY_POINT_GROUP, available_sinks

    ep = EntryPoint(name="jsonl-too", value="redline.telemetry.sinks.jsonl:from_context",
                    group=ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins, "entry_points",
                        lambda group: [ep] if group == ENTRY_POINT_GROUP else [])
    assert available_sinks()["jsonl-too"] == ep.value
    assert TelemetryConfig(trackers=("jsonl-too",)).trackers == ("jsonl-too",)
    (sink,) = make_sinks(["jsonl-too"], SinkContext(tmp_path))
    assert isinstance(sink, JsonlSink)
    sink.close()


def test_wandb_groups_a_study_and_logs_samples_as_images_and_a_table(tmp_path: Path) -> None:
    from PIL import Image

    from redline.telemetry.wandb_reader import find_run_files, iter_records, read_history

    image = tmp_path / "00-generated.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    sink = wandb_sink(tmp_path / "run", name="fp32-s0", group="study-x")
    feed([sink], [("metrics", metrics(10)), "flush",
                  ("samples", {"step": 10, "samples": [
                      {"title": "input 0", "images": {"generated": str(image)},
                       "texts": {"prediction": "0.5"}, "metrics": {"psnr": 21.5}}]}),
                  "flush"])
    (path,) = find_run_files(tmp_path / "run")
    (run,) = (r.run for r in iter_records(path) if r.WhichOneof("record_type") == "run")
    assert run.run_group == "study-x"
    (row,) = read_history(path)  # joined to the step-10 row: W&B's step never moves back
    assert row["_step"] == 10 and row["loss"] == 0.1
    assert row["samples/images._type"] == "images/separated"
    assert row["samples/images.captions"] == ["input 0: generated (psnr 21.5)"]
    assert row["samples/table._type"] == "table-file" and row["samples/table.nrows"] == 1
