"""Monotonic alignment search against a brute-force search over every monotonic path, against the
``monotonic-align`` package (Glow-TTS's Cython search) when it is installed, and on alignments
that are known by construction; the diagonal prior against scipy's beta-binomial."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from polymodal.heads.alignment_search import diagonal_log_prior, gaussian_log_likelihood, maximum_path, uniform_durations


def _brute_force(value: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Best score and path of one (L, F) item by trying every way to give each token >= 1 frames."""
    tokens, frames = value.shape
    best, best_path = float("-inf"), None
    for cuts in itertools.combinations(range(1, frames), tokens - 1):  # where tokens 1.. start
        edges = (0, *cuts, frames)
        path = torch.zeros(tokens, frames)
        for i in range(tokens):
            path[i, edges[i] : edges[i + 1]] = 1
        score = float((value * path).sum())
        if score > best:
            best, best_path = score, path
    return best, best_path


def _mask(lengths: list[int], frames: list[int], num_tokens: int, num_frames: int) -> torch.Tensor:
    tokens = torch.arange(num_tokens)[None, :] < torch.tensor(lengths)[:, None]
    steps = torch.arange(num_frames)[None, :] < torch.tensor(frames)[:, None]
    return tokens[:, :, None] & steps[:, None, :]


@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force_on_small_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths, frames = [1, 2, 3, 4, 3], [3, 5, 7, 7, 3]
    value = torch.randn(5, 4, 7, generator=generator, dtype=torch.float64)
    path = maximum_path(value, _mask(lengths, frames, 4, 7))
    for b, (tokens, count) in enumerate(zip(lengths, frames)):
        best, expected = _brute_force(value[b, :tokens, :count])
        assert float((value[b] * path[b]).sum()) == pytest.approx(best, abs=1e-5)
        assert torch.equal(path[b, :tokens, :count], expected)  # continuous values: the best path is unique
        assert path[b, tokens:].sum() == 0 and path[b, :, count:].sum() == 0


def test_equals_the_monotonic_align_package():
    package = pytest.importorskip("monotonic_align")
    generator = torch.Generator().manual_seed(7)
    lengths, frames = [12, 5, 1, 30], [80, 5, 9, 64]
    value = torch.randn(4, 30, 80, generator=generator)
    mask = _mask(lengths, frames, 30, 80)
    # The package takes [batch, frames, tokens] (VITS' layout), the transpose of Glow-TTS's
    # [batch, tokens, frames] that ours takes; it returns the path in its input's layout.
    theirs = package.maximum_path(value.transpose(1, 2).contiguous(), mask.transpose(1, 2).contiguous())
    assert torch.equal(maximum_path(value, mask), theirs.transpose(1, 2).float())


def test_recovers_a_known_alignment():
    torch.manual_seed(0)
    durations = torch.tensor([[3, 7, 1, 5], [2, 2, 9, 0]])  # the second item has three tokens
    means = torch.randn(2, 4, 16) * 3
    frames = torch.zeros(2, 16, 16)
    for b in range(2):
        token = torch.repeat_interleave(torch.arange(4), durations[b])
        frames[b, : len(token)] = means[b, token] + 0.1 * torch.randn(len(token), 16)
    mask = _mask([4, 3], [16, 13], 4, 16)
    path = maximum_path(gaussian_log_likelihood(means, frames), mask)
    assert torch.equal(path.sum(-1).long(), durations)


def test_every_real_frame_once_tokens_in_order():
    generator = torch.Generator().manual_seed(3)
    value = torch.randn(3, 6, 40, generator=generator)
    mask = _mask([6, 4, 2], [40, 25, 2], 6, 40)
    path = maximum_path(value, mask)
    assert torch.equal(path.sum(1), mask[:, 0, :].float())  # one token per real frame
    owner = path.argmax(1)  # (B, F)
    assert bool(((owner[:, 1:] - owner[:, :-1]) >= 0).where(mask[:, 0, 1:], True).all())  # never moves back
    assert bool((path.sum(-1) >= 1).where(mask[:, :, 0], True).all())  # every real token is said


