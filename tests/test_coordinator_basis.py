"""coordinator.basis: the two federated basis phases against NumPy on pooled data."""

from __future__ import annotations

import numpy as np
import pytest

from biofed.coordinator.basis import aggregate_statistics, basis_from_covariance, standardization_from_moments
from biofed.kernels import standard_scale


def _devices(n_devices=5, rows=200, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return [
        rng.normal(size=(rows, d)) @ mixing * rng.uniform(0.5, 3, size=d) + rng.normal(size=d) * 4
        for _ in range(n_devices)
    ]


def _moments(X):
    return np.concatenate([X.mean(0), (X**2).mean(0)])


def _covariance(X, mean, scale):
    Z = (X - mean) / scale
    return (Z.T @ Z / len(Z)).ravel()


def test_equal_counts_match_pooled_data():
    devices = _devices()
    pooled = np.vstack(devices)
    big = 1e9  # clip far above every norm: no clipping
    stat, n_clipped = aggregate_statistics([_moments(X) for X in devices], big)
    assert n_clipped == 0
    mean, scale = standardization_from_moments(stat)
    np.testing.assert_allclose(mean, pooled.mean(0), rtol=1e-12)
    np.testing.assert_allclose(scale, pooled.std(0), rtol=1e-9)

    cov, _ = aggregate_statistics([_covariance(X, mean, scale) for X in devices], big)
    components, eigenvalues = basis_from_covariance(cov, k=3)
    Z = (pooled - pooled.mean(0)) / pooled.std(0)
    _, S, Vt = np.linalg.svd(Z, full_matrices=False)
    np.testing.assert_allclose(eigenvalues, S[:3] ** 2 / len(Z), rtol=1e-9)
    # same subspace and, with the sign rule applied to the reference, the same vectors
    ref = Vt[:3] * np.sign(Vt[:3][np.arange(3), np.abs(Vt[:3]).argmax(1)])[:, None]
    np.testing.assert_allclose(components, ref, atol=1e-8)
    np.testing.assert_allclose(components @ components.T, np.eye(3), atol=1e-12)


def test_unequal_counts_are_weighted_uniformly():
    a, b = _devices(2, rows=100, d=3, seed=1)
    b = b[:10]
    stat, _ = aggregate_statistics([_moments(a), _moments(b)], 1e9)
    np.testing.assert_allclose(stat[:3], (a.mean(0) + b.mean(0)) / 2)
    assert not np.allclose(stat[:3], np.vstack([a, b]).mean(0))


def test_clipping():
    stats = np.array([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    mean, n_clipped = aggregate_statistics(stats, 1.0)
    assert n_clipped == 1
    np.testing.assert_allclose(mean, ([0.6, 0.8] + stats[1]) / 2)


def test_variance_floor_keeps_scale_positive():
    # a constant feature, a noise-made negative variance and an ordinary one: the one scale rule
    mean, scale = standardization_from_moments(np.array([2.0, 1.0, 3.0, 4.0, 0.5, 13.0]))
    np.testing.assert_allclose(mean, [2.0, 1.0, 3.0])
    np.testing.assert_allclose(scale, [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(scale, standard_scale(mean, [0.0, -0.5, 4.0]))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: aggregate_statistics(np.zeros((0, 3)), 1.0), "non-empty"),
        (lambda: aggregate_statistics(np.array([[np.nan, 1.0]]), 1.0), "NaN or inf"),
        (lambda: aggregate_statistics(np.ones((2, 2)), 0.0), "clip_norm must be a finite number > 0"),
        (lambda: standardization_from_moments(np.ones(3)), "even length 2d"),
        (lambda: standardization_from_moments(np.array([1.0, np.inf])), "NaN or inf"),
        (lambda: basis_from_covariance(np.ones(5), 2), "not d\\*d"),
        (lambda: basis_from_covariance(np.ones((2, 3)), 2), r"\(d\*d,\) or \(d, d\)"),
        (lambda: basis_from_covariance(np.eye(3), 0), "k must be an integer >= 1"),
        (lambda: basis_from_covariance(np.full((2, 2), np.nan), 1), "NaN or inf"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_k_larger_than_d_and_sign_rule():
    cov = np.diag([1.0, 3.0, 2.0])
    components, eigenvalues = basis_from_covariance(-0.0 + cov, k=10)
    np.testing.assert_allclose(eigenvalues, [3.0, 2.0, 1.0])
    np.testing.assert_allclose(components, np.eye(3)[[1, 2, 0]])
