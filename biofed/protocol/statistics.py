"""The wire layout of a device's one-shot class statistics (the ``statistics`` phase).

A device sends its clipped class means ``M`` (c, k) and, optionally, its clipped
within-class scatter ``S`` (k, k) in the basis space as ONE vector

    v = concat(M.ravel() / C_m, S.ravel() / C_s) / sqrt(b)

with ``b`` the number of blocks (1 without the scatter, else 2). Sensitivity: each block is
clipped to its own bound (``||M||_F <= C_m``, ``||S||_F <= C_s``), so each scaled block has
norm <= 1 and ``||v||_2 <= sqrt(b) / sqrt(b) = 1``. One device's contribution to the sum of
the ``v`` therefore moves it by at most 1 (2 under replacement, the convention of every
clipped sum biofed releases), and ONE Gaussian mechanism of noise std ``z`` on that sum
covers both blocks: a single ledger entry of multiplier ``z``. De-scaled, the noise on the
summed means has std ``z sqrt(b) C_m`` per entry and on the summed scatter ``z sqrt(b) C_s``
(the same privacy as two separate releases of multiplier ``z sqrt(b)`` each).

Shared by the device (:func:`pack_statistics`) and the coordinator
(:func:`unpack_statistics`), so the layout is written once.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["STATISTICS_CLIP_NORM", "pack_statistics", "statistics_size", "unpack_statistics"]

STATISTICS_CLIP_NORM = 1.0
"""L2 bound of a packed vector (the sensitivity of a sum of them): each block is scaled by
its own bound, so the whole vector's norm is at most 1."""


def statistics_size(n_classes: int, k: int, with_scatter: bool) -> int:
    """Length of the packed vector: ``c k`` (+ ``k k`` with the scatter)."""
    return n_classes * k + (k * k if with_scatter else 0)


def pack_statistics(
    means: np.ndarray, scatter: np.ndarray | None, means_clip: float, scatter_clip: float | None
) -> np.ndarray:
    """The vector ``v`` of the module docstring from already clipped ``means`` (c, k) and
    ``scatter`` (k, k) or None; its L2 norm is at most 1 when the blocks respect their bounds."""
    if (scatter is None) != (scatter_clip is None):
        raise ValueError("scatter and scatter_clip must be given together (or neither)")
    blocks = [np.asarray(means, dtype=np.float64).ravel() / means_clip]
    if scatter is not None:
        blocks.append(np.asarray(scatter, dtype=np.float64).ravel() / scatter_clip)
    return np.concatenate(blocks) / math.sqrt(len(blocks))


def unpack_statistics(
    vector: np.ndarray, n_classes: int, k: int, means_clip: float, scatter_clip: float | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(means (c, k), scatter (k, k) or None)`` de-scaled from a packed vector (or a mean of
    packed vectors, which de-scales to the mean of the blocks).

    Raises
    ------
    ValueError
        ``vector`` is not of length :func:`statistics_size`.
    """
    with_scatter = scatter_clip is not None
    expected = statistics_size(n_classes, k, with_scatter)
    vector = np.asarray(vector, dtype=np.float64)
    if vector.shape != (expected,):
        raise ValueError(
            f"a statistics vector of {n_classes} classes in k={k} dimensions"
            f"{' with the scatter' if with_scatter else ''} has {expected} entries, got shape {vector.shape}"
        )
    scaled = vector * math.sqrt(2 if with_scatter else 1)
    means = scaled[: n_classes * k].reshape(n_classes, k) * means_clip
    scatter = scaled[n_classes * k :].reshape(k, k) * scatter_clip if with_scatter else None
    return means, scatter
