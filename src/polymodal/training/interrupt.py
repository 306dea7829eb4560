"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (``kill``, a job scheduler's pre-emption).

The first signal is only noted: the step under way finishes, a checkpoint of it is written, and the
run ends with :class:`~polymodal.errors.RunInterrupted`, which the CLI turns into exit status
128 + the signal number (130 for SIGINT, 143 for SIGTERM). ``--resume`` then continues exactly, as
after any checkpoint. A second signal stops at once; the last checkpoint is still whole, because
checkpoints are written into a temporary folder and renamed into place.

A rank of a launched run (``torchrun``, ``--nproc-per-node``) gets one Ctrl-C twice: from the
terminal, which signals its whole process group, and from the launcher, which passes the signal
it got on to every rank. So there, a stop signal again within ``REPEAT_WINDOW`` seconds is the
same request, and the rank still finishes its step and checkpoints, as for one SIGTERM; a Ctrl-C
pressed again later stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from polymodal.distributed.collectives import any_rank
from polymodal.distributed.process import launched
from polymodal.errors import RunInterrupted

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A launched rank takes the same signal again within this many seconds as the first one passed on
# by the launcher: it forwards at once (well under a second), a person presses Ctrl-C again later.
REPEAT_WINDOW = 2.0


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: workers leave SIGINT and SIGTERM to the main process.

    Ctrl-C at a terminal reaches every process of the group; a worker that died of it would make
    the main process's next batch fail ("DataLoader worker exited unexpectedly") instead of letting
    it finish the step and checkpoint. The main process ends its workers itself.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopOnSignal:
    """Within a ``with`` block, SIGINT and SIGTERM set :attr:`requested` instead of stopping at once.

    Handlers can only be set from the main thread; elsewhere the block changes nothing (the
    process's own handlers apply). The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and launched() and time.monotonic() - self._first_at < REPEAT_WINDOW:
            log.info("%s again: the launcher passing the same request on; still finishing this step", name)
            return
        if self.signum is not None:
            raise RunInterrupted(
                f"stopped at once by a second {name}; the last checkpoint is whole: continue with --resume",
                signum=signum,
            )
        self.signum, self._first_at = signum, time.monotonic()
        log.warning("%s received: finishing this step and writing a checkpoint (send it again to stop at once)", name)

    def agreed(self) -> bool:
        """Whether any rank of a data-parallel run has a stop request (``requested`` in a single
        process). The launcher forwards a signal to every rank, but each notes it at its own point of
        a step; asked by every rank after every step, this ends them all after the same one. A rank
        that saw none takes the request as a SIGTERM."""
        if any_rank(self.requested) and self.signum is None:
            self.signum, self._first_at = signal.SIGTERM, time.monotonic()
            log.warning("another rank received a stop signal: finishing this step")
        return self.requested

    def raise_if_requested(self, step: int, checkpoint: Path) -> None:
        """End the run, when a signal asked for it, now that its checkpoint of ``step`` is written."""
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        raise RunInterrupted(
            f"stopped by {name} after step {step}; checkpoint {checkpoint} written: continue with --resume",
            signum=self.signum,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            # None: the handler was set outside Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
