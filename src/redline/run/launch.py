"""`redline train --nproc N`: the same command in N processes on this host, through torchrun.

Every argument but `--nproc N` (or `--nproc=N`) goes to the ranks, so each rank runs the
`redline train ...` the user typed, as `torchrun --standalone --nproc-per-node N -m
redline train ...` would. A signal that stops the launch exits as `signals.exit_code`
says; a rank that failed gives its own exit code (distributed.launch).
"""

from __future__ import annotations

from redline import distributed
from redline.config import ConfigError
from redline.run.signals import exit_code


def rank_argv(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` or `--nproc=N`: what each rank is started with."""
    kept, skip = [], False
    for item in argv:
        if skip or item.startswith("--nproc="):
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        kept.append(item)
    return kept


def launch(nproc: int, argv: list[str]) -> int:
    """Run `redline ARGV` (less --nproc) in `nproc` processes; the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give a number of processes >= 1")
    if distributed.World.from_env().distributed:
        raise ConfigError("--nproc inside a torchrun launch: drop --nproc (torchrun already "
                          "started the processes)")
    try:
        return distributed.launch(nproc, rank_argv(argv))
    except SignalException as e:  # Ctrl-C or SIGTERM: the launcher passed it to the ranks,
        return exit_code(int(e.sigval))  # which finished their step and saved, saying so
