"""The two federated basis phases as pure functions (coordinator side).

Before training, the fleet agrees on a standardization and a k-dimensional feature basis
without pooling any data. Each device sends one clipped statistic per phase (a
:class:`biofed.protocol.Sketch`); with X the device's raw ``(n, d)`` training rows:

moments
    ``s_i = concat(mean(X, 0), mean(X**2, 0))`` (D = 2d). The coordinator averages the
    devices' statistics, ``mean = s[:d]``, ``var = s[d:] - mean**2``,
    ``scale = standard_scale(mean, var)`` (:func:`biofed.kernels.standard_scale`).
covariance
    ``s_i = (Z.T @ Z / n).ravel()`` with ``Z = (X - mean) / scale`` (D = d*d). The
    coordinator averages, symmetrizes and keeps the top-k eigenvectors
    (:func:`basis_from_covariance`).

Device standardization (``[model] standardization = "device"``, the default)
------------------------------------------------------------------------------
There is no moments phase: each device z-scores its rows with the mean and scale of its own
training split (never sent), so its covariance statistic is the correlation matrix of its
rows (entries in [-1, 1], diagonal 1, Frobenius norm between sqrt(d) and d whatever the raw
feature units). :func:`basis_from_covariance` is used unchanged; the published basis has
mean 0 and scale 1. Raw-feature moments, by contrast, have the norm of the feature scale
(heart rate in bpm next to log band powers and ECG volts), so noise calibrated to a clip
norm that large swamps them unless the fleet is very large. Clipping a
correlation matrix only rescales it (eigenvectors unchanged), and the signal-to-noise ratio
of the noised average, ``n / (z ||R_i||)`` per entry, does not depend on the clip norm once
it is below the norms: ``dp.basis_clip_norm = 1`` is a sound choice.

Uniform weighting
-----------------
:func:`aggregate_statistics` gives every device the same weight ``1/n``, whatever its
number of rows. That is what differential privacy needs: a device's row count is private
and unbounded, so weighting by it would make one device's influence (the sensitivity)
unbounded. With per-device clipping to C the *sum* has sensitivity C under add/remove of
one device, and the Gaussian mechanism adds ``N(0, (z C)^2)`` to it. The price is bias
when devices hold different amounts of data: the result is the mean of the devices'
means, which equals the pooled-data statistic exactly when every device has the same
count (and no clipping or noise changed anything), as the tests check.
"""

from __future__ import annotations

import logging

import numpy as np

from biofed.kernels import standard_scale
from biofed.kernels._validation import check_positive_float
from biofed.privacy_mechanism import ClippedSum

logger = logging.getLogger(__name__)

__all__ = [
    "aggregate_statistics",
    "basis_from_covariance",
    "standardization_from_moments",
]

_CLIP_TOLERANCE = 1e-9  # a device's own clipping lands at C up to rounding: not "clipped here"
_MOMENTS_RTOL = 1e-12
"""``E[x^2] - E[x]^2`` cancels: a variance within this fraction of ``E[x^2]`` is rounding, i.e. 0."""


def aggregate_statistics(statistics, clip_norm: float) -> tuple[np.ndarray, int]:
    """Uniform mean of the devices' statistics, each clipped to ``clip_norm``, without noise.

    The coordinator validates and averages sketches with it; a central-mode release of the
    same clipped sum goes through the privacy mechanism (:func:`biofed.coordinator.phases.basis_phase`).

    Parameters
    ----------
    statistics : array-like, shape (n, D)
        One row per device (already clipped by the device; clipped again here to C so a
        misbehaving device cannot exceed the sensitivity).
    clip_norm : float
        C > 0, the L2 bound of one device's statistic.

    Returns
    -------
    mean : ndarray, shape (D,)
        ``sum_i clip(s_i) / n``.
    n_clipped : int
        Statistics above C (beyond rounding) that this re-clipping shrank: devices that did
        not clip themselves.
    """
    stats = np.asarray(statistics, dtype=np.float64)
    if stats.ndim != 2 or stats.shape[0] == 0 or stats.shape[1] == 0:
        raise ValueError(
            f"statistics must be a non-empty (n_devices, D) array, got shape {stats.shape}; "
            "a basis phase needs at least one device's statistic."
        )
    if not np.isfinite(stats).all():
        raise ValueError("statistics contain NaN or inf; drop the offending device's sketch before aggregating.")
    c = check_positive_float(clip_norm, "clip_norm")
    total, norms = ClippedSum(stats, c, 0.0).clipped_total()
    n_clipped = int((norms > c * (1 + _CLIP_TOLERANCE)).sum())
    return total / stats.shape[0], n_clipped


