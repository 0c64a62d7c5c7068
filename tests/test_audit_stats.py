"""The audit's statistics against known distributions and plain SciPy references."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from scipy import optimize, stats

from biofed.apps.audit_stats import (
    canary_directions,
    clopper_pearson,
    epsilon_of_gdp,
    gaussian_epsilon_lower_bound,
    gdp_mu_lower_bound,
    softmax_invariant_basis,
    threshold_epsilon_lower_bound,
)
from biofed.kernels import init_params, loss_and_grad, n_params, train


def _gdp_epsilon_reference(mu: float, delta: float) -> float:
    """Balle & Wang (2018): the Gaussian mechanism's exact delta(epsilon), inverted with brentq."""

    def delta_of(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(delta_of, 0.0, 100.0, xtol=1e-12)


# ----------------------------------------------------------------------------- directions
@pytest.mark.parametrize(("d", "c", "h"), [(32, 2, 0), (5, 3, 0), (6, 4, 7)])
def test_softmax_invariant_basis_is_orthonormal_and_orthogonal_to_every_gradient(d, c, h):
    basis = softmax_invariant_basis(d, c, h)
    rows = d if h == 0 else h
    assert basis.shape == (n_params(d, c, h), rows + 1)
    np.testing.assert_allclose(basis.T @ basis, np.eye(rows + 1), atol=1e-12)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, d)), rng.integers(0, c, 40)
    params = init_params(d, c, h, random_state=1) + rng.normal(scale=0.1, size=n_params(d, c, h))
    _, grad = loss_and_grad(params, X, y, c, h)
    assert np.linalg.norm(grad) > 1e-3
    assert np.abs(basis.T @ grad).max() < 1e-12
    # a whole local training run (SGD, the agent's default) moves nothing along the basis
    new, _ = train(params, X, y, c, h, epochs=3, batch_size=8, lr=0.1, random_state=2)
    assert np.abs(basis.T @ (new - params)).max() < 1e-12


def test_softmax_invariant_basis_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_classes must be >= 2"):
        softmax_invariant_basis(4, 1)
    with pytest.raises(ValueError, match="hidden must be an integer >= 0"):
        softmax_invariant_basis(4, 2, -1)
    with pytest.raises(ValueError, match="n_inputs must be an integer >= 1"):
        softmax_invariant_basis(0, 2)


def test_canary_directions_are_orthonormal_inside_the_subspace_and_uniform():
    basis = softmax_invariant_basis(8, 2)
    rng = np.random.default_rng(3)
    directions = canary_directions(basis, 9, rng)
    assert directions.shape == (9, 18)
    np.testing.assert_allclose(directions @ directions.T, np.eye(9), atol=1e-12)
    np.testing.assert_allclose(directions - (directions @ basis) @ basis.T, 0.0, atol=1e-12)
    # Haar: the first coordinate (in the subspace) of a direction has mean 0 and variance 1/m
    first = np.array([(canary_directions(basis, 1, rng) @ basis)[0, 0] for _ in range(3000)])
    assert abs(first.mean()) < 0.03 and abs(first.var() - 1 / 9) < 0.015


def test_canary_directions_rejects_bad_requests():
    basis = softmax_invariant_basis(3, 2)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 4\]"):
        canary_directions(basis, 5, rng)
    with pytest.raises(ValueError, match="orthonormal columns"):
        canary_directions(2 * basis, 2, rng)


