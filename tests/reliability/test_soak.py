"""Soak: a 2,000-step run (dropout, shuffled data, an RNG-drawing evaluation, a checkpoint every 4
steps) killed with SIGKILL at 5 random moments and resumed after each ends with bitwise the weights,
and the same logged figures, of a run never interrupted. Slow: about a minute on an idle core."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from polymodal.training.checkpoint import latest_checkpoint

JOB = Path(__file__).parents[1] / "training" / "resume_job.py"
STEPS = 2000
KILLS = 5
# Extra wait after a target step is logged, so a kill lands anywhere: mid-step, mid-evaluation,
# mid-checkpoint (one is written every 4 steps).
MAX_JITTER_SECONDS = 0.05

log = logging.getLogger(__name__)


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen([sys.executable, str(JOB), str(run_dir), "--steps", str(STEPS), *args],
                            stdout=out, stderr=out, env=env)  # fmt: skip


def _last_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _entries(run_dir: Path) -> dict:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(e["step"], e["split"]) for e in entries]
    assert len(keys) == len(set(keys)), "a step was logged twice"
    return {(e["step"], e["split"]): {k: v for k, v in e.items() if k not in ("time", "samples_per_s")} for e in entries}


@pytest.mark.slow
def test_killed_five_times_ends_like_an_uninterrupted_run(tmp_path):
    started = time.monotonic()
    rng = random.Random(int(os.environ.get("POLYMODAL_SOAK_SEED", "16")))
    targets = sorted(rng.sample(range(20, STEPS - 20), KILLS))
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole = _start(whole_dir)
    kills = []
    for number, target in enumerate(targets):
        proc = _start(killed_dir, *(["--resume"] if number else []))
        while proc.poll() is None and _last_logged(killed_dir) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, MAX_JITTER_SECONDS))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
        reached = latest_checkpoint(killed_dir)
        kills.append((target, _last_logged(killed_dir), reached.name if reached else None))
    assert _start(killed_dir, "--resume").wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-2000:]
    assert whole.wait(timeout=600) == 0

    final = f"checkpoints/step_{STEPS:07d}/model.safetensors"
    resumed, uninterrupted = (safetensors.torch.load_file(d / final) for d in (killed_dir, whole_dir))
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert _entries(killed_dir) == _entries(whole_dir)
    log.warning("soak: killed at (target step, last logged, latest checkpoint) %s; %.0f s", kills, time.monotonic() - started)
