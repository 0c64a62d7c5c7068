"""What a device contributes to one-shot training, and what it learns for itself alone.

:func:`class_statistics`
    The device's sufficient statistics for a linear discriminant: its per-class mean rows
    and its within-class scatter (normalized by its row count, so every device weighs the
    same), each clipped to an L2 bound. They travel packed in one vector
    (:mod:`biofed.protocol.statistics`); the sum over devices is released once through the
    privacy mechanism and the coordinator solves a ridge-regularized LDA
    (:func:`biofed.coordinator.lda.lda_from_statistics`): one private release instead of a
    round per step.
:func:`personalize`
    Fine-tunes the global model on the device's own labelled training windows. The result
    never leaves the device, so it costs no privacy; it is reported apart from the global
    model.
"""

from __future__ import annotations

import numpy as np

from biofed.kernels.training import clip_l2, train

__all__ = ["ClassStatistics", "class_statistics", "personalize"]


class ClassStatistics:
    """A device's clipped contribution: ``means`` (c, d) and ``scatter`` (d, d) or None."""

    __slots__ = ("means", "scatter")

    def __init__(self, means: np.ndarray, scatter: np.ndarray | None) -> None:
        self.means = means
        self.scatter = scatter


def class_statistics(X, y, n_classes: int, *, means_clip: float, scatter_clip: float | None) -> ClassStatistics:
    """Clipped per-class means and within-class scatter of one device's training rows.

    Parameters
    ----------
    X : array-like, shape (n, d)
        The device's (standardized or projected) training rows.
    y : array-like of int, shape (n,)
        Class indices in ``[0, n_classes)``; every class needs at least one row.
    means_clip : float
        L2 bound of the flattened (c, d) class means (the sensitivity of their sum).
    scatter_clip : float or None
        Frobenius bound of the (d, d) within-class scatter ``sum_c sum_{x in c} (x - m_c)(x - m_c)^T / n``;
        None leaves the scatter out (a diagonal-free, mean-difference classifier).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be (n, d) and y (n,), got {X.shape} and {y.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN/inf; drop those windows before computing statistics")
    missing = [c for c in range(n_classes) if not np.any(y == c)]
    if missing:
        raise ValueError(
            f"class(es) {missing} have no training window on this device; it cannot contribute class means"
        )
    means = np.stack([X[y == c].mean(axis=0) for c in range(n_classes)])
    clipped_means, _ = clip_l2(means.ravel(), means_clip)
    scatter = None
    if scatter_clip is not None:
        centred = X - means[y]
        scatter_full = centred.T @ centred / X.shape[0]
        scatter = clip_l2(scatter_full.ravel(), scatter_clip)[0].reshape(scatter_full.shape)
    return ClassStatistics(clipped_means.reshape(means.shape), scatter)


def personalize(
    global_params, X, y, n_classes: int, *, epochs: int = 20, lr: float = 0.01, prox_mu: float = 0.1, random_state=None
) -> np.ndarray:
    """The global logistic-regression model fine-tuned on the device's own labelled rows.

    Adam from the global parameters, with a FedProx pull ``prox_mu`` toward them so a few
    windows adapt the model rather than replace it. Returns the device's own parameters
    (same layout as ``global_params``); nothing of them is sent anywhere.
    """
    params, _ = train(
        global_params,
        X,
        y,
        n_classes,
        epochs=epochs,
        lr=lr,
        optimizer="adam",
        prox_mu=prox_mu,
        prox_center=global_params,
        random_state=random_state,
    )
    return params
