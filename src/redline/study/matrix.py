"""`redline study`: one task under several settings, judged against the reference's noise.

    settings = precisions x every --vary axis          (plan_settings)
    reference = fp32 (else the first precision) at each axis's first value, N seeds;
                every other setting 1 seed (--other-seeds), seed = train.seed
    for each setting and seed, in order:               (Study.run)
        an ordinary run directory STUDY/<setting>-s<seed>/, trained by Trainer
        finished:  its outcome in STUDY/outcomes/<run>.json, skipped on --resume
        refused:   the device cannot run the precision (or its package is missing):
                   recorded with the reason; the study goes on
        diverged:  the run stopped itself (non-finite steps): recorded, the study goes on
        killed:    --resume continues that run from its last checkpoint
    timing (timing.py): every setting timed again, side by side, in interleaved rounds:
        STUDY/timing.json (its speed verdict needs a speed-up beyond their spread)
    summary (summarize.py, verdicts.py): per setting samples/s, step time, peak memory,
        each metric against the reference's band (judge.py), a setting that changed
        nothing flagged, the recommendation; STUDY/summary.json and STUDY/report.html

A short run gets curves: unless telemetry.log_every was set (in the config file or with
--set), it is lowered so each run logs at least MIN_POINTS windows, and the study says so.

Every run trains a fresh model from the same seed and data order as the reference's first
seed, so a difference is the setting's, not the draw's; the reference's other seeds
measure how much a second fp32 run differs by chance.

Under torchrun every rank walks the same plan and trains each run with the others (each
run is an ordinary torchrun training run); rank 0 claims the study directory and writes
the plan, the outcomes and the summary.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redline import checkpoint as ckpt
from redline import distributed
from redline.config import ConfigError, RunConfig
from redline.errors import MissingExtra, RunStopped, UserError, writing
from redline.events import Callback, State
from redline.files import atomic_write_text
from redline.job.build import rank_device
from redline.precision import PRECISIONS, PrecisionError
from redline.run.rundir import new_run_dir
from redline.run.trainer import Trainer
from redline.study import timing
from redline.study.summarize import OUTCOMES, PLAN, read_outcomes, summarize
from redline.task import Task, resolve_task, task_member
from redline.telemetry.config import TelemetryConfig

MIN_POINTS = 20  # windows a run logs at least, unless telemetry.log_every was set


class StudyError(UserError):
    """A study that cannot start as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Setting:
    """One cell of the study: a precision, values of the varied keys, a seed."""

    precision: str
    vary: tuple[tuple[str, Any], ...]
    seed: int
    reference: bool = False

    @property
    def label(self) -> str:
        """The setting without its seed, as the summary groups it."""
        return ", ".join([self.precision, *(f"{k}={v}" for k, v in self.vary)])

    @property
    def run_name(self) -> str:
        parts = [self.precision, *(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in self.vary)]
        slug = "_".join("".join(c if c.isalnum() or c in "-." else "-" for c in str(p))
                        for p in parts)
        return f"{slug}-s{self.seed}"

    def overrides(self) -> dict[str, Any]:
        return {"precision.name": self.precision, "train.seed": self.seed, **dict(self.vary)}


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """["train.batch_size=16,64"] -> {"train.batch_size": [16, 64]} (values as YAML)."""
    import yaml

    axes: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise ConfigError(f"--vary expects SECTION.KEY=V1,V2 (e.g. train.batch_size=16,64)"
                              f", got {item!r}")
        axes[key.strip()] = [yaml.safe_load(v) for v in values]
    return axes


def parse_precisions(text: str | None) -> list[str]:
    """--precision's comma-separated list of precisions (fp32 alone when not given)."""
    return [p.strip() for p in (text or "fp32").split(",") if p.strip()]


def new_study(config: RunConfig, precisions: list[str], vary: list[str], seeds: int,
              other_seeds: int, study_dir: str | Path | None = None, resume: bool = False,
              progress: bool | None = None, log_every_given: bool | None = None) -> Study:
    """The study `redline study` describes: config's task under every precision x each
    --vary item's values (KEY=V1,V2), the reference with `seeds` seeds, the others with
    `other_seeds`, in `study_dir` (default: runs/study-TASK-TIME). `log_every_given`:
    whether the user set telemetry.log_every (None: it differs from the default)."""
    task = resolve_task(config.task, config.task_args)
    if log_every_given is None:
        log_every_given = config.telemetry.log_every != TelemetryConfig().log_every
    config, notes = (config, []) if log_every_given else adapt_log_every(config)
    settings = plan_settings(config, precisions, parse_vary(vary), seeds, other_seeds)
    return Study(task, config, settings, study_dir, resume, progress=progress, notes=notes)


