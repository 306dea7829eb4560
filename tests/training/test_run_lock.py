"""The run-folder lock: a second holder fails at once naming the first one's pid; a lock left by a
killed process is taken over with a warning; the CLI reports a held folder in one line, exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from polymodal.cli.main import main
from polymodal.errors import RunError
from polymodal.training.run_lock import LOCK_FILE, RunLock, pid_alive

HOLD = """
import sys, time
from polymodal.training.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(run_dir, seconds: float) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_fails_naming_the_pid_then_gets_it_once_free(tmp_path):
    holder = _hold(tmp_path, 60)
    try:
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)
        with pytest.raises(RunError, match=rf"{tmp_path} is in use by another training process \(pid {holder.pid}"):
            with RunLock(tmp_path):
                pass
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    # SIGTERM ended it without its `with` block's exit: the file stays, the kernel lock does not.
    with RunLock(tmp_path) as lock:
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(RunError, match=f"pid {os.getpid()}"):  # one process, one holder
            RunLock(tmp_path).acquire()
    assert not lock.path.exists()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = _hold(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert not pid_alive(holder.pid)
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)
    with caplog.at_level("WARNING", logger="polymodal.training.run_lock"), RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"stale lock {tmp_path / LOCK_FILE}: it names pid {holder.pid}, which is no longer running" in message


def test_a_lock_file_by_hand_with_a_dead_pid_and_a_refused_start_leaves_no_folder(tmp_path, caplog):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(done.stdout)
    with caplog.at_level("WARNING", logger="polymodal.training.run_lock"), RunLock(tmp_path):
        pass
    assert "no longer running" in caplog.records[0].getMessage()

    fresh = tmp_path / "fresh"
    with RunLock(fresh):
        with pytest.raises(RunError):
            RunLock(fresh).acquire()
        assert fresh.is_dir()
    assert not fresh.exists()  # created by the lock and left empty: removed again


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(0) and not pid_alive(-5)


def test_second_train_on_a_held_folder_is_one_line_and_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir, 60)
    try:
        # Waiting for the holder would end in a trained run (status 0) a minute later.
        assert main(["train", "--config", "tiny", f"run_dir={run_dir}"]) == 2
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("polymodal train: error:") and f"(pid {holder.pid}" in err[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing else was written
