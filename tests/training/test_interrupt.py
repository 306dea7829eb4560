"""SIGINT and SIGTERM during training: the step under way finishes, a checkpoint of it is written,
the run ends with RunInterrupted (exit status 130 / 143), and resuming ends with bitwise the same
weights and metrics as a run never interrupted; in-process and for a subprocess signalled from
outside, as test_resume.py does for SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from polymodal.errors import RunInterrupted
from polymodal.training.checkpoint import latest_checkpoint
from polymodal.training.interrupt import StopOnSignal
from polymodal.training.loop import fit

sys.path.insert(0, str(Path(__file__).parent))  # the toy run and resume_job.py beside this file
from resume_job import STEPS, assert_same_weights, logged_steps, signal_when, start  # noqa: E402
from toy import Points, collate, toy_config, toy_model  # noqa: E402


class SignalAt:
    """A collate function that sends ``signum`` to this process while collating its ``at``-th batch
    (twice with ``again``)."""

    def __init__(self, at: int, signum: int, *, again: bool = False) -> None:
        self.calls, self.at, self.signum, self.again = 0, at, signum, again

    def __call__(self, items):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
            if self.again:
                os.kill(os.getpid(), self.signum)
        return collate(items)


def _entries(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "samples_per_s", "mfu")} for line in lines]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_and_resume_matches_an_uninterrupted_run(tmp_path, signum):
    # Poisoned items: some steps are skipped on both sides. Batches are collated in step (no
    # prefetching thread), so the signal sent while collating batch 7 arrives during step 7.
    config = toy_config(steps=14, ckpt_every=5, prefetch=0)
    whole = toy_model()
    fit(whole, Points(), collate, config, tmp_path / "whole")

    before = signal.getsignal(signum)
    with pytest.raises(RunInterrupted) as caught:
        fit(toy_model(), Points(), SignalAt(7, signum), config, tmp_path / "cut")
    assert signal.getsignal(signum) is before  # the handlers are put back
    assert caught.value.exit_status == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} after step 7" in str(caught.value)
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000007"  # not a multiple of ckpt_every

    resumed = toy_model()
    fit(resumed, Points(), collate, config, tmp_path / "cut", resume=True)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert _entries(tmp_path / "cut") == _entries(tmp_path / "whole")  # skipped_steps included
    assert _entries(tmp_path / "whole")[-1]["skipped_steps"] > 0


def test_a_second_signal_stops_at_once(tmp_path):
    with pytest.raises(RunInterrupted, match="stopped at once by a second SIGTERM") as caught:
        fit(toy_model(), Points(), SignalAt(3, signal.SIGTERM, again=True), toy_config(steps=10, ckpt_every=100, prefetch=0), tmp_path)
    assert caught.value.exit_status == 143
    assert latest_checkpoint(tmp_path) is None  # stopped inside step 3, before any checkpoint


def test_outside_the_main_thread_nothing_is_installed():
    import threading

    seen = {}

    def enter():
        with StopOnSignal() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stop.requested

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == {"handler": signal.getsignal(signal.SIGTERM), "requested": False}


@pytest.mark.slow  # three Python processes: about 20 s on two busy cores
def test_sigterm_to_a_subprocess_then_resume_matches_bitwise(tmp_path):
    cut_dir, whole_dir = tmp_path / "cut", tmp_path / "whole"
    whole = start(whole_dir)
    cut = start(cut_dir, "--step-delay", "0.05")
    signal_when(cut, signal.SIGTERM, lambda: max(logged_steps(cut_dir), default=0) >= 6)
    assert cut.wait(timeout=60) == 143, (tmp_path / "cut.log").read_text()
    log = (tmp_path / "cut.log").read_text()
    assert "SIGTERM received: finishing this step" in log and "checkpoint" in log
    reached = latest_checkpoint(cut_dir)
    assert reached is not None and reached.name != f"step_{STEPS:07d}"

    assert start(cut_dir, "--resume").wait(timeout=120) == 0, (tmp_path / "cut.log").read_text()
    assert whole.wait(timeout=120) == 0
    assert_same_weights(cut_dir, whole_dir, STEPS)


@pytest.mark.slow  # three Python processes, two of them with DataLoader workers
def test_ctrl_c_to_the_process_group_with_dataloader_workers(tmp_path):
    # A terminal's Ctrl-C reaches the workers too; they must leave it to the main process.
    cut_dir, whole_dir = tmp_path / "cut", tmp_path / "whole"
    whole = start(whole_dir)
    cut = start(cut_dir, "--step-delay", "0.05", "--workers", "2", new_session=True)
    signal_when(cut, signal.SIGINT, lambda: max(logged_steps(cut_dir), default=0) >= 6, group=True)
    assert cut.wait(timeout=60) == 130, (tmp_path / "cut.log").read_text()
    assert "exited unexpectedly" not in (tmp_path / "cut.log").read_text()
    assert start(cut_dir, "--resume", "--workers", "2").wait(timeout=120) == 0, (tmp_path / "cut.log").read_text()
    assert whole.wait(timeout=120) == 0
    assert_same_weights(cut_dir, whole_dir, STEPS)  # workers or not, the same batches


def test_a_launched_rank_takes_a_quick_repeat_as_the_launcher_passing_ctrl_c_on(tmp_path, monkeypatch):
    """One Ctrl-C reaches a launched rank twice (the terminal's and the launcher's copy): the step
    still finishes and is saved, as after one signal. Outside a launched run the same two signals
    stop at once (test_a_second_signal_stops_at_once)."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)  # a rank of a launched run (of one: no process group needed)
    with pytest.raises(RunInterrupted, match="stopped by SIGINT after step 3") as caught:
        fit(toy_model(), Points(), SignalAt(3, signal.SIGINT, again=True), toy_config(steps=10, ckpt_every=100, prefetch=0), tmp_path)
    assert caught.value.exit_status == 130
    assert latest_checkpoint(tmp_path).name == "step_0000003"  # the step under way, saved
