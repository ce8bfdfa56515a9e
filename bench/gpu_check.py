"""The one command that validates redline's CUDA paths end to end.

    python bench/gpu_check.py            # on a machine with an NVIDIA GPU

Development and CI have no GPU, so every CUDA branch is thin and sits behind device.py;
this script exercises those branches for real: device detection and the peak-FLOPs
table, every precision policy the GPU supports (refusals for the rest; fp8 through torchao
on sm_89+, with a layer really converted), Engine.step with no host sync under
torch.cuda.set_sync_debug_mode("error"), per-layer statistics with no host sync on the
inspecting steps, a checkpoint round trip that includes the CUDA RNG, and a 2-rank
torchrun training run (NCCL with two GPUs; with one, gloo on it, since NCCL refuses two
ranks on one device) whose run directory must show both ranks and no telemetry host sync.
The memory levers (issue 20) on CUDA: 8-bit and 4-bit optimizer states (a few steps, their
state bytes against fp32 AdamW's), cpu-offload (CPUOffloadOptimizer steps, the optimizer's
state off the device), activation checkpointing selective and full (gradients equal to no
checkpointing's, peaks lower, from torch.cuda.max_memory_allocated), a short training run
with both levers, and the OOM memory snapshot (a run that runs out of memory at
micro-batch 1 under --memory-budget leaves memory_snapshot.pickle and memory.json in its
run directory).
It prints one line per check and exits 1 if any failed. Without a GPU it says so and exits
0 (nothing to validate); `--device cpu` runs the lever checks that have a CPU path (the
low-bit states and checkpointing) and the FSDP check over gloo (2 CPU ranks) on the CPU,
to test this script where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsdp_check import checks as fsdp_checks
from redline.checkpoint import load_latest, save_checkpoint
from redline.device import DeviceInfo
from redline.engine import Engine
from redline.memory.probe import live_tensor_bytes, measure_peak
from redline.precision import PRECISIONS, PrecisionError, get_precision
from redline.rng import rng_state, set_rng_state

RESULTS: list[tuple[str, bool, str]] = []
MEMGPT = Path(__file__).resolve().parents[1] / "tests" / "tasks" / "memgpt.py"


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def wrap(fn: Callable[[], str]) -> Callable[[], str]:
        try:
            RESULTS.append((name, True, fn()))
        except Exception as e:  # a check that fails must not stop the others
            RESULTS.append((name, False, f"{type(e).__name__}: {e}"))
            traceback.print_exc()
        return fn
    return wrap


def _model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    # three Linear layers: fp8 keeps the first and last in high precision, converts the middle
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(),
                          nn.Linear(1024, 10)).cuda()
    return model, torch.randn(64, 256, device="cuda"), torch.randint(0, 10, (64,), device="cuda")


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]).float(), batch[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: only the memory-lever checks that have a CPU path and the "
                        "FSDP check over gloo")
    args = p.parse_args()
    if args.device == "cpu":
        lever_checks(DeviceInfo.detect("cpu"))
        fsdp_checks(check, DeviceInfo.detect("cpu"))
        return report()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to validate here (run this on a GPU machine)")
        return 0
    info = DeviceInfo.detect("cuda")

    @check("device")
    def _() -> str:
        assert info.memory_total and info.capability
        peak = info.peak_for("bfloat16")
        return (f"{info.name}, sm_{info.capability[0]}{info.capability[1]}, "
                f"{info.memory_total / 2**30:.0f} GiB, bf16 peak "
                f"{peak / 1e12:.0f} TFLOP/s" if peak else "no peak-FLOPs entry")

    for name in PRECISIONS:
        @check(f"precision {name}")
        def _(name: str = name) -> str:
            try:
                policy = get_precision(name, info)
            except PrecisionError as e:
                return f"refused: {e}"
            model, x, y = _model()
            model = policy.convert_module(model)
            if policy.param_dtype != torch.float32:
                x = x.to(policy.param_dtype)
            engine = Engine(model, torch.optim.AdamW(model.parameters(), foreach=True,
                                                     capturable=True), policy,
                            grad_clip=1.0, micro_batch_size=16)
            with policy.global_context():
                first = engine.step((x, y), _loss)  # warm-up: lazy CUDA init may sync
                torch.cuda.synchronize()
                if name != "fp16-mixed":  # GradScaler.step reads its inf flag by design
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    for _ in range(20):
                        loss = engine.step((x, y), _loss)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            assert torch.isfinite(loss) and loss.item() < first.item(), "loss did not fall"
            fp8 = sum(d["converted"] for d in policy.layer_plan)
            assert fp8 or not policy.layer_plan, "fp8 converted no layer"
            return (f"ok, loss {first.item():.3f} -> {loss.item():.3f}, no host sync"
                    + (f", {fp8} layer(s) in fp8" if policy.layer_plan else ""))

    @check("telemetry windows without host sync")
    def _() -> str:
        from redline.telemetry.metrics import WindowContext, WindowLogger

        model, x, y = _model()
        policy = get_precision("bf16-mixed" if info.supports_bf16 else "fp32", info)
        records: list[dict] = []
        engine = Engine(model, torch.optim.AdamW(model.parameters(), foreach=True,
                                                 capturable=True), policy, grad_clip=1.0)
        logger = WindowLogger(5, WindowContext(samples_per_step=64, device=info.torch_device,
                                               flops_per_step=10**9,
                                               peak_flops=info.peak_for("bfloat16")),
                              records.append)
        with policy.global_context():
            engine.step((x, y), _loss)  # warm-up outside the check
            torch.cuda.synchronize()
            logger.start()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for step in range(1, 21):
                    loss = engine.step((x, y), _loss)
                    logger.record(step, loss, engine.grad_norm, 64, 1e-3, 0, 64 * step, 0.0,
                                  step == 20)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            logger.finish()
        assert [r["step"] for r in records] == [5, 10, 15, 20], records
        assert all(r["redline/host_syncs"] == 0 for r in records[:-1])
        return (f"ok, 4 windows, no sync; step {1e3 * records[-1]['step_time_s']:.2f} ms, "
                f"MFU {records[-1]['mfu']}")

    @check("per-layer statistics without host sync")
    def _() -> str:
        from redline.events import Dispatcher, Event, State
        from redline.inspector import InspectConfig, Inspector, read_rows

        model, x, y = _model()
        with tempfile.TemporaryDirectory() as d:
            state = State(model=model, run_dir=d)
            dispatcher = Dispatcher([Inspector(InspectConfig(every=2), d)])
            engine = Engine(model, torch.optim.AdamW(model.parameters(), foreach=True,
                                                     capturable=True), "fp32",
                            dispatcher=dispatcher, state=state)
            dispatcher.fire(Event.FIT_START, state)
            engine.step((x, y), _loss)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(4):
                    dispatcher.fire(Event.BATCH_START, state, (x, y))
                    engine.step((x, y), _loss)
                    state.step += 1
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()  # the window's values have arrived
            dispatcher.fire(Event.WINDOW, state, {"step": state.step})
            rows = read_rows(d)
        assert sorted({r["step"] for r in rows}) == [2, 4], rows[:3]
        return f"ok, {len(rows)} rows at steps 2 and 4, no host sync on the steps"

    @check("checkpoint with CUDA RNG")
    def _() -> str:
        with tempfile.TemporaryDirectory() as d:
            torch.cuda.manual_seed(0)
            state = rng_state()
            a = torch.rand(4, device="cuda")
            save_checkpoint(d, 1, {"model": {"w": a}, "rng": state}, keep=1)
            _, payload = load_latest(d, map_location="cuda")  # type: ignore[misc]
            set_rng_state(payload["rng"])
            assert torch.equal(a, torch.rand(4, device="cuda")), "CUDA RNG not restored"
        return "ok"

    @check("torchrun, 2 ranks")
    def _() -> str:
        two = torch.cuda.device_count() >= 2
        toy = Path(__file__).resolve().parents[1] / "tests" / "tasks" / "toy.py"
        with tempfile.TemporaryDirectory() as d:
            env = {**os.environ, **({} if two else {"REDLINE_DIST_BACKEND": "gloo"})}
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "-m", "redline", "train", f"{toy}:ToyRegression",
                 "--steps", "40", "--device", "cuda" if two else "cuda:0", "--no-progress",
                 "--no-report", "--run-dir", f"{d}/run", "--set", "telemetry.log_every=10",
                 "--set", "train.batch_size=32", "--set", "train.effective_batch_size=64"],
                env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            lines = Path(f"{d}/run/metrics.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines if '"loss"' in line]
            ranks = {json.loads(line)["rank"]
                     for line in Path(f"{d}/run/ranks.jsonl").read_text().splitlines()}
        assert [r["step"] for r in rows] == [10, 20, 30, 40] and ranks == {0, 1}
        assert all(r["redline/host_syncs"] == 0 for r in rows[:-1]), rows
        return (f"ok over {'NCCL' if two else 'gloo on one GPU'}, "
                f"{rows[-1]['samples_per_s']:.0f} samples/s, slowest rank "
                f"{rows[-1]['dist/slowest_rank']}")

    fsdp_checks(check, info)
    lever_checks(info)
    snapshot_check(info)
    return report()


def _memgpt(device: DeviceInfo, **shape: int) -> tuple[Any, nn.Module, Any]:
    """tests/tasks/memgpt.py's MemGPT (the levers' test model): (task, model, one batch)."""
    from redline.task import resolve_task

    task = resolve_task(f"{MEMGPT}:MemGPT", shape)
    torch.manual_seed(0)
    model = task.build_model().to(device.torch_device)
    batch = [t.to(device.torch_device) for t in task.train_data()[:4]]
    return task, model, batch


def _state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state tensors, inside torchao's quantized subclasses too
    (their codes, scales and code tables), wherever they are."""
    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()
    states = getattr(optimizer, "state", {})
    return sum(size(v) for s in states.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _steps(optimizer: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
           n: int = 5) -> tuple[float, float]:
    first = last = 0.0
    for i in range(n):
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, (x, y))
        loss.backward()
        optimizer.step()
        first, last = (loss.item(), loss.item()) if i == 0 else (first, loss.item())
    return first, last


