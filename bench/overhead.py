"""What per-step logging costs: redline's telemetry against a bare loop and its peers.

    PYTHONPATH=src python bench/overhead.py [--workloads mlp-small,mlp-large,conv-bn,mlp-groups]
        [--repeats 121,31,61,61] [--steps 50] [--threads 1] [--small 128x160]
        [--large 512x176] [--fixed-heap]

Goal: redline as `redline train` runs it, with full telemetry (Engine.step with the OOM
guard on + Telemetry: jsonl, tensorboard and wandb offline, hardware sampler, MFU,
log_every=50) within 0.5 % of the hand-written loop that does the same work (clipping
and a scheduler step), on every workload (bench/workloads.py: two MLP sizes, a conv net
with BatchNorm, several parameter groups). Pass/fail is printed as measured.

One process; per workload one model, optimizer and scheduler that every variant steps in
turn, pre-made batches (a list, no DataLoader). Variants: the bare loop (zero_grad,
forward, loss, backward, clip_grad_norm_, step, scheduler step: the floor) and an
identical copy of it (the noise control); Engine.step alone; redline as Trainer._loop's
body on CPU (data-wait clock, BATCH_START and STEP_END handlers, Engine.step, state,
Telemetry.record_step), with the OOM guard on as `redline train` runs it, and again with
it off (telemetry's own cost). On the MLP workloads also the peers: the floor + wandb
run.log of 10 metrics a step; Lightning Trainer.fit with self.log of them (on_step=True,
logger=False), timed between on_train_batch_end hooks; Accelerate (log_with="wandb",
accelerator.log every step).

Each repeat runs every variant for a block of steps, in a random order; a variant's cost
is the median over repeats of its block time divided by the floor's block time in the
same repeat (paired: the machine's drift cancels), with a distribution-free 95 %
confidence interval. W&B runs, the session and Accelerate live across blocks, Lightning
runs one fit per block. Warm-up is log_every/2 steps and blocks are a multiple of
log_every, so every redline block closes a window mid-block and its writer process
finishes inside redline's block. Peers' W&B runs keep W&B's defaults (system stats on)
except console capture. Pick --small/--large so the floor is ~2 ms and ~30 ms.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import track

from redline.device import DeviceInfo
from redline.engine import Engine
from redline.events import Dispatcher, Event, State
from redline.telemetry.config import TelemetryConfig
from redline.telemetry.session import Telemetry
from workloads import CLIP, LR, Batch, Workload, build

TRACKERS = ["jsonl", "tensorboard", "wandb"]
LOG_EVERY, GOAL_PCT = 50, 0.5
FLOOR, ENGINE, REDLINE = "bare loop (floor)", "Engine.step only", "redline, full telemetry"
NO_GUARD = "redline, full telemetry, OOM guard off"
CONTROL = "bare loop again (noise control)"
WANDB, LIGHTNING, ACCEL = "bare + wandb.log", "Lightning self.log, no logger", "Accelerate + wandb"


class PerStep:
    """The 10 metrics a peer's user logs every step; reads loss and grad norm on the host."""

    def __init__(self, batch_size: int) -> None:
        self.n, self.t, self.ema, self.samples = batch_size, 0.0, 0.0, 0
        self.log_s, self.last_s, self.calls = 0.0, 0.0, 0

    def log(self, log: Callable[..., Any], i: int, loss: torch.Tensor, gnorm: torch.Tensor,
            lr: float, **kw: Any) -> None:
        t = time.perf_counter()
        log(self(i, loss, gnorm, lr), **kw)
        self.last_s = time.perf_counter() - t
        self.log_s, self.calls = self.log_s + self.last_s, self.calls + 1

    def __call__(self, step: int, loss: torch.Tensor, gnorm: torch.Tensor, lr: float
                 ) -> dict[str, float]:
        now = time.perf_counter()
        dt, self.t = (now - self.t if self.t else 0.0), now
        loss_v, gn = loss.item(), gnorm.item()
        self.samples += self.n
        self.ema = 0.98 * self.ema + 0.02 * loss_v
        return {"loss": loss_v, "loss_ema": self.ema, "grad_norm": gn, "lr": lr,
                "clip_coef": min(1.0, CLIP / (gn + 1e-6)), "step_time_s": dt,
                "samples_per_s": self.n / dt if dt else 0.0, "samples": float(self.samples),
                "epoch": 0.0, "step": float(step)}


