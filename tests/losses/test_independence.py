"""Independence penalties: HSIC against references written here in float64 numpy (the biased
V-statistic from its three expectations, the unbiased one as a U-statistic over every ordered
quadruple of distinct rows), the cross-covariance penalty against the biased linear HSIC it equals,
and the point of both: about 0 on independent codes, clearly above 0 on dependent ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from polymodal.losses.independence import cross_covariance_penalty, hsic


def _codes(batch: int, *, seed: int, dependent: bool, dims: tuple[int, int] = (2, 2)):
    """(batch, Dx) and (batch, Dy <= Dx) float64 codes; y depends on x nonlinearly when asked."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dims[0], generator=gen, dtype=torch.float64)
    noise = torch.randn(batch, dims[1], generator=gen, dtype=torch.float64)
    if not dependent:
        return x, noise
    # y_j = x_j^2 (+ noise): uncorrelated with x (odd moments vanish) yet dependent on it.
    return x, x[:, : dims[1]].square() + 0.3 * noise


def _gram_np(x: np.ndarray, kernel: str, sigma: float | None) -> np.ndarray:
    if kernel == "linear":
        return x @ x.T
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    if sigma is None:
        sigma = np.median(dist[np.triu_indices(len(x), k=1)])
    return np.exp(-(dist**2) / (2 * sigma**2))


def _hsic_biased_reference(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Gretton et al.'s V-statistic E[k l] + E[k] E[l] - 2 E_i[E_j k_ij E_q l_iq], times m^2/(m-1)^2."""
    m = len(k)
    v_stat = (k * l).mean() + k.mean() * l.mean() - 2 * (k.mean(1) * l.mean(1)).mean()
    return v_stat * m**2 / (m - 1) ** 2


def _hsic_unbiased_reference(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """The U-statistic of E[k_ij l_ij] + E[k_ij l_qr] - 2 E[k_ij l_iq] over distinct indices."""
    m = len(k)
    total = 0.0
    quadruples = list(itertools.permutations(range(m), 4))
    for i, j, q, r in quadruples:
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return total / len(quadruples)


@pytest.mark.parametrize("kernel, sigma", [("linear", None), ("rbf", None), ("rbf", 0.7)])
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_hsic_equals_the_dense_reference(kernel, sigma, unbiased):
    reference = _hsic_unbiased_reference if unbiased else _hsic_biased_reference
    for seed, dependent in ((0, True), (1, False)):
        x, y = _codes(8, seed=seed, dependent=dependent, dims=(3, 2))  # 8 * 7 * 6 * 5 = 1680 quadruples
        expected = reference(_gram_np(x.numpy(), kernel, sigma), _gram_np(y.numpy(), kernel, sigma))
        got = hsic(x, y, kernel=kernel, unbiased=unbiased, sigma=sigma)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_cross_covariance_penalty_is_the_biased_linear_hsic():
    for seed in range(3):
        x, y = _codes(50, seed=seed, dependent=True, dims=(6, 4))
        y = y + 0.5 * x[:, :4]  # a linear dependence too, so the cross-covariance is not ~0
        penalty = cross_covariance_penalty(x, y)
        torch.testing.assert_close(penalty, hsic(x, y, kernel="linear", unbiased=False))
        expected = np.square(np.cov(x.numpy().T, y.numpy().T)[:6, 6:]).sum()  # numpy's (B - 1) covariance
        assert penalty.item() == pytest.approx(expected, rel=1e-10)


def test_cross_covariance_penalty_by_hand():
    # x = (1, -1), y = (2, -2): Cov = sum x_c y_c / (B - 1) = (2 + 2) / 1 = 4, squared 16.
    x = torch.tensor([[1.0], [-1.0]])
    assert cross_covariance_penalty(x, 2 * x).item() == pytest.approx(16.0)
    assert cross_covariance_penalty(x, torch.tensor([[5.0], [5.0]])).item() == 0.0  # constant y


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_rbf_hsic_separates_independent_from_dependent_codes(unbiased):
    independent = [hsic(*_codes(200, seed=s, dependent=False), kernel="rbf", unbiased=unbiased).item() for s in range(5)]
    dependent = [hsic(*_codes(200, seed=s, dependent=True), kernel="rbf", unbiased=unbiased).item() for s in range(5)]
    assert max(abs(v) for v in independent) < 0.002
    assert min(dependent) > 0.005 and min(dependent) > 4 * max(abs(v) for v in independent)


def test_linear_hsic_sees_only_correlation():
    # x^2 is uncorrelated with x, so the linear kernel misses it (the reason for the RBF option);
    # a linear dependence it sees at once.
    x, y = _codes(2000, seed=0, dependent=True)
    assert abs(hsic(x, y, kernel="linear").item()) < 0.02
    assert hsic(x, y + x, kernel="linear").item() > 1.0


def test_unbiased_hsic_is_centred_on_zero_for_independent_codes():
    # The biased estimate is positive by construction; the unbiased one averages to about 0.
    biased, unbiased = [], []
    for seed in range(40):
        x, y = _codes(16, seed=seed, dependent=False)
        biased.append(hsic(x, y, kernel="rbf", unbiased=False).item())
        unbiased.append(hsic(x, y, kernel="rbf", unbiased=True).item())
    assert min(biased) > 0
    assert abs(np.mean(unbiased)) < 0.25 * np.mean(biased)
    assert min(unbiased) < 0 < max(unbiased)


def test_gradients_flow_and_match_finite_differences():
    x, y = (t[:6].clone().requires_grad_() for t in _codes(6, seed=2, dependent=True))
    for fn in (
        lambda a, b: hsic(a, b, kernel="rbf", sigma=1.3),  # the median bandwidth is held constant
        lambda a, b: hsic(a, b, kernel="linear", unbiased=False),
        cross_covariance_penalty,
    ):
        assert torch.autograd.gradcheck(fn, (x, y))
    # bf16 inputs are computed in fp32.
    assert hsic(x.detach().bfloat16(), y.detach().bfloat16(), kernel="rbf").dtype == torch.float32


def test_bad_inputs_are_named():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="at least 4"):
        hsic(x, x)  # the unbiased estimator needs four rows
    assert torch.isfinite(hsic(x, x, unbiased=False))
    with pytest.raises(ValueError, match="valid: linear, rbf"):
        hsic(torch.randn(8, 2), torch.randn(8, 2), kernel="gaussian")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        hsic(torch.randn(8, 2), torch.randn(8, 2), kernel="rbf", sigma=0.0)
    with pytest.raises(ValueError, match="same item"):
        cross_covariance_penalty(torch.randn(8, 2), torch.randn(9, 2))
