"""A study's speed, measured side by side: every setting timed in interleaved rounds.

A run's own samples/s comes from its wall clock while it trained, alone, minutes apart
from the others: on a machine whose load changes (another job, a busy core) two runs of
the same setting differ by more than two precisions do. So once every run has trained,
each setting (its first seed's config) is built again as training builds it
(tuning/trial.py's Runner: the job's own loader, engine and precision) and timed in
`ROUNDS` rounds, all settings in each round, alternating direction, so a slowdown
mid-measurement falls on every setting alike:

    round 1: fp32, bf16-mixed, fp8-emulated      each for whole steps >= MIN_S seconds
    round 2: fp8-emulated, bf16-mixed, fp32
    ...

STUDY/timing.json holds each setting's rates, one per round; summarize.py takes their
median and their spread (the range relative to the median), and judges a speed-up only
beyond that spread. Before the rounds, one forward of each setting whose precision
computes in a narrower dtype than float32 (bf16-mixed, fp16-mixed, bf16-true) records the
dtypes its Linear and convolution layers actually produced (`ran`): a device that
silently ran them in float32 is a precision that changed nothing (verdicts.py).

Under torchrun, or with `batch_size: auto` (each run resolves its own micro-batch), the
rounds are not run, and timing.json says why: the study then makes no speed claim.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from redline import batch as batch_tree
from redline.config import RunConfig
from redline.device import DeviceInfo
from redline.precision import PrecisionError
from redline.task import Task

TIMING = "timing.json"  # a study directory's interleaved timing rounds
ROUNDS = 5  # interleaved rounds: the spread of five is a usable noise estimate
MIN_S = 0.25  # each setting's share of a round: whole steps adding up to at least this


def read_timing(study_dir: str | Path) -> dict[str, Any] | None:
    """STUDY/timing.json, or None when the study has not been timed."""
    path = Path(study_dir) / TIMING
    return json.loads(path.read_text()) if path.is_file() else None


def skipped(reason: str) -> dict[str, Any]:
    """A timing record that says why no rounds were run."""
    return {"rounds": 0, "min_s": 0.0, "settings": {}, "skipped": reason}


def time_settings(task: Task, configs: dict[str, RunConfig], device: DeviceInfo,
                  rounds: int = ROUNDS, min_s: float = MIN_S,
                  say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Each label's config timed in `rounds` interleaved rounds (module docstring); a
    config the device refuses is left out, with its reason."""
    from redline.tuning.trial import Runner, interleave

    refused: dict[str, str] = {}
    built: list[tuple[str, Runner]] = []
    try:
        for label, config in configs.items():
            try:
                built.append((label, Runner(task, config, device)))
            except PrecisionError as e:
                refused[label] = str(e)
        ran = {label: compute_dtypes(runner.job) for label, runner in built}
        for _, runner in built:
            runner.warm_up()
        timings = interleave([r for _, r in built], rounds, min_s, None if say is None else (
            lambda i, r: say(f"timing {built[i][0]} (round {r + 1} of {rounds})")))
    finally:
        for _, runner in built:
            runner.close()
    return {"rounds": rounds, "min_s": min_s,
            "settings": {label: {"rates": t.rates, "waits": t.waits, **ran[label]}
                         for (label, _), t in zip(built, timings, strict=True)},
            "refused": refused}


_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d)


def compute_dtypes(job: Any) -> dict[str, Any]:
    """{"compute_dtype": the precision's, "ran": {dtype: how many Linear / convolution
    outputs had it}} from one forward of the loss on the first samples, under the
    precision's contexts (eval mode, no gradient, random state untouched); {} for a
    float32 precision, where there is nothing to check."""
    from redline.rng import preserved_rng

    precision = job.precision
    if precision.compute_dtype == torch.float32:
        return {}
    seen: Counter[str] = Counter()

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            seen[str(output.dtype).removeprefix("torch.")] += 1

    model = job.model
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, _LAYERS)]
    was_training = model.training
    try:
        n = min(2, len(job.train_set))
        batch = batch_tree.move(batch_tree.first_samples(job.train_set, n),
                                job.device.torch_device)
        model.eval()
        with preserved_rng(), torch.no_grad(), precision.global_context(), \
                precision.forward_context():
            job.task.loss(model, batch)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return {"compute_dtype": str(precision.compute_dtype).removeprefix("torch."),
            "ran": dict(seen)}


def timed_configs(base: RunConfig, settings: Sequence[Any]) -> dict[str, RunConfig]:
    """label -> the config of the setting's first seed, in plan order."""
    configs: dict[str, RunConfig] = {}
    for s in settings:
        if s.label not in configs:
            configs[s.label] = base.updated(s.overrides())
    return configs
