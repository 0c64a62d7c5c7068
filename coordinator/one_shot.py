"""One-shot private training from summed sufficient statistics (LDA / ridge).

Devices send :func:`biofed.edge.statistics.class_statistics` (clipped class means and
within-class scatter); the coordinator sums them and releases the sums once through the
privacy mechanism (:func:`release_class_statistics`: one charge covering both blocks, in the
live federation's packed layout) and
solves

    w_c = (S + lambda I)^-1 m_c,   b_c = -1/2 m_c^T (S + lambda I)^-1 m_c

with ``m_c`` the averaged class means and ``S`` the averaged within-class scatter
(symmetrized, its eigenvalues floored at 0). ``lambda`` shrinks toward the
nearest-class-mean rule, which is what survives heavy noise. Equal class priors: the task's
score is balanced accuracy.
"""

from __future__ import annotations

import numpy as np

from biofed.privacy_mechanism import Charge, ClippedSum, PrivacyMechanism
from biofed.protocol.statistics import STATISTICS_CLIP_NORM, pack_statistics, unpack_statistics

__all__ = ["release_class_statistics"]


def release_class_statistics(
    contributions,
    n_classes: int,
    *,
    means_clip: float,
    scatter_clip: float | None,
    noise_multiplier: float,
    mechanism: PrivacyMechanism,
    round: int = 0,
    kind: str = "statistics",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sum the devices' clipped statistics, release the sum once, return the noised averages.

    ``contributions`` is a sequence of :class:`~biofed.edge.statistics.ClassStatistics`. Each
    is packed as the live federation's devices pack theirs
    (:func:`biofed.protocol.statistics.pack_statistics`: both blocks in one vector of norm at
    most :data:`~biofed.protocol.statistics.STATISTICS_CLIP_NORM`), so the release is one
    Gaussian mechanism of multiplier ``noise_multiplier`` on that bound, charged once as
    ``Charge(round, kind, 1, noise_multiplier)``; the mechanism re-clips every packed vector,
    so a contribution that was not clipped cannot exceed the sensitivity. The device count is
    public. Returns ``(means (c, d), scatter (d, d) or None)``.
    """
    contributions = list(contributions)
    if not contributions:
        raise ValueError("one-shot training needs at least one device's statistics")
    z = float(noise_multiplier)
    rows = np.stack([pack_statistics(c.means, c.scatter, means_clip, scatter_clip) for c in contributions])
    (total,) = mechanism.release(
        Charge(round, kind, 1.0, z), ClippedSum(rows, STATISTICS_CLIP_NORM, z * STATISTICS_CLIP_NORM)
    )
    dim = contributions[0].means.shape[1]
    return unpack_statistics(total / len(contributions), n_classes, dim, means_clip, scatter_clip)
