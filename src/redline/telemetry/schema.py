"""Every metric key redline writes, defined once: its name, unit and meaning.

A key is a `str` (so a record is a plain dict and JSON writes it as its name) that also
carries its `unit`, `meaning` and `stream`. The window logger, the sampler, the sinks, the
console, `redline doctor RUN_DIR` and the report read keys from here, and the metric
table of docs/telemetry.md is generated from it (`python -m redline.telemetry.schema`; a
test checks that the guide holds that table).

Streams: `metrics` (one record per telemetry window, plus `eval/*` rows and any rows a
callback logs), `system` (hardware samples, from the writer process's sampler), `ranks`
(under torchrun: each rank's own figures for each window, in ranks.jsonl). Keys a
callback adds to a window (Event.WINDOW) are the callback's own and are not listed here;
they should not reuse these names.

This module imports nothing: the writer process reads it without torch.
"""

from __future__ import annotations

import sys


class Key(str):
    """A metric name with its unit, meaning and stream."""

    unit: str
    meaning: str
    stream: str

    def __new__(cls, name: str, unit: str, meaning: str, stream: str = "metrics") -> Key:
        key = super().__new__(cls, name)
        key.unit, key.meaning, key.stream = unit, meaning, stream
        KEYS[name] = key
        return key

    def __reduce__(self) -> tuple[type, tuple[str]]:  # sent between ranks as a plain name
        return (str, (str(self),))


KEYS: dict[str, Key] = {}

# ---- axes of every record -----------------------------------------------------------------
STEP = Key("step", "steps", "optimizer steps completed when the record was made")
TIME = Key("time", "s (Unix)", "wall-clock time the record was made")

# ---- training windows (every telemetry.log_every steps) ------------------------------------
EPOCH = Key("epoch", "epochs", "epoch of the window's last step (0-based)")
SAMPLES = Key("samples", "samples", "training samples consumed so far")
LR = Key("lr", "", "learning rate of the first parameter group after the window's last step")
LOSS = Key("loss", "task's", "mean training loss over the window's steps whose loss was "
           "finite (NaN when none was)")
GRAD_NORM = Key("grad_norm", "", "global gradient norm, before clipping, of the window's last "
                "step")
SKIPPED_STEPS = Key("skipped_steps", "steps", "optimizer updates not applied in this window "
                    "(not cumulative): non-finite gradients, skipped by train.on_nonfinite or "
                    "by fp16's loss scaler")
NONFINITE_STEPS = Key("nonfinite_steps", "steps", "steps in this window whose loss or "
                      "gradients were not finite (fp16's scaler overflowing gradients of a "
                      "finite loss excepted)")
NONFINITE_RUN = Key("nonfinite_run_max", "steps", "the longest run of consecutive non-finite "
                    "steps reached in this window, counting from before it")
FIRST_NONFINITE = Key("first_nonfinite_step", "step", "the window's first non-finite step; "
                      "empty when none")
STEP_TIME = Key("step_time_s", "s", "mean time per optimizer step over the window (CUDA "
                "events on a GPU, the host clock on CPU)")
SAMPLES_PER_S = Key("samples_per_s", "samples/s", "effective batch / step_time_s (all ranks "
                    "together under torchrun)")
DATA_WAIT_PCT = Key("data_wait_pct", "%", "share of the window's wall time the training "
                    "thread waited for the data loader")
MFU = Key("mfu", "fraction", "model FLOPs utilisation: model FLOPs per step (recomputation "
          "left out) / step_time_s / peak_flops; empty where the peak is unknown (an unknown "
          "GPU, fp8)")
HFU = Key("hfu", "fraction", "hardware FLOPs utilisation: the FLOPs the device ran per step, "
          "recomputation included (activation checkpointing's reruns of the forward, fused "
          "attention's QKᵀ in its backward) / step_time_s / peak_flops; present only where "
          "something is recomputed, else it equals mfu")
PEAK_FLOPS = Key("peak_flops", "FLOP/s", "the dense peak MFU divides by, of all ranks' devices "
                 "together (its source, table, measured or override, is in events.jsonl's "
                 "'flops' event)")
MICRO_BATCH = Key("micro_batch", "samples", "samples per forward/backward at the window's end")
ACCUMULATION_STEPS = Key("accumulation_steps", "micro-batches", "micro-batches per optimizer "
                         "step")
EFFECTIVE_BATCH = Key("effective_batch", "samples", "samples per optimizer step")
MEM_ALLOCATED = Key("mem_allocated_bytes", "bytes", "tensor memory in use at the window's end "
                    "(CUDA allocator; CPU: the memory.budget tracker's count)")
MEM_RESERVED = Key("mem_reserved_bytes", "bytes", "memory the CUDA caching allocator holds")
MEM_PEAK = Key("mem_peak_bytes", "bytes", "peak tensor memory during the window (CUDA "
               "allocator; CPU: the memory.budget tracker's count)")
MEM_RSS = Key("mem_rss_bytes", "bytes", "CPU: resident memory of the training process at the "
              "window's end")
