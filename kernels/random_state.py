"""The one place a ``random_state`` argument becomes a ``numpy.random.Generator`` (scikit-learn convention).

Every seedable part of biofed (randomized kernels, synthetic data, partitions, local training,
the coordinator's device sampling) takes its generator from :func:`check_random_state`.
Privacy noise never does: :class:`biofed.privacy_mechanism.PrivacyMechanism` draws it from its
own OS-seeded generator.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["check_random_state"]


def check_random_state(random_state=None) -> np.random.Generator:
    """Return a ``numpy.random.Generator`` for ``random_state``.

    Parameters
    ----------
    random_state : None, int, numpy.random.SeedSequence or numpy.random.Generator
        None draws fresh OS entropy (128 bits, unpredictable); an int >= 0 or a SeedSequence
        seeds a new PCG64 generator (same seed, same stream); a Generator is used as is (and
        advanced), which lets a caller thread one generator through several calls. Global
        NumPy seeding is never read or changed.

    Returns
    -------
    rng : numpy.random.Generator

    Raises
    ------
    TypeError
        ``random_state`` is of another type (a bool or float included).
    ValueError
        A negative int.

    Examples
    --------
    >>> rng = check_random_state(7)
    >>> check_random_state(rng) is rng
    True
    >>> int(check_random_state(7).integers(100)) == int(rng.integers(100))
    True
    """
    if random_state is None or isinstance(random_state, (np.random.Generator, np.random.SeedSequence)):
        return np.random.default_rng(random_state)
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, (bool, np.bool_)):
        if random_state < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state}.")
        return np.random.default_rng(int(random_state))
    raise TypeError(
        f"random_state must be None, a non-negative int, a numpy.random.SeedSequence or a numpy.random.Generator, "
        f"got {type(random_state).__name__} {random_state!r}; use np.random.default_rng(seed)."
    )