# ----------------------------------------------------------------------------- epsilon of mu
@pytest.mark.parametrize("mu", [0.3, 1.0, 1.58, 3.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_epsilon_of_gdp_matches_the_closed_form_and_dp_accounting(mu, delta):
    eps = epsilon_of_gdp(mu, delta)
    assert eps == pytest.approx(_gdp_epsilon_reference(mu, delta), abs=1e-6)
    pld = PLDAccountant().compose(dp_accounting.GaussianDpEvent(1 / mu)).get_epsilon(delta)
    assert eps == pytest.approx(pld, abs=2e-3)


def test_epsilon_of_gdp_edges():
    assert epsilon_of_gdp(0.0, 1e-5) == 0.0
    assert epsilon_of_gdp(-1.0, 1e-5) == 0.0
    assert epsilon_of_gdp(math.inf, 1e-5) == math.inf
    assert epsilon_of_gdp(1e-3, 0.5) == 0.0  # delta above the whole curve
    with pytest.raises(ValueError, match="delta must be in"):
        epsilon_of_gdp(1.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        epsilon_of_gdp(math.nan, 1e-5)


# ----------------------------------------------------------------------------- Gaussian fit
def test_mu_lower_bound_covers_the_true_mu_at_its_confidence():
    rng = np.random.default_rng(20)
    trials, mu = 400, 1.58
    covered = 0
    estimates = []
    for _ in range(trials):
        sigma = rng.uniform(0.5, 5.0)  # the fit is scale-free
        inserted = rng.normal(mu * sigma + 3.0, sigma, 16)
        held_out = rng.normal(3.0, sigma, 17)
        mu_hat, mu_lower = gdp_mu_lower_bound(inserted, held_out, 0.95)
        covered += mu_lower <= mu
        estimates.append(mu_hat)
        assert mu_lower < mu_hat
    # binomial(400, 0.95): 0.92 .. 0.98 is beyond 3 standard deviations either way
    assert 0.92 <= covered / trials <= 0.98
    assert np.median(estimates) == pytest.approx(mu, abs=0.1)


def test_mu_lower_bound_is_the_noncentral_t_quantile():
    inserted, held_out = np.array([2.0, 3.5, 1.0, 4.0]), np.array([0.5, -1.0, 0.0, 1.5, -0.5])
    mu_hat, mu_lower = gdp_mu_lower_bound(inserted, held_out, 0.9)
    n1, n0 = 4, 5
    pooled = (inserted.var(ddof=1) * 3 + held_out.var(ddof=1) * 4) / 7
    assert mu_hat == pytest.approx((inserted.mean() - held_out.mean()) / math.sqrt(pooled))
    scale = math.sqrt(n1 * n0 / (n1 + n0))
    assert stats.nct.sf(mu_hat * scale, 7, mu_lower * scale) == pytest.approx(0.1, abs=1e-8)


def test_mu_lower_bound_without_spread():
    assert gdp_mu_lower_bound([2.0, 2.0], [0.0, 0.0]) == (math.inf, math.inf)
    assert gdp_mu_lower_bound([0.0, 0.0], [1.0, 1.0])[0] == 0.0


def test_gaussian_bound_of_a_noiseless_release_is_infinite():
    bound = gaussian_epsilon_lower_bound([3.0, 3.0, 3.0], [0.0, 0.0, 0.0], 1e-5)
    assert bound.lower == math.inf and bound.method == "gaussian"


def test_gaussian_bound_is_below_the_true_epsilon_and_tight_with_many_canaries():
    rng = np.random.default_rng(7)
    mu, delta = 1.5, 1e-5
    bound = gaussian_epsilon_lower_bound(rng.normal(mu, 1, 2000), rng.normal(0, 1, 2000), delta)
    true_eps = _gdp_epsilon_reference(mu, delta)
    assert bound.lower <= true_eps
    assert bound.lower >= 0.85 * true_eps
    assert bound.n_inserted == 2000 and bound.mu_lower < bound.mu


@pytest.mark.parametrize(
    ("inserted", "held_out", "message"),
    [
        ([1.0], [0.0, 1.0], "inserted must be a 1-d array of at least 2 scores"),
        ([1.0, math.nan], [0.0, 1.0], "inserted must be finite"),
        ([1.0, 2.0], [[0.0, 1.0]], "held_out must be a 1-d array"),
    ],
)
def test_bounds_reject_bad_scores(inserted, held_out, message):
    with pytest.raises(ValueError, match=message):
        gaussian_epsilon_lower_bound(inserted, held_out, 1e-5)
    with pytest.raises(ValueError, match=message):
        threshold_epsilon_lower_bound(inserted, held_out, 1e-5)


def test_bounds_reject_a_bad_confidence():
    with pytest.raises(ValueError, match="confidence must be in"):
        gaussian_epsilon_lower_bound([1.0, 2.0], [0.0, 1.0], 1e-5, confidence=1.0)


# ----------------------------------------------------------------------------- threshold test
@pytest.mark.parametrize(("k", "n", "confidence"), [(0, 20, 0.95), (7, 20, 0.95), (20, 20, 0.9), (13, 100, 0.99)])
def test_clopper_pearson_matches_scipy_binomtest(k, n, confidence):
    reference = stats.binomtest(k, n).proportion_ci(confidence, method="exact")
    low, high = clopper_pearson(k, n, confidence)
    assert low == pytest.approx(reference.low, abs=1e-12)
    assert high == pytest.approx(reference.high, abs=1e-12)


def test_clopper_pearson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="successes <= trials"):
        clopper_pearson(5, 4, 0.95)


def test_threshold_bound_of_separated_scores_is_limited_by_the_sample_size():
    bound = threshold_epsilon_lower_bound(np.arange(100.0) + 1000, np.arange(100.0), 1e-5)
    # no false positive in 100 held-out scores cannot prove an FPR below ~3.7e-2 (Bonferroni at 200 thresholds)
    assert 2.0 < bound.lower < math.log(100)
    assert bound.estimate == math.inf


def test_threshold_bound_of_indistinguishable_scores_is_small():
    rng = np.random.default_rng(11)
    bound = threshold_epsilon_lower_bound(rng.normal(0, 1, 500), rng.normal(0, 1, 500), 1e-5)
    assert bound.lower < 0.1


def test_threshold_bound_never_exceeds_the_true_epsilon():
    rng = np.random.default_rng(12)
    mu, delta = 2.0, 1e-5
    for _ in range(20):
        bound = threshold_epsilon_lower_bound(rng.normal(mu, 1, 300), rng.normal(0, 1, 300), delta)
        assert bound.lower <= _gdp_epsilon_reference(mu, delta)


def test_mu_lower_bound_beyond_the_stable_noncentral_t_is_conservative(monkeypatch):
    import biofed.apps.audit_stats as audit_stats

    rng = np.random.default_rng(4)
    inserted, held_out = rng.normal(200.0, 1.0, 16), rng.normal(0.0, 1.0, 17)
    exact = gdp_mu_lower_bound(inserted, held_out)
    monkeypatch.setattr(audit_stats, "_NCT_STABLE_T", 1.0)
    closed_form = gdp_mu_lower_bound(inserted, held_out)
    assert closed_form[0] == exact[0]
    assert 0.9 * exact[1] < closed_form[1] < exact[1]
    # a noiseless release: scores differ by rounding only, the bound stays finite and huge
    monkeypatch.undo()
    mu_hat, mu_lower = gdp_mu_lower_bound(3.0 + rng.normal(0, 1e-15, 16), rng.normal(0, 1e-15, 17))
    assert 1e12 < mu_lower < mu_hat < math.inf
