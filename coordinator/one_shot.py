"""One-shot private training from summed sufficient statistics, for ``biofed evaluate``.

The offline evaluation's twin of the live federation's statistics phase
(:func:`biofed.coordinator.phases.statistics_phase`): the devices' clipped class means and
within-class scatter (:func:`biofed.edge.statistics.class_statistics`) are packed as the
devices pack theirs, their sum is released once through the privacy mechanism
(:func:`release_class_statistics`) and the coordinator solves the ridge LDA
(:func:`biofed.coordinator.lda.lda_from_statistics`) from the noised averages.
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
