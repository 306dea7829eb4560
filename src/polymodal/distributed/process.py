"""The process group of a data-parallel run: set up from the launcher's environment, torn down at
the end, and the rank / world helpers every other module asks (they answer rank 0 of a world of 1
when no group exists, so single-process code needs no branch).

``torchrun`` (and ``polymodal train --nproc-per-node``, which relaunches through it) starts one
process per device and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. The backend follows the device: NCCL between GPUs, gloo between CPU processes.

Reference: Li et al. 2020, PyTorch Distributed: Experiences on Accelerating Data Parallel Training,
arXiv:2006.15704.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from polymodal.errors import ConfigError

log = logging.getLogger(__name__)

# What torchrun sets in every process it starts; their presence means "part of a launched run".
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long a collective waits for the slowest rank: rank 0 evaluates alone while the others wait in
# their next step, and a periodic evaluation of a large run can take many minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """Whether this process was started by a launcher (``torchrun``) as one rank of a run."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def active() -> bool:
    """Whether a process group is set up in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the group; 0 without one."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes train together; 1 without a group."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes the run folder (logs, checkpoints, eval.json)."""
    return rank() == 0


def trains_across_ranks(module: torch.nn.Module) -> bool:
    """Whether ``module`` is in a data-parallel training step (training mode, gradients on, several
    ranks), where every rank runs its forward together and it may call collectives. Evaluation,
    which rank 0 may run alone, is in eval mode or without gradients."""
    return module.training and torch.is_grad_enabled() and world_size() > 1


def local_rank() -> int:
    """This process's index on its machine (its GPU); 0 outside a launched run."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device) -> torch.device:
    """``device`` made this rank's: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` in a launched run."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", local_rank())
    return device


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda[:N]`` must be available. A bare
    ``cuda`` in a launched data-parallel run is this rank's GPU, ``cuda:LOCAL_RANK``."""
    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    return local_device(torch.device(name))


def setup(device: torch.device) -> None:
    """Join the run's process group (from the launcher's environment) with the backend ``device``
    needs; a GPU rank also makes its own GPU the current one.

    Raises:
        ConfigError: this process was not started by a launcher.
    """
    if not launched():
        raise ConfigError(
            "no RANK/WORLD_SIZE/LOCAL_RANK in the environment: start several processes with "
            "`polymodal train --nproc-per-node N ...` or `torchrun -m polymodal train ...`"
        )
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(device)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    log.info("rank %d of %d joined the %s process group", rank(), world_size(), backend)


def teardown() -> None:
    """Leave the process group (nothing to do without one), together: a rank that tears its
    connections down while another still uses them can abort that one (gloo)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Within the block, this process is one rank of the launched run (when it was launched as one;
    otherwise the block runs as a single process). Ranks other than 0 log warnings only, so the
    console shows each message once. A block that raises leaves the group as it is: the other ranks
    may be waiting in a collective (the launcher ends them), and the process exits next."""
    if not launched() or active():
        yield
        return
    setup(device)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    yield
    teardown()


def comm_device() -> torch.device:
    """Where a collective's own small tensors live: the current GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank reaches this point (nothing to wait for in a single process)."""
    if world_size() > 1:
        dist.barrier()
