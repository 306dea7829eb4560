"""Data-parallel training equals one process: 2 ranks (gloo, CPU) at batch 16 end 5 steps with the
weights of one process at batch 32 (1e-5), for the any-to-any model with contrastive negatives
gathered from both ranks, the VQ-VAE whose EMA codebook and dead-code restarts are synchronised,
and an any-to-any model with a mixture-of-experts backbone (its load balance over both ranks'
tokens). Both ranks end with bitwise the same weights and buffers.

The VQ codebook's statistics are the exception to 1e-5: their sums over two ranks round otherwise
than one sum over the batch (about 1e-7), enough for a vector almost equidistant from two codes to
choose the other one (measured: one vector at step 3). Each such choice moves a count by
``1 - decay`` = 0.01 and a code by about that times a vector, so those buffers are compared at
the size of a few such choices; a statistic left unsynchronised would be off by half a batch.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # ranks.py beside this file
from ranks import TOLERANCE, build_run, run_ranks, train_run, weights  # noqa: E402

STEPS = 5
FLIPS = 5  # VQ assignments allowed to differ over the run (each 0.01 of a count)
STATISTICS = {"cluster_size": FLIPS * 0.01, "code_sum": FLIPS * 0.01, "codebook": 1e-3}


@pytest.mark.parametrize("kind", ["contrastive", "vqvae", "moe"])
def test_two_ranks_at_16_train_like_one_process_at_32(tmp_path, kind):
    run_ranks(train_run, 2, kind, tmp_path / "ddp", 16, STEPS)
    train_run(kind, tmp_path / "one", 32, STEPS)
    rank0, rank1 = weights(tmp_path / "ddp" / "rank0.safetensors"), weights(tmp_path / "ddp" / "rank1.safetensors")
    one = weights(tmp_path / "one" / "rank0.safetensors")
    saved = weights(tmp_path / "ddp" / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors")
    assert rank0.keys() == rank1.keys() == one.keys() == saved.keys()
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        assert torch.equal(rank0[name], saved[name]), f"{name}: rank 0's checkpoint is not its weights"
        tolerance = STATISTICS.get(name.rsplit(".", 1)[-1], TOLERANCE) if "quantizer" in name else TOLERANCE
        torch.testing.assert_close(rank0[name], one[name], rtol=0, atol=tolerance, msg=lambda m: f"{name}: {m}")
    initial = build_run(kind, 32, STEPS)[1].state_dict()
    moved = max((one[name] - initial[name]).abs().max().item() for name in one)
    assert moved > 20 * TOLERANCE  # training moved the weights far beyond the tolerance
    if kind == "vqvae":  # the synchronised statistics moved (and restarts happened on step one)
        codebook = next(name for name in one if name.endswith("quantizer.codebook"))
        assert not torch.allclose(one[codebook], one[codebook].mean(0))


def test_accumulated_micro_batches_train_like_one_process(tmp_path):
    """2 ranks x 2 micro-batches of 8 (the first under no_sync) equal one process x 2 micro-batches
    of 16: the sharded order serves each micro-batch, and its contrastive negatives span both ranks."""
    run_ranks(train_run, 2, "contrastive", tmp_path / "ddp", 8, STEPS, "train.grad_accum=2")
    train_run("contrastive", tmp_path / "one", 16, STEPS, "train.grad_accum=2")
    ddp, one = weights(tmp_path / "ddp" / "rank1.safetensors"), weights(tmp_path / "one" / "rank0.safetensors")
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=0, atol=TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_fsdp_two_ranks_train_like_one_process_and_checkpoint_in_shards(tmp_path):
    """train.fsdp=true: 2 ranks holding half the weights each train like one process at batch 32;
    their checkpoints are rank shards (no model.safetensors), and the whole model gathered at the
    end equals one process's."""
    run_ranks(train_run, 2, "fsdp", tmp_path / "fsdp", 16, STEPS)
    train_run("fsdp", tmp_path / "one", 32, STEPS)  # one process: fsdp has nothing to shard
    whole, one = weights(tmp_path / "fsdp" / "rank0.safetensors"), weights(tmp_path / "one" / "rank0.safetensors")
    assert whole.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(whole[name], one[name], rtol=0, atol=TOLERANCE, msg=lambda m: f"{name}: {m}")
    checkpoint = tmp_path / "fsdp" / "checkpoints" / f"step_{STEPS:07d}"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2  # one file of shards per rank


def test_an_fsdp_checkpoint_resumes_in_one_process(tmp_path):
    """The shards 2 ranks saved at step 2 load into one unsharded process (the checkpoint library
    reshards), which trains on at batch 32 to the weights the 2 ranks reached."""
    run_ranks(train_run, 2, "fsdp", tmp_path / "fsdp", 16, 4, "train.ckpt_every=2")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")  # as if stopped after step 2
    train_run("fsdp", resumed, 32, 4, "train.ckpt_every=2", resume=True)
    expected, got = weights(tmp_path / "fsdp" / "rank0.safetensors"), weights(resumed / "rank0.safetensors")
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=TOLERANCE, msg=lambda m: f"{name}: {m}")
