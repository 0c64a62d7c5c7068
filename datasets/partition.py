"""Split data across federated devices: naturally by subject, or label-skewed by a Dirichlet draw.

Both functions are deterministic: :func:`partition_by_subject` keeps first-appearance order,
:func:`dirichlet_label_partition` depends only on its arguments and ``random_state``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from biofed.datasets.recording import Recording
from biofed.kernels.random_state import check_random_state

__all__ = ["dirichlet_label_partition", "partition_by_subject"]


def partition_by_subject(recordings: Iterable[Recording]) -> dict[str, list[Recording]]:
    """Group recordings by subject: one device per subject, the natural federated split.

    Parameters
    ----------
    recordings : iterable of Recording
        Each must have ``subject`` set.

    Returns
    -------
    dict[str, list[Recording]]
        Subjects in order of first appearance; recordings keep their input order.

    Raises
    ------
    ValueError
        If a recording has no subject (the message names its source).
    """
    groups: dict[str, list[Recording]] = {}
    for rec in recordings:
        if not isinstance(rec, Recording):
            raise TypeError(f"partition_by_subject expects Recording objects, got {type(rec).__name__}.")
        if rec.subject is None:
            raise ValueError(
                f"{rec.source}: recording has no subject; set Recording.subject (dataclasses.replace) "
                "or split by label with dirichlet_label_partition."
            )
        groups.setdefault(rec.subject, []).append(rec)
    return groups


def dirichlet_label_partition(
    labels, n_devices: int, alpha: float, *, random_state=None, min_size: int = 0
) -> list[np.ndarray]:
    """Label-skewed (non-IID) split of sample indices over devices.

    For each class, device shares are drawn from ``Dirichlet(alpha * ones(n_devices))`` and
    the class's shuffled indices are cut at the cumulative shares (Hsu et al., 2019). Small
    ``alpha`` (0.1) gives each device few classes; large ``alpha`` (100) approaches IID.

    Parameters
    ----------
    labels : array-like, shape (N,)
        Class label of every sample (any hashable values numpy can sort).
    n_devices : int
        Number of devices (>= 1).
    alpha : float
        Dirichlet concentration, finite and > 0.
    random_state : int, numpy.random.Generator or None
        Randomness source; equal seeds give equal partitions.
    min_size : int
        Redraw until every device holds at least this many samples (default 0: devices
        may be empty). At most 1000 draws; raises if the constraint cannot be met.

    Returns
    -------
    list of ndarray of int64, length n_devices
        Sorted indices per device; every index in ``range(N)`` appears exactly once.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {y.shape}.")
    if y.size == 0:
        raise ValueError("labels is empty; nothing to partition.")
    if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ValueError(f"n_devices must be an integer >= 1, got {n_devices!r}.")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be finite and > 0, got {alpha!r}.")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}.")
    if min_size * n_devices > y.size:
        raise ValueError(
            f"min_size={min_size} for {n_devices} devices needs {min_size * n_devices} samples, got {y.size}."
        )
    rng = check_random_state(random_state)
    classes, inverse = np.unique(y, return_inverse=True)
    by_class = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(n_devices, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for device, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                parts[device].append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise ValueError(
        f"could not give every one of {n_devices} devices >= {min_size} samples in 1000 Dirichlet draws "
        f"with alpha={alpha}; raise alpha or lower min_size."
    )
