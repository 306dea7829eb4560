"""The Fréchet distance against torchmetrics' FID formula and scipy's matrix square root, on
hand-checkable diagonal Gaussians, and the mean pairwise distance against a double loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from polymodal.evaluation.frechet import frechet_distance, frechet_distance_from_statistics, gaussian_statistics, mean_pairwise_distance


def _two_sets(seed: int = 0, n: int = 400, k: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=generator, dtype=torch.float64) @ torch.randn(k, k, generator=generator, dtype=torch.float64)
    b = torch.randn(n, k, generator=generator, dtype=torch.float64) * 2 + 0.5
    return a, b


def test_equals_torchmetrics_fid_formula():
    fid = pytest.importorskip("torchmetrics.image.fid")
    a, b = _two_sets()
    (mean_a, cov_a), (mean_b, cov_b) = gaussian_statistics(a), gaussian_statistics(b)
    peer = float(fid._compute_fid(mean_a, cov_a, mean_b, cov_b))
    assert frechet_distance(a, b) == pytest.approx(peer, rel=1e-8)


def test_equals_the_scipy_sqrtm_form():
    linalg = pytest.importorskip("scipy.linalg")
    a, b = _two_sets(seed=1)
    (mean_a, cov_a), (mean_b, cov_b) = gaussian_statistics(a), gaussian_statistics(b)
    root = linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    expected = float(((mean_a - mean_b) ** 2).sum()) + np.trace(cov_a.numpy() + cov_b.numpy() - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_diagonal_gaussians_by_hand():
    # Diagonal covariances commute: d^2 = |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2.
    mean_a, mean_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    sd_a, sd_b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])
    by_hand = 1 + 0 + 4 + 1 + 0 + 4
    assert frechet_distance_from_statistics(mean_a, torch.diag(sd_a**2), mean_b, torch.diag(sd_b**2)) == pytest.approx(by_hand)


def test_zero_for_one_set_and_symmetric():
    a, b = _two_sets(seed=2)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)


def test_mean_pairwise_distance_against_a_double_loop():
    items = torch.randn(5, 2, 3)
    pairs = [float((items[i] - items[j]).norm()) for i, j in itertools.permutations(range(5), 2)]
    assert mean_pairwise_distance(items) == pytest.approx(sum(pairs) / len(pairs))
    assert mean_pairwise_distance(items[:1].repeat(4, 1, 1)) == 0.0