def _step_ms(optimizer: Any, info: DeviceInfo, n: int = 10) -> float:
    """Milliseconds of one optimizer step on the gradients present (median of `n`)."""
    import statistics
    import time

    times = []
    for _ in range(n):
        if info.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.step()
        if info.is_cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def lever_checks(info: DeviceInfo) -> None:
    """The memory levers of issue 20 on `info`'s device (the module docstring)."""

    def make_optimizer(model: nn.Module, kind: str) -> Any:
        from redline.memory.optimizer_state import make_optimizer

        return make_optimizer(list(model.parameters()), 1e-3, 0.0, kind)

    def fp32_state() -> tuple[int, float]:
        """fp32 AdamW's state bytes and its optimizer step's milliseconds."""
        model, x, y = toy()
        fp32 = make_optimizer(model, "fp32")
        _steps(fp32, model, x, y, 2)
        return _state_bytes(fp32), _step_ms(fp32, info)

    def toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024),
                              nn.GELU(), nn.Linear(1024, 10)).to(info.torch_device)
        g = torch.Generator().manual_seed(0)
        return (model, torch.randn(64, 256, generator=g).to(info.torch_device),
                torch.randint(0, 10, (64,), generator=g).to(info.torch_device))

    for kind, most in (("8bit", 0.30), ("4bit", 0.18)):
        @check(f"optimizer state {kind} on {info.kind}")
        def _(kind: str = kind, most: float = most) -> str:
            model, x, y = toy()
            optimizer = make_optimizer(model, kind)
            first, last = _steps(optimizer, model, x, y)
            fp32_bytes, fp32_ms = fp32_state()
            state = _state_bytes(optimizer)
            assert last < first, f"loss did not fall: {first:.4f} -> {last:.4f}"
            assert state <= most * fp32_bytes, (state, fp32_bytes)
            on = {v.device.type for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor)}
            assert on == {info.kind}, f"state on {on}"
            ms = _step_ms(optimizer, info)
            return (f"ok, loss {first:.3f} -> {last:.3f}, state {state / 2**20:.2f} MiB = "
                    f"{state / fp32_bytes:.2f} of fp32 AdamW's {fp32_bytes / 2**20:.2f} MiB; "
                    f"optimizer step {ms:.2f} ms (fp32 AdamW: {fp32_ms:.2f} ms)")

    if info.is_cuda:
        @check("optimizer state cpu-offload on cuda")
        def _() -> str:
            model, x, y = toy()
            optimizer = make_optimizer(model, "cpu-offload")
            fp32_bytes = fp32_state()[0]
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            first, last = _steps(optimizer, model, x, y)
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            held = torch.cuda.memory_allocated() - before  # the state it keeps on the GPU
            assert last < first, f"loss did not fall: {first:.4f} -> {last:.4f}"
            assert held < 0.05 * fp32_bytes, (held, fp32_bytes)
            return (f"ok, loss {first:.3f} -> {last:.3f}, {held / 2**20:.2f} MiB held on the "
                    f"GPU after 5 steps (fp32 AdamW's state: {fp32_bytes / 2**20:.2f} MiB)")

    @check(f"activation checkpointing selective / full on {info.kind}")
    def _() -> str:
        from redline.memory.blocks import find_blocks
        from redline.memory.checkpointing import Checkpointing

        shape = ({"width": 256, "layers": 6, "seq": 512} if info.is_cuda
                 else {"width": 64, "layers": 4, "seq": 128})
        task, model, batch = _memgpt(info, **shape)
        ckpt = Checkpointing(find_blocks(model), "none")
        grads: dict[str, list[torch.Tensor]] = {}
        peaks: dict[str, int] = {}
        for mode in ("none", "selective", "full"):
            ckpt.set(mode)
            model.zero_grad(set_to_none=True)
            peaks[mode] = measure_peak(lambda: task.loss(model, batch).backward(), info,
                                       baseline=live_tensor_bytes(model)).peak_bytes
            grads[mode] = [p.grad.detach().clone() for p in model.parameters()]
        for mode in ("selective", "full"):
            for a, b in zip(grads["none"], grads[mode], strict=True):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
        return "ok, gradients equal none's; peaks " + ", ".join(
            f"{m} {v / 2**20:.1f} MiB" for m, v in peaks.items())

    if info.is_cuda:
        @check("training with checkpointing and 8bit states (redline train)")
        def _() -> str:
            with tempfile.TemporaryDirectory() as d:
                done = _train(d, "--batch-size", "8", "--steps", "6",
                              "--set", "memory.activation_checkpointing=selective",
                              "--set", "memory.optimizer_state=8bit")
                assert done.returncode == 0, done.stderr[-2000:]
                rows = [json.loads(line) for line in
                        Path(f"{d}/run/metrics.jsonl").read_text().splitlines()
                        if '"loss"' in line]
            return f"ok, loss at step {rows[-1]['step']}: {rows[-1]['loss']:.3f}"


