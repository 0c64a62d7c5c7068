"""Sliding windows over multichannel streams, as read-only strided views (no copy).

A multichannel stream is ``(n_channels, n_samples)``; its windows are
``(n_windows, n_channels, window)``. Window ``i`` covers samples ``[i * hop, i * hop + window)``;
trailing samples that do not fill a whole window are left out (the next chunk of a stream
continues from ``count_windows(n_samples, window, hop) * hop``).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.lib.stride_tricks import as_strided

from biofed.kernels._validation import check_float_array, check_positive_int

__all__ = ["count_windows", "sliding_windows"]


def count_windows(n_samples: int, window: int, hop: int) -> int:
    """Number of whole windows of ``window`` samples, ``hop`` samples apart, in a stream.

    Parameters
    ----------
    n_samples : int
        Stream length in samples (>= 0).
    window : int
        Window length in samples (>= 1).
    hop : int
        Distance between the starts of consecutive windows in samples (>= 1).

    Returns
    -------
    n_windows : int
        ``(n_samples - window) // hop + 1``, or 0 when ``n_samples < window``.

    Raises
    ------
    TypeError
        When an argument is not an integer.
    ValueError
        When ``n_samples < 0``, ``window < 1`` or ``hop < 1``.

    Examples
    --------
    >>> count_windows(1000, 500, 250)
    3
    >>> count_windows(499, 500, 250)
    0
    """
    n_samples = check_positive_int(n_samples, "n_samples", minimum=0)
    window = check_positive_int(window, "window")
    hop = check_positive_int(hop, "hop")
    if n_samples < window:
        return 0
    return (n_samples - window) // hop + 1


def sliding_windows(x, window: int, hop: int) -> np.ndarray:
    """Read-only strided view of the windows of a multichannel stream (no copy).

    Parameters
    ----------
    x : array-like, shape (n_channels, n_samples)
        The stream. float32 stays float32; every other real dtype becomes float64 (which
        copies once). NaN is accepted (it marks dropped samples; drop the affected windows
        with ``np.isnan(w).any(axis=(1, 2))`` before computing features); inf is rejected.
    window : int
        Window length in samples (>= 1).
    hop : int
        Distance between window starts in samples (>= 1).

    Returns
    -------
    windows : ndarray, shape (n_windows, n_channels, window)
        Read-only view sharing memory with ``x`` when ``x`` is already a C-contiguous
        float32/float64 array. ``n_windows = count_windows(n_samples, window, hop)``, which may
        be 0 (shape ``(0, n_channels, window)``). Copy it (``windows.copy()``) to write.

    Raises
    ------
    TypeError
        When ``x`` is not real numeric or ``window``/``hop`` are not integers.
    ValueError
        When ``x`` is not 2-D, is empty or holds inf, or ``window < 1`` or ``hop < 1``.

    Examples
    --------
    >>> x = np.arange(10.0).reshape(1, 10)
    >>> sliding_windows(x, 4, 3)[:, 0]
    array([[0., 1., 2., 3.],
           [3., 4., 5., 6.],
           [6., 7., 8., 9.]])
    """
    x = check_float_array(x, "x", ndim=2, allow_nan=True)
    window = check_positive_int(window, "window")
    hop = check_positive_int(hop, "hop")
    n_channels, n_samples = x.shape
    n_windows = count_windows(n_samples, window, hop)
    ch_stride, sample_stride = x.strides
    return as_strided(
        x,
        shape=(n_windows, n_channels, window),
        strides=(hop * sample_stride, ch_stride, sample_stride),
        writeable=False,
    )


def _check_windows(windows, *, min_window: int = 1, check_finite: bool = True) -> np.ndarray:
    """Validate a ``(n_windows, n_channels, window)`` stack; ``n_windows`` may be 0.

    ``check_finite=False`` leaves the scan for NaN/inf to a kernel that tests the samples in
    its own pass (see ``check_float_array``).

    Returns a C-contiguous float32/float64 array (see ``check_float_array``). A stack with no
    windows (what ``sliding_windows`` returns for a too-short stream) passes unchanged in shape
    so that feature kernels return an empty ``(0, n_channels, n_features)`` result.
    """
    arr = np.asarray(windows)
    if arr.ndim != 3:
        raise ValueError(
            f"windows must be 3-D (n_windows, n_channels, window), got a {arr.ndim}-D array of "
            f"shape {arr.shape}. Cut a (n_channels, n_samples) stream with "
            "sliding_windows(x, window, hop), or pass one window as x[None]."
        )
    if arr.shape[0] == 0 and arr.shape[1] > 0 and arr.shape[2] > 0 and arr.dtype.kind in "fiub":
        arr = np.empty(arr.shape, dtype=np.float32 if arr.dtype == np.float32 else np.float64)
    else:
        arr = check_float_array(arr, "windows", ndim=3, check_finite=check_finite)
    if arr.shape[2] < min_window:
        raise ValueError(
            f"windows hold {arr.shape[2]} sample(s) each (shape {arr.shape}), this feature needs "
            f"at least {min_window}. Use longer windows."
        )
    return arr


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _append_samples(chunk, buf, start):
    """Copy ``chunk`` (n_channels, n) into ``buf[:, start : start + n]`` (cast to ``buf``'s
    dtype) and return the float64 sum of its samples, in one pass.

    A stream buffer's append and its finiteness test: the sum is finite exactly when every
    sample is (barring a float64 overflow). ``reassoc`` lets the compiler split the sum into
    SIMD partial sums; only its finiteness is used.
    """
    n = chunk.shape[1]
    total = 0.0
    for c in range(chunk.shape[0]):
        source = chunk[c]
        target = buf[c, start : start + n]
        for j in range(n):
            value = source[j]
            target[j] = value
            total += value
    return total
