"""The held-out split of a device's feature windows, and the score measured on it.

One rule, used by the device agent (its training rows and the windows it evaluates the
global model on) and by ``biofed demo``'s centralized baseline, so federated and
centralized numbers are measured on exactly the same windows:

    per label, the **last** ``fraction`` of that label's windows in time order are held
    out, as one contiguous block.

Holding out a contiguous block (rather than a random sample) matters because windows
overlap (a 2 s window every 1 s): a random split would put the neighbours of every test
window into the training set, and the score would measure memorisation of the recording
rather than generalisation to later signal.
"""

from __future__ import annotations

import math

import numpy as np

from biofed.kernels import standard_scale

_BLOCK_ROWS = 2048

__all__ = ["HOLDOUT_FRACTION", "balanced_accuracy", "device_standardization", "holdout_split", "row_blocks"]

HOLDOUT_FRACTION = 0.2
"""Fraction of each label's windows held out for evaluation."""


def holdout_split(labels, t, fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Split windows into training and held-out sets, per label, by time.

    Parameters
    ----------
    labels : array-like, shape (N,)
        Label of every window (any hashable values; ``""`` is a label like any other:
        filter unlabelled windows out before or after, as needed).
    t : array-like, shape (N,)
        Window times (seconds, finite); ties keep their input order.
    fraction : float, default 0.2
        In [0, 1). For a label with n windows, ``ceil(fraction * n)`` of them are held out,
        except that a label with a single window keeps it for training.

    Returns
    -------
    train, held_out : ndarray of bool, shape (N,) each
        Disjoint masks covering every window.

    Raises
    ------
    ValueError
        Mismatched lengths, non-finite times or a fraction outside [0, 1).

    Examples
    --------
    >>> train, test = holdout_split(["a"] * 5 + ["b"] * 5, list(range(10)))
    >>> test.nonzero()[0].tolist()
    [4, 9]
    """
    labels = np.asarray(labels)
    t = np.asarray(t, dtype=np.float64)
    if labels.ndim != 1 or t.ndim != 1 or labels.shape != t.shape:
        raise ValueError(f"labels and t must be 1-D of equal length, got shapes {labels.shape} and {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("t contains NaN/inf; every window needs a finite time in seconds")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be a number in [0, 1), got {fraction!r}")
    held_out = np.zeros(labels.shape[0], dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        idx = idx[np.argsort(t[idx], kind="stable")]
        n_out = math.ceil(fraction * idx.size) if idx.size > 1 else 0
        if n_out:
            held_out[idx[idx.size - n_out :]] = True
    return ~held_out, held_out


def row_blocks(X: np.ndarray, rows: np.ndarray | None = None):
    """The rows ``X[rows]`` (all rows when ``rows`` is None), block by block, in order.

    ``X`` (N, d), ``rows`` (N,) bool. Yields (b, d) arrays of at most a few thousand rows, so a
    statistic of a device's training rows needs no (n, d) copy of them beside ``X``.
    """
    for start in range(0, X.shape[0], _BLOCK_ROWS):
        block = X[start : start + _BLOCK_ROWS]
        yield block if rows is None else block[rows[start : start + _BLOCK_ROWS]]


def device_standardization(X_train, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of a device's own training rows (device standardization).

    With ``[model] standardization = "device"`` every device z-scores its raw feature rows
    with these statistics before computing its basis statistic, training, evaluating and
    predicting: a per-subject calibration (standard practice across subjects in EEG), whose
    statistics never leave the device. They always come from the *training* split, so the
    held-out windows are standardized without looking at them (no leakage), and live
    windows the same way.

    Parameters
    ----------
    X_train : array-like, shape (N, d)
        The device's raw rows.
    rows : ndarray of bool, shape (N,), optional
        The training rows among them (at least one); all rows when None. The statistics are
        accumulated block by block (:func:`row_blocks`), without copying the training rows.

    Returns
    -------
    mean : ndarray, shape (d,)
    scale : ndarray, shape (d,)
        Standard deviation (ddof=0); 1 where the feature is constant on the device
        (:func:`biofed.kernels.standard_scale`), so ``scale > 0`` everywhere.

    Examples
    --------
    >>> mean, scale = device_standardization([[1.0, 5.0], [3.0, 5.0]])
    >>> mean.tolist(), scale.tolist()
    ([2.0, 5.0], [1.0, 1.0])
    >>> device_standardization([[1.0, 5.0], [3.0, 5.0], [9.0, 9.0]], np.array([True, True, False]))[0].tolist()
    [2.0, 5.0]
    """
    X = np.asarray(X_train, dtype=np.float64)
    if rows is not None:
        rows = np.asarray(rows)
        if rows.dtype != bool or rows.shape != X.shape[:1]:
            raise ValueError(
                f"rows must be a boolean mask with one entry per row of X {X.shape}, "
                f"got dtype {rows.dtype} and shape {rows.shape}"
            )
    if X.ndim != 2:
        n = 0
    else:
        n = X.shape[0] if rows is None else int(np.count_nonzero(rows))
    if n == 0:
        raise ValueError(
            f"device standardization needs a non-empty (n, d) array of training rows, got shape {X.shape} "
            f"with {n} training rows; a device without training windows cannot standardize"
        )
    total = np.zeros(X.shape[1])
    for block in row_blocks(X, rows):
        if not np.isfinite(block).all():
            raise ValueError("the training rows contain NaN/inf; drop those windows before standardizing")
        total += block.sum(axis=0)
    mean = total / n
    # the variance block by block: no (n, d) temporary of centred rows beside the rows themselves
    squares = np.zeros_like(mean)
    for block in row_blocks(X, rows):
        centred = block - mean
        squares += np.einsum("ij,ij->j", centred, centred)
    return mean, standard_scale(mean, squares / n)


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's definition).

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (N,)
        N >= 1.

    Returns
    -------
    float
        In [0, 1]; 0.5 for a constant prediction on two balanced-or-not classes.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {y_true.shape} and {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("balanced accuracy needs at least one window, got none")
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls))
