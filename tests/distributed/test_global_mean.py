"""Token-averaged losses are global means over ranks: with captions of different lengths, 2 ranks at
batch 16 hold different numbers of target tokens, and still train like one process at batch 32 on
the concatenated batch (1e-5), because each rank's term is weighed by its share of every rank's
tokens. The weights themselves are checked by hand on made-up counts."""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # ranks.py beside this file
from ranks import TOLERANCE, Items, build_run, run_ranks, train_run, weights  # noqa: E402

from polymodal.distributed.global_mean import global_mean_shares, global_means
from polymodal.distributed.process import rank
from polymodal.training.sampler import ShardedSampler

STEPS = 5
BATCH = 16
SEED = 3  # ranks.build_run's


def _shares(out: Path) -> None:
    """Rank 0 counts 3 tokens of term ``a`` and has no ``c``; rank 1 counts 1 of ``a``, 4 of ``c``."""
    counts = [{"a": torch.tensor(3), "b": torch.tensor(0)}, {"a": torch.tensor(1), "b": torch.tensor(0), "c": torch.tensor(4)}]
    losses = {name: torch.tensor(10.0) for name in [*counts[rank()], "contrastive"]}
    torch.save((global_mean_shares(counts[rank()]), global_means(losses, counts[rank()])), out / f"rank{rank()}.pt")


def test_shares_are_each_ranks_part_of_every_ranks_units(tmp_path):
    run_ranks(_shares, 2, tmp_path)
    (shares0, means0), (shares1, means1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert shares0 == {"a": 2 * 3 / 4, "b": 1.0} and shares1 == {"a": 2 * 1 / 4, "b": 1.0, "c": 2.0}
    assert means0["a"].item() == 15.0 and means1["c"].item() == 20.0
    assert means0["contrastive"].item() == 10.0  # a term without a count is left as it is
    assert global_mean_shares({"a": torch.tensor(3)}) == {}  # one process: nothing weighed
    loss = torch.tensor(1.5)
    assert global_means({"a": loss}, {"a": torch.tensor(3)})["a"] is loss


def _first_batch_tokens(rank_: int) -> int:
    order = ShardedSampler(len(Items()), seed=SEED, start=0, batch_size=BATCH, rank=rank_, world_size=2)
    rows = torch.tensor(list(itertools.islice(iter(order), BATCH)))
    return int(Items(ragged=True).text_mask[rows].sum())


def test_ranks_with_different_caption_lengths_train_like_one_process(tmp_path):
    assert _first_batch_tokens(0) != _first_batch_tokens(1)  # the ranks' token means differ in weight
    run_ranks(train_run, 2, "ragged", tmp_path / "ddp", BATCH, STEPS)
    train_run("ragged", tmp_path / "one", 2 * BATCH, STEPS)
    rank0, rank1 = weights(tmp_path / "ddp" / "rank0.safetensors"), weights(tmp_path / "ddp" / "rank1.safetensors")
    one = weights(tmp_path / "one" / "rank0.safetensors")
    for name in one:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(rank0[name], one[name], rtol=0, atol=TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    initial = build_run("ragged", 2 * BATCH, STEPS)[1].state_dict()
    assert max((one[name] - initial[name]).abs().max().item() for name in one) > 20 * TOLERANCE
