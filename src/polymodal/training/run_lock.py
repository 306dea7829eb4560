"""One training process per run folder: ``run_dir/.lock``, an advisory lock file holding the pid.

Two ``train`` commands on one folder would interleave their checkpoints and metrics. The second
one fails at once, naming the pid that holds the folder. Who holds it is decided by the kernel's
``flock`` on the file, which is released however its holder ends (even by SIGKILL), so a stale lock
can never block a run; the pid written inside names the holder in the error, and tells the next run
that the file was left behind by a process that is no longer running (a warning, then it takes the
folder over). Where ``fcntl`` does not exist (Windows) the pid alone decides: alive means held.

Usage::

    with RunLock(run_dir):
        ...  # the whole training job
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from types import TracebackType

from polymodal.errors import RunError

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid check alone decides
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
MAX_PID_BYTES = 32  # a pid and a newline fit many times over


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:  # Windows raises OSError for an unknown pid
        return False
    return True


def _read_pid(fd: int) -> int | None:
    """The pid written in the lock file, or None if it is empty or not a number."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, MAX_PID_BYTES).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


class RunLock:
    """An exclusive lock on a run folder for the life of a ``with`` block (the folder is created).

    Args:
        run_dir: the run folder; the lock is ``run_dir/.lock``, removed on release.

    Raises:
        RunError: on entry, when another live process holds the folder (the message names its pid).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self) -> None:
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            holder = _read_pid(fd)
            if not self._try_lock(fd, holder):
                os.close(fd)
                self._remove_created_dir()
                raise RunError(
                    f"{self.run_dir} is in use by another training process (pid {holder or 'unknown'}, lock "
                    f"{self.path}); wait for it to end or stop it, or train into another folder with run_dir=..."
                )
            # The holder may have released and removed the file between our open and our lock: then
            # we hold a lock on a file nobody else will see. Start again on the current file.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        if holder is not None and holder != os.getpid():
            why = "is running but does not hold it (its pid was reused?)" if pid_alive(holder) else "is no longer running"
            log.warning("taking over the stale lock %s: it names pid %d, which %s", self.path, holder, why)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _try_lock(fd: int, holder: int | None) -> bool:
        if fcntl is None:
            return holder is None or holder == os.getpid() or not pid_alive(holder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        # Remove the file while still holding the lock, so nobody can lock it in between.
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        """A folder this lock created and nothing filled (a refused start) is removed again."""
        if self._created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:  # not empty: the run wrote into it
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