MEM_RSS_PEAK = Key("mem_rss_peak_bytes", "bytes", "CPU: the most the training process has "
                   "been resident since it started (the OS's high-water mark)")
MEM_PCT = Key("mem_pct", "%", "peak memory as a share of memory.budget, else of the device's "
              "memory (CPU without a budget: resident memory of physical memory)")
OVERHEAD_PCT = Key("redline/overhead_pct", "%", "redline's own time on the training thread "
                   "as a share of the window's wall time: recording steps, closing the window "
                   "(with its WINDOW callbacks and the hand-off to the writer process) and the "
                   "inspector's work on inspecting steps; not counted: the Engine's few "
                   "microseconds a step beyond a bare loop's (the OOM guard's snapshot, the "
                   "non-finite check) and the loop's bookkeeping (bench/overhead.py measures "
                   "the whole against a hand-written loop)")
EMULATED = Key("precision/emulated", "flag", "1 when the precision is an emulation "
               "(fp8-emulated): the format's numerics, not its speed; absent otherwise")
HOST_SYNCS = Key("redline/host_syncs", "syncs", "times redline's telemetry made the host wait "
                 "for the device in this window (goal: 0)")

# ---- ranks under torchrun (a window's figures, gathered once per window) ------------------
WORLD_SIZE = Key("dist/world_size", "ranks", "processes training together under torchrun; "
                 "absent in a single-process run")
SLOWEST_RANK = Key("dist/slowest_rank", "rank", "the rank the others waited for in this window "
                   "(the one that waited least at the step's agreement)")
SYNC_WAIT_MAX = Key("dist/sync_wait_pct", "%", "the largest share of a rank's step time spent "
                    "waiting for the slowest rank at the step's agreement")
STEP_TIME_SPREAD = Key("dist/busy_spread_pct", "%", "how much longer the slowest rank's busy "
                       "time (step time less its wait) was than the fastest's")
RANK = Key("rank", "", "the rank whose figures a ranks.jsonl record holds (its step_time_s, "
           "samples_per_s (its share), micro_batch, data_wait_pct, mem_* and "
           "redline/overhead_pct keys mean what they mean in metrics)", "ranks")
SYNC_WAIT_PCT = Key("sync_wait_pct", "%", "this rank's share of step time spent waiting for "
                    "the other ranks at the step's agreement", "ranks")
COMM_PCT = Key("comm_pct", "%", "this rank's share of step time spent in FSDP's all-gathers "
               "and reduce-scatters (distributed.strategy fsdp on CPUs, where they run "
               "synchronously; absent elsewhere)", "ranks")
COMM_MAX = Key("dist/comm_pct", "%", "the largest share of a rank's step time spent in FSDP's "
               "all-gathers and reduce-scatters (comm_pct in ranks.jsonl)")

# ---- evaluation rows ---------------------------------------------------------------------
EVAL_PREFIX = "eval/"
EVAL_LOSS = Key("eval/loss", "task's", "mean loss over the evaluation batches")
EVAL_TIME = Key("eval/time_s", "s", "how long the evaluation took (not counted as step time)")
EVAL_ANY = Key("eval/<metric>", "task's", "each metric the task's evaluate() returns")
EVAL_SET_ANY = Key("eval/<set>/<metric>", "task's", "with several evaluation sets (eval_data "
                   "returning a dict): each set's loss and metrics, under the set's name")

# ---- hardware samples (system.jsonl, every telemetry.system_every_s) -----------------------
CPU_UTIL = Key("cpu/util_pct", "%", "CPU utilisation of the whole machine", "system")
RAM_USED = Key("ram/used_pct", "%", "physical memory in use, whole machine", "system")
PROC_RSS = Key("proc/rss_bytes", "bytes", "resident memory of the training process", "system")
GPU_UTIL = Key("gpu/util_pct", "%", "share of time a kernel ran on the GPU (NVML)", "system")
GPU_MEM_UTIL = Key("gpu/mem_util_pct", "%", "share of time device memory was read or written",
                   "system")
GPU_MEM_USED = Key("gpu/mem_used_bytes", "bytes", "device memory in use, all processes",
                   "system")
GPU_MEM_TOTAL = Key("gpu/mem_total_bytes", "bytes", "device memory", "system")
GPU_TEMP = Key("gpu/temp_c", "°C", "GPU temperature", "system")
GPU_POWER = Key("gpu/power_w", "W", "board power draw", "system")
GPU_CLOCK = Key("gpu/sm_clock_mhz", "MHz", "SM clock", "system")

TABLE_BEGIN = "<!-- metrics table: generated by python -m redline.telemetry.schema -->"
TABLE_END = "<!-- end of metrics table -->"


def is_eval(key: str) -> bool:
    return key.startswith(EVAL_PREFIX)


def markdown_table() -> str:
    """docs/telemetry.md's table of every key, between its begin and end markers."""
    rows = [TABLE_BEGIN, "| key | stream | unit | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k}` | {k.stream} | {k.unit or '-'} | {k.meaning} |" for k in KEYS.values()]
    return "\n".join([*rows, TABLE_END])


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
