"""Sharded evaluation equals one process: a tiny-preset run's test figures computed by 2 gloo ranks,
each generating, embedding and reconstructing its share of the batches, are those of one process
exactly (counts, accuracies, recalls, PSNR: the same batches, so the same floats), on both ranks;
and each rank collated only its share of the items."""

import contextlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # eval_ranks.py, ranks.py beside this file
from eval_ranks import LIMIT, evaluate_here, evaluate_with_samples, map_numbers, tiny_run  # noqa: E402
from nested import assert_same  # noqa: E402
from ranks import run_ranks  # noqa: E402


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as each rank has: a matmul split over more threads may round otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("num_items", "batch_size", "stop_at"), [(10, 3, None), (11, 2, 12), (3, 4, None)])
def test_two_ranks_map_alternate_batches_into_the_one_process_results(tmp_path, num_items, batch_size, stop_at):
    """Rank r computes batches r, r + 2 ...; both return every batch in order, cut where one
    process would stop (after the first batch whose running sum passes ``stop_at``)."""
    map_numbers(num_items, batch_size, stop_at, tmp_path)  # one process
    single = torch.load(tmp_path / "map0.pt")
    run_ranks(map_numbers, 2, num_items, batch_size, stop_at, tmp_path)
    got = [torch.load(tmp_path / f"map{r}.pt") for r in range(2)]
    assert got[0] == got[1]
    assert [numbers for numbers, _ in got[0]] == [numbers for numbers, _ in single]
    assert [who for _, who in got[0]] == [i % 2 for i in range(len(single))]  # alternate ranks computed them
    expected, total = [], 0
    for start in range(0, num_items, batch_size):  # the plain loop one process runs
        expected.append(list(range(start, min(start + batch_size, num_items))))
        total += sum(expected[-1])
        if stop_at is not None and total > stop_at:
            break
    assert [numbers for numbers, _ in single] == expected


@pytest.mark.slow
def test_two_ranks_evaluate_their_shares_into_one_process_figures(tmp_path):
    run_dir, one, two = tmp_path / "run", tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    tiny_run(run_dir, fresh=True)
    with one_thread():
        evaluate_here(run_dir, one)  # one process, no group
    run_ranks(evaluate_here, 2, run_dir, two)
    single = torch.load(one / "rank0.pt", weights_only=False)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:
        assert_same(got["figures"], single["figures"], "figures")
        assert_same(got["small"], single["small"], "small")
    figures, small = single["figures"], single["small"]
    assert figures["image_to_text"]["count"] == single["num_test"] and "retrieval_image_to_text" in figures
    assert small["captions"]["count"] == single["num_test"] and small["captions_limited"]["count"] >= LIMIT
    assert len(small["embedded_limited"][next(iter(small["embedded_limited"]))][1]) <= LIMIT
    shares = [got["collated"] for got in ranks]
    assert sum(shares) <= single["collated"] + 3 * 2  # at most a round's extra batch per limited call
    assert all(0 < share < single["collated"] for share in shares)  # each rank did part of the work


def test_two_ranks_finish_an_evaluation_with_samples(tmp_path):
    """Training's final evaluation, samples and the image tokenizer's figures included, on 2 ranks:
    both finish (the tokenizer's reconstruction is shared out, so rank 1 takes part in it while rank
    0 alone draws samples), rank 0 has the figures one process has, and rank 1 only the shared ones."""
    run_dir, one, two = tmp_path / "run", tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    tiny_run(run_dir, fresh=True)
    with one_thread():
        evaluate_with_samples(run_dir, one)
    run_ranks(evaluate_with_samples, 2, run_dir, two, timeout=120)
    single = torch.load(one / "samples0.pt", weights_only=False)
    main, other = (torch.load(two / f"samples{r}.pt", weights_only=False) for r in range(2))
    assert {"text_to_image", "text_to_audio", "image_tokenizer"} <= set(single) and set(main) == set(single)
    assert_same(main["image_tokenizer"], single["image_tokenizer"], "image_tokenizer")
    assert_same(main["image_to_text"], single["image_to_text"], "image_to_text")
    assert "image_tokenizer" not in other and "text_to_image" not in other and "image_to_text" in other
