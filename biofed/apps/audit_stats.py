"""Statistics of the empirical privacy audit (:mod:`biofed.apps.audit`): pure functions on arrays.

The audit inserts *canaries* into a federation: clients whose update is ``C * c`` for a secret
unit direction ``c`` (Andrew et al. 2023, "One-shot empirical privacy estimation for federated
learning"). For each canary the adversary computes a score: the sum over the rounds it saw of
the projection of what it saw (a released model delta, or a device's update) onto ``c``.
*Held-out* directions, drawn with the inserted ones but never inserted, give the scores of the
null hypothesis. Under a Gaussian mechanism of noise multiplier ``z`` run ``T`` times, inserted
and held-out scores are Gaussian with one variance and their means differ by ``sqrt(T) / z``
standard deviations: the pair is ``mu``-GDP with ``mu = sqrt(T) / z``, and the distance
between the two score distributions *is* the privacy the adversary gets.

Two lower bounds on epsilon come out of the scores:

:func:`gaussian_epsilon_lower_bound`
    Andrew et al.'s Gaussian fit, with a confidence bound: the standardized mean difference of
    two equal-variance Gaussian samples follows a noncentral t distribution, which gives an
    exact lower confidence bound on ``mu``; its epsilon at ``delta`` is the epsilon of the
    Gaussian mechanism with ``z = 1 / mu`` (dp-accounting's analytic Gaussian privacy loss).
    Valid when the scores are Gaussian, which they are for biofed's Gaussian mechanisms.
:func:`threshold_epsilon_lower_bound`
    Distribution-free: the threshold test "score > t" has true and false positive rates
    bounded with Clopper-Pearson intervals; ``(TPR - delta) / FPR <= exp(epsilon)`` for any
    ``(epsilon, delta)``-DP mechanism (and the same with the negatives). The threshold is
    chosen among the observed scores, so every candidate is tested at a Bonferroni-corrected
    level. It needs many canaries to say much and is reported beside the Gaussian bound.

Canary directions
-----------------
A canary must not be hidden by the honest devices' updates. Andrew et al. rely on millions of
parameters, where random directions are orthogonal to everything. biofed's models are small,
so the canaries live where honest updates have no component: the softmax output is unchanged
when the same number is added to every class's logit, so the gradient of the cross-entropy
(and every SGD update built from it, without L2 or Adam) has no component along "the same
value in every class column" of each row of the output layer, and of its bias
(:func:`softmax_invariant_basis`). The DP noise is isotropic, so there the mechanism meets the
canary alone. :func:`canary_directions` draws orthonormal directions in that subspace, so
inserted canaries do not interfere with each other or with the held-out ones either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

__all__ = [
    "EpsilonBound",
    "canary_directions",
    "clopper_pearson",
    "epsilon_of_gdp",
    "gaussian_epsilon_lower_bound",
    "gdp_mu_lower_bound",
    "softmax_invariant_basis",
    "threshold_epsilon_lower_bound",
]


@dataclass(frozen=True)
class EpsilonBound:
    """An epsilon lower bound at ``confidence`` and what it was computed from.

    ``estimate`` is the point estimate (epsilon of the fitted ``mu`` for the Gaussian method,
    of the observed rates for the threshold test); ``lower`` holds with probability
    ``>= confidence`` over the canaries. ``mu`` / ``mu_lower`` are the fitted GDP parameter
    and its lower bound (Gaussian method only).
    """

    method: str
    lower: float
    estimate: float
    confidence: float
    delta: float
    n_inserted: int
    n_held_out: int
    mu: float | None = None
    mu_lower: float | None = None


def _scores(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"{name} must be a 1-d array of at least 2 scores, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite (no NaN or inf scores)")
    return array


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    return float(confidence)


def _check_delta(delta: float) -> float:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), e.g. 1e-5, got {delta!r}")
    return float(delta)


_NCT_STABLE_T = 1e3
"""Above this t statistic :func:`gdp_mu_lower_bound` uses a closed-form (conservative) bound."""


# ----------------------------------------------------------------------------- directions
def softmax_invariant_basis(n_inputs: int, n_classes: int, hidden: int = 0) -> np.ndarray:
    """Orthonormal basis (P, m) of the parameter directions a softmax model's output ignores.

    For the flat layout of :mod:`biofed.kernels.training` (logistic regression ``W (d, c) | b
    (c,)``, or the MLP's output layer ``W2 (h, c) | b2 (c,)``), basis vector ``j`` puts
    ``1 / sqrt(c)`` in every class column of row ``j`` of the output weights (``j`` in
    ``range(rows)``) or, for the last one, of the output bias: ``m = rows + 1`` with
    ``rows = d`` (logistic regression) or ``h`` (MLP). Cross-entropy gradients are orthogonal
    to all of them.
    """
    for value, name in ((n_inputs, "n_inputs"), (n_classes, "n_classes")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 0:
        raise ValueError(f"hidden must be an integer >= 0, got {hidden!r}")
    d, c, h = int(n_inputs), int(n_classes), int(hidden)
    if c < 2:
        raise ValueError(f"n_classes must be >= 2 for a softmax model, got {c}")
    rows = d if h == 0 else h
    n_params = d * c + c if h == 0 else d * h + h + h * c + c
    start = 0 if h == 0 else d * h + h  # first entry of the output weights
    basis = np.zeros((n_params, rows + 1))
    for j in range(rows):
        basis[start + j * c : start + (j + 1) * c, j] = 1.0 / math.sqrt(c)
    basis[n_params - c :, rows] = 1.0 / math.sqrt(c)
    return basis


def canary_directions(subspace: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` orthonormal directions (n, P) drawn uniformly (Haar) inside ``subspace`` (P, m).

    ``subspace`` must have orthonormal columns and ``n <= m``. The directions are the first
    ``n`` columns of a Haar-random orthogonal matrix (QR of a Gaussian matrix with the signs
    of R's diagonal fixed) mapped into the subspace.
    """
    basis = np.asarray(subspace, dtype=np.float64)
    if basis.ndim != 2:
        raise ValueError(f"subspace must be a (P, m) matrix, got shape {basis.shape}")
    m = basis.shape[1]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= m:
        raise ValueError(f"n must be an integer in [1, {m}] (the subspace dimension), got {n!r}")
    if not np.allclose(basis.T @ basis, np.eye(m), atol=1e-10):
        raise ValueError("subspace must have orthonormal columns")
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    q *= np.sign(np.diag(r))
    return (basis @ q[:, :n]).T


# ----------------------------------------------------------------------------- Gaussian fit
def epsilon_of_gdp(mu: float, delta: float) -> float:
    """Epsilon at ``delta`` of a ``mu``-GDP mechanism: the Gaussian mechanism with noise
    multiplier ``1 / mu`` (dp-accounting's analytic :class:`GaussianPrivacyLoss`). 0 for
    ``mu <= 0``, ``inf`` for ``mu = inf``."""
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

    delta = _check_delta(delta)
    if math.isnan(mu):
        raise ValueError("mu must not be NaN")
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    loss = GaussianPrivacyLoss(standard_deviation=1.0 / mu, sensitivity=1.0, pessimistic_estimate=False)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    high = 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        high *= 2.0
        if high > 1e6:
            return math.inf
    return float(optimize.brentq(lambda eps: loss.get_delta_for_epsilon(eps) - delta, 0.0, high, xtol=1e-10))


def gdp_mu_lower_bound(inserted, held_out, confidence: float = 0.95) -> tuple[float, float]:
    """``(mu_hat, mu_lower)``: the standardized mean difference of the scores and its lower
    confidence bound, for two Gaussian samples with a common variance.

    ``t = mu_hat * sqrt(n1 n0 / (n1 + n0))`` follows a noncentral t distribution with
    ``n1 + n0 - 2`` degrees of freedom and noncentrality ``mu * sqrt(n1 n0 / (n1 + n0))``;
    ``mu_lower`` is the noncentrality (rescaled) at which the observed ``t`` is the upper
    ``1 - confidence`` quantile. Scores with no spread give ``(inf, inf)`` when the inserted
    ones are larger.
    """
    x1, x0 = _scores(inserted, "inserted"), _scores(held_out, "held_out")
    confidence = _check_confidence(confidence)
    n1, n0 = x1.size, x0.size
    df = n1 + n0 - 2
    pooled = (((x1 - x1.mean()) ** 2).sum() + ((x0 - x0.mean()) ** 2).sum()) / df
    gap = x1.mean() - x0.mean()
    if pooled <= 0:
        return (math.inf, math.inf) if gap > 0 else (0.0, -math.inf)
    mu_hat = gap / math.sqrt(pooled)
    scale = math.sqrt(n1 * n0 / (n1 + n0))
    t_obs = mu_hat * scale
    alpha = 1.0 - confidence
    if t_obs > _NCT_STABLE_T:
        # far beyond any epsilon a ledger claims, where scipy's noncentral t loses precision: the
        # bound splits alpha between the normal and the chi-square parts of T = (Z + nc) / sqrt(V / df)
        spread = math.sqrt(stats.chi2.ppf(alpha / 2, df) / df)
        return float(mu_hat), float((t_obs * spread - stats.norm.ppf(1 - alpha / 2)) / scale)

    def excess(nc: float) -> float:  # P(T >= t_obs | nc) - alpha, increasing in nc
        return float(stats.nct.sf(t_obs, df, nc)) - alpha

    low, high = t_obs - 10.0, t_obs + 1.0
    while excess(low) > 0:
        low -= 10.0 + abs(low)
    while excess(high) < 0:
        high += 10.0 + abs(high)
    nc = optimize.brentq(excess, low, high, xtol=1e-10)
    return float(mu_hat), float(nc / scale)


def gaussian_epsilon_lower_bound(inserted, held_out, delta: float, confidence: float = 0.95) -> EpsilonBound:
    """Epsilon lower bound at ``confidence`` from a Gaussian fit of the canary scores
    (:func:`gdp_mu_lower_bound` then :func:`epsilon_of_gdp`)."""
    delta = _check_delta(delta)
    mu_hat, mu_lower = gdp_mu_lower_bound(inserted, held_out, confidence)
    return EpsilonBound(
        method="gaussian",
        lower=epsilon_of_gdp(mu_lower, delta),
        estimate=epsilon_of_gdp(mu_hat, delta),
        confidence=confidence,
        delta=delta,
        n_inserted=len(inserted),
        n_held_out=len(held_out),
        mu=mu_hat,
        mu_lower=mu_lower,
    )


# ----------------------------------------------------------------------------- threshold test
def clopper_pearson(successes, trials, confidence: float):
    """Two-sided Clopper-Pearson interval ``(low, high)`` of a binomial proportion at ``confidence``
    (element-wise for arrays of ``successes`` / ``trials``)."""
    k, n = np.asarray(successes), np.asarray(trials)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    alpha = 1.0 - _check_confidence(confidence)
    with np.errstate(invalid="ignore"):  # the edge cases are set explicitly
        low = np.where(k == 0, 0.0, stats.beta.ppf(alpha / 2, k, n - k + 1))
        high = np.where(k == n, 1.0, stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(
            numerator <= 0, 0.0, np.where(denominator <= 0, np.inf, np.log(np.maximum(numerator, 1e-300) / denominator))
        )
    return np.maximum(ratio, 0.0)


def threshold_epsilon_lower_bound(inserted, held_out, delta: float, confidence: float = 0.95) -> EpsilonBound:
    """Distribution-free epsilon lower bound from the best threshold test "score > t".

    Every observed score is a candidate threshold; each candidate's true and false positive
    rates get Clopper-Pearson intervals at level ``1 - (1 - confidence) / K`` (K candidates,
    Bonferroni), so the maximum over candidates of
    ``max(log((TPR_low - delta) / FPR_high), log((TNR_low - delta) / FNR_high))``
    holds at ``confidence``.
    """
    x1, x0 = _scores(inserted, "inserted"), _scores(held_out, "held_out")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    thresholds = np.unique(np.concatenate([x1, x0]))
    level = 1.0 - (1.0 - confidence) / thresholds.size
    n1, n0 = x1.size, x0.size
    tp = n1 - np.searchsorted(np.sort(x1), thresholds, side="right")  # scores > t
    fp = n0 - np.searchsorted(np.sort(x0), thresholds, side="right")
    tpr_low, fnr_high = clopper_pearson(tp, n1, level)[0], clopper_pearson(n1 - tp, n1, level)[1]
    fpr_high, tnr_low = clopper_pearson(fp, n0, level)[1], clopper_pearson(n0 - fp, n0, level)[0]
    best_lower = float(max(_log_ratio(tpr_low - delta, fpr_high).max(), _log_ratio(tnr_low - delta, fnr_high).max()))
    tpr, fpr = tp / n1, fp / n0
    best_estimate = float(max(_log_ratio(tpr - delta, fpr).max(), _log_ratio(1 - fpr - delta, 1 - tpr).max()))
    return EpsilonBound(
        method="threshold",
        lower=best_lower,
        estimate=best_estimate,
        confidence=confidence,
        delta=delta,
        n_inserted=x1.size,
        n_held_out=x0.size,
    )
