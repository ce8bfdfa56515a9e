"""The `redline` command: parse, call a workflow, print. Bad input exits 2 with one sentence.

Bad input is any `redline.errors.UserError` (a wrong config key, an unknown task, a
missing optional package, a corrupt checkpoint): one sentence on stderr, exit code 2.
Anything raised by the user's own code keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from redline import __version__, output
from redline.run.signals import exit_code

EXIT_BAD_INPUT = 2

EPILOG_TRAIN = """\
examples:
  redline train sr3-tiny --steps 200
  redline train sr3-tiny --precision bf16-mixed --set train.lr=1e-3 --json
  redline train my_tasks.py:MyTask --config run.yaml --run-dir runs/exp1
  redline train sr3-tiny --run-dir runs/exp1 --resume     # continue where it stopped
  redline train my_tasks.py:MyTask --config run.yaml --dry-run   # check it all, write nothing
  redline train sr3-tiny --steps 50 --nproc 2      # 2 processes, DDP (= torchrun ... -m redline)
  redline train reportgen-tiny --batch-size 32 --set train.lr=1e-3 --steps 600

Any config key can be set with --set SECTION.KEY=VALUE (values are YAML); the flags
above are shorthands for train.steps, train.batch_size, train.seed, precision.name,
memory.budget, device and telemetry.trackers.
"""

EPILOG_TUNE = """\
examples:
  redline tune sr3-tiny                          # precision, batch, layout, loader, compile
  redline tune sr3-tiny --budget-s 60 --factors precision,batch
  redline tune my_task.py:MyTask --batch-only --memory-budget 2GiB --target 0.9
  redline train my_task.py:MyTask --config my_task-tuned.yaml

The search starts from the config as given (its micro-batch, precision and loader) and
measures: where the start does not fit memory.target of the budget, the memory plan
chooses the levers that make it fit (activation checkpointing, 4bit optimizer state, a
smaller micro-batch), printed in a table with each combination's predicted and measured
peak; each precision the device runs passes a short quality check against fp32's
run-to-run noise first; each setting replaces the current one only when it is faster by
more than the timing noise. It prints every setting tried, the choice and the reason per
factor, and the speed-up of the tuned config over the starting one, timed side by side.
A setting is adopted only when faster than the start beyond the noise, and the start is
written when the tuned config is not. The effective batch is the start's (kept by
accumulation) unless --set train.grow_effective_batch=true, and then train.lr follows
train.lr_scaling. Under torchrun only the micro-batch is searched.
"""

EPILOG_STUDY = """\
examples:
  redline study sr3-tiny --precision fp32,bf16-mixed,fp8-emulated --steps 100
  redline study my_task.py:MyTask --precision fp32,fp16-mixed --seeds 3 --json
  redline study sr3-tiny --precision fp32,bf16-mixed --vary train.batch_size=16,64
  redline study sr3-tiny --precision fp32,bf16-mixed --run-dir runs/s1 --resume

fp32 (the reference) runs --seeds seeds: its spread is the run-to-run noise every other
setting's difference is judged against. The study directory holds one ordinary run
directory per setting and seed, summary.json and report.html.
"""

# flag attribute -> the config key it is a shorthand for
SHORTHANDS = (("steps", "train.steps"), ("batch_size", "train.batch_size"),
              ("seed", "train.seed"), ("precision", "precision.name"), ("device", "device"),
              ("memory_budget", "memory.budget"), ("target", "memory.target"))


def _job_options() -> argparse.ArgumentParser:
    """The options every command that builds a training job takes, declared once."""
    from redline.precision import PRECISIONS

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("task", nargs="?", help="built-in name, package.module:Class or "
                   "path/to/file.py:Class (or 'task' in --config)")
    p.add_argument("--config", metavar="FILE", help="YAML config file")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override a config key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--precision", metavar="NAME",
                   help="one of " + ", ".join(PRECISIONS) + " (precision.name)")
    p.add_argument("--device", metavar="DEV", help="auto, cpu, cuda, cuda:N or mps (device)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="e.g. 2GiB: a CPU budget, or a cap below the device's memory "
                        "(memory.budget)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object as the last line of standard output")
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redline",
        description="Run PyTorch training at the limit of the hardware, safely, and show "
                    "the evidence.",
    )
    p.add_argument("--version", action="version", version=f"redline {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    job = _job_options()
    d = sub.add_parser(
        "doctor", help="check the environment, or diagnose a run's step time",
        description="Without RUN_DIR: check that training can run here (exit 1 on a "
                    "blocker). With RUN_DIR: read the run's telemetry and say where its step "
                    "time went and what to change.")
    d.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory to diagnose")
    d.add_argument("--device", default="auto", help="device to check (default: auto)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    _add_train(sub, job)
    _add_tune(sub, job)
    _add_study(sub, job)
    r = sub.add_parser("report", help="(re)build report.html for a run or study directory",
                       description="Write DIR/report.html: self-contained (no network "
                                   "needed), from what a run or a study directory holds.")
    r.add_argument("directory", metavar="DIR", help="a run or study directory")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    _add_export(sub)
    return p


EPILOG_EXPORT = """\
examples:
  redline export runs/exp1 --to model.pt              # the newest readable checkpoint
  redline export runs/exp1 --to model.pt --step 2000

  state = torch.load("model.pt", weights_only=True)   # anywhere, no redline needed
  model.load_state_dict(state)

