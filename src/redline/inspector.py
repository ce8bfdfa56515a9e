"""Per-layer statistics every `inspect.every` steps, at no host sync on the other steps.

People debugging divergence dump every layer's weights, gradients and activations to
pickles every 100 steps and pay seconds for it. The Inspector is a callback that, on an
inspecting step only:

    BATCH_START            forward hooks go on the selected layers; the task's series
                           (Task.series, optional) are computed on the batch
    each layer's forward   its output's statistics (stats.tensor_stats), once per step;
                           for an fp8 layer also its input's and weight's fp8 figures
    BEFORE_OPTIMIZER_STEP  every selected parameter's and gradient's statistics (final,
                           unscaled gradients); the hooks come off; everything is stacked
                           into one device tensor (on CUDA copied to pinned memory,
                           non-blocking)
    WINDOW                 the stacked values are read (they have arrived: the window's
                           own values were issued after them) and written to
                           RUN_DIR/stats/layers/ and stats/series/ as Parquet

So a step that does not inspect runs no hook and reads nothing, and an inspecting step adds
no host sync of its own. What an inspecting step costs the training thread (the hooks,
the statistics, the stacking) is timed and added, at the next window, to that window's
`redline/overhead_pct`, so the run's self-measured overhead includes inspection (the
WINDOW step's Parquet write runs inside the window's close, which telemetry times).
(On a CPU, where reading a value waits for nothing, an inspecting
step reads one flag per statistics call, whether all are finite, to skip the NaN/Inf
counts that must be 0: stats.tensor_stats. `host_reads=False` turns that off.)
Statistics are computed on the device: norms with a foreach kernel, the rest a few
reductions per tensor. `inspect.snapshot_every` also saves the full tensors as
safetensors (stats/snapshots/step-N.safetensors): an explicit, costly opt-in.

Read them with pandas in one call: `pd.read_parquet("RUN_DIR/stats/layers")`; columns
step, tensor, layer, kind (param | grad | activation | fp8_input | fp8_weight) and the
statistics of stats.STAT_NAMES (fp8 rows: stats.FP8_STAT_NAMES).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from redline.errors import MissingExtra, require
from redline.events import Callback, State
from redline.files import atomic_write_bytes
from redline.stats import FP8_STAT_NAMES, STAT_NAMES, fp8_stats, histograms, tensor_stats

SeriesFn = Callable[[nn.Module, Any], dict[str, Any]]
Publish = Callable[[int, list[dict[str, Any]]], None]
HISTOGRAM_BINS = 32
# telemetry/schema.py's OVERHEAD_PCT and STEP_TIME (a package this layer does not import)
OVERHEAD_PCT, STEP_TIME = "redline/overhead_pct", "step_time_s"


@dataclass(frozen=True)
class InspectConfig:
    """The `inspect` section: per-layer statistics of parameters, gradients, activations."""

    every: int = 200
    """Steps between inspections, and the last step; 0: off. At 200 the cost was under
    1 % of the run (bench/inspect_overhead.py, docs/benchmarks.md)."""
    layers: tuple[str, ...] = ()
    """Patterns selecting layers by name or type, case-insensitive (e.g. [attn, conv,
    norm]); empty: every layer that holds parameters."""
    snapshot_every: int = 0
    """Steps between full-tensor snapshots (safetensors, costly); 0: never."""

    def __post_init__(self) -> None:
        require(self.every >= 0, "inspect.every", self.every, "an integer >= 0 (0: off)")
        require(self.snapshot_every >= 0, "inspect.snapshot_every", self.snapshot_every,
                "an integer >= 0 (0: never)")
        object.__setattr__(self, "layers", tuple(self.layers))
        for pattern in self.layers:
            require(isinstance(pattern, str) and pattern != "", "inspect.layers", pattern,
                    "a list of non-empty name or type patterns")

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.snapshot_every > 0

    def inspects(self, step: int, last: int = 0) -> bool:
        """Whether optimizer step `step` is inspected: every `every` steps and the run's
        `last` step (so a run shorter than `every` still has its end state), and every
        `snapshot_every` steps."""
        return (self.every > 0 and (step % self.every == 0 or step == last)) or (
            self.snapshot_every > 0 and step % self.snapshot_every == 0)


def select_layers(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, nn.Module]:
    """name -> module for the layers `patterns` select (see InspectConfig.layers)."""
    found = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue  # containers and parameter-free layers: their children are listed
        kind = type(module).__name__
        if not patterns or any(re.search(p, name, re.I) or re.search(p, kind, re.I)
                               for p in patterns):
            found[name or "model"] = module
    return found


@dataclass
class _Pending:
    step: int
    labels: list[tuple[str, str, str]]  # (tensor, layer, kind) per row of `values`
    values: torch.Tensor  # [rows, len(STAT_NAMES)]
    fp8_labels: list[tuple[str, str, str]] = field(default_factory=list)
    fp8_values: torch.Tensor | None = None
    series: dict[str, torch.Tensor] = field(default_factory=dict)
    histograms: torch.Tensor | None = None  # [parameter and gradient rows, HISTOGRAM_BINS]


class Inspector(Callback):
    """The statistics callback (module docstring). `series` is the task's optional
    Task.series(model, batch); `forward_context` the precision's, for it; `publish(step,
    histograms)`, when given, receives each parameter's and gradient's histogram
    (HISTOGRAM_BINS bins from its min to its max) at the window, for TensorBoard and W&B."""

    def __init__(self, config: InspectConfig, run_dir: str | Path,
                 series: SeriesFn | None = None,
                 forward_context: Callable[[], contextlib.AbstractContextManager[Any]]
                 = contextlib.nullcontext, host_reads: bool | None = None,
                 publish: Publish | None = None) -> None:
        _pyarrow()  # a missing pyarrow is said before training, not at the first window
        _warm_parquet()
        self.config, self.dir = config, Path(run_dir) / "stats"
        self.series_fn, self.forward_context = series, forward_context
        # None: read values on the host where that is free (the model is on a CPU)
        self._host_reads = host_reads
        # given (TensorBoard or W&B is on): parameter and gradient histograms go to it
        self.publish = publish
        self.layers: dict[str, nn.Module] = {}
        self._active: int | None = None  # the step being inspected
        self._handles: list[Any] = []
        self._acts: dict[str, tuple[torch.Tensor, torch.Tensor | None, Any]] = {}
        self._series: dict[str, torch.Tensor] = {}
        self._pending: list[_Pending] = []
        self.busy_s = 0.0  # training-thread time inspecting, since the last window
        self._window_step = 0  # the step the last window ended at

    # ---- events ------------------------------------------------------------------------------

    def on_fit_start(self, state: State) -> None:
        assert state.model is not None
        self.layers = select_layers(state.model, self.config.layers)
        self._window_step = state.step
        if self._host_reads is None:
            self._host_reads = all(p.device.type == "cpu" for p in state.model.parameters())
        for part in ("layers", "series"):  # a resumed run writes each step once
            for path in (self.dir / part).glob("step-*.parquet"):
                if int(path.stem.removeprefix("step-")) > state.step:
                    path.unlink()

    def on_batch_start(self, state: State, batch: Any) -> None:
        step = state.step + 1
        if not self.config.inspects(step, state.max_steps):
            return
        t = time.perf_counter()
        self._active, self._acts = step, {}
        snapshot = self._snapshot_step(step)
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._hook(name, snapshot)))
        if self.series_fn is not None:
            self._series = self._task_series(state.model, batch)
        self.busy_s += time.perf_counter() - t

    def on_micro_batch_change(self, state: State, info: dict[str, Any]) -> None:
        if self._active is not None and info.get("reason") == "oom":
            self._acts = {}  # the step is redone: its first forward's figures are void

    def on_before_optimizer_step(self, state: State, optimizer: torch.optim.Optimizer) -> None:
        if self._active is None:
            return
        t = time.perf_counter()
        step, self._active = self._active, None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        labels, tensors = [], []
        for layer, module in self.layers.items():
            for pname, p in module.named_parameters(recurse=False):
                labels.append((f"{layer}.{pname}", layer, "param"))
                tensors.append(_local(p))
                if p.grad is not None:
                    labels.append((f"{layer}.{pname}", layer, "grad"))
                    tensors.append(_local(p.grad))
        rows = [tensor_stats(tensors, bool(self._host_reads))] if tensors else []
        hist = (histograms(tensors, rows[0][:, 3], rows[0][:, 4], HISTOGRAM_BINS)
                if rows and self.publish is not None else None)
        fp8_labels, fp8_rows = [], []
        for layer, (act, fp8, _) in self._acts.items():
            labels.append((layer, layer, "activation"))
            rows.append(act)
            if fp8 is not None:
                fp8_labels += [(layer, layer, "fp8_input"), (layer, layer, "fp8_weight")]
                fp8_rows.append(fp8)
        pending = _Pending(step, labels, _to_host(torch.cat(rows)) if rows else
                           torch.empty(0, len(STAT_NAMES)), fp8_labels,
                           _to_host(torch.cat(fp8_rows)) if fp8_rows else None,
                           {k: _to_host(v) for k, v in self._series.items()},
                           _to_host(hist) if hist is not None else None)
        self._pending.append(pending)
        if self._snapshot_step(step):
            self._save_snapshot(step)
        self._acts, self._series = {}, {}
        self.busy_s += time.perf_counter() - t

    def on_window(self, state: State, record: dict[str, Any]) -> None:
        step = int(record["step"])
        self._charge(record, step - self._window_step)
        self._window_step = step
        self._flush(step)

    def _charge(self, record: dict[str, Any], steps: int) -> None:
        """Add the time inspecting took since the last window to the window's overhead
        share (its wall time: step time x steps; under CUDA the record is a window older
        than the time charged, which evens out over a run)."""
        busy, self.busy_s = self.busy_s, 0.0
        pct, step_time = record.get(OVERHEAD_PCT), record.get(STEP_TIME)
        if busy and pct is not None and step_time and steps > 0:
            record[OVERHEAD_PCT] = pct + 100.0 * busy / (step_time * steps)

    def on_fit_end(self, state: State) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # sync: once, at the end, for the last copies
        self._flush(state.step)

    # ---- hooks and figures -------------------------------------------------------------------

    def _hook(self, name: str, snapshot: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in self._acts:
                return  # one micro-batch's figures per step: the first's
            out = _first_float(output)
            if out is None:
                return
            t = time.perf_counter()
            with torch.no_grad():
                fp8 = None
                if type(module).__name__ == "Float8Linear" and _first_float(args) is not None:
                    fp8 = torch.stack([fp8_stats(_first_float(args)),  # type: ignore[arg-type]
                                       fp8_stats(_local(module.weight))])
                full = out.detach().cpu() if snapshot else None
                self._acts[name] = (tensor_stats([out], bool(self._host_reads)), fp8, full)
            self.busy_s += time.perf_counter() - t
        return hook

    def _task_series(self, model: nn.Module | None, batch: Any) -> dict[str, torch.Tensor]:
        assert model is not None and self.series_fn is not None
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        # forked: training's random stream is where it would be without inspection
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.forward_context():
            values = self.series_fn(model, batch)
        return {k: torch.as_tensor(v).detach().float().reshape(-1) for k, v in values.items()}

    def _snapshot_step(self, step: int) -> bool:
        every = self.config.snapshot_every
        return every > 0 and step % every == 0

    def _save_snapshot(self, step: int) -> None:
        from safetensors.torch import save

        tensors = {}
        for layer, module in self.layers.items():
            for pname, p in module.named_parameters(recurse=False):
                tensors[f"param/{layer}.{pname}"] = _local(p).detach().cpu().contiguous()
                if p.grad is not None:
                    tensors[f"grad/{layer}.{pname}"] = _local(p.grad).detach().cpu().contiguous()
        for layer, (_, _, full) in self._acts.items():
            if full is not None:
                tensors[f"activation/{layer}"] = full.contiguous()
        path = self.dir / "snapshots" / f"step-{step:08d}.safetensors"
        atomic_write_bytes(path, save(tensors), "statistics snapshot")

    # ---- storage -----------------------------------------------------------------------------

    def _flush(self, upto: int) -> None:
        ready = [p for p in self._pending if p.step <= upto]
        self._pending = [p for p in self._pending if p.step > upto]
        for p in ready:
            rows = _rows(p.step, p.labels, p.values.tolist(), STAT_NAMES)
            if p.fp8_values is not None:
                rows += _rows(p.step, p.fp8_labels, p.fp8_values.tolist(), FP8_STAT_NAMES)
            _write_parquet(self.dir / "layers" / f"step-{p.step:08d}.parquet", rows,
                           LAYER_COLUMNS)
            if p.histograms is not None and self.publish is not None:
                self.publish(p.step, _histogram_entries(rows, p.histograms.tolist()))
            if p.series:
                _write_parquet(self.dir / "series" / f"step-{p.step:08d}.parquet", [
                    {"step": p.step, "name": name, "index": i, "value": v}
                    for name, values in p.series.items()
                    for i, v in enumerate(values.tolist())], SERIES_COLUMNS)


def _histogram_entries(rows: list[dict[str, Any]], counts: list[list[float]]
                       ) -> list[dict[str, Any]]:
    """One entry per parameter and gradient (the first rows), as TensorBoard's
    add_histogram_raw and W&B's Histogram take them."""
    out = []
    for row, c in zip(rows[:len(counts)], counts, strict=True):  # then come the activations
        lo, hi = row["min"], row["max"]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            continue  # a tensor holding NaN/Inf has no range to bin (its stats count them)
        edges = [lo + (hi - lo) * i / len(c) for i in range(len(c) + 1)]
        out.append({"name": f"{row['kind']}/{row['tensor']}", "min": lo, "max": hi,
                    "num": sum(c), "sum": row["mean"] * sum(c),
                    "sum_squares": row["norm"] ** 2, "edges": edges, "counts": c})
    return out


def _first_float(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        for v in value:
            found = _first_float(v)
            if found is not None:
                return found
    return None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter or gradient (a DTensor), else `tensor`.
    Only rank 0 inspects: statistics of the whole sharded tensor would be collectives the
    other ranks never join, so a sharded model's rows describe rank 0's shard."""
    to_local = getattr(tensor, "to_local", None)  # DTensor's public accessor
    return to_local() if to_local is not None else tensor


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """On CUDA a pinned host copy, non-blocking (read at the next window); else as is."""
    if values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


def _rows(step: int, labels: list[tuple[str, str, str]], values: list[list[float]],
          names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"step": step, "tensor": t, "layer": layer, "kind": kind,
             **dict(zip(names, row, strict=True))}
            for (t, layer, kind), row in zip(labels, values, strict=True)]


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingExtra("per-layer statistics (inspect.every)", "pyarrow", "all") from None
    return pyarrow


# Every file of a directory has the same columns, so pandas reads the directory in one call.
LAYER_COLUMNS = {"step": "int64", "tensor": "string", "layer": "string", "kind": "string",
                 **dict.fromkeys((*STAT_NAMES, *FP8_STAT_NAMES), "float64")}
SERIES_COLUMNS = {"step": "int64", "name": "string", "index": "int64", "value": "float64"}


@functools.cache
def _warm_parquet() -> None:
    """Write an empty table to memory, once a process, at set-up: pyarrow's first Parquet
    write in a process costs ~0.2 s of CPU (measured; later ones ~1 ms), which would
    otherwise land in the training step whose window first writes statistics."""
    pa = _pyarrow()
    pa.parquet.write_table(pa.table({name: [] for name in LAYER_COLUMNS},
                                    schema=_schema(LAYER_COLUMNS)), pa.BufferOutputStream())


def _schema(columns: dict[str, str]) -> Any:
    pa = _pyarrow()
    return pa.schema([(name, pa.type_for_alias(kind)) for name, kind in columns.items()])


def _write_parquet(path: Path, rows: list[dict[str, Any]], columns: dict[str, str]) -> None:
    """One step's rows as a Parquet file, written whole or not at all (temp + rename)."""
    pa = _pyarrow()
    schema = _schema(columns)
    table = pa.table({name: [row.get(name) for row in rows] for name in columns},
                     schema=schema)
    buffer = pa.BufferOutputStream()
    pa.parquet.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue().to_pybytes(), "statistics")


def read_rows(run_dir: str | Path, part: str = "layers") -> list[dict[str, Any]]:
    """RUN_DIR/stats/PART (layers or series) as a list of rows, oldest step first; empty
    when nothing was inspected. (pandas: `pd.read_parquet("RUN_DIR/stats/layers")`.)"""
    path = Path(run_dir) / "stats" / part
    files = sorted(path.glob("step-*.parquet"))
    if not files:
        return []
    pq = _pyarrow().parquet
    return [row for f in files for row in pq.read_table(f).to_pylist()]
