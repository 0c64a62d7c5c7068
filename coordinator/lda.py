"""The regularized LDA solved from averaged class statistics (no release, no noise).

Shared by the live federation's statistics phase (:func:`biofed.coordinator.phases.statistics_phase`,
whose release goes through the privacy mechanism) and the offline evaluation
(:mod:`biofed.coordinator.one_shot`)::

    w_c = (S + lambda I)^-1 m_c,   b_c = -1/2 m_c^T (S + lambda I)^-1 m_c

with ``m_c`` the averaged class means and ``S`` the averaged within-class scatter
(symmetrized, its eigenvalues floored at 0). ``lambda`` shrinks toward the
nearest-class-mean rule, which is what survives heavy noise. Equal class priors: the task's
score is balanced accuracy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lda_from_statistics"]


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