class Variant:
    """`block(n)` runs n steps and returns seconds per step."""

    def __init__(self, step: Callable[[], None], close: Callable[[], None] = lambda: None,
                 per_step: PerStep | None = None) -> None:
        self.step, self.close, self.per_step, self.steps = step, close, per_step, 0
        self.sink_s: dict[str, float] = {}  # redline: time in hub.publish, per stream
        self.sink_n: dict[str, int] = {}

    def block(self, n: int) -> float:
        self.steps += n
        step, t0 = self.step, time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - t0) / n


def _bare(w: Workload, log: Any = None, ps: PerStep | None = None,
          after: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> Variant:
    """The floor: what a hand-written loop does for the same result (clip, scheduler step);
    with `log` and `ps`, a peer's per-step logging; `after(step, loss, norm)` for what
    bench/step_costs.py adds to it."""
    it, k = itertools.cycle(w.data), itertools.count(1)
    model, opt, sched, loss_fn = w.model, w.optimizer, w.scheduler, w.loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, next(it))
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        sched.step()
        if log is not None and ps is not None:
            ps.log(log, i := next(k), loss, gn, opt.param_groups[0]["lr"], step=i)
        elif after is not None:
            after(next(k), loss.detach(), gn)

    return Variant(step, per_step=ps)


def _engine(w: Workload) -> Variant:
    it = itertools.cycle(w.data)
    engine = Engine(w.model, w.optimizer, "fp32", scheduler=w.scheduler, grad_clip=CLIP)
    return Variant(lambda: engine.step(next(it), w.loss))  # type: ignore[arg-type,return-value]


def _redline(w: Workload, run_dir: Path, guard: bool = True) -> tuple[Variant, Path]:
    device, bs, opt = DeviceInfo.detect("cpu"), w.batch_size, w.optimizer
    it = itertools.cycle(w.data)
    cfg = TelemetryConfig(log_every=LOG_EVERY, trackers=tuple(TRACKERS), wandb_mode="offline")
    telemetry = Telemetry(run_dir, cfg, device=device, samples_per_step=bs, progress=False,
                          run_name=run_dir.name, skip_nonfinite=True)
    state = State(model=w.model, optimizer=opt, max_steps=10**9, run_dir=str(run_dir))
    dispatcher = Dispatcher()
    # as `redline train` runs it: the OOM guard on, its micro-batch the whole batch, and
    # non-finite steps skipped (train.on_nonfinite: skip, through the fused AdamW's found_inf)
    engine = Engine(w.model, opt, "fp32", scheduler=w.scheduler, grad_clip=CLIP,
                    dispatcher=dispatcher, state=state, micro_batch_size=bs if guard else None,
                    oom_guard=guard, skip_nonfinite=True)
    v = Variant(lambda: None)
    publish = telemetry.hub.publish  # timed: the training thread's one hand-off per window

    def timed(stream: str, record: dict[str, Any]) -> None:
        t = time.perf_counter()
        publish(stream, record)
        v.sink_s[stream] = v.sink_s.get(stream, 0.0) + time.perf_counter() - t
        v.sink_n[stream] = v.sink_n.get(stream, 0) + 1

    telemetry.hub.publish = timed  # type: ignore[method-assign]
    telemetry.count_flops(w.model, w.data[0], w.loss, bs)
    telemetry.start()
    dispatcher.fire(Event.FIT_START, state)
    ended = [time.perf_counter()]
    on_batch_start = dispatcher.table[Event.BATCH_START]
    on_step_end = dispatcher.table[Event.STEP_END]
    record_step = telemetry.record_step

    def step() -> None:  # Trainer._loop's body on CPU, minus the eval/checkpoint checks
        t = time.perf_counter()
        batch = next(it)
        wait = time.perf_counter() - t
        for handler in on_batch_start:
            handler(state, batch)
        loss = engine.step(batch, w.loss)  # type: ignore[arg-type]
        state.step += 1
        state.batch_in_epoch += 1
        state.samples_seen += bs
        for handler in on_step_end:
            handler(state, loss)
        record_step(state.step, loss, engine.grad_norm, engine.micro_batch_size,
                    opt.param_groups[0]["lr"], state.epoch, state.samples_seen, wait)

    def close() -> None:
        dispatcher.fire(Event.FIT_END, state)
        telemetry.close()

    v.step, v.close, run_block = step, close, v.block

    def block(n: int) -> float:  # other variants' blocks are not window time (like evaluation)
        telemetry.window.exclude(time.perf_counter() - ended[0])
        dt = run_block(n)
        ended[0] = time.perf_counter()
        return dt

    v.block = block  # type: ignore[method-assign]
    return v, run_dir / "metrics.jsonl"


