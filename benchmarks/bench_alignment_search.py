"""Monotonic alignment search and its diagonal prior at the `generation` preset's sizes, against their
peers on the same inputs, in one run.

Every step of the `generation` preset aligns each item's log-mel frames to its text's states (64
items, 5 states per word, about 40 states and 140 frames at most; ``heads/state_alignment.py``):
the diagonal prior (``diagonal_log_prior``), then the search (``maximum_path``).

- ``maximum_path`` (a numpy loop over frames) against the ``monotonic-align`` package's Cython
  search (Glow-TTS's), on the same scores; the paths must be equal.
- ``diagonal_log_prior`` (lgamma terms read from a cached table) against scipy's
  ``betabinom.logpmf`` over the same grid, item by item; the values must agree to 1e-4.

    python benchmarks/bench_alignment_search.py
    python benchmarks/bench_alignment_search.py --items 64 --states 40 --frames 140 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from polymodal.heads.alignment_search import diagonal_log_prior, maximum_path


def inputs(items: int, states: int, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores (B, L, F), and each item's real states and frames (B,), one item at the padded sizes."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(states // 3, states + 1, (items,), generator=generator)
    counts = torch.minimum(lengths + torch.randint(frames // 3, frames + 1, (items,), generator=generator), torch.tensor(frames))
    lengths[0], counts[0] = states, frames
    return torch.randn(items, states, frames, generator=generator), lengths, counts


def timed(run, repeats: int) -> float:
    """Median seconds of ``repeats`` calls, after one call to warm up."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--states", type=int, default=40)
    parser.add_argument("--frames", type=int, default=140)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import monotonic_align  # the dev extra's peer
    from scipy.stats import betabinom

    scores, lengths, counts = inputs(args.items, args.states, args.frames, seed=0)
    mask = (torch.arange(args.states)[None, :, None] < lengths[:, None, None]) & (torch.arange(args.frames)[None, None, :] < counts[:, None, None])

    ours_path = maximum_path(scores, mask)
    # The package takes (B, frames, tokens), the transpose of ours, and returns its path in that layout.
    theirs_path = monotonic_align.maximum_path(scores.transpose(1, 2).contiguous(), mask.transpose(1, 2).contiguous()).transpose(1, 2)
    if not torch.equal(ours_path, theirs_path.float()):
        raise SystemExit("maximum_path differs from monotonic_align's")
    ours = timed(lambda: maximum_path(scores, mask), args.repeats)
    theirs = timed(lambda: monotonic_align.maximum_path(scores.transpose(1, 2).contiguous(), mask.transpose(1, 2).contiguous()), args.repeats)

    prior = diagonal_log_prior(lengths, counts, args.states, args.frames)

    def scipy_prior() -> list[np.ndarray]:
        out = []
        for tokens, steps in zip(lengths.tolist(), counts.tolist()):
            k, j = np.arange(tokens)[:, None], np.arange(1, steps + 1)[None, :]
            out.append(betabinom.logpmf(k, tokens - 1, j, steps - j + 1))
        return out

    worst = max(float(np.abs(prior[b, : len(e), : e.shape[1]].double().numpy() - e).max()) for b, e in enumerate(scipy_prior()))
    if worst > 1e-4:
        raise SystemExit(f"diagonal_log_prior differs from scipy's betabinom by {worst:.2e}")
    ours_prior = timed(lambda: diagonal_log_prior(lengths, counts, args.states, args.frames), args.repeats)
    scipy_time = timed(scipy_prior, max(args.repeats // 4, 1))

    print(f"{args.items} items, up to {args.states} states and {args.frames} frames, {args.threads} threads, median of {args.repeats}")
    print(f"  maximum_path        ours {1e3 * ours:6.2f} ms   monotonic_align (Cython) {1e3 * theirs:6.2f} ms   ours / theirs {ours / theirs:.2f}   paths equal")
    print(f"  diagonal_log_prior  ours {1e3 * ours_prior:6.2f} ms   scipy betabinom.logpmf   {1e3 * scipy_time:6.2f} ms   ours / theirs {ours_prior / scipy_time:.2f}   max |difference| {worst:.1e}")


if __name__ == "__main__":
    main()
