"""Input validation shared by the public kernel wrappers.

Kernels validate once at the public boundary (scikit-learn style) and then trust their
arrays; the jitted workers never check anything. Every error says what arrived and how
to fix it.
"""

from __future__ import annotations

import math

import numpy as np


def check_float_array(
    x, name: str, *, ndim: int | tuple[int, ...], allow_nan: bool = False, check_finite: bool = True
) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32/float64 array after checking it.

    Parameters
    ----------
    x : array-like
        The user's input.
    name : str
        The parameter name used in error messages.
    ndim : int or tuple of int
        The accepted number(s) of dimensions.
    allow_nan : bool
        Accept NaN (never inf) when True.
    check_finite : bool
        False skips the scan for non-finite values, for kernels that find them in their own pass
        over the data and then call :func:`raise_if_nonfinite`.

    Returns
    -------
    array : ndarray
        float32 input stays float32; every other real dtype becomes float64.

    Raises
    ------
    TypeError
        When ``x`` is complex, object or not numeric.
    ValueError
        When the dimensionality is wrong, the array is empty or holds non-finite values.
    """
    arr = x if type(x) is np.ndarray else np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(
            f"{name} must be a real numeric array, got dtype {arr.dtype}. "
            f"Convert it with np.asarray({name}, dtype=np.float64)."
        )
    accepted = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if arr.ndim not in accepted:
        wanted = " or ".join(f"{n}-D" for n in accepted)
        raise ValueError(f"{name} must be {wanted}, got a {arr.ndim}-D array of shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); at least one element is required.")
    if arr.dtype not in (np.float32, np.float64) or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype == np.float32 else np.float64)
    # O(1)-memory test first (add.reduce: the sum without ndarray.sum's Python layers, which
    # cost more than the sum itself on a feature row)
    if check_finite and not math.isfinite(np.add.reduce(arr, axis=None)):
        raise_if_nonfinite(arr, name, allow_nan=allow_nan)
    return arr


def first_nonfinite(arr: np.ndarray, *, inf_only: bool = False) -> tuple[int, tuple[int, ...]] | None:
    """``(count, index)`` of the NaN/inf values of ``arr`` (only the infs with ``inf_only``): how
    many there are and the index of the first in C order; ``None`` when there is none.

    The one element-wise scan behind every "non-finite sample" error, run after a cheaper
    test (a sum that is not finite) said there may be one.
    """
    bad = np.isinf(arr) if inf_only else ~np.isfinite(arr)
    if not bad.any():
        return None
    return int(np.count_nonzero(bad)), tuple(int(i) for i in np.argwhere(bad)[0])


def raise_if_nonfinite(arr: np.ndarray, name: str, *, allow_nan: bool = False) -> None:
    """Raise the ValueError of :func:`check_float_array` if ``arr`` holds NaN or inf (only inf
    with ``allow_nan``); return quietly otherwise (a finite array whose sum overflowed).

    Callers run it after a cheaper test said "maybe" (a sum that is not finite): the
    element-wise scan only runs to build a precise message.
    """
    found = first_nonfinite(arr, inf_only=allow_nan)
    if found is not None:
        count, first = found
        kind = "NaN or inf" if not allow_nan else "inf"
        raise ValueError(
            f"{name} contains {count} {kind} value(s), the first at index {first}. "
            "Drop or interpolate non-finite samples before computing features."
        )


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int after checking ``value >= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_positive_float(value, name: str) -> float:
    """Return ``value`` as a float after checking it is finite and > 0."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.") from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return out


def check_nonnegative_float(value, name: str) -> float:
    """Return ``value`` as a float after checking it is finite and >= 0."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return out
