"""A 2-rank run (torchrun, gloo; DDP, or FSDP with sharded checkpoints) killed with SIGKILL mid-way,
every process at once as when a machine fails, and resumed at the same world size, ends with
bitwise the weights of an uninterrupted 2-rank run; and ``polymodal train --nproc-per-node 2`` leaves a whole run folder
written once, by rank 0."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # ranks.py beside this file
from ddp_job import STEPS  # noqa: E402
from ranks import weights  # noqa: E402

from polymodal.training.checkpoint import latest_checkpoint

JOB = Path(__file__).parent / "ddp_job.py"
TIMEOUT = 300


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    """The job as 2 ranks under torchrun, in a process group of its own (its pid is the group's id)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(JOB), str(run_dir), *args]
    return subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)


def _finish(proc: subprocess.Popen, run_dir: Path) -> None:
    assert proc.wait(timeout=TIMEOUT) == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_killed_and_resumed_end_like_an_uninterrupted_run(tmp_path, mode):
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    _finish(_start(whole_dir, *mode), whole_dir)
    killed = _start(killed_dir, "--delay", "0.3", *mode)
    deadline = time.monotonic() + TIMEOUT
    while killed.poll() is None and time.monotonic() < deadline:
        found = latest_checkpoint(killed_dir)
        if found is not None and int(found.name.removeprefix("step_")) >= 4:
            os.killpg(killed.pid, signal.SIGKILL)  # the agent and both ranks, at once
            break
        time.sleep(0.05)
    killed.wait(timeout=TIMEOUT)
    stopped_at = int(latest_checkpoint(killed_dir).name.removeprefix("step_"))
    assert killed.returncode == -signal.SIGKILL and stopped_at < STEPS
    _finish(_start(killed_dir, "--resume", *mode), killed_dir)
    for name in ("rank0.safetensors",) if mode else ("rank0.safetensors", "rank1.safetensors"):
        expected, resumed = weights(whole_dir / name), weights(killed_dir / name)
        assert all(torch.equal(expected[key], resumed[key]) for key in expected), name
    steps = [json.loads(line)["step"] for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, by rank 0 alone


@pytest.mark.slow
def test_nproc_per_node_trains_a_whole_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "polymodal", "train", "--nproc-per-node", "2", "--config", "tiny", f"run_dir={run_dir}",
               "data.options.num_samples=96", "train.steps=4", "tokenizer_train.steps=2", "train.ckpt_every=2",
               "tokenizer_train.ckpt_every=2", "train.progress=false", "tokenizer_train.progress=false"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run folder: {run_dir}" in done.stdout and done.stdout.count("run folder") == 1  # rank 0 alone prints it
    for stage in (run_dir, run_dir / "image_tokenizer"):
        assert (stage / "eval.json").is_file() and (stage / "config.yaml").is_file()
        entries = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        logged = [(entry["step"], entry["split"]) for entry in entries]
        assert logged and len(logged) == len(set(logged))  # one writer: nothing logged twice
    assert "rank 1 of 2 joined the gloo process group" in done.stderr


@pytest.mark.slow
def test_ctrl_c_at_a_terminal_stops_the_ranks_after_a_checkpoint(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the launcher and both ranks get it,
    and the launcher passes it on again; the ranks still finish their step, save it and stop."""
    run_dir = tmp_path / "run"
    job = _start(run_dir, "--delay", "0.3")
    deadline = time.monotonic() + TIMEOUT
    while job.poll() is None and time.monotonic() < deadline:
        found = latest_checkpoint(run_dir)
        if found is not None and int(found.name.removeprefix("step_")) >= 2:
            os.killpg(job.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    job.wait(timeout=TIMEOUT)
    log = (tmp_path / "run.log").read_text()
    assert "stopped at once" not in log and "stopped by SIGINT after step" in log, log[-3000:]
    stopped_at = int(latest_checkpoint(run_dir).name.removeprefix("step_"))
    assert 2 < stopped_at < STEPS  # the step under way when Ctrl-C came, saved
