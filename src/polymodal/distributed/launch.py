"""``polymodal train --nproc-per-node N``: the command relaunches itself through PyTorch's own
launcher (``torch.distributed.run``, the code behind ``torchrun``) as N ranks per machine, each a
``python -m polymodal train ...`` with the same config and overrides. ``torchrun -m polymodal
train ...`` does the same by hand.

One machine: ``--nproc-per-node N`` alone (a private rendezvous on a free port). Several machines:
the same command on each, with ``--nnodes M`` and either ``--rdzv-endpoint HOST:PORT`` (c10d
rendezvous, any machine's address; give a ``--rdzv-id`` shared by the machines of one job) or
``--master-addr``/``--master-port`` with ``--node-rank``.

Reference: PyTorch Elastic's launcher, https://pytorch.org/docs/stable/elastic/run.html.
"""

from __future__ import annotations

import argparse
import logging

from polymodal.distributed.process import launched
from polymodal.errors import ConfigError

log = logging.getLogger(__name__)

# polymodal train's launcher options -> torchrun's (each passed on only when given).
FORWARDED = {
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "rdzv_backend": "--rdzv-backend",
    "rdzv_endpoint": "--rdzv-endpoint",
    "rdzv_id": "--rdzv-id",
    "master_addr": "--master-addr",
    "master_port": "--master-port",
    "max_restarts": "--max-restarts",
}


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher options of ``polymodal train`` (torchrun's names)."""
    group = parser.add_argument_group("data-parallel launch (torch.distributed.run)")
    group.add_argument("--nproc-per-node", type=int, metavar="N", help="processes (ranks) per machine: GPUs, or CPU processes")
    group.add_argument("--nnodes", metavar="M|MIN:MAX", help="machines in the job (default 1)")
    group.add_argument("--node-rank", type=int, metavar="I", help="this machine's index, with --master-addr")
    group.add_argument("--rdzv-backend", metavar="NAME", help="rendezvous backend, e.g. c10d (the default with --rdzv-endpoint)")
    group.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="where the machines of the job meet")
    group.add_argument("--rdzv-id", metavar="ID", help="the job's id, the same on every machine (e.g. $SLURM_JOB_ID)")
    group.add_argument("--master-addr", metavar="HOST", help="rank 0's machine, for a static rendezvous")
    group.add_argument("--master-port", type=int, metavar="PORT", help="rank 0's port, for a static rendezvous")
    group.add_argument("--max-restarts", type=int, metavar="K", help="restart the workers up to K times after a failure")


def requested(args: argparse.Namespace) -> bool:
    """Whether this command should start the ranks (rather than be one)."""
    if args.nproc_per_node is None:
        given = [flag for key, flag in FORWARDED.items() if getattr(args, key) is not None]
        if given:
            raise ConfigError(f"{given[0]} needs --nproc-per-node N (the processes to start on each machine)")
        return False
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    return not launched()


def torchrun_argv(args: argparse.Namespace, worker_argv: list[str]) -> list[str]:
    """torchrun's command line: the launcher options given, then ``-m polymodal`` and ``worker_argv``."""
    argv = ["--nproc-per-node", str(args.nproc_per_node)]
    for key, flag in FORWARDED.items():
        value = getattr(args, key)
        if value is not None:
            argv += [flag, str(value)]
    if args.rdzv_endpoint is not None and args.rdzv_backend is None:
        argv += ["--rdzv-backend", "c10d"]
    single = args.nnodes in (None, "1", "1:1") and args.rdzv_endpoint is None and args.master_addr is None
    if single and args.master_port is None:
        argv.append("--standalone")  # one machine: a local rendezvous on a free port
    return [*argv, "--module", "polymodal", *worker_argv]


def relaunch(args: argparse.Namespace, worker_argv: list[str]) -> int:
    """Run ``polymodal <worker_argv>`` as ``args.nproc_per_node`` ranks per machine, waiting for them.

    Returns:
        0, the exit status of the first rank that failed (2 for a config error), or 128 + the signal
        that stopped the launcher (143 for SIGTERM; its ranks got it too, and stopped after a checkpoint).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = torchrun_argv(args, worker_argv)
    log.info("launching: torchrun %s", " ".join(argv))
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    except SignalException as exc:  # the launcher was signalled; it passed the signal on to every rank
        log.warning("%s: the ranks were asked to stop after their step (a checkpoint); continue with --resume", exc.sigval.name)
        return 128 + int(exc.sigval)
    return 0
