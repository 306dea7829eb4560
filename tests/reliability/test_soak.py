"""Soak: a 2,000-step run (dropout, shuffled data, an RNG-drawing evaluation, a checkpoint every 4
steps) killed with SIGKILL at 5 random moments and resumed after each ends with bitwise the weights,
and the same logged figures, of a run never interrupted. Slow: about a minute on an idle core."""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from polymodal.training.checkpoint import latest_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))  # the job the resume tests use
from resume_job import assert_same_weights, logged_entries, logged_steps, start  # noqa: E402

STEPS = 2000
STEPS_ARGS = ("--steps", str(STEPS))
KILLS = 5
# Extra wait after a target step is logged, so a kill lands anywhere: mid-step, mid-evaluation,
# mid-checkpoint (one is written every 4 steps).
MAX_JITTER_SECONDS = 0.05

log = logging.getLogger(__name__)


@pytest.mark.slow
def test_killed_five_times_ends_like_an_uninterrupted_run(tmp_path):
    started = time.monotonic()
    rng = random.Random(int(os.environ.get("POLYMODAL_SOAK_SEED", "16")))
    # One random step in each fifth of the run, so kills land early, midway and late.
    span = STEPS // KILLS
    targets = [rng.randrange(k * span + 10, (k + 1) * span - 10) for k in range(KILLS)]
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole = start(whole_dir, *STEPS_ARGS)
    kills = []
    for number, target in enumerate(targets):
        proc = start(killed_dir, *STEPS_ARGS, *(["--resume"] if number else []))
        while proc.poll() is None and max(logged_steps(killed_dir), default=0) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, MAX_JITTER_SECONDS))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
        reached = latest_checkpoint(killed_dir)
        kills.append((target, max(logged_steps(killed_dir)), reached.name if reached else None))
    assert start(killed_dir, *STEPS_ARGS, "--resume").wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-2000:]
    assert whole.wait(timeout=600) == 0

    assert_same_weights(killed_dir, whole_dir, STEPS)
    assert logged_entries(killed_dir) == logged_entries(whole_dir)
    log.warning("soak: killed at (target step, last logged, latest checkpoint) %s; %.0f s", kills, time.monotonic() - started)
