"""``random_state`` handling shared by the randomized kernels (scikit-learn convention)."""

from __future__ import annotations

import numbers

import numpy as np


def check_random_state(random_state) -> np.random.Generator:
    """Return a ``numpy.random.Generator`` for ``random_state``.

    Parameters
    ----------
    random_state : None, int or numpy.random.Generator
        None draws fresh OS entropy; an int >= 0 seeds a new PCG64 generator (same int, same
        stream); a Generator is used as is (and advanced), which lets a caller thread one
        generator through several calls. Global NumPy seeding is never read or changed.

    Returns
    -------
    rng : numpy.random.Generator
    """
    if random_state is None or isinstance(random_state, np.random.Generator):
        return np.random.default_rng(random_state)
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state}.")
        return np.random.default_rng(int(random_state))
    raise TypeError(
        f"random_state must be None, a non-negative int or a numpy.random.Generator, "
        f"got {type(random_state).__name__} {random_state!r}; use np.random.default_rng(seed)."
    )
