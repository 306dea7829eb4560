"""A small training run for the resume, signal and soak tests: dropout, shuffled data, frequent
checkpoints; and the helpers those tests drive it with.

Usage: python resume_job.py RUN_DIR [--resume] [--step-delay SECONDS] [--steps N] [--workers N]
The delay slows the data pipeline only (it changes no number), so the test can kill the run mid-way.
A run stopped by SIGINT or SIGTERM exits with the CLI's status for it (128 + the signal number).
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import Dataset

from polymodal.config import Config, DataConfig, TrainConfig
from polymodal.errors import RunInterrupted
from polymodal.models.output import StepOutput
from polymodal.training.loop import fit

sys.path.insert(0, str(Path(__file__).parent))  # toy.py beside this file
from toy import Batch  # noqa: E402

STEPS = 24
JOB = Path(__file__)
VOLATILE = ("time", "samples_per_s")  # logged figures that differ between two identical runs


def start(run_dir: Path, *args: str, new_session: bool = False) -> subprocess.Popen:
    """This job on ``run_dir`` in a subprocess on one thread, its output appended to ``<run_dir>.log``;
    with ``new_session``, in a process group of its own (its pid is the group's id), as a terminal
    would start it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen([sys.executable, str(JOB), str(run_dir), *args], stdout=log, stderr=log, env=env,
                            start_new_session=new_session)  # fmt: skip


def signal_when(proc: subprocess.Popen, signum: int, ready, *, timeout: float = 120, group: bool = False) -> None:
    """Send ``signum`` to ``proc`` (to its whole process group with ``group``, as Ctrl-C at a
    terminal does) as soon as ``ready()`` holds (polled), unless ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
            return
        time.sleep(0.01)


def logged_steps(run_dir: Path) -> list[int]:
    """The steps in ``metrics.jsonl`` so far (a line torn by a kill is left out)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def logged_entries(run_dir: Path) -> dict[tuple[int, str], dict]:
    """Every logged figure by (step, split), asserting each was logged once."""
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(e["step"], e["split"]) for e in entries]
    assert len(keys) == len(set(keys)), "a step was logged twice"
    return {(e["step"], e["split"]): {k: v for k, v in e.items() if k not in VOLATILE} for e in entries}


def assert_same_weights(run_a: Path, run_b: Path, step: int) -> None:
    """The two runs' checkpoints of ``step`` hold bitwise the same weights."""
    final = f"checkpoints/step_{step:07d}/model.safetensors"
    a, b = (safetensors.torch.load_file(run / final) for run in (run_a, run_b))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class Points(Dataset):
    def __init__(self, n: int = 40) -> None:
        gen = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = torch.sin(self.x[:, :2] * 2) + self.x[:, 2:4]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class SlowCollate:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, items):
        time.sleep(self.delay)
        return Batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 2))

    def forward(self, batch: Batch) -> StepOutput:
        return StepOutput(losses={"mse": (self.net(batch.x) - batch.y).square().mean()})


def evaluate(model: nn.Module, step: int) -> dict[str, float]:
    # Draws from the global RNG on purpose: resume must replay it at the same point.
    return {"probe": torch.rand(()).item(), "weight_sum": float(model.net[0].weight.sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    train = TrainConfig(
        steps=args.steps, batch_size=6, grad_accum=2, lr=3e-2, warmup_steps=3, log_every=2, ckpt_every=4,
        keep_checkpoints=2, eval_every=6, precision="fp32", progress=False,
    )
    config = Config(seed=3, device="cpu", data=DataConfig(num_workers=args.workers), train=train)
    torch.manual_seed(11)
    collate = SlowCollate(args.step_delay)
    try:
        fit(DropoutMLP(), Points(), collate, config, args.run_dir, resume=args.resume, evaluate=evaluate)
    except RunInterrupted as exc:
        logging.getLogger(__name__).warning("%s", exc)
        sys.exit(exc.exit_status)


if __name__ == "__main__":
    main()