def _lightning(w: Workload, tmp: Path) -> Variant:
    import lightning.pytorch as pl

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    ps = PerStep(w.batch_size)
    net, opt, sched, data, loss_fn = w.model, w.optimizer, w.scheduler, w.data, w.loss

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.stamps = net, list[float]()
            self.last, self.gn = torch.zeros(()), torch.zeros(())

        def training_step(self, batch: Batch, idx: int) -> torch.Tensor:
            self.last = loss_fn(self.net, batch)
            return self.last

        def configure_optimizers(self) -> Any:  # one optimizer across fits: state carries over
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def configure_gradient_clipping(self, *args: Any, **kw: Any) -> None:
            self.gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), CLIP, foreach=True)

        def on_train_batch_end(self, outputs: Any, batch: Any, idx: int) -> None:
            ps.log(self.log_all, self.global_step, self.last, self.gn, LR)
            if idx == 0:  # before the first stamp: not in the timed steps
                ps.log_s, ps.calls = ps.log_s - ps.last_s, ps.calls - 1
            self.stamps.append(time.perf_counter())

        def log_all(self, metrics: dict[str, float]) -> None:
            for k, v in metrics.items():
                self.log(k, v, on_step=True, on_epoch=False)

    module = Module()

    def block(n: int) -> float:
        module.stamps = []
        trainer = pl.Trainer(max_steps=n + 1, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=str(tmp),
                             num_sanity_val_steps=0, limit_val_batches=0)
        # an iterator, not a list: Lightning would read a list as several loaders
        trainer.fit(module, (data[i % len(data)] for i in range(n + 1)))
        s = module.stamps
        return (s[-1] - s[0]) / (len(s) - 1)

    v = Variant(lambda: None, per_step=ps)
    v.block = block  # type: ignore[method-assign]
    return v


def _accelerate(w: Workload, tmp: Path) -> Variant:
    import wandb
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, log_with="wandb", project_dir=str(tmp))
    acc.init_trackers("redline-bench", init_kwargs={"wandb": {
        "dir": str(tmp), "mode": "offline", "name": "accelerate", "reinit": "create_new",
        "settings": wandb.Settings(console="off")}})
    model, opt = acc.prepare(w.model, w.optimizer)
    it, k, ps = itertools.cycle(w.data), itertools.count(1), PerStep(w.batch_size)
    sched, loss_fn = w.scheduler, w.loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, next(it))
        acc.backward(loss)
        gn = acc.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        ps.log(acc.log, i := next(k), loss, gn, opt.param_groups[0]["lr"], step=i)

    return Variant(step, acc.end_training, ps)


