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
It prints one line per check and exits 1 if any failed. Without a GPU it says so and exits
0 (nothing to validate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from redline.checkpoint import load_latest, save_checkpoint
from redline.device import DeviceInfo
from redline.engine import Engine
from redline.precision import PRECISIONS, PrecisionError, get_precision
from redline.rng import rng_state, set_rng_state

RESULTS: list[tuple[str, bool, str]] = []


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

    failed = [r for r in RESULTS if not r[1]]
    for name, ok, detail in RESULTS:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