def _train(run_root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "redline", "train", f"{MEMGPT}:MemGPT", "--device", "cuda",
         "--no-progress", "--no-report", "--run-dir", f"{run_root}/run",
         "--set", "telemetry.log_every=2", *args],
        capture_output=True, text=True, timeout=300)


def snapshot_check(info: DeviceInfo) -> None:
    @check("OOM at micro-batch 1 leaves the allocator's memory snapshot")
    def _() -> str:
        # A GPT of ~100 MiB of parameters whose one-sample step needs ~400 MiB beyond them
        # (gradients, AdamW's state, ~290 MiB of activations at sequence 1024): 256 MiB
        # holds the parameters even in the allocator's 20 MiB segments, but no step, so the
        # guard retries 4 -> 2 -> 1 (the allocator recording) and the run ends with the
        # snapshot written.
        with tempfile.TemporaryDirectory() as d:
            done = _train(d, "--batch-size", "4", "--steps", "3", "--memory-budget", "256MiB",
                          "--set", "task_args.width=512", "--set", "task_args.layers=8",
                          "--set", "task_args.seq=1024")
            assert done.returncode != 0, "the run did not run out of memory"
            snap = Path(f"{d}/run/memory_snapshot.pickle")
            assert snap.is_file(), f"no snapshot; stderr: {done.stderr[-1500:]}"
            with snap.open("rb") as f:
                data = pickle.load(f)  # the format https://pytorch.org/memory_viz reads
            assert "segments" in data and data.get("device_traces"), list(data)
            traces = sum(len(t) for t in data["device_traces"])
            memory = json.loads(Path(f"{d}/run/memory.json").read_text())
        said = done.stderr.strip().splitlines()[-1][:120] if done.stderr.strip() else ""
        return (f"ok, {snap.stat().st_size / 2**10:.0f} KiB snapshot, {traces} trace "
                f"events; memory.json has {sorted(memory)[:4]}; said: {said}")


def report() -> int:
    failed = [r for r in RESULTS if not r[1]]
    for name, ok, detail in RESULTS:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
