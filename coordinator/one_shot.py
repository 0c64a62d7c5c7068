"""One-shot private training from summed sufficient statistics (LDA / ridge).

Devices send :func:`biofed.edge.statistics.class_statistics` (clipped class means and
within-class scatter); the coordinator sums them, releases each sum once with Gaussian
noise (:func:`biofed.coordinator.release.release_statistics`, one ``GaussianDpEvent`` per
released block) and solves

    w_c = (S + lambda I)^-1 m_c,   b_c = -1/2 m_c^T (S + lambda I)^-1 m_c

with ``m_c`` the averaged class means and ``S`` the averaged within-class scatter
(symmetrized, its eigenvalues floored at 0). ``lambda`` shrinks toward the
nearest-class-mean rule, which is what survives heavy noise. Equal class priors: the task's
score is balanced accuracy.
"""

from __future__ import annotations

import dp_accounting
import numpy as np

from biofed.coordinator.lda import lda_from_statistics
from biofed.coordinator.release import ReleaseLedger, release_statistics

__all__ = ["lda_from_statistics", "release_class_statistics"]


def release_class_statistics(
    contributions,
    n_classes: int,
    *,
    means_clip: float,
    scatter_clip: float | None,
    noise_multiplier: float,
    ledger: ReleaseLedger,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sum the devices' clipped statistics, release each sum once, return the noised averages.

    ``contributions`` is a sequence of :class:`~biofed.edge.statistics.ClassStatistics`; the
    coordinator re-clips each to the bounds (a device that did not clip cannot exceed the
    sensitivity). Noise std is ``noise_multiplier * clip`` on each sum; the device count is
    public. Returns ``(means (c, d), scatter (d, d) or None)``.
    """
    from biofed.kernels.training import clip_l2

    contributions = list(contributions)
    if not contributions:
        raise ValueError("one-shot training needs at least one device's statistics")
    n = len(contributions)
    z = float(noise_multiplier)
    means_sum = sum(clip_l2(c.means.ravel(), means_clip)[0] for c in contributions)
    means = release_statistics(means_sum, z * means_clip, dp_accounting.GaussianDpEvent(z), ledger) / n
    scatter = None
    if scatter_clip is not None:
        scatter_sum = sum(clip_l2(c.scatter.ravel(), scatter_clip)[0] for c in contributions)
        scatter = release_statistics(scatter_sum, z * scatter_clip, dp_accounting.GaussianDpEvent(z), ledger) / n
        d = contributions[0].scatter.shape[0]
        scatter = scatter.reshape(d, d)
    return means.reshape(n_classes, -1), scatter
