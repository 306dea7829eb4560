"""``polymodal export``'s conversion of an FSDP run's sharded checkpoint, in one process without a
process group: the whole model it writes equals, bitwise, the model the 2 ranks gathered at the
end of their run (``fsdp.export_whole``); an earlier checkpoint exports that step's weights. (The
command on an ordinary run: ``tests/cli/test_cli.py``.)"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # ranks.py beside this file
from ranks import build_run, run_ranks, train_run, weights  # noqa: E402

from polymodal.training.export import export_weights

STEPS = 4


def test_a_sharded_checkpoint_exports_the_whole_model_the_ranks_gathered(tmp_path):
    run_dir = tmp_path / "fsdp"
    run_ranks(train_run, 2, "fsdp", run_dir, 16, STEPS, "train.ckpt_every=2")
    last, earlier = (run_dir / "checkpoints" / f"step_{step:07d}" for step in (STEPS, 2))
    assert not (last / "model.safetensors").exists() and (last / "sharded").is_dir()  # shards only
    out = export_weights(last, build_run("fsdp", 16, STEPS)[1], tmp_path / "export" / "model.safetensors")
    exported, gathered = weights(out), weights(run_dir / "rank0.safetensors")
    assert exported.keys() == gathered.keys()
    for name in gathered:
        assert torch.equal(exported[name], gathered[name]), name
    before = weights(export_weights(earlier, build_run("fsdp", 16, STEPS)[1], tmp_path / "step2.safetensors"))
    assert any(not torch.equal(before[name], gathered[name]) for name in gathered)  # step 2's, not the last
