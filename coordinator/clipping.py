"""Adaptive clipping for client-level differential privacy.

:class:`AdaptiveClipping` is the clip-norm rule of Andrew et al. [1]_ as pure functions of
the current clip norm: nothing here draws noise or keeps state. Its noised clipped count is
released by :class:`biofed.privacy_mechanism.PrivacyMechanism` (:meth:`AdaptiveClipping.count_query`),
together with the update sum it is accounted with (:class:`biofed.coordinator.central_dp.DPAggregator`);
the clip norm itself lives in the coordinator's state. The coordinator's non-noise
randomness (device sampling, model initialisation) comes from
:func:`biofed.kernels.random_state.check_random_state`.

References
----------
.. [1] G. Andrew, O. Thakkar, H. B. McMahan, S. Ramaswamy, "Differentially private
   learning with adaptive clipping", NeurIPS 2021, arXiv:1905.03871.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from biofed.kernels._validation import check_nonnegative_float, check_positive_float
from biofed.privacy_mechanism import ClippedSum

logger = logging.getLogger(__name__)

__all__ = [
    "AdaptiveClipping",
    "delta_noise_multiplier",
]


def delta_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the model update once the clipped-count query is paid for.

    Andrew et al. [1]_ (Theorem 1) release the update sum with multiplier ``z_delta`` and
    the centred clipped-count sum (sensitivity 1/2) with noise ``sigma_b``; together they
    form one Gaussian mechanism of multiplier ``z`` when

        z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

    The privacy ledger records ``z``; the update noise uses ``z_delta * C``.

    Parameters
    ----------
    noise_multiplier : float
        The overall target z > 0 of the round.
    count_noise_std : float
        sigma_b, the std of the noise on the clipped-count sum; must exceed ``z / 2``.

    Returns
    -------
    float
        ``z_delta`` (> z).

    Raises
    ------
    ValueError
        When ``2 sigma_b <= z``: the count query alone would spend the whole budget.
    """
    z = check_positive_float(noise_multiplier, "noise_multiplier")
    sigma_b = check_positive_float(count_noise_std, "count_noise_std")
    remaining = z**-2 - (2.0 * sigma_b) ** -2
    if remaining <= 0:
        raise ValueError(
            f"count_noise_std={sigma_b!r} is too small for noise_multiplier={z!r}: the clipped-count "
            f"query needs 2 * count_noise_std > noise_multiplier (here {2 * sigma_b:g} <= {z:g}), "
            "otherwise no noise budget is left for the model update. Increase count_noise_std "
            "(Andrew et al. use about n_expected / 20)."
        )
    return remaining**-0.5


@dataclass(frozen=True)
class AdaptiveClipping:
    """Geometric clip-norm update tracking a target quantile of update norms [1]_.

    Each round every device reports ``b_i = 1[||delta_i|| <= C]``. The server estimates
    the fraction of unclipped updates from the centred, noised sum

        b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / n_expected + 1/2

    and moves the clip norm ``C <- C * exp(-eta * (b_bar - gamma))``. The centring by
    1/2 (as in Andrew et al. and TensorFlow Privacy's ``QuantileEstimatorQuery``) keeps
    the add/remove sensitivity of the count at 1/2, which is what
    :func:`delta_noise_multiplier` assumes; when ``n_expected`` equals the number of
    reports it equals ``(sum_i b_i + N(0, sigma_b^2)) / n_expected``.

    Parameters
    ----------
    target_quantile : float
        gamma in (0, 1): the fraction of updates that should end up unclipped.
    learning_rate : float
        eta > 0 of the geometric update (0.2 in the paper).
    count_noise_std : float
        sigma_b >= 0. Zero releases the count without noise (no DP for the count: only
        for non-private runs).
    """

    target_quantile: float
    learning_rate: float = 0.2
    count_noise_std: float = 0.0

    def __post_init__(self) -> None:
        gamma = float(self.target_quantile)
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}.")
        object.__setattr__(self, "target_quantile", gamma)
        object.__setattr__(self, "learning_rate", check_positive_float(self.learning_rate, "learning_rate"))
        object.__setattr__(self, "count_noise_std", check_nonnegative_float(self.count_noise_std, "count_noise_std"))

    def delta_noise_multiplier(self, noise_multiplier: float) -> float:
        """:func:`delta_noise_multiplier` with this estimator's ``count_noise_std``."""
        return delta_noise_multiplier(noise_multiplier, self.count_noise_std)

    def count_query(self, clipped_bits) -> ClippedSum:
        """The clipped-count query for the privacy mechanism: one row ``b_i - 1/2`` per
        reporting device (L2 bound 1/2), noise ``count_noise_std``.

        Parameters
        ----------
        clipped_bits : array-like of {0, 1} or bool, shape (n,)
            ``1`` where a device's update norm was <= the current clip.
        """
        bits = np.asarray(clipped_bits)
        if bits.ndim != 1:
            raise ValueError(f"clipped_bits must be 1-D (one bit per device), got shape {bits.shape}.")
        if bits.dtype.kind not in "biuf" or not np.all((bits == 0) | (bits == 1)):
            raise ValueError("clipped_bits must hold only 0/1 (or booleans), one per reporting device.")
        return ClippedSum((bits.astype(np.float64) - 0.5)[:, None], 0.5, self.count_noise_std)

    def next_clip(self, clip_norm: float, noised_centred_count: float, n_expected: int) -> float:
        """The clip norm after a round, from the released ``sum_i (b_i - 1/2) + N(0, sigma_b^2)``.

        Parameters
        ----------
        clip_norm : float
            The clip norm C > 0 the round used.
        noised_centred_count : float
            The released value of :meth:`count_query`.
        n_expected : int
            Denominator of the estimate (expected number of reports, >= 1).

        Returns
        -------
        float
            ``C * exp(-eta * (b_bar - gamma))``.
        """
        clip = check_positive_float(clip_norm, "clip_norm")
        if isinstance(n_expected, bool) or not isinstance(n_expected, (int, np.integer)) or n_expected < 1:
            raise ValueError(f"n_expected must be an integer >= 1, got {n_expected!r}.")
        b_bar = float(noised_centred_count) / int(n_expected) + 0.5
        new_clip = float(clip * math.exp(-self.learning_rate * (b_bar - self.target_quantile)))
        logger.debug("adaptive clipping: b_bar=%.4f -> clip=%.6g", b_bar, new_clip)
        return new_clip
