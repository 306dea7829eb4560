"""`polymodal train` stopped by SIGTERM or SIGINT: status 143 or 130, one line saying which step was
saved, the lock released, and `--resume` finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polymodal.training.checkpoint import latest_checkpoint
from polymodal.training.run_lock import LOCK_FILE

sys.path.insert(0, str(Path(__file__).parent))
from contract import TINY_ANY_TO_ANY  # noqa: E402

STEPS = 300


def _polymodal(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "polymodal.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"  # stage 2's log; stage 1 logs in image_tokenizer/
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


@pytest.mark.slow  # a tiny two-stage run, signalled, then resumed to its end
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_step_exits_with_its_status_and_resume_finishes(tmp_path, data_cache, signum, status):
    run_dir = tmp_path / "run"
    args = [*TINY_ANY_TO_ANY, f"run_dir={run_dir}", f"train.steps={STEPS}", "train.log_every=1", "train.ckpt_every=1000"]
    proc = _polymodal("train", *args)
    deadline = time.monotonic() + 300
    while proc.poll() is None and _logged(run_dir) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"polymodal train: stopped by {signal.Signals(signum).name} after step "), last
    step = int(last.split("after step ")[1].split(";")[0])
    assert 3 <= step < STEPS and latest_checkpoint(run_dir).name == f"step_{step:07d}"
    assert not (run_dir / LOCK_FILE).exists()

    resumed = _polymodal("train", "--resume", f"run_dir={run_dir}")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert latest_checkpoint(run_dir).name == f"step_{STEPS:07d}" and (run_dir / "eval.json").is_file()
