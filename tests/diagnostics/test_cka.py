"""CKA: ours against dense NumPy references written here (the centring matrix, the U-statistic
summed over index tuples, SciPy's pairwise distances), the feature-space form against the Gram
form, the unbiased HSIC against cka-pytorch's, and the paper's invariances."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform

from polymodal.diagnostics import cka, cka_matrix, feature_cka, feature_hsic, gram_cka, gram_hsic, linear_gram, rbf_gram

TOL = 1e-6  # the bar; float64 everywhere, so the agreement is far tighter in practice


def _pair(n: int = 200, dx: int = 24, dy: int = 40, *, seed: int = 0, noise: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, dx) and y (n, dy) = a random linear map of x plus noise, both off-centre."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64) + 2.0
    y = torch.tanh(x @ torch.randn(dx, dy, generator=gen, dtype=torch.float64)) + noise * torch.randn(n, dy, generator=gen, dtype=torch.float64)
    return x, y


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ----- dense NumPy references -----


def _np_hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n  # the centring matrix
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def _np_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012's closed form, written with explicit n x n products."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    total = np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ kt @ lt @ one)
    return float(total) / (n * (n - 3))


def _np_hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:
    """HSIC_u straight from its definition: the mean over distinct ordered (i, j, q, r) of
    k_ij l_ij + k_ij l_qr - 2 k_ij l_iq (Song et al. 2012). O(n^4): tiny n only."""
    n = k.shape[0]
    idx = np.array(list(itertools.permutations(range(n), 4)))  # (n!/(n-4)!, 4)
    i, j, q, r = idx.T
    return float(np.mean(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]))


def _np_cka(k: np.ndarray, l: np.ndarray, hsic) -> float:
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def _np_rbf(x: np.ndarray, fraction: float) -> np.ndarray:
    dist = pdist(x)  # (n(n-1)/2,) distances between distinct examples
    sigma = fraction * np.median(dist)
    return np.exp(-squareform(dist) ** 2 / (2 * sigma**2))


# ----- against the references -----


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_matches_dense_numpy(unbiased):
    x, y = _pair()
    xn, yn = x.numpy(), y.numpy()
    want = _np_cka(xn @ xn.T, yn @ yn.T, _np_hsic_unbiased if unbiased else _np_hsic_biased)
    assert cka(x, y, unbiased=unbiased) == pytest.approx(want, abs=TOL)
    assert gram_cka(linear_gram(x), linear_gram(y), unbiased=unbiased) == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize("fraction", [0.2, 0.8])
@pytest.mark.parametrize("unbiased", [False, True])
def test_rbf_cka_matches_dense_numpy(fraction, unbiased):
    x, y = _pair(n=101)  # odd n: an odd count of distances, the median is one of them
    xn, yn = x.numpy(), y.numpy()
    want = _np_cka(_np_rbf(xn, fraction), _np_rbf(yn, fraction), _np_hsic_unbiased if unbiased else _np_hsic_biased)
    assert cka(x, y, kernel="rbf", unbiased=unbiased, bandwidth_fraction=fraction) == pytest.approx(want, abs=TOL)


def test_rbf_gram_median_of_even_count_averages_the_two_middle_distances():
    x, _ = _pair(n=4)  # 6 distances: numpy's median averages the 3rd and 4th
    np.testing.assert_allclose(rbf_gram(x, bandwidth_fraction=0.5).numpy(), _np_rbf(x.numpy(), 0.5), atol=1e-12)


def test_unbiased_hsic_equals_the_u_statistic_over_index_tuples():
    x, y = _pair(n=8, dx=3, dy=5)
    k, l = linear_gram(x), linear_gram(y)
    want = _np_hsic_u_statistic(k.numpy(), l.numpy())
    assert gram_hsic(k, l, unbiased=True).item() == pytest.approx(want, rel=1e-9)
    assert feature_hsic(x, y, unbiased=True).item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("shape", [(300, 16, 48), (40, 64, 100)])  # widths below n, and above it
def test_feature_space_form_equals_gram_form(unbiased, shape):
    n, dx, dy = shape
    x, y = _pair(n, dx, dy, seed=3)
    assert feature_cka(x, y, unbiased=unbiased) == pytest.approx(gram_cka(linear_gram(x), linear_gram(y), unbiased=unbiased), abs=TOL)
    assert feature_hsic(x, y, unbiased=unbiased).item() == pytest.approx(gram_hsic(linear_gram(x), linear_gram(y), unbiased=unbiased).item(), rel=1e-9)


def test_unbiased_hsic_matches_cka_pytorch():
    hsic_module = pytest.importorskip("cka_pytorch.hsic")
    x, y = _pair(n=64, seed=5)
    k, l = linear_gram(x), linear_gram(y)
    peer = hsic_module.hsic1(k[None], l[None])  # (1,) batched Grams
    assert gram_hsic(k, l, unbiased=True).item() == pytest.approx(peer.item(), rel=1e-9)


# ----- properties -----


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_a_representation_with_itself_is_one(kernel, unbiased):
    x, _ = _pair()
    assert cka(x, x, kernel=kernel, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariant_to_rotation_scale_and_shift(kernel, unbiased):
    x, y = _pair(seed=7)
    base = cka(x, y, kernel=kernel, unbiased=unbiased)
    moved_x = 3.5 * x @ _orthogonal(x.shape[1], 1) - 4.0
    moved_y = 0.01 * y @ _orthogonal(y.shape[1], 2)
    assert cka(moved_x, moved_y, kernel=kernel, unbiased=unbiased) == pytest.approx(base, abs=1e-9)
    assert 0.2 < base < 0.99  # the pair is related but not identical, so the check has bite


def test_cka_is_symmetric_and_float32_inputs_give_the_float64_value():
    x, y = _pair(seed=2)
    assert cka(x, y) == pytest.approx(cka(y, x), abs=1e-12)
    assert cka(x.float(), y.float()) == pytest.approx(cka(x.float().double(), y.float().double()), abs=1e-12)


def test_linear_cka_is_not_invariant_to_anisotropic_scaling():
    x, y = _pair(seed=4)
    stretch = torch.ones(x.shape[1], dtype=torch.float64)
    stretch[0] = 30.0
    assert abs(cka(x * stretch, y) - cka(x, y)) > 1e-3


def test_unbiased_cka_of_independent_representations_is_near_zero_and_biased_is_not():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(500, 200, generator=gen, dtype=torch.float64)
    y = torch.randn(500, 200, generator=gen, dtype=torch.float64)
    assert abs(cka(x, y, unbiased=True)) < 0.02
    assert cka(x, y) > 0.2  # the biased estimator's well-known floor when d is not << n


def test_rbf_cka_ranks_a_nonlinear_relation_above_noise():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    y = torch.stack([torch.sin(3 * x[:, 0]), torch.cos(3 * x[:, 1])], dim=1)
    noise = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    assert cka(x, y, kernel="rbf", unbiased=True) > 5 * abs(cka(x, noise, kernel="rbf", unbiased=True))


def test_cka_of_a_constant_representation_is_nan():
    x, _ = _pair()
    assert math.isnan(cka(x, torch.ones(x.shape[0], 5)))


# ----- the matrix -----


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_matrix_entries_equal_pairwise_cka(kernel):
    x, y = _pair(seed=8)
    z = x[:, :10] ** 2
    reps = [x, y, z]
    matrix = cka_matrix(reps, kernel=kernel, unbiased=True)
    assert matrix.shape == (3, 3)
    for i, j in itertools.product(range(3), range(3)):
        assert matrix[i, j].item() == pytest.approx(cka(reps[i], reps[j], kernel=kernel, unbiased=True), abs=1e-12)
    rect = cka_matrix([x, z], [y], kernel=kernel, unbiased=True)
    torch.testing.assert_close(rect, matrix[[0, 2]][:, [1]], rtol=0, atol=1e-12)


def test_cka_matrix_mixed_widths_above_n_use_the_gram_form_and_agree():
    x, y = _pair(n=30, dx=8, dy=50, seed=9)  # y wider than n: the Gram form is the cheaper one
    matrix = cka_matrix([x, y])
    assert matrix[0, 1].item() == pytest.approx(feature_cka(x, y), abs=TOL)


# ----- errors -----


def test_errors_name_the_problem():
    x, y = _pair()
    with pytest.raises(ValueError, match="same examples"):
        cka(x, y[:-1])
    with pytest.raises(ValueError, match="unknown CKA kernel 'cosine'; valid: linear, rbf"):
        cka(x, y, kernel="cosine")
    with pytest.raises(ValueError, match="at least 4"):
        cka(x[:3], y[:3], unbiased=True)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        cka(x[0], y[0])
    with pytest.raises(ValueError, match="bandwidth_fraction must be positive"):
        cka(x, y, kernel="rbf", bandwidth_fraction=0)
