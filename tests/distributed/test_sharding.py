"""Sharded data order and the single-process defaults: W ranks' shards interleave, batch by batch,
into exactly the stream one process reads at W times the batch, from any resumed position; with no
process group every helper answers as one process of one and every collective is the identity."""

import itertools

import pytest
import torch

from polymodal.distributed.collectives import any_rank, gather_rows, mean_over_ranks, row_counts, sum_over_ranks
from polymodal.distributed.data_parallel import data_parallel, gradient_sync
from polymodal.distributed.process import is_main, launched, local_device, rank, world_size
from polymodal.training.sampler import EpochSampler, ShardedSampler, build_loader


def _take(sampler, count: int) -> list[int]:
    return list(itertools.islice(iter(sampler), count))


@pytest.mark.parametrize(("world", "batch", "start"), [(2, 3, 0), (3, 2, 12), (2, 4, 8), (4, 1, 5)])
def test_rank_shards_interleave_into_the_one_process_stream(world, batch, start):
    num_items, batches = 10, 7
    one = _take(EpochSampler(num_items, seed=4, start=start), world * batch * batches)
    shards = [_take(ShardedSampler(num_items, seed=4, start=start, batch_size=batch, rank=r, world_size=world), batch * batches)
              for r in range(world)]  # fmt: skip
    for step in range(batches):
        together = [i for shard in shards for i in shard[step * batch : (step + 1) * batch]]
        assert together == one[step * world * batch : (step + 1) * world * batch]


def test_loader_gives_each_rank_its_share_of_each_global_batch():
    data = torch.arange(11)
    one = next(iter(build_loader(data, torch.stack, batch_size=6, seed=1, start=6)))
    parts = [next(iter(build_loader(data, torch.stack, batch_size=3, seed=1, start=6, rank=r, world_size=2))) for r in range(2)]
    assert torch.equal(torch.cat(parts), one)


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ShardedSampler(5, seed=0, start=0, batch_size=1, rank=2, world_size=2)


def test_without_a_process_group_everything_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (rank(), world_size(), is_main(), launched()) == (0, 1, True, False)
    assert local_device(torch.device("cuda")) == torch.device("cuda")  # no LOCAL_RANK: left as it is
    rows = torch.randn(3, 2, requires_grad=True)
    assert gather_rows(rows) is rows and row_counts(3, rows.device) == [3]
    assert sum_over_ranks(rows) is rows and torch.equal(mean_over_ranks(rows), rows)
    assert any_rank(True) and not any_rank(False)
    model = torch.nn.Linear(2, 2)
    assert data_parallel(model, torch.device("cpu"), gradient_surgery=True) is model  # one process: nothing to wrap
    with gradient_sync(model, last=False):
        pass


def test_a_launched_rank_uses_its_own_gpu(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched()
    assert local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert local_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert local_device(torch.device("cpu")) == torch.device("cpu")
