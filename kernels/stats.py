"""Streaming, mergeable standardization statistics (count, mean, sum of squared deviations).

A device folds every new block of feature rows into its :class:`Moments` with
:func:`moments_update`; two devices (or two threads) combine theirs with
:func:`moments_merge`. Both use the pairwise update of Chan, Golub and LeVeque, so the
result equals the mean and variance of the concatenated data up to rounding, whatever
the chunking, and never forms the catastrophic ``E[x^2] - E[x]^2``.

Statistics are always accumulated in float64, whatever the input dtype.

References
----------
.. [1] T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating formulae and a pairwise
   algorithm for computing sample variances", Stanford CS tech. report STAN-CS-79-773
   (1979), eq. 2.1b.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from biofed.kernels._validation import check_float_array, check_nonnegative_float, check_positive_int

__all__ = [
    "SCALE_FLOOR_REL",
    "Moments",
    "moments_init",
    "moments_update",
    "moments_merge",
    "moments_scale",
    "standard_scale",
]

SCALE_FLOOR_REL = 1e-9
"""A feature whose standard deviation is at most ``SCALE_FLOOR_REL * max(1, |mean|)`` is constant
(see :func:`standard_scale`)."""


class Moments(NamedTuple):
    """Running per-feature statistics.

    Attributes
    ----------
    count : float
        Number of rows seen (a float so weighted merges stay exact).
    mean : ndarray, shape (d,), float64
        Per-feature mean.
    m2 : ndarray, shape (d,), float64
        Per-feature sum of squared deviations from ``mean``; variance = ``m2 / count``.
    """

    count: float
    mean: np.ndarray
    m2: np.ndarray


@njit(cache=True, nogil=True)
def _block_moments(x, mean, m2):
    """Two-pass mean and sum of squared deviations of ``x`` (N, d) into ``mean``/``m2`` (d,)."""
    n, d = x.shape
    for j in range(d):
        mean[j] = 0.0
        m2[j] = 0.0
    for i in range(n):
        for j in range(d):
            mean[j] += x[i, j]
    for j in range(d):
        mean[j] /= n
    for i in range(n):
        for j in range(d):
            dev = x[i, j] - mean[j]
            m2[j] += dev * dev


@njit(cache=True, nogil=True)
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b, mean_out, m2_out):
    """Chan et al. pairwise combination; returns the merged count, fills ``mean_out``/``m2_out``."""
    total = count_a + count_b
    if count_a == 0.0:
        mean_out[:] = mean_b
        m2_out[:] = m2_b
        return count_b
    if count_b == 0.0:
        mean_out[:] = mean_a
        m2_out[:] = m2_a
        return count_a
    frac = count_b / total
    weight = count_a * count_b / total
    for j in range(mean_a.shape[0]):
        delta = mean_b[j] - mean_a[j]
        mean_out[j] = mean_a[j] + delta * frac
        m2_out[j] = m2_a[j] + m2_b[j] + delta * delta * weight
    return total


def _check_moments(m, name: str) -> Moments:
    if not isinstance(m, tuple) or len(m) != 3:
        raise TypeError(
            f"{name} must be a Moments(count, mean, m2) tuple, got {type(m).__name__}; use moments_init(d)."
        )
    count, mean, m2 = m
    count = check_nonnegative_float(count, f"{name}.count")
    mean = np.asarray(check_float_array(mean, f"{name}.mean", ndim=1), dtype=np.float64)
    m2 = np.asarray(check_float_array(m2, f"{name}.m2", ndim=1), dtype=np.float64)
    if mean.shape != m2.shape:
        raise ValueError(f"{name}.mean and {name}.m2 must have the same shape, got {mean.shape} and {m2.shape}.")
    if np.any(m2 < 0):
        raise ValueError(f"{name}.m2 holds negative sums of squares; it was not produced by moments_update.")
    return Moments(count, mean, m2)


def moments_init(d: int) -> Moments:
    """Return empty statistics for ``d`` features.

    Parameters
    ----------
    d : int
        Number of features, >= 1.

    Returns
    -------
    moments : Moments
        ``count = 0.0``, ``mean`` and ``m2`` zeros of shape (d,), float64.
    """
    d = check_positive_int(d, "d")
    return Moments(0.0, np.zeros(d), np.zeros(d))


def moments_update(m: Moments, X) -> Moments:
    """Fold a block of rows into running statistics.

    Parameters
    ----------
    m : Moments
        Current statistics for d features (not modified).
    X : array-like, shape (N, d)
        New rows, finite. A 1-D array of length d is one row.

    Returns
    -------
    moments : Moments
        Statistics of everything seen so far plus ``X``.
    """
    m = _check_moments(m, "m")
    x = check_float_array(X, "X", ndim=(1, 2))
    if x.ndim == 1:
        x = x[None, :]
    d = m.mean.shape[0]
    if x.shape[1] != d:
        raise ValueError(f"X must have {d} columns to match the moments, got shape {x.shape}.")
    mean_b = np.empty(d)
    m2_b = np.empty(d)
    _block_moments(np.ascontiguousarray(x, dtype=np.float64), mean_b, m2_b)
    mean = np.empty(d)
    m2 = np.empty(d)
    count = _chan_merge(m.count, m.mean, m.m2, float(x.shape[0]), mean_b, m2_b, mean, m2)
    return Moments(float(count), mean, m2)


def moments_merge(a: Moments, b: Moments) -> Moments:
    """Combine the statistics of two disjoint sets of rows (Chan et al. [1]_).

    Parameters
    ----------
    a, b : Moments
        Statistics over the same d features.

    Returns
    -------
    moments : Moments
        Statistics of the union; ``moments_merge(a, b)`` equals ``moments_merge(b, a)`` up to rounding.
    """
    a = _check_moments(a, "a")
    b = _check_moments(b, "b")
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"cannot merge moments over {a.mean.shape[0]} and {b.mean.shape[0]} features.")
    d = a.mean.shape[0]
    mean = np.empty(d)
    m2 = np.empty(d)
    count = _chan_merge(a.count, a.mean, a.m2, b.count, b.mean, b.m2, mean, m2)
    return Moments(float(count), mean, m2)


def moments_scale(m: Moments) -> np.ndarray:
    """Population standard deviation (ddof=0) with 1 for constant features (:func:`standard_scale`).

    Parameters
    ----------
    m : Moments
        Statistics of at least one row.

    Returns
    -------
    std : ndarray, shape (d,), float64
        Strictly positive, ready to be the ``scale`` of :func:`biofed.kernels.transform`.
    """
    m = _check_moments(m, "m")
    if m.count == 0:
        raise ValueError("moments hold no rows (count == 0); call moments_update with data first.")
    return standard_scale(m.mean, m.m2 / m.count)


def standard_scale(mean, variance) -> np.ndarray:
    """The scale that standardizes features of this mean and variance: the standard deviation,
    with 1 where the feature is constant.

    The one scale floor of biofed: devices, the coordinator's moments phase and the kernels'
    streaming moments all standardize with it. A feature counts as constant when its standard
    deviation is at most ``SCALE_FLOOR_REL * max(1, |mean|)`` (rounding level, as in
    scikit-learn's scalers) or its variance is negative (a noised estimate); dividing by a
    deviation that small would turn rounding or noise into huge standardized values.

    Parameters
    ----------
    mean, variance : array-like, shape (d,)
        Finite per-feature mean and (population, possibly noised) variance.

    Returns
    -------
    scale : ndarray, shape (d,), float64
        Strictly positive, ready to be the ``scale`` of :func:`biofed.kernels.transform`.

    Examples
    --------
    >>> standard_scale([0.0, 5.0, 1e6, 0.0], [4.0, 0.0, 1e-12, -1.0]).tolist()
    [2.0, 1.0, 1.0, 1.0]
    """
    mean = np.asarray(mean, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    if mean.ndim != 1 or mean.shape != variance.shape:
        raise ValueError(
            f"mean and variance must be 1-D of equal length, got shapes {mean.shape} and {variance.shape}."
        )
    if not (np.isfinite(mean).all() and np.isfinite(variance).all()):
        raise ValueError("mean and variance must be finite.")
    std = np.sqrt(np.maximum(variance, 0.0))
    std[std <= SCALE_FLOOR_REL * np.maximum(1.0, np.abs(mean))] = 1.0
    return std