def standardization_from_moments(statistic) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and scale from the averaged moments statistic.

    Parameters
    ----------
    statistic : array-like, shape (2d,)
        ``concat(E[x], E[x^2])`` averaged over devices (possibly noised).

    Returns
    -------
    mean : ndarray, shape (d,)
    scale : ndarray, shape (d,)
        ``standard_scale(E[x], E[x^2] - E[x]^2)`` (:func:`biofed.kernels.standard_scale`):
        the standard deviation, and 1 where the feature is constant (its variance within the
        rounding of the difference) or noise made the variance estimate negative, so the
        devices never divide by ~0. ``scale > 0``
        everywhere, as :class:`biofed.protocol.Basis` requires.
    """
    s = np.asarray(statistic, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or s.size % 2:
        raise ValueError(f"the moments statistic must be 1-D of even length 2d, got shape {s.shape}.")
    if not np.isfinite(s).all():
        raise ValueError("the moments statistic contains NaN or inf.")
    d = s.size // 2
    mean = s[:d].copy()
    var = s[d:] - mean**2
    var[np.abs(var) <= _MOMENTS_RTOL * np.abs(s[d:])] = 0.0
    scale = standard_scale(mean, var)
    n_floored = int(np.count_nonzero((scale == 1.0) & (var != 1.0)))
    if n_floored:
        logger.info("basis: %d of %d features constant or noise-dominated, their scale is 1", n_floored, d)
    return mean, scale


def basis_from_covariance(statistic, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenvectors of the averaged covariance statistic.

    Parameters
    ----------
    statistic : array-like, shape (d*d,) or (d, d)
        ``E[Z Z^T]`` of standardized features averaged over devices (possibly noised, so
        not exactly symmetric).
    k : int
        Basis rank requested; ``k' = min(k, d)`` components are returned.

    Returns
    -------
    components : ndarray, shape (k', d)
        Orthonormal rows, by decreasing eigenvalue, each with its largest-magnitude entry
        positive (a deterministic sign, so a re-run gives the same basis).
    eigenvalues : ndarray, shape (k',)
        Descending. Noise can make trailing ones negative.
    """
    s = np.asarray(statistic, dtype=np.float64)
    if s.ndim == 1:
        d = int(round(np.sqrt(s.size)))
        if d * d != s.size or d == 0:
            raise ValueError(f"the covariance statistic has {s.size} entries, which is not d*d for any d >= 1.")
        s = s.reshape(d, d)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"the covariance statistic must be (d*d,) or (d, d), got shape {s.shape}.")
    if not np.isfinite(s).all():
        raise ValueError("the covariance statistic contains NaN or inf.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}.")
    symmetric = 0.5 * (s + s.T)
    eigenvalues, eigenvectors = np.linalg.eigh(symmetric)
    k_eff = min(int(k), s.shape[0])
    order = np.argsort(eigenvalues)[::-1][:k_eff]
    components = eigenvectors[:, order].T.copy()
    pivots = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(k_eff), pivots])
    components *= np.where(signs == 0, 1.0, signs)[:, None]
    return components, eigenvalues[order]