def test_too_few_frames_is_refused_and_has_a_fallback():
    with pytest.raises(ValueError, match="at least as many frames as tokens"):
        maximum_path(torch.zeros(1, 3, 2), torch.ones(1, 3, 2, dtype=torch.bool))
    even = uniform_durations(torch.tensor([3, 4]), torch.tensor([7, 2]), 5)
    assert even.tolist() == [[2, 2, 3, 0, 0], [0, 1, 0, 1, 0]]
    assert torch.equal(even.sum(1), torch.tensor([7.0, 2.0]))


def test_diagonal_prior_equals_scipy_beta_binomial():
    betabinom = pytest.importorskip("scipy.stats").betabinom
    lengths, frames = [5, 1, 3], [12, 4, 3]
    prior = diagonal_log_prior(torch.tensor(lengths), torch.tensor(frames), 6, 13, scaling=0.7)
    for b, (tokens, steps) in enumerate(zip(lengths, frames)):
        expected = [[betabinom.logpmf(k, tokens - 1, 0.7 * j, 0.7 * (steps - j + 1)) for j in range(1, steps + 1)] for k in range(tokens)]
        torch.testing.assert_close(prior[b, :tokens, :steps], torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)
        assert prior[b, tokens:].abs().max() == 0 and prior[b, :, steps:].abs().max() == 0  # padding adds nothing
        torch.testing.assert_close(prior[b, :tokens, :steps].exp().sum(0), torch.ones(steps))  # a distribution per frame


def test_diagonal_prior_from_its_cached_tables_equals_scipy_at_every_size():
    """The prior reads lgamma values from tables cached by size; calls of growing and shrinking
    sizes (a table reused, then a larger one) still give scipy's beta-binomial."""
    betabinom = pytest.importorskip("scipy.stats").betabinom
    generator = torch.Generator().manual_seed(2)
    for num_tokens, num_frames, scaling in ((3, 5, 1.0), (45, 170, 1.0), (7, 20, 1.0), (64, 300, 0.5), (40, 141, 1.0)):
        lengths = torch.randint(1, num_tokens + 1, (6,), generator=generator)
        frames = (lengths + torch.randint(0, num_frames - num_tokens + 1, (6,), generator=generator)).clamp(max=num_frames)
        lengths[0], frames[0] = num_tokens, num_frames  # one item fills the padded sizes
        prior = diagonal_log_prior(lengths, frames, num_tokens, num_frames, scaling=scaling)
        for b, (tokens, steps) in enumerate(zip(lengths.tolist(), frames.tolist())):
            k, j = np.arange(tokens)[:, None], np.arange(1, steps + 1)[None, :]
            expected = betabinom.logpmf(k, tokens - 1, scaling * j, scaling * (steps - j + 1))
            torch.testing.assert_close(prior[b, :tokens, :steps].double(), torch.from_numpy(expected), atol=1e-4, rtol=1e-6)
            assert prior[b, tokens:].abs().sum() == 0 and prior[b, :, steps:].abs().sum() == 0


def test_diagonal_prior_decides_ties_and_yields_to_clear_evidence():
    lengths, frames = torch.tensor([4]), torch.tensor([16])
    prior = diagonal_log_prior(lengths, frames, 4, 16)
    mask = _mask([4], [16], 4, 16)
    alike = maximum_path(torch.zeros(1, 4, 16) + prior, mask).sum(-1)  # every token fits every frame
    assert torch.equal(alike, torch.tensor([[4.0, 4.0, 4.0, 4.0]]))
    durations = [2, 9, 1, 4]
    edges = torch.tensor([0, *durations]).cumsum(0)
    known = torch.full((1, 4, 16), -20.0)  # each frame fits its own token far better than any other
    for i in range(4):
        known[0, i, edges[i] : edges[i + 1]] = 0.0
    assert torch.equal(maximum_path(known + prior, mask).sum(-1), torch.tensor([durations], dtype=torch.float32))