def bench(w: Workload, steps: int, repeats: int, threads: int, tmp: Path
          ) -> tuple[dict[str, list[float]], dict[str, Variant], list[dict[str, Any]]]:
    # One model and one optimizer that every variant steps in turn: the same tensors at
    # the same addresses, so no variant is faster for where its memory happens to lie
    # (separate copies made two identical loops differ by up to 1.5 %).
    slug = "".join(c if c.isalnum() else "-" for c in w.name)
    redline, metrics_path = _redline(w, tmp / f"redline-{slug}")
    # A second, identical floor: how far two equal loops drift apart is the noise level.
    variants = {FLOOR: _bare(w), CONTROL: _bare(w), ENGINE: _engine(w), REDLINE: redline,
                NO_GUARD: _redline(w, tmp / f"noguard-{slug}", False)[0]}
    run = None
    if w.peers:
        import wandb
        run = wandb.init(dir=str(tmp), mode="offline", project="redline-bench", name="bare",
                         reinit="create_new", settings=wandb.Settings(console="off"))
        variants.update({WANDB: _bare(w, run.log, PerStep(w.batch_size)),
                         LIGHTNING: _lightning(w, tmp), ACCEL: _accelerate(w, tmp)})
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for v in variants.values():  # warm-up; redline's windows then close mid-block
        torch.set_num_threads(threads)
        v.block(LOG_EVERY // 2)
    order = random.Random(0)
    for _ in track(range(repeats), description=w.name, transient=True):
        # A fresh random order each repeat: with a rotation each variant would always
        # follow the same one, and e.g. the floor would always inherit the background work
        # of the W&B run that logged just before it.
        for name in order.sample(names, len(names)):
            torch.set_num_threads(threads)  # in case a framework changed it
            times[name].append(variants[name].block(steps))
    for v in variants.values():
        v.close()
    if run is not None:
        run.finish()
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return times, variants, [r for r in records if "redline/overhead_pct" in r]


def paired(times: dict[str, list[float]], name: str, floor: str = FLOOR
           ) -> tuple[float, float, float]:
    """Median of the per-repeat ratios name/floor, with a 95 % confidence interval.

    Each repeat runs every variant once, close together in time, so a ratio within one
    repeat cancels the machine's slow drift. The interval is distribution-free: the order
    statistics around the median that a Binomial(n, 1/2) puts 95 % of the mass between.
    """
    ratios = sorted(t / f for t, f in zip(times[name], times[floor], strict=True))
    n = len(ratios)
    half = 0.98 * math.sqrt(n)  # 1.96 standard deviations of Binomial(n, 1/2)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return statistics.median(ratios), ratios[lo], ratios[hi]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="mlp-small,mlp-large,conv-bn,mlp-groups",
                   help="comma-separated, from bench/workloads.py")
    p.add_argument("--repeats", default="121,31,61,61",
                   help="repeats per workload, in the same order (one value: all)")
    p.add_argument("--steps", type=int, default=50,
                   help="steps per block; a multiple of log_every (50)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--small", default="128x160", help="mlp-small's WIDTHxBATCH, floor ~2 ms")
    p.add_argument("--large", default="512x176", help="mlp-large's WIDTHxBATCH, floor ~30 ms")
    p.add_argument("--fixed-heap", action="store_true",
                   help="fix glibc malloc's mmap and trim thresholds (mallopt), so that no "
                        "variant's step pays page faults for its big activations because "
                        "of where small allocations happen to lie")
    args = p.parse_args()
    if args.fixed_heap:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        print("glibc malloc: mmap threshold 32 MiB, trim threshold 1 GiB "
              f"({'set' if ok else 'not set'})")
    with tempfile.TemporaryDirectory(prefix="redline-overhead-",
                                     ignore_cleanup_errors=True) as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp))
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")  # what redline's fp32 policy pins
    import accelerate
    import lightning
    import wandb
    names = args.workloads.split(",")
    repeats = [int(s) for s in args.repeats.split(",")]
    repeats = (repeats * len(names))[:len(names)] if len(repeats) == 1 else repeats
    assert len(repeats) == len(names), "one --repeats value per workload"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; Python "
          f"{platform.python_version()}, torch {torch.__version__}, lightning "
          f"{lightning.__version__}, accelerate {accelerate.__version__}, wandb "
          f"{wandb.__version__}; {args.threads} thread(s), repeats {repeats} x {args.steps} "
          "steps, interleaved, one shared model per workload", flush=True)
    t_start, rows, notes = time.perf_counter(), [], []
    why: dict[str, list[str]] = {k: [] for k in (ENGINE, REDLINE, WANDB, LIGHTNING, ACCEL)}
    for w, reps in zip(build(names, args.small, args.large), repeats, strict=True):
        times, variants, recs = bench(w, args.steps, reps, args.threads, tmp)
        _report(w.name, times, variants, recs, rows, notes, why)
    print("\n| model | variant | median ms/step | spread (min..max) | vs floor, paired "
          "(95 % CI) |\n"
          "|---|---|---|---|---|\n" + "\n".join(rows))
    print(f"\nredline's goal: within {GOAL_PCT} % of the floor (median of the per-repeat "
          "ratios), every workload.")
    print("\n".join(notes))
    print("\nWhere the extra time per step goes (paired median ratio x floor, per workload):")
    for k, text in (
        (ENGINE, "the Engine's Python per step: precision hooks, the norm it keeps for "
                 "telemetry"),
        (REDLINE, "loop body, the OOM guard's RNG and BatchNorm snapshots, "
                  "Telemetry.record_step with its window closes (sinks and sampler run in "
                  "the writer process)"),
        (WANDB, "two .item() reads and run.log on the training thread"),
        (LIGHTNING, ".item() + 10 self.log calls; the rest: Lightning's loop, hooks, closure"),
        (ACCEL, ".item() + accelerator.log; the rest: optimizer wrapper, accelerate's clip"),
    ):
        if why[k]:
            print(f"- {k}: {' | '.join(why[k])}: {text}.")
    print(f"\nload {os.getloadavg()[0]:.2f} at the end; total {time.perf_counter() - t_start:.0f}"
          " s", flush=True)