The file is the model's plain state_dict: full tensors on the CPU, keyed as the bare
model's (no DDP/FSDP/compile prefixes), whether the run wrote single-file checkpoints
or sharded ones (distributed.strategy fsdp: the shards are put together here, in one
process, without building the model). Nothing else of the checkpoint (optimizer, RNG,
data position) is written: to continue training, use train --resume.
"""


def _add_export(sub: Any) -> None:
    e = sub.add_parser(
        "export", help="write a run's model as one plain state_dict file (--to model.pt)",
        description="Write the model of RUN_DIR's checkpoint as a single-file state_dict "
                    "that torch.load(path, weights_only=True) reads and the bare model's "
                    "load_state_dict accepts.",
        epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with checkpoints")
    e.add_argument("--to", required=True, metavar="FILE", help="the file to write")
    e.add_argument("--step", type=int, metavar="N",
                   help="the checkpoint of step N (default: the newest readable one)")
    e.add_argument("--json", action="store_true", help="print one JSON object")


def _add_train(sub: Any, job: argparse.ArgumentParser) -> None:
    from redline.task import available_tasks
    from redline.telemetry.sinks import available_sinks

    t = sub.add_parser(
        "train", parents=[job], help="train a task and write a run directory",
        description="Train TASK: a built-in name (" + ", ".join(available_tasks())
                    + "), package.module:Class or path/to/file.py:Class.",
        epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--steps", type=int, metavar="N", help="optimizer steps (train.steps)")
    t.add_argument("--batch-size", metavar="N|auto",
                   help="micro-batch, or auto to fill memory.target (train.batch_size)")
    t.add_argument("--seed", type=int, metavar="N", help="random seed (train.seed)")
    t.add_argument("--tracker", action="append", default=[], metavar="NAME",
                   help="add a tracker: " + ", ".join(available_sinks())
                        + ", or package.module:Class (telemetry.trackers; repeatable)")
    t.add_argument("--run-dir", metavar="DIR", help="run directory (default: runs/TASK-TIME)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in --run-dir (default: the "
                        "newest run of TASK under runs/)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    t.add_argument("--dry-run", action="store_true",
                   help="check the config and device, build everything, run one training "
                        "step and one evaluation batch, write nothing; exit 0, 1 or 2 like "
                        "doctor")
    t.add_argument("--no-report", action="store_true",
                   help="do not write RUN_DIR/report.html at the end (redline report does)")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this host (DistributedDataParallel; "
                        "torchrun --standalone --nproc-per-node N -m redline train ...; "
                        "several hosts: see docs/distributed.md)")


def _add_tune(sub: Any, job: argparse.ArgumentParser) -> None:
    u = sub.add_parser(
        "tune", parents=[job],
        help="measure the fastest settings (precision, micro-batch, channels_last, data "
             "loading, compile); write a tuned config",
        description="Measure TASK under each setting that sets its speed, within a time "
                    "budget, and write a config that `redline train --config` accepts.",
        epilog=EPILOG_TUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help="time the search may take, in seconds (default 120)")
    u.add_argument("--factors", metavar="LIST",
                   help="comma-separated factors to search, of memory, precision, "
                        "batch, channels_last, loader, compile (default: all)")
    u.add_argument("--quality-steps", type=int, metavar="N",
                   help="optimizer steps of each precision's quality check (default 30)")
    u.add_argument("--batch-only", action="store_true",
                   help="only the batch search: the largest micro-batch within "
                        "memory.target (verified) and the fastest")
    u.add_argument("--target", type=float, metavar="F",
                   help="share of the budget to fill, e.g. 0.85 (memory.target)")
    u.add_argument("--output", metavar="FILE", help="tuned config (default: TASK-tuned.yaml)")
    u.add_argument("--no-cache", action="store_true", help="search even if a result is cached")
    u.add_argument("--keep-budget", action="store_true",
                   help="keep --memory-budget in the tuned config (on a CPU training then "
                        "tracks every tensor operation to enforce it, which is slower)")
    u.add_argument("--nproc", type=int, metavar="N",
                   help="plan for N ranks on this host (train --nproc N): the memory plan "
                        "weighs ddp against fsdp sharding per rank, and where both fit "
                        "trains the leading candidates for a few steps on N ranks "
                        "(communication included) and chooses by their measured "
                        "samples/s, within --budget-s; rows not measured are marked "
                        "projections")


def _add_study(sub: Any, job: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "study", parents=[job], help="train TASK under several settings; judge each against "
        "fp32's own noise; write report.html",
        description="Train TASK once per setting (the comma-separated --precision list x "
                    "the --vary values), fp32 with several seeds for its noise floor, and "
                    "judge every other setting's metrics against that noise; the fastest "
                    "setting within it is recommended.", epilog=EPILOG_STUDY,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--steps", type=int, metavar="N", help="optimizer steps per run "
                   "(train.steps)")
    s.add_argument("--seeds", type=int, default=3, metavar="N",
                   help="seeds of the reference (fp32), its noise floor (default 3)")
    s.add_argument("--other-seeds", type=int, default=1, metavar="N",
                   help="seeds of every other setting (default 1)")
    s.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="another axis, e.g. train.batch_size=16,64 (repeatable)")
    s.add_argument("--tracker", action="append", default=[], metavar="NAME",
                   help="add a tracker to every run (telemetry.trackers; repeatable)")
    s.add_argument("--run-dir", metavar="DIR",
                   help="the study directory (default: runs/study-TASK-TIME)")
    s.add_argument("--resume", action="store_true",
                   help="continue the study in --run-dir: finished runs are kept, a killed "
                        "one continues from its checkpoint")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load(args: argparse.Namespace, command: str,
          shorthands: tuple[tuple[str, str], ...] = SHORTHANDS) -> Any:
    """The config the command's flags describe; ConfigError without a task."""
    from redline.config import ConfigError, load_config

    sets = list(args.overrides)
    for flag, key in shorthands:
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    if args.task:
        sets.append(f"task={args.task}")
    config = load_config(args.config, sets)
    trackers = getattr(args, "tracker", [])
    if trackers:
        config = config.updated({"telemetry.trackers": [*config.telemetry.trackers, *trackers]})
    if not config.task:
        raise ConfigError(f"no task given: name one (e.g. redline {command} sr3-tiny) or set "
                          "'task' in the config file")
    return config


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    from redline.run.launch import launch
    from redline.run.trainer import Trainer

    config = _load(args, "train")
    if args.dry_run:
        return _dry_run(args, config)
    if args.nproc is not None:
        return launch(args.nproc, argv)
    # --resume without --run-dir: the Trainer continues the task's latest run
    trainer = Trainer(config, run_dir=args.run_dir, resume=args.resume,
                      progress=False if args.no_progress else None)
    result = trainer.fit()
    if not trainer.world.main:  # rank 0 reports the run
        return exit_code(result.interrupted)
    info = result.to_dict()
    if not args.no_report and result.steps:
        from redline.study.report import build_report

        info["report"] = str(build_report(result.run_dir))
    if args.json:
        output.print_json(info)
    else:
        output.print_result(info)
    return exit_code(result.interrupted)