def adapt_log_every(config: RunConfig, points: int = MIN_POINTS
                    ) -> tuple[RunConfig, list[str]]:
    """`config` with telemetry.log_every lowered so a run of train.steps logs at least
    `points` windows, and the note that says so ([] when it already does)."""
    steps, every = config.train.steps, config.telemetry.log_every
    if steps // every >= points:
        return config, []
    new = max(1, steps // points)
    if new == every:
        return config, []
    note = (f"telemetry.log_every {every} -> {new} so each {steps}-step run logs "
            f"{steps // new} points of its curves (set telemetry.log_every to choose)")
    return config.updated({"telemetry.log_every": new}), [note]


def set_explicitly(config_path: str | Path | None, overrides: list[str], key: str) -> bool:
    """Whether `key` (dotted) is set by the config file at `config_path` or an override."""
    from redline.config import load_config, parse_override

    if any(parse_override(item)[0] == key for item in overrides):
        return True
    if not config_path:
        return False
    import yaml

    load_config(config_path)  # a bad file: its one sentence, as every command gives it
    node: Any = yaml.safe_load(Path(config_path).read_text()) or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def plan_settings(base: RunConfig, precisions: list[str], vary: dict[str, list[Any]],
                  seeds: int, other_seeds: int = 1) -> list[Setting]:
    """Every setting of the study, the reference's seeds first (module docstring)."""
    if not precisions:
        raise ConfigError("--precision needs at least one name, e.g. fp32,bf16-mixed")
    for name in precisions:
        if name not in PRECISIONS:
            raise ConfigError(f"unknown precision {name!r} in --precision; choose from: "
                              + ", ".join(PRECISIONS))
    if seeds < 1 or other_seeds < 1:
        raise ConfigError(f"--seeds and --other-seeds must be >= 1, got {seeds} and "
                          f"{other_seeds}")
    for key, values in vary.items():  # an unknown key or a bad value: one sentence, now
        if key in ("precision.name", "train.seed"):
            raise ConfigError(f"--vary {key}: use --precision / --seeds for that axis")
        for value in values:
            base.updated({key: value})
    reference_precision = "fp32" if "fp32" in precisions else precisions[0]
    first = tuple((k, v[0]) for k, v in vary.items())
    combos = [tuple(zip(vary, values, strict=True))
              for values in itertools.product(*vary.values())]
    settings = [Setting(reference_precision, first, base.train.seed + i, reference=True)
                for i in range(seeds)]
    for precision in dict.fromkeys(precisions):
        for combo in combos:
            if precision == reference_precision and combo == first:
                continue
            settings += [Setting(precision, combo, base.train.seed + i)
                         for i in range(other_seeds)]
    return settings


@dataclass
class Outcome:
    """What became of one setting's run."""

    run: str
    status: str  # finished | refused | diverged
    reason: str | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    wall_s: float | None = None


class _StudyBar(Callback):
    """Advances the study's one progress bar from each run's steps."""

    def __init__(self, progress: Any, offset: int) -> None:
        self.progress, self.offset = progress, offset

    def on_step_end(self, state: State, loss: Any) -> None:
        self.progress.step(self.offset + state.step)


class Study:
    """Runs the settings of a study into `study_dir` (module docstring)."""

    def __init__(self, task: Task, base: RunConfig, settings: list[Setting],
                 study_dir: str | Path | None = None, resume: bool = False,
                 progress: bool | None = None, notes: list[str] | None = None) -> None:
        self.task, self.base, self.settings = task, base, settings
        self.resume, self.progress = resume, progress
        self.notes = list(notes or [])  # what the study changed and why, for its output
        world = distributed.World.from_env()
        self.comm = distributed.init(world, rank_device(base.device, world).kind)
        self.main = world.main
        self.dir = self.comm.from_main(lambda: self._claim(Path(study_dir) if study_dir
                                                           else None))

    def _claim(self, path: Path | None) -> Path:
        plan = {"task": self.base.task or self.task.name, "base": self.base.to_dict(),
                "notes": self.notes, "settings": [{**asdict(s), "run": s.run_name, "label": s.label}
                             for s in self.settings]}
        plan = json.loads(json.dumps(plan))  # tuples as lists, as the file holds them
        if path is None:
            if self.resume:
                raise StudyError("--resume needs --run-dir: the study directory to continue")
            path = new_run_dir(f"study-{self.task.name}")
        elif path.exists() and not (path / PLAN).is_file() and any(path.iterdir()):
            raise StudyError(f"{str(path)!r} is not a study directory (it has no {PLAN}); "
                             "choose another --run-dir")
        elif (path / PLAN).is_file():
            if not self.resume:
                raise StudyError(f"{str(path)!r} already holds a study; add --resume to "
                                 "continue it, or choose another --run-dir")
            if json.loads((path / PLAN).read_text()) != plan:
                raise StudyError(f"the study in {str(path)!r} was planned with other settings "
                                 "or config; continue it with the same flags, or choose "
                                 "another --run-dir")
        elif self.resume:
            raise StudyError(f"--resume: {str(path)!r} holds no study to continue; drop "
                             "--resume to start one there")
        with writing("study directory", path):
            (path / OUTCOMES).mkdir(parents=True, exist_ok=True)
            atomic_write_text(path / PLAN, json.dumps(plan, indent=1), "study plan")
        return path

    def run(self) -> tuple[list[Outcome], str | None]:
        """Train every setting not yet done; (outcomes, the signal that stopped it or None)."""
        from redline.telemetry.progress import Progress

        steps = self.base.train.steps
        bar = Progress(steps * len(self.settings),
                       interactive=self.progress if self.main else False)
        bar.start(0)
        outcomes: list[Outcome] = []
        try:
            for i, setting in enumerate(self.settings):
                outcome, stopped = self._one(setting, _StudyBar(bar, i * steps))
                if stopped:
                    return outcomes, stopped
                outcomes.append(outcome)
                if self.main:
                    bar.step((i + 1) * steps)
                    self._say(i, setting, outcome)
        finally:
            bar.close()
        if self.main:
            self._time(outcomes)
        return outcomes, None

    def _time(self, outcomes: list[Outcome]) -> None:
        """STUDY/timing.json: every setting timed in interleaved rounds (timing.py), once."""
        path = self.dir / timing.TIMING
        if path.is_file():
            return
        finished = {o.run for o in outcomes if o.status == "finished"}
        settings = [s for s in self.settings if s.run_name in finished]
        if self.comm.world.distributed:
            record = timing.skipped("under torchrun the rounds are not run: each run's "
                                    "samples/s is its own clock's, so no speed claim")
        elif self.base.train.auto_batch:
            record = timing.skipped("batch_size auto: each run chose its own micro-batch, "
                                    "so the settings are not timed side by side")
        else:
            configs = timing.timed_configs(self.base, settings)
            print(f"study: timing {len(configs)} settings side by side in {timing.ROUNDS} "
                  "interleaved rounds", file=sys.stderr, flush=True)
            try:
                record = timing.time_settings(self.task, configs,
                                              rank_device(self.base.device, self.comm.world))
            except (RuntimeError, UserError) as e:  # e.g. out of memory with every job built
                first = (str(e).splitlines() or [type(e).__name__])[0]
                record = timing.skipped(f"the timing rounds failed ({first}), so no speed "
                                        "claim")
        atomic_write_text(path, json.dumps(record, indent=1), "study timing")

    def finish(self) -> dict[str, Any]:
        """Judge what has run: STUDY/summary.json and STUDY/report.html; the summary."""
        from redline.study.report import build_report

        plan = json.loads((self.dir / PLAN).read_text())
        outcomes = read_outcomes(self.dir)
        summary = summarize(plan, outcomes, self.dir,
                            task_member(self.task, "metric_directions"))
        atomic_write_text(self.dir / "summary.json",
                          json.dumps(summary, indent=1, default=str), "study summary")
        summary["report"] = str(build_report(self.dir, summary))
        return summary

    def _one(self, setting: Setting, callback: Callback) -> tuple[Outcome, str | None]:
        record = self.dir / OUTCOMES / f"{setting.run_name}.json"
        if record.is_file():
            return Outcome(**json.loads(record.read_text())), None
        run_dir = self.dir / setting.run_name
        resume = bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
        if run_dir.exists() and not resume and self.main:
            shutil.rmtree(run_dir)  # killed before its first checkpoint: start it again
        config = self.base.updated(setting.overrides())
        if "wandb" in config.telemetry.trackers and config.telemetry.wandb_group is None:
            config = config.updated({"telemetry.wandb_group": self.dir.name})  # one group
        start = time.perf_counter()
        try:
            fit = Trainer(config, task=self.task, run_dir=run_dir, resume=resume,
                          callbacks=[callback], progress=False).fit()
        except (PrecisionError, MissingExtra) as e:
            outcome = Outcome(setting.run_name, "refused", str(e))
        except RunStopped as e:
            outcome = Outcome(setting.run_name, "diverged", str(e))
        else:
            if fit.interrupted:
                return Outcome(setting.run_name, "interrupted"), fit.interrupted
            outcome = Outcome(setting.run_name, "finished", fit=fit.to_dict())
        outcome.wall_s = time.perf_counter() - start
        if self.main:
            atomic_write_text(record, json.dumps(asdict(outcome), default=str),
                              "study outcome")
        return outcome, None

    def _say(self, i: int, setting: Setting, outcome: Outcome) -> None:
        head = f"study [{i + 1}/{len(self.settings)}] {setting.label} seed {setting.seed}"
        if outcome.status != "finished":
            print(f"{head}: {outcome.status}: {outcome.reason}", file=sys.stderr, flush=True)
            return
        fit = outcome.fit
        speed = f"{fit['samples_per_s']:.1f} samples/s" if fit.get("samples_per_s") else ""
        evals = ", ".join(f"{k} {v:.4g}" for k, v in fit.get("eval", {}).items())
        print(f"{head}: {speed}{'; ' if speed and evals else ''}{evals}", file=sys.stderr,
              flush=True)