def _report(label: str, times: dict[str, list[float]], variants: dict[str, Variant],
            recs: list[dict[str, Any]], rows: list[str], notes: list[str],
            why: dict[str, list[str]]) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med[FLOOR]
    ratio = {k: paired(times, k) for k in times}
    for name, ts in times.items():
        r, lo, hi = ratio[name]
        rows.append(f"| {label} | {name} | {med[name] * 1e3:.3f} | {min(ts) * 1e3:.3f}.."
                    f"{max(ts) * 1e3:.3f} | {r:.4f}x ({lo:.4f}..{hi:.4f}) |")
    ext, ext_hi = 100 * (ratio[REDLINE][0] - 1), 100 * (ratio[REDLINE][2] - 1)
    pct = statistics.median([r["redline/overhead_pct"] for r in recs[1:-1]]
                            or [r["redline/overhead_pct"] for r in recs])
    mfu = [r["mfu"] for r in recs if r.get("mfu") is not None]
    c, c_lo, c_hi = (100 * (x - 1) for x in ratio[CONTROL])
    verdict = "PASS" if ext <= GOAL_PCT else "FAIL"
    notes.append(f"- {label}: redline/overhead_pct (self-reported, median of "
                 f"{max(1, len(recs) - 2)} windows) {pct:.3f} %; measured from outside "
                 f"{ext:+.2f} % (95 % CI up to {ext_hi:+.2f} %; noise control: two "
                 f"identical floors {c:+.2f} %, CI {c_lo:+.2f}..{c_hi:+.2f} %) -> "
                 f"{verdict}" + (f" (MFU {statistics.median(mfu):.3f})" if mfu else ""))
    ng, ng_hi = 100 * (ratio[NO_GUARD][0] - 1), 100 * (ratio[NO_GUARD][2] - 1)
    notes.append(f"  telemetry without the OOM guard: {ng:+.2f} % (95 % CI up to "
                 f"{ng_hi:+.2f} %) -> {'PASS' if ng <= GOAL_PCT else 'FAIL'}")
    us = {k: (ratio[k][0] - 1) * floor * 1e6 for k in med}
    red = variants[REDLINE]
    hand_off = red.sink_s.get("metrics", 0.0) / max(1, red.sink_n.get("metrics", 0))
    why[ENGINE].append(f"{us[ENGINE]:+.0f} us")
    why[REDLINE].append(f"{us[REDLINE] - us[ENGINE]:+.0f} us over Engine.step; "
                        f"record_step {pct / 100 * med[REDLINE] * 1e6:.1f} us a step, of "
                        f"which hub.publish {hand_off * 1e6:.0f} us a window")
    for k in (WANDB, LIGHTNING, ACCEL):
        if k in variants:
            ps = variants[k].per_step or PerStep(1)
            why[k].append(f"{us[k]:+.0f} us, {ps.log_s / max(1, ps.calls) * 1e6:.0f} us "
                          "logging")


if __name__ == "__main__":
    main()
