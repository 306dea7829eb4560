"""Gradient surgery in a data-parallel run equals one process: 2 ranks (gloo, CPU) at batch 16 with
PCGrad or GradNorm end 5 steps with the weights of one process at batch 32 (1e-5), because each
term's gradient is averaged over the ranks before the surgery. Both ranks end bitwise alike, and
GradNorm's learned weights in the checkpoint are one process's. The surgery did act: PCGrad found
conflicting pairs, GradNorm's weights left 1."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # ranks.py beside this file
from ranks import TOLERANCE, run_ranks, train_run, weights  # noqa: E402

from polymodal.training.checkpoint import STATE_FILE

STEPS = 5


def _surgery_state(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints" / f"step_{STEPS:07d}" / STATE_FILE, weights_only=False)
    return state["extra"]["gradient_surgery"]


def _logged(run_dir: Path, prefix: str) -> list[float]:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [value for entry in entries for name, value in entry.items() if name.startswith(prefix)]


@pytest.mark.parametrize("kind", ["pcgrad", "gradnorm", pytest.param("gradnorm_layer", marks=pytest.mark.slow)])
def test_two_ranks_with_gradient_surgery_train_like_one_process(tmp_path, kind):
    run_ranks(train_run, 2, kind, tmp_path / "ddp", 16, STEPS)
    train_run(kind, tmp_path / "one", 32, STEPS)
    rank0, rank1 = weights(tmp_path / "ddp" / "rank0.safetensors"), weights(tmp_path / "ddp" / "rank1.safetensors")
    one = weights(tmp_path / "one" / "rank0.safetensors")
    assert rank0.keys() == rank1.keys() == one.keys()
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(rank0[name], one[name], rtol=0, atol=TOLERANCE, msg=lambda m: f"{name}: {m}")
    if kind == "pcgrad":
        conflicts = _logged(tmp_path / "ddp", "pcgrad/conflicts")
        assert conflicts == pytest.approx(_logged(tmp_path / "one", "pcgrad/conflicts"))
        assert max(conflicts) > 0  # projections happened
        return
    ddp, single = _surgery_state(tmp_path / "ddp"), _surgery_state(tmp_path / "one")
    assert ddp["names"] == single["names"] and len(ddp["names"]) >= 3
    torch.testing.assert_close(ddp["weights"], single["weights"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(ddp["initial_losses"], single["initial_losses"], rtol=1e-6, atol=0)
    assert (ddp["weights"] - 1).abs().max() > 100 * TOLERANCE  # the weights were learned