def _dry_run(args: argparse.Namespace, config: Any) -> int:
    from redline.run.dryrun import dry_run, render
    from redline.task import resolve_task

    result = dry_run(config, resolve_task(config.task, config.task_args), args.nproc)
    output.show(args.json, result.to_dict(), render(result))
    return 0 if result.ok else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from redline.task import resolve_task
    from redline.tuning.workflow import TuneOptions, run_tune

    options = TuneOptions.from_flags(
        factors=args.factors, budget_s=args.budget_s, quality_steps=args.quality_steps,
        batch_only=args.batch_only, no_cache=args.no_cache, output=args.output,
        keep_budget=args.keep_budget, nproc=args.nproc)
    config = _load(args, "tune")
    tuned = run_tune(resolve_task(config.task, config.task_args), config, options,
                     warn=output.warn)
    if tuned.path is None:  # a rank other than 0: rank 0 reports
        return 0
    if args.json:
        output.print_json(tuned.to_dict())
    else:
        output.print_tuned(tuned, config.memory.target)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from redline.study.matrix import new_study, parse_precisions, set_explicitly

    precisions = parse_precisions(args.precision)
    # the study sets precision.name per setting: --precision is its list, not a shorthand
    config = _load(args, "study", tuple(s for s in SHORTHANDS if s[0] != "precision"))
    study = new_study(config, precisions, args.vary, args.seeds, args.other_seeds,
                      args.run_dir, args.resume, progress=False if args.no_progress else None,
                      log_every_given=set_explicitly(args.config, args.overrides,
                                                     "telemetry.log_every"))
    if study.main:  # under torchrun: rank 0 reports the study
        output.print_study_start(study)
    _, stopped = study.run()
    if stopped and study.main:
        output.print_study_stopped(study, stopped, args.task, precisions)
    if stopped or not study.main:
        return exit_code(stopped)
    summary = study.finish()
    if args.json:
        output.print_json(summary)
    else:
        output.print_study(summary)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from redline.study.report import build_report

    out = build_report(args.directory)
    output.show(args.json, {"report": str(out)}, f"report: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from redline.run.export import export

    source, written = export(args.run_dir, args.to, args.step)
    output.show(args.json, {"checkpoint": str(source), "model": str(written)},
                f"exported {source} -> {written} (a plain state_dict)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from redline.diagnose.doctor import diagnose_run, render
    from redline.environment import environment_check

    if args.run_dir:
        diagnosis = diagnose_run(args.run_dir)
        output.show(args.json, diagnosis.to_dict(), diagnosis.render())
        return 0
    report = environment_check(args.device)
    output.show(args.json, report.to_dict(), render(report))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    from redline.errors import RunStopped, StorageError, UserError
    from redline.quiet import quiet_third_party

    quiet_third_party()  # before a task, a tracker or fp8 imports torchao
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[], int]] = {
        "doctor": lambda: cmd_doctor(args), "train": lambda: cmd_train(args, argv),
        "tune": lambda: cmd_tune(args), "study": lambda: cmd_study(args),
        "report": lambda: cmd_report(args), "export": lambda: cmd_export(args)}
    try:
        return handlers[args.command]()
    except UserError as e:
        if _other_rank():  # torchrun: every rank found it; rank 0 says it, once
            return EXIT_BAD_INPUT
        return _fail(args, str(e))
    except StorageError as e:  # the machine's fault, not the input's: exit 1
        _fail(args, f"{e}; what was saved before is intact")
        return 1
    except RunStopped as e:  # the run stopped itself, saying why (the state is saved)
        from redline.distributed import PeerFailed

        if not _other_rank() or isinstance(e, PeerFailed):  # a rank's own finding: it says it
            _fail(args, str(e))
        return 1
    except _out_of_memory() as e:
        first, *rest = str(e).splitlines() or [""]
        if "would fit with" not in first:
            # under torchrun, sharding divides the model's states by the ranks
            shard = ("--set distributed.strategy=fsdp (or auto), "
                     if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
            first += (f"; lower memory use ({shard}a memory lever, bf16-mixed, a smaller "
                      "model) or raise memory.budget")
        print("\n".join([f"redline: error: {first}", *rest]), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("redline: interrupted", file=sys.stderr)
        return exit_code("SIGINT")


def _other_rank() -> bool:
    """A rank other than 0 under torchrun (which sets RANK)."""
    return int(os.environ.get("RANK", "0")) > 0


def _out_of_memory() -> tuple[type[BaseException], ...]:
    import torch

    from redline.memory.guard import OutOfMemoryAtMinimum

    return (OutOfMemoryAtMinimum, torch.OutOfMemoryError)


def _fail(args: argparse.Namespace, message: str) -> int:
    print(f"redline: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        output.print_json({"error": message})
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
