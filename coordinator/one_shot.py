"""One-shot private training from summed sufficient statistics (LDA / ridge).

Devices send :func:`biofed.edge.statistics.class_statistics` (clipped class means and
within-class scatter); the coordinator sums them and releases the sums once through the
privacy mechanism (:func:`release_class_statistics`: one charge covering both blocks) and
solves

    w_c = (S + lambda I)^-1 m_c,   b_c = -1/2 m_c^T (S + lambda I)^-1 m_c

with ``m_c`` the averaged class means and ``S`` the averaged within-class scatter
(symmetrized, its eigenvalues floored at 0). ``lambda`` shrinks toward the
nearest-class-mean rule, which is what survives heavy noise. Equal class priors: the task's
score is balanced accuracy.
"""

from __future__ import annotations

import numpy as np

from biofed.privacy_mechanism import Charge, ClippedSum, PrivacyMechanism, joint_noise_multiplier

__all__ = ["lda_from_statistics", "release_class_statistics"]


def release_class_statistics(
    contributions,
    n_classes: int,
    *,
    means_clip: float,
    scatter_clip: float | None,
    noise_multiplier: float,
    mechanism: PrivacyMechanism,
    round: int = 0,
    kind: str = "train",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sum the devices' clipped statistics, release the sums once, return the noised averages.

    ``contributions`` is a sequence of :class:`~biofed.edge.statistics.ClassStatistics`; the
    mechanism re-clips each block to its bound (a device that did not clip cannot exceed the
    sensitivity) and adds noise of std ``noise_multiplier * clip`` to each summed block; the
    device count is public. The blocks form one release, charged as
    ``Charge(round, kind, 1, joint_noise_multiplier(z, blocks))`` (the same epsilon as one
    ``GaussianDpEvent(z)`` per block). Returns ``(means (c, d), scatter (d, d) or None)``.
    """
    contributions = list(contributions)
    if not contributions:
        raise ValueError("one-shot training needs at least one device's statistics")
    n = len(contributions)
    z = float(noise_multiplier)
    queries = [ClippedSum(np.stack([c.means.ravel() for c in contributions]), means_clip, z * means_clip)]
    if scatter_clip is not None:
        rows = np.stack([c.scatter.ravel() for c in contributions])
        queries.append(ClippedSum(rows, scatter_clip, z * scatter_clip))
    charge = Charge(round, kind, 1.0, joint_noise_multiplier(z, len(queries)))
    released = mechanism.release(charge, *queries)
    means = released[0].reshape(n_classes, -1) / n
    scatter = None
    if scatter_clip is not None:
        d = contributions[0].scatter.shape[0]
        scatter = released[1].reshape(d, d) / n
    return means, scatter


def lda_from_statistics(means, scatter, ridge: float) -> np.ndarray:
    """Logistic-regression-layout parameters (``W (d, c) | b (c,)``) of the regularized LDA.

    ``means`` (c, d); ``scatter`` (d, d) or None (then ``S = 0``: nearest class mean);
    ``ridge`` > 0.
    """
    means = np.asarray(means, dtype=np.float64)
    c, d = means.shape
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge!r}")
    if scatter is None:
        S = np.zeros((d, d))
    else:
        S = 0.5 * (np.asarray(scatter) + np.asarray(scatter).T)
        vals, vecs = np.linalg.eigh(S)
        S = (vecs * np.maximum(vals, 0.0)) @ vecs.T
    A = S + ridge * np.eye(d)
    W = np.linalg.solve(A, means.T)  # (d, c)
    b = -0.5 * np.einsum("dc,cd->c", W, means)
    return np.concatenate([W.ravel(), b])
