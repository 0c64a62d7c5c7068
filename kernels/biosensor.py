"""Time-domain biosensor features: window statistics, beat detection, heart rate and RMSSD.

Beat detector (``detect_peaks``)
--------------------------------
A band-limited derivative energy envelope (Pan-Tompkins style, without the fixed ECG band-pass)
built from *rising* slopes only, so that it works for ECG and PPG alike: every QRS complex has
a steep rise whatever the lead's polarity (the R upstroke, or the return from a deep S/QS), a
PPG pulse has exactly one steep rise (its systolic upstroke; a symmetric pulse would otherwise
give two bursts, rise and fall), while T waves, dicrotic waves and baseline wander rise slowly:

1. smooth: centred moving average over ``2 * round(0.01 * fs) + 1`` samples (~20 ms, damps
   mains and EMG noise); every moving average here averages the samples available at the
   edges (no zero padding, so window edges create no false slopes), as their sum times the
   reciprocal of their count (a multiplication: a division per sample would cost more than
   the sums);
2. rising slope: ``d = max(np.gradient(smoothed) * fs, 0)`` (signal units per second);
3. envelope: moving average of ``d ** 2`` over ``2 * round(0.05 * fs) + 1`` samples (~0.1 s:
   a narrow QRS keeps its slope energy, a T wave ~4x wider and ~4x less steep drops ~16x),
   computed as differences of the prefix sums of ``d ** 2`` (``np.cumsum``'s order; the
   smoothing sums each window afresh, see ``_moving_average_into``);
4. candidates: local maxima of the envelope, refractory distance ``ceil(min_distance_s * fs)``
   (highest first, ties: the later sample wins), prominence within +-1 s, exactly as
   ``scipy.signal.find_peaks(envelope, distance=..., prominence=..., wlen=2 * round(fs) + 1)``;
5. threshold: a fixed ``prominence`` (envelope units, (signal units / s) ** 2) when given;
   otherwise adaptive, a candidate is kept when its prominence is at least 0.2 times the
   largest candidate prominence within +-1.5 s (a beat at >= 40 bpm is always in reach, so the
   threshold follows amplitude changes; 0.2 in energy is ~0.45 in amplitude: it keeps smaller
   beats next to a large one, T waves and noise stay far below, ~0.01-0.05);
6. beat time: the maximum of a smoother, triangular envelope (two moving averages over
   ``2 * round(0.025 * fs) + 1`` samples, as differences of prefix sums like step 3) within
   +-``round(0.05 * fs)`` samples of the candidate; the box envelope's flat top would
   otherwise jitter by a few samples per beat and inflate RMSSD.

The beat time is the centre of the steepest rise of the beat: a few ms before the R peak for
an upright QRS complex (annotations of MIT-BIH record 100 match within 50 ms), the middle of
the systolic upstroke for a PPG pulse (its maximum-slope point). On pure noise it reports
noise bursts about ``min_distance_s`` apart; there is no absolute amplitude floor.

Heart-rate features (``heart_rate_features``): from the peaks of each window and channel,
inter-beat intervals ``ibi = diff(peaks) / fs``; heart rate ``60 / mean(ibi)`` beats/min
(0 with fewer than 2 peaks); RMSSD ``sqrt(mean(diff(ibi) ** 2))`` in ms (0 with fewer than
3 peaks). Both are always finite.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

from biofed.kernels._validation import check_float_array, check_positive_float, raise_if_nonfinite
from biofed.kernels.spectral import _sum  # the SIMD sum of the finiteness test
from biofed.kernels.windowing import _append_samples, _check_windows

__all__ = ["BIOSENSOR_FEATURES", "detect_peaks", "heart_rate_features", "window_statistics"]

BIOSENSOR_FEATURES = ("mean", "std", "slope", "min", "max", "heart_rate", "rmssd")

_SMOOTH_HALF_S = 0.01  # step 1: smoothing half-width (~20 ms window)
_ENVELOPE_HALF_S = 0.05  # step 3: slope-energy half-width (~0.1 s window); step 6 search
_FIDUCIAL_HALF_S = 0.025  # step 6: half-width of each of the two triangular-envelope passes
_PROMINENCE_WINDOW_S = 1.0  # step 4: prominence bases are searched within +-1 s of a peak
_ADAPTIVE_WINDOW_S = 1.5  # step 5: adaptive threshold reference within +-1.5 s
_ADAPTIVE_FRACTION = 0.2  # step 5: keep peaks with prominence >= 0.2 * local reference


@njit(cache=True, nogil=True)
def _window_statistics(windows, fs, out):
    """Mean, std (ddof=0), least-squares slope per second, min, max of each window and channel.

    Parameters
    ----------
    windows : ndarray, shape (n_windows, n_channels, window)
    fs : float
        Sampling rate in Hz.
    out : ndarray, shape (n_windows, n_channels, 5)
        Output, written in place. Accumulation is in float64 (two-pass, centred sums).
    """
    n = windows.shape[2]
    for i in range(windows.shape[0]):
        _statistics_of_window(windows[i], 0, n, fs, out[i])


@njit(cache=True, nogil=True)
def _statistics_of_window(w, first, n, fs, out):
    """``_window_statistics`` of the window ``w[:, first : first + n]`` into ``out``
    (n_channels, 5). Each channel is read as ``w[c, first : first + n]``: from a C-contiguous
    ``w`` (a stream's buffer) its samples are typed contiguous, which lets the loops vectorize."""
    n_channels = w.shape[0]
    # four channels per pass: four independent chains of sums (the last pass repeats its
    # last channel to fill the four, which rewrites that channel's outputs with the same bits)
    for c in range(0, n_channels, 4):
        c1 = min(c + 1, n_channels - 1)
        c2 = min(c + 2, n_channels - 1)
        c3 = min(c + 3, n_channels - 1)
        stop = first + n
        _statistics_of_four(
            w[c, first:stop], w[c1, first:stop], w[c2, first:stop], w[c3, first:stop],
            fs, out[c], out[c1], out[c2], out[c3],
        )  # fmt: skip


@njit(cache=True, nogil=True, inline="always")
def _statistics_of_four(x, y, z, u, fs, out_x, out_y, out_z, out_u):
    """``_window_statistics`` of four channels ``x``, ``y``, ``z``, ``u`` (n,) at once, into
    ``out_x`` ... ``out_u`` (5,).

    Each sum runs over its channel's samples in order, as for one channel alone (the same bits);
    the channels' sums do not depend on each other, so the core overlaps their additions
    (a single running sum waits for the previous addition on every sample).
    """
    n = x.shape[0]
    t_mean = (n - 1) / 2.0
    t_ss = n * (n * n - 1.0) / 12.0  # sum_j (j - t_mean)^2
    lo_x = hi_x = x[0]
    lo_y = hi_y = y[0]
    lo_z = hi_z = z[0]
    lo_u = hi_u = u[0]
    total_x = total_y = total_z = total_u = 0.0
    for j in range(n):
        a = x[j]
        b = y[j]
        c = z[j]
        d = u[j]
        total_x += a
        total_y += b
        total_z += c
        total_u += d
        lo_x = a if a < lo_x else lo_x  # the first of equal values, as a strict test
        hi_x = a if a > hi_x else hi_x
        lo_y = b if b < lo_y else lo_y
        hi_y = b if b > hi_y else hi_y
        lo_z = c if c < lo_z else lo_z
        hi_z = c if c > hi_z else hi_z
        lo_u = d if d < lo_u else lo_u
        hi_u = d if d > hi_u else hi_u
    mean_x = total_x / n
    mean_y = total_y / n
    mean_z = total_z / n
    mean_u = total_u / n
    ss_x = sxy_x = ss_y = sxy_y = ss_z = sxy_z = ss_u = sxy_u = 0.0
    for j in range(n):
        t = j - t_mean
        a = x[j] - mean_x
        b = y[j] - mean_y
        c = z[j] - mean_z
        d = u[j] - mean_u
        ss_x += a * a
        sxy_x += t * a
        ss_y += b * b
        sxy_y += t * b
        ss_z += c * c
        sxy_z += t * c
        ss_u += d * d
        sxy_u += t * d
    _store_statistics(out_x, n, t_ss, fs, mean_x, ss_x, sxy_x, lo_x, hi_x)
    _store_statistics(out_y, n, t_ss, fs, mean_y, ss_y, sxy_y, lo_y, hi_y)
    _store_statistics(out_z, n, t_ss, fs, mean_z, ss_z, sxy_z, lo_z, hi_z)
    _store_statistics(out_u, n, t_ss, fs, mean_u, ss_u, sxy_u, lo_u, hi_u)


@njit(cache=True, nogil=True, inline="always")
def _store_statistics(out, n, t_ss, fs, mean, ss, sxy, lo, hi):
    out[0] = mean
    out[1] = math.sqrt(ss / n)
    out[2] = sxy / t_ss * fs if t_ss > 0.0 else 0.0
    out[3] = lo
    out[4] = hi


def window_statistics(windows, fs: float) -> np.ndarray:
    """Summary statistics of every window and channel.

    Parameters
    ----------
    windows : array-like, shape (n_windows, n_channels, window)
        Windows (e.g. from ``sliding_windows``); finite values. ``n_windows`` may be 0.
    fs : float
        Sampling rate in Hz (> 0), for the slope's time axis.

    Returns
    -------
    stats : ndarray, shape (n_windows, n_channels, 5)
        Columns ``mean``, ``std`` (ddof=0), ``slope`` (least-squares line against time in
        seconds, signal units per second; 0 for one-sample windows), ``min``, ``max``
        (``BIOSENSOR_FEATURES[:5]``). float32 for float32 input, float64 otherwise.

    Raises
    ------
    TypeError
        On non-numeric windows or fs.
    ValueError
        On non-3-D, empty-window or non-finite windows, or ``fs <= 0``.

    Examples
    --------
    >>> w = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    >>> window_statistics(w, fs=2.0)[0, 0]
    array([2.5       , 1.11803399, 2.        , 1.        , 4.        ])
    """
    windows = _check_windows(windows, check_finite=False)
    fs = check_positive_float(fs, "fs")
    out = np.empty(windows.shape[:2] + (5,), dtype=windows.dtype)
    if windows.shape[0]:
        _window_statistics(windows, fs, out)
        # a window's mean is finite exactly when its samples are (barring a float64 overflow):
        # the kernel's pass replaces a separate scan of the samples
        if not math.isfinite(np.add.reduce(out[..., 0], axis=None)):
            raise_if_nonfinite(windows, "windows")
    return out


#: Widest moving-average window (samples) summed directly; wider ones use the running sum.
_DIRECT_SUM_MAX_WIDTH = 25


@njit(cache=True, nogil=True)
def _moving_average_into(x, half, lo, hi, out):
    """``out[i]`` = centred mean of ``x`` over ``[i - half, i + half]`` clipped to the array,
    for ``lo <= i < hi`` (float64); the rest of ``out`` is left alone.

    Windows of up to ``_DIRECT_SUM_MAX_WIDTH`` samples are summed directly, left to right,
    which is exactly the float arithmetic of ``sum(x[a:b]) / (b - a)``: the sums of all interior
    windows advance together, four terms per pass over the range (a loop the compiler
    vectorizes), so the cost is ``width / 4`` cheap passes. Wider windows take the O(n) running
    sum of ``_running_average`` over the whole array, which is faster from about 30 samples on.
    """
    n = x.shape[0]
    width = 2 * half + 1
    if width > _DIRECT_SUM_MAX_WIDTH:
        out[lo:hi] = _running_average(x, half)[lo:hi]
        return
    a = max(lo, half)  # [a, b): windows that fit in the array
    b = min(hi, n - half)
    if b > a:
        sums = out[a:b]
        m = b - a
        start = a - half
        first = x[start : start + m]
        for i in range(m):
            sums[i] = 0.0 + first[i]  # 0.0 + -0.0 is 0.0, as in the sum from 0.0
        j = 1
        while j + 4 <= width:  # four terms per pass: a quarter of the loads and stores of sums
            t1, t2 = x[start + j : start + j + m], x[start + j + 1 : start + j + 1 + m]
            t3, t4 = x[start + j + 2 : start + j + 2 + m], x[start + j + 3 : start + j + 3 + m]
            for i in range(m):
                sums[i] = (((sums[i] + t1[i]) + t2[i]) + t3[i]) + t4[i]
            j += 4
        if j < width:  # width is odd: two terms are left
            t1, t2 = x[start + j : start + j + m], x[start + j + 1 : start + j + 1 + m]
            for i in range(m):
                sums[i] = (sums[i] + t1[i]) + t2[i]
        inverse = 1.0 / width
        for i in range(m):
            sums[i] *= inverse
    else:
        a = b = hi
    for edge_lo, edge_hi in ((lo, a), (max(b, lo), hi)):
        for i in range(edge_lo, edge_hi):
            first = max(i - half, 0)
            stop = min(i + half + 1, n)
            total = 0.0
            for j in range(first, stop):
                total += x[j]
            out[i] = total * (1.0 / (stop - first))


@njit(cache=True, nogil=True)
def _moving_average(x, half):
    """Centred mean over ``[i - half, i + half]`` clipped to the array (float64 out); see
    ``_moving_average_into``."""
    out = np.empty(x.shape[0], dtype=np.float64)
    _moving_average_into(x, half, 0, x.shape[0], out)
    return out


@njit(cache=True, nogil=True)
def _running_average(x, half):
    """``_moving_average`` in O(n) for wide windows (the smoothing above 1.2 kHz).

    A running window sum adds the sample that enters and subtracts the one that leaves, with
    Neumaier compensation: after a tall sample leaves the window the sum of the small samples
    left is recovered to rounding of *their* size, and a raw trace's offset does not leak
    rounding into its flat stretches (as an uncompensated running sum or prefix-sum
    difference of signed samples would). A count of the non-zero samples in the window makes
    a window of zeros average to exactly 0, which keeps flat stretches of the rectified slope
    exactly flat.
    """
    n = x.shape[0]
    out = np.empty(n, dtype=np.float64)
    total = 0.0
    carry = 0.0  # Neumaier compensation: the low-order bits ``total`` has lost
    nonzero = 0
    lo = 0
    hi = 0
    for i in range(n):
        stop = min(i + half + 1, n)
        while hi < stop:
            v = float(x[hi])
            t = total + v
            carry += (total - t) + v if abs(total) >= abs(v) else (v - t) + total
            total = t
            if v != 0.0:
                nonzero += 1
            hi += 1
        start = max(i - half, 0)
        while lo < start:
            v = -float(x[lo])
            t = total + v
            carry += (total - t) + v if abs(total) >= abs(v) else (v - t) + total
            total = t
            if v != 0.0:
                nonzero -= 1
            lo += 1
        out[i] = (total + carry) * (1.0 / (hi - lo)) if nonzero else 0.0
    return out


@njit(cache=True, nogil=True)
def _prefix_average_into(x, y, half, prefix_x, prefix_y, out_x, out_y):
    """Centred means of two non-negative signals ``x`` and ``y`` (same length) over
    ``[i - half, i + half]`` clipped to the array, as differences of their prefix sums
    (``prefix_*``: scratch of ``len(x) + 1``), into ``out_x`` and ``out_y``. One signal is
    passed as both (with the same scratch and output).

    O(n) at any width: one running sum per signal (``np.cumsum``'s order) and one vectorized
    pass of differences. The two running sums share one loop: each waits for its previous
    addition on every sample, the other's additions fill that wait. For non-negative samples
    the prefix sums only grow, so a stretch of zeros keeps the same prefix sum: its windows
    average to exactly 0 and every window holding the same non-zero samples averages to the
    same bits (plateaus stay exactly flat); elsewhere a difference is off by at most
    ``~eps * prefix[i + half + 1]``.
    """
    n = x.shape[0]
    total_x = total_y = 0.0
    prefix_x[0] = prefix_y[0] = 0.0
    for i in range(n):
        total_x += x[i]
        total_y += y[i]
        prefix_x[i + 1] = total_x
        prefix_y[i + 1] = total_y
    _average_from_prefix(prefix_x, half, n, out_x)
    _average_from_prefix(prefix_y, half, n, out_y)


@njit(cache=True, nogil=True, inline="always")
def _average_from_prefix(prefix, half, n, out):
    width = 2 * half + 1
    a = min(half, n)  # [a, b): windows that fit in the array
    b = max(n - half, a)
    inverse = 1.0 / width
    # views indexed from 0: every index is visibly non-negative, so no negative-index wrap-around
    # test per sample (which would keep the loop from vectorizing)
    ends, starts, centred = prefix[a + half + 1 : b + half + 1], prefix[a - half : b - half], out[a:b]
    for k in range(b - a):
        centred[k] = (ends[k] - starts[k]) * inverse
    for edge_lo, edge_hi in ((0, a), (b, n)):
        for i in range(edge_lo, edge_hi):
            first = max(i - half, 0)
            stop = min(i + half + 1, n)
            out[i] = (prefix[stop] - prefix[first]) * (1.0 / (stop - first))


@njit(cache=True, nogil=True)
def _slope_energy_into(x, fs, smooth_half, smoothed, d2):
    """Squared rising slope ``max(np.gradient(smoothed) * fs, 0) ** 2`` into ``d2`` (and the
    smoothed samples into ``smoothed``); needs ``x.shape[0] >= 2``."""
    n = x.shape[0]
    _moving_average_into(x, smooth_half, 0, n, smoothed)
    s = smoothed
    d2[0] = _squared_rise((s[1] - s[0]) * fs)  # np.gradient(s) * fs: its halving is exact
    d2[n - 1] = _squared_rise((s[n - 1] - s[n - 2]) * fs)
    ahead, behind, inside = s[2:], s[: n - 2], d2[1 : n - 1]  # indices from 0: no wrap-around test
    for k in range(n - 2):
        inside[k] = _squared_rise((ahead[k] - behind[k]) * 0.5 * fs)


@njit(cache=True, nogil=True, inline="always")
def _squared_rise(slope):
    """``max(slope, 0) ** 2`` as one multiplication (the same bits)."""
    rise = max(slope, 0.0)
    return rise * rise


@njit(cache=True, nogil=True)
def _local_maxima_into(x, peaks):
    """Indices of local maxima (plateau middles) into ``peaks`` (scratch of at least
    ``max(len(x) // 2, 1)``), as ``scipy.signal._peak_finding_utils._local_maxima_1d``;
    returns their count.

    A vectorized pass flags every rise that a drop or a plateau follows, a second lists the
    flagged samples without a branch per sample (the compares of noisy samples are
    unpredictable). A pass over that shorter list then walks each plateau as scipy does: its
    middle is a peak when the next different sample is lower.
    """
    n = x.shape[0]
    rise_then_top = np.empty(n, dtype=np.uint8)
    for i in range(1, n - 1):
        rise_then_top[i] = (x[i - 1] < x[i]) & (x[i] >= x[i + 1])
    m = 0
    for i in range(1, n - 1):
        peaks[m] = i  # kept by advancing m, overwritten otherwise
        m += rise_then_top[i]
    kept = 0
    for p in range(m):
        i = peaks[p]
        i_ahead = i + 1
        while i_ahead < n - 1 and x[i_ahead] == x[i]:
            i_ahead += 1
        peaks[kept] = (i + i_ahead - 1) // 2  # kept by advancing, as above
        kept += x[i_ahead] < x[i]
    return kept


#: Most rounds of ``_select_by_distance``'s highest-remaining search; beyond, it sorts.
_DISTANCE_ROUNDS_MAX = 16
#: Most peaks ordered by insertion sort; more take NumPy's mergesort (same stable order).
_INSERTION_SORT_MAX = 64


@njit(cache=True, nogil=True)
def _select_by_distance(x, peaks, distance, state):
    """Keep the peaks at least ``distance`` samples apart, highest first (ties: the later
    wins), as ``scipy.signal.find_peaks``; compacts ``peaks`` (sorted) in place, returns the
    count. ``state`` is scratch of ``peaks``' length (each peak's ``_PRESENT`` / ``_KEPT`` /
    ``_REMOVED``).

    scipy visits the peaks by descending height and skips those already removed, so each
    peak it keeps is the highest (the latest of equal ones) still present. When few can be
    kept (they are ``distance`` apart: at most ``span // distance + 1``), repeated searches
    for that peak cost less than sorting all the candidates.
    """
    n_peaks = peaks.shape[0]
    if n_peaks == 0:
        return 0
    if (peaks[n_peaks - 1] - peaks[0]) // distance + 1 < _DISTANCE_ROUNDS_MAX:
        _keep_highest_remaining(x, peaks, distance, state)
    else:
        _keep_in_height_order(x, peaks, distance, state)
    m = 0
    for k in range(n_peaks):
        if state[k] == _KEPT:
            peaks[m] = peaks[k]
            m += 1
    return m


_PRESENT, _KEPT, _REMOVED = 0, 1, 2  # states of a peak in ``_select_by_distance``'s scratch


@njit(cache=True, nogil=True)
def _keep_highest_remaining(x, peaks, distance, state):
    """``_select_by_distance``'s outcome in ``state``: one search of the remaining peaks per
    kept peak."""
    state[:] = _PRESENT
    while True:
        best = _highest_present(x, peaks, state)
        if best < 0:
            return
        _remove_neighbours(peaks, best, distance, state)


@njit(cache=True, nogil=True)
def _highest_present(x, peaks, state):
    """Index of the highest present peak (the latest of equal ones), -1 if none.

    Four running maxima over every fourth peak, merged at the end: a single one would wait
    for its previous compare on every peak.
    """
    n_peaks = peaks.shape[0]
    b0 = b1 = b2 = b3 = -1
    h0 = h1 = h2 = h3 = -np.inf
    k = 0
    while k + 4 <= n_peaks:
        b0, h0 = _if_higher(x, peaks, state, k, b0, h0)
        b1, h1 = _if_higher(x, peaks, state, k + 1, b1, h1)
        b2, h2 = _if_higher(x, peaks, state, k + 2, b2, h2)
        b3, h3 = _if_higher(x, peaks, state, k + 3, b3, h3)
        k += 4
    while k < n_peaks:
        b0, h0 = _if_higher(x, peaks, state, k, b0, h0)
        k += 1
    best, height = b0, h0
    for b, h in ((b1, h1), (b2, h2), (b3, h3)):
        if b >= 0 and (best < 0 or h > height or (h == height and b > best)):
            best, height = b, h
    return best


@njit(cache=True, nogil=True, inline="always")
def _if_higher(x, peaks, state, k, best, best_height):
    """(k, its height) if peak ``k`` is present and not lower than ``best_height`` (the later
    of equals wins), else (best, best_height); without a branch."""
    height = x[peaks[k]]
    higher = (state[k] == _PRESENT) & (height >= best_height)
    return (k if higher else best), (height if higher else best_height)


@njit(cache=True, nogil=True)
def _keep_in_height_order(x, peaks, distance, state):
    """``_select_by_distance``'s outcome in ``state``: scipy's visit of all peaks in height order."""
    n_peaks = peaks.shape[0]
    heights = x[peaks]
    order = np.empty(n_peaks, dtype=np.int64)
    if n_peaks <= _INSERTION_SORT_MAX:  # a stable sort by height: the order of the mergesort
        for k in range(n_peaks):
            height = heights[k]
            q = k - 1
            while q >= 0 and heights[order[q]] > height:
                order[q + 1] = order[q]
                q -= 1
            order[q + 1] = k
    else:
        order[:] = np.argsort(heights, kind="mergesort")
    state[:] = _PRESENT
    for idx in range(n_peaks - 1, -1, -1):
        j = order[idx]
        if state[j] == _PRESENT:
            _remove_neighbours(peaks, j, distance, state)


@njit(cache=True, nogil=True, inline="always")
def _remove_neighbours(peaks, j, distance, state):
    """Keep peak ``j``; remove the peaks closer than ``distance`` to it."""
    state[j] = _KEPT
    n_peaks = peaks.shape[0]
    k = j - 1
    while k >= 0 and peaks[j] - peaks[k] < distance:
        state[k] = _REMOVED
        k -= 1
    k = j + 1
    while k < n_peaks and peaks[k] - peaks[j] < distance:
        state[k] = _REMOVED
        k += 1


#: Samples per block of ``_prominences_into``'s block minima and maxima.
_PROMINENCE_BLOCK = 16


@njit(cache=True, nogil=True)
def _prominence_scratch_size(n):
    """Length of the float scratch ``prom`` of ``_select_peaks_into`` for ``n`` samples: a
    prominence per peak, then the block minima and maxima of ``_prominences_into``."""
    return max(n // 2, 1) + 2 * (n // _PROMINENCE_BLOCK)


@njit(cache=True, nogil=True)
def _prominences_into(x, peaks, half_window, prom, blocks):
    """Prominence of each peak with bases searched within ``+-half_window`` samples, into
    ``prom``; ``blocks`` is scratch of ``2 * (len(x) // _PROMINENCE_BLOCK)``.

    As scipy, the search from a peak goes outwards while the samples are not higher than the
    peak and takes the minimum on each side. The highest peaks search the whole +-1 s, so the
    minimum and maximum of each block of ``_PROMINENCE_BLOCK`` samples are taken once: the
    search steps over a whole block that lies in the window and holds no higher sample (the
    same minimum: a minimum does not depend on the order of its terms).
    """
    n = x.shape[0]
    size = _PROMINENCE_BLOCK
    n_blocks = n // size
    block_min, block_max = blocks[:n_blocks], blocks[n_blocks : 2 * n_blocks]
    for b in range(n_blocks):
        lo = hi = x[b * size]
        for j in range(b * size + 1, b * size + size):
            v = x[j]
            lo = v if v < lo else lo
            hi = v if v > hi else hi
        block_min[b] = lo
        block_max[b] = hi
    for p in range(peaks.shape[0]):
        peak = peaks[p]
        height = x[peak]
        i_min = max(peak - half_window, 0)
        i_max = min(peak + half_window, n - 1)
        left_min = height
        i = peak
        while i >= i_min:
            if (i + 1) % size == 0 and i + 1 - size >= i_min and block_max[i // size] <= height:
                left_min = min(left_min, block_min[i // size])
                i -= size
            elif x[i] <= height:
                left_min = min(left_min, x[i])
                i -= 1
            else:
                break
        right_min = height
        i = peak
        while i <= i_max:
            if i % size == 0 and i + size - 1 <= i_max and block_max[i // size] <= height:
                right_min = min(right_min, block_min[i // size])
                i += size
            elif x[i] <= height:
                right_min = min(right_min, x[i])
                i += 1
            else:
                break
        prom[p] = height - max(left_min, right_min)


@njit(cache=True, nogil=True)
def _select_peaks_into(x, distance, half_window, prominence, adaptive_half, adaptive_fraction, peaks, order, prom):
    """Steps 4-5 on a 1-D array ``x``; ``prominence < 0`` selects the adaptive threshold.

    ``peaks`` and ``order`` are scratch of at least ``max(len(x) // 2, 1)``, ``prom`` of
    ``_prominence_scratch_size(len(x))``; the selected peaks end up in ``peaks[:count]``, the
    count is returned.
    """
    n_peaks = _local_maxima_into(x, peaks)
    if n_peaks == 0:
        return 0
    n_peaks = _select_by_distance(x, peaks[:n_peaks], distance, order[:n_peaks])
    _prominences_into(x, peaks[:n_peaks], half_window, prom, prom[max(x.shape[0] // 2, 1) :])
    m = 0
    if prominence >= 0.0:
        for p in range(n_peaks):
            if prom[p] >= prominence:
                peaks[m] = peaks[p]
                m += 1
        return m
    lo = 0
    hi = 0
    for p in range(n_peaks):  # peaks[m:] still holds the candidates p, p + 1, ... (m <= p)
        while peaks[p] - peaks[lo] > adaptive_half:
            lo += 1
        if hi < p:
            hi = p
        while hi + 1 < n_peaks and peaks[hi + 1] - peaks[p] <= adaptive_half:
            hi += 1
        reference = 0.0
        for q in range(lo, hi + 1):
            if prom[q] > reference:
                reference = prom[q]
        order[p] = 1 if prom[p] >= adaptive_fraction * reference else 0  # keep flag
    for p in range(n_peaks):
        if order[p]:
            peaks[m] = peaks[p]
            m += 1
    return m


@njit(cache=True, nogil=True)
def _select_peaks(x, distance, half_window, prominence, adaptive_half, adaptive_fraction):
    """``_select_peaks_into`` with its own scratch: the selected peak indices."""
    size = max(x.shape[0] // 2, 1)
    peaks = np.empty(size, dtype=np.int64)
    order = np.empty(size, dtype=np.int64)
    prom = np.empty(_prominence_scratch_size(x.shape[0]), dtype=np.float64)
    m = _select_peaks_into(x, distance, half_window, prominence, adaptive_half, adaptive_fraction, peaks, order, prom)
    return peaks[:m].copy()


@njit(cache=True, nogil=True)
def _detector_work(n):
    """Scratch of the detector for signals of ``n`` samples: 10 float64 rows of ``n + 1`` (see
    below), 2 int64 rows of ``max(n // 2, 1)`` and the float ``prom`` of ``_select_peaks_into``."""
    size = max(n // 2, 1)
    return (
        np.empty((10, n + 1), dtype=np.float64),
        np.empty((2, size), dtype=np.int64),
        np.empty(_prominence_scratch_size(n), dtype=np.float64),
    )


#: Rows of ``_detector_work``'s float scratch: smoothed samples (then the first pass of the
#: triangular envelope), squared rising slope, box envelope and prefix sums of the first (0-3)
#: and second (4-7) signal of a pair, then the triangular envelope of each (8, 9; before it,
#: a contiguous copy of each signal).
_SMOOTHED, _SLOPE_ENERGY, _ENVELOPE, _PREFIX, _SECOND_SIGNAL, _TRIANGULAR = 0, 1, 2, 3, 4, 8


@njit(cache=True, nogil=True)
def _envelopes_into(x, y, fs, smooth_half, envelope_half, fwork):
    """Steps 1-3 of the signals ``x`` and ``y`` (``n >= 3`` samples each) into rows 0-3 and
    4-7 of ``fwork`` (``_detector_work(n)[0]``)."""
    n = x.shape[0]
    first = fwork[:_SECOND_SIGNAL]
    second = fwork[_SECOND_SIGNAL:]
    # the smoothing's passes vectorize over contiguous samples only: windows are strided views
    contiguous_x, contiguous_y = fwork[_TRIANGULAR, :n], fwork[_TRIANGULAR + 1, :n]  # free until step 6
    contiguous_x[:] = x
    contiguous_y[:] = y
    _slope_energy_into(contiguous_x, fs, smooth_half, first[_SMOOTHED, :n], first[_SLOPE_ENERGY, :n])
    _slope_energy_into(contiguous_y, fs, smooth_half, second[_SMOOTHED, :n], second[_SLOPE_ENERGY, :n])
    _prefix_average_into(
        first[_SLOPE_ENERGY, :n],
        second[_SLOPE_ENERGY, :n],
        envelope_half,
        first[_PREFIX],
        second[_PREFIX],
        first[_ENVELOPE, :n],
        second[_ENVELOPE, :n],
    )


@njit(cache=True, nogil=True)
def _triangular_into(fwork, n, fiducial_half):
    """The triangular envelopes (step 6) of both signals of a pair into rows ``_TRIANGULAR`` and
    ``_TRIANGULAR + 1`` of ``fwork``, after ``_envelopes_into``: the first pass is a difference
    of the prefix sums of the squared rising slopes the box envelope left in the ``_PREFIX``
    rows (the bits of a fresh ``_prefix_average_into``), into the smoothed-sample rows."""
    one, other = fwork[:_SECOND_SIGNAL], fwork[_SECOND_SIGNAL:]
    _average_from_prefix(one[_PREFIX], fiducial_half, n, one[_SMOOTHED, :n])
    _average_from_prefix(other[_PREFIX], fiducial_half, n, other[_SMOOTHED, :n])
    _prefix_average_into(
        one[_SMOOTHED, :n], other[_SMOOTHED, :n], fiducial_half,
        one[_PREFIX], other[_PREFIX], fwork[_TRIANGULAR, :n], fwork[_TRIANGULAR + 1, :n],
    )  # fmt: skip


@njit(cache=True, nogil=True)
def _beats_of_envelope(envelope, triangular, prominence, lengths, adaptive_fraction, iwork, prom):
    """Steps 4-6: beat indices from the box envelope ``envelope`` and the triangular envelope
    ``triangular`` (n,) into ``iwork[0, :count]``; returns the count. Scratch: ``_detector_work(n)``.
    """
    distance, half_window, adaptive_half, _, envelope_half, _ = lengths
    n = envelope.shape[0]
    beats, order = iwork[0], iwork[1]
    n_candidates = _select_peaks_into(
        envelope, distance, half_window, prominence, adaptive_half, adaptive_fraction, beats, order, prom
    )
    m = 0
    for p in range(n_candidates):  # beats[m] is written after beats[p >= m] is read
        candidate = beats[p]
        lo = max(candidate - envelope_half, 0)
        hi = min(candidate + envelope_half, n - 1)
        best = lo
        for i in range(lo + 1, hi + 1):
            if triangular[i] > triangular[best]:
                best = i
        if m == 0 or best > beats[m - 1]:
            beats[m] = best
            m += 1
    return m


@njit(cache=True, nogil=True)
def _beats_into(x, fs, prominence, lengths, adaptive_fraction, fwork, iwork, prom):
    """Beat indices of ``x`` (module docstring steps 1-6) into ``iwork[0, :count]``; returns
    the count (0 for fewer than 3 samples). Scratch from ``_detector_work(len(x))``.

    ``lengths`` = (distance, prominence half-window, adaptive half-window, smoothing
    half-width, envelope half-width, triangular-envelope half-width), all in samples.
    """
    n = x.shape[0]
    if n < 3:
        return 0
    d2, envelope, inner = fwork[_SLOPE_ENERGY, :n], fwork[_ENVELOPE, :n], fwork[_SMOOTHED, :n]
    triangular, prefix = fwork[_TRIANGULAR, :n], fwork[_PREFIX]
    _slope_energy_into(x, fs, lengths[3], inner, d2)
    _prefix_average_into(d2, d2, lengths[4], prefix, prefix, envelope, envelope)
    _average_from_prefix(prefix, lengths[5], n, inner)  # the same prefix sums of d2
    _prefix_average_into(inner, inner, lengths[5], prefix, prefix, triangular, triangular)
    return _beats_of_envelope(envelope, triangular, prominence, lengths, adaptive_fraction, iwork, prom)


@njit(cache=True, nogil=True)
def _detect_peaks(x, fs, prominence, lengths, adaptive_fraction):
    """Beat indices of ``x`` (``_beats_into`` with its own scratch)."""
    fwork, iwork, prom = _detector_work(x.shape[0])
    m = _beats_into(x, fs, prominence, lengths, adaptive_fraction, fwork, iwork, prom)
    return iwork[0, :m].copy()


def _detector_lengths(fs: float, min_distance_s: float) -> tuple[int, int, int, int, int, int]:
    """Sample counts for ``_detect_peaks`` (see its ``lengths``)."""
    return (
        max(1, math.ceil(min_distance_s * fs)),
        max(1, round(_PROMINENCE_WINDOW_S * fs)),
        max(1, round(_ADAPTIVE_WINDOW_S * fs)),
        round(_SMOOTH_HALF_S * fs),
        max(1, round(_ENVELOPE_HALF_S * fs)),
        max(1, round(_FIDUCIAL_HALF_S * fs)),
    )


def detect_peaks(x, fs: float, *, min_distance_s: float = 0.3, prominence: float | None = None) -> np.ndarray:
    """Beat indices of an ECG or PPG trace (slope-energy envelope detector, module docstring).

    Parameters
    ----------
    x : array-like, shape (n_samples,)
        One ECG or PPG channel, either polarity; finite values.
    fs : float
        Sampling rate in Hz (> 0).
    min_distance_s : float, default 0.3
        Refractory period in seconds (> 0): envelope peaks closer than this are merged into
        the highest one. 0.3 s allows up to 200 beats/min.
    prominence : float or None, default None
        Minimum prominence of the slope-energy envelope, in (signal units / s) ** 2 (>= 0).
        None uses the adaptive threshold (0.2 x the largest prominence within +-1.5 s), which
        follows amplitude changes and needs no calibration.

    Returns
    -------
    peaks : ndarray of int64, shape (n_peaks,)
        Sorted, distinct sample indices of the beats: the centre of each beat's steepest rise
        (a few ms before an R peak; mid-upstroke of a PPG pulse). Empty for fewer than
        3 samples.

    Raises
    ------
    TypeError
        On non-numeric input or parameters.
    ValueError
        On non-1-D, empty or non-finite ``x``, ``fs <= 0``, ``min_distance_s <= 0`` or a
        negative or non-finite ``prominence``.

    Examples
    --------
    >>> fs = 100.0
    >>> t = np.arange(500) / fs
    >>> pulses = np.exp(-0.5 * ((t % 1.0 - 0.5) / 0.02) ** 2)      # one pulse per second
    >>> detect_peaks(pulses, fs)                                   # steepest rise, 20 ms early
    array([ 48, 148, 248, 348, 448])
    """
    x = check_float_array(x, "x", ndim=1)
    fs = check_positive_float(fs, "fs")
    min_distance_s = check_positive_float(min_distance_s, "min_distance_s")
    if prominence is None:
        threshold = -1.0
    else:
        try:
            threshold = float(prominence)
        except (TypeError, ValueError):
            raise TypeError(f"prominence must be a number or None, got {prominence!r}.") from None
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(
                f"prominence must be a finite number >= 0 (envelope units, (signal units / s) ** 2) or None, "
                f"got {prominence!r}."
            )
    return _detect_peaks(x, fs, threshold, _detector_lengths(fs, min_distance_s), _ADAPTIVE_FRACTION)


@njit(cache=True, nogil=True)
def _heart_rate_features(windows, channels, fs, lengths, adaptive_fraction, out):
    """Mean heart rate (beats/min) and RMSSD (ms) of each window and of the channels
    ``channels`` (indices into axis 1 of ``windows``), into ``out`` (n_windows, len(channels), 2);
    False if a sample is NaN or inf (or a float64 sum overflowed), the outputs then undefined.

    One scratch for every window and channel. The channels go in pairs through steps 1-3
    (``_envelopes_into``: their running sums overlap). The finiteness test sums the smoothed
    samples each detection leaves in its scratch (no extra pass over the samples).
    """
    n = windows.shape[2]
    detector = _detector_work(n)
    finite = True
    for i in range(windows.shape[0]):
        window_finite = _heart_rate_of_window(
            windows[i], 0, n, channels, fs, lengths, adaptive_fraction, out[i], detector
        )
        finite = finite and window_finite
    return finite


@njit(cache=True, nogil=True)
def _heart_rate_of_window(w, first, n, channels, fs, lengths, adaptive_fraction, out, detector):
    """``_heart_rate_features`` of the window ``w[:, first : first + n]`` into ``out``
    (len(channels), 2), with the scratch ``detector`` of ``_detector_work(n)``; False if a
    sample is not finite. Channels are read as ``w[c, first : first + n]`` (see
    ``_statistics_of_window``)."""
    fwork, iwork, prom = detector
    n_hr = channels.shape[0]
    stop = first + n
    one, other = fwork[:_SECOND_SIGNAL], fwork[_SECOND_SIGNAL:]
    finite = True
    for c in range(0, n_hr, 2):
        c2 = min(c + 1, n_hr - 1)  # an odd last channel is paired with itself
        x = w[channels[c], first:stop]
        y = w[channels[c2], first:stop]
        if n < 3:
            finite = finite and math.isfinite(_sum(x, 0, n) + _sum(y, 0, n))
            out[c] = out[c2] = 0.0
            continue
        _envelopes_into(x, y, fs, lengths[3], lengths[4], fwork)
        finite = finite and math.isfinite(_sum(one[_SMOOTHED], 0, n) + _sum(other[_SMOOTHED], 0, n))
        _triangular_into(fwork, n, lengths[5])
        for channel, envelope, triangular in (
            (c, one[_ENVELOPE, :n], fwork[_TRIANGULAR, :n]),
            (c2, other[_ENVELOPE, :n], fwork[_TRIANGULAR + 1, :n]),
        ):
            n_peaks = _beats_of_envelope(envelope, triangular, -1.0, lengths, adaptive_fraction, iwork, prom)
            _store_heart_rate(iwork[0], n_peaks, fs, out[channel])
    return finite


@njit(cache=True, nogil=True, inline="always")
def _store_heart_rate(beats, n_peaks, fs, out):
    """Heart rate and RMSSD of the beat indices ``beats[:n_peaks]`` into ``out`` (2,)."""
    heart_rate = 0.0
    rmssd = 0.0
    if n_peaks >= 2:
        heart_rate = 60.0 * fs * (n_peaks - 1) / (beats[n_peaks - 1] - beats[0])
    if n_peaks >= 3:
        ss = 0.0
        for p in range(2, n_peaks):
            d = ((beats[p] - beats[p - 1]) - (beats[p - 1] - beats[p - 2])) / fs
            ss += d * d
        rmssd = 1000.0 * math.sqrt(ss / (n_peaks - 2))
    out[0] = heart_rate
    out[1] = rmssd


@njit(cache=True, nogil=True)
def _biosensor_rows(windows, channels, fs, lengths, adaptive_fraction, stat_columns, hr_columns, out):
    """``_window_statistics`` of every channel and ``_heart_rate_features`` of ``channels`` of
    each window, written into the columns of its row ``out[i]`` (float64, (n_windows, F)):
    statistic ``k`` of channel ``c`` into ``stat_columns[5 * c + k]``, heart-rate feature
    ``k`` of ``channels[h]`` into ``hr_columns[2 * h + k]``. A feature row in one call, for
    windows checked by the caller."""
    n = windows.shape[2]
    work = _row_work(windows.shape[1], channels.shape[0], n)
    columns = (stat_columns, hr_columns)
    for i in range(windows.shape[0]):
        _row_of_window(windows[i], 0, n, channels, fs, lengths, adaptive_fraction, columns, out[i], work)


@njit(cache=True, nogil=True)
def _row_work(n_channels, n_hr, n):
    """Scratch of ``_row_of_window``: statistics (n_channels, 5), heart-rate features (n_hr, 2)
    and the detector's ``_detector_work(n)``."""
    return np.empty((n_channels, 5), dtype=np.float64), np.empty((n_hr, 2), dtype=np.float64), _detector_work(n)


@njit(cache=True, nogil=True)
def _row_of_window(w, first, n, channels, fs, lengths, adaptive_fraction, columns, row, work):
    """``_biosensor_rows`` of the one window ``w[:, first : first + n]`` into ``row`` (F,), with
    ``columns`` = (stat_columns, hr_columns) and the scratch ``work`` of ``_row_work``."""
    stat_columns, hr_columns = columns
    stats, hr, detector = work
    _statistics_of_window(w, first, n, fs, stats)
    if channels.shape[0]:
        _heart_rate_of_window(w, first, n, channels, fs, lengths, adaptive_fraction, hr, detector)
    for k in range(stat_columns.shape[0]):
        row[stat_columns[k]] = stats[k // 5, k % 5]
    for k in range(hr_columns.shape[0]):
        row[hr_columns[k]] = hr[k // 2, k % 2]


@njit(cache=True, nogil=True)
def _append_biosensor_row(chunk, x, where, channels, fs, lengths, adaptive_fraction, stat_columns, hr_columns, out):
    """A biosensor stream buffer's append and the feature row of the one window it completes, in
    one call (the live step, as ``WelchStream.append_features`` is for spectral streams).

    ``where`` (int64) holds ``[fill, first, window]``: ``_append_samples(chunk, x, fill)``, then,
    only if that sum is finite, ``_biosensor_rows`` of the window ``x[:, first : first + window]``
    into ``out`` (1, F). Returns the chunk's float64 sum (non-finite: nothing but the copy
    behind ``fill`` was done).
    """
    total = _append_samples(chunk, x, where[0])
    if math.isfinite(total):
        n = where[2]
        work = _row_work(x.shape[0], channels.shape[0], n)
        columns = (stat_columns, hr_columns)
        _row_of_window(x, where[1], n, channels, fs, lengths, adaptive_fraction, columns, out[0], work)
    return total


def heart_rate_features(windows, fs: float) -> np.ndarray:
    """Mean heart rate and RMSSD of every window and channel (ECG or PPG channels).

    Parameters
    ----------
    windows : array-like, shape (n_windows, n_channels, window)
        Windows of ECG/PPG channels (either polarity); finite values. ``n_windows`` may be 0.
        Beats are found by ``detect_peaks`` with its defaults.
    fs : float
        Sampling rate in Hz (> 0).

    Returns
    -------
    features : ndarray, shape (n_windows, n_channels, 2)
        Columns ``heart_rate`` = ``60 / mean(ibi)`` beats/min (0 with fewer than 2 peaks) and
        ``rmssd`` = ``1000 * sqrt(mean(diff(ibi) ** 2))`` ms (0 with fewer than 3 peaks), with
        ``ibi = diff(peaks) / fs`` (``BIOSENSOR_FEATURES[5:]``). Always finite. float32 for
        float32 input, float64 otherwise.

    Raises
    ------
    TypeError
        On non-numeric windows or fs.
    ValueError
        On non-3-D, empty-window or non-finite windows, or ``fs <= 0``.
    """
    windows = _check_windows(windows, check_finite=False)
    fs = check_positive_float(fs, "fs")
    out = np.empty(windows.shape[:2] + (2,), dtype=windows.dtype)
    channels = np.arange(windows.shape[1])
    if windows.shape[0] and not _heart_rate_features(windows, channels, *_heart_rate_args(fs), out):
        raise_if_nonfinite(windows, "windows")  # the kernel's sum of the samples was not finite
    return out


@functools.lru_cache(maxsize=16)
def _heart_rate_args(fs: float) -> tuple[float, tuple[int, ...], float]:
    """The parameters after ``windows`` of ``_heart_rate_features`` for a validated ``fs``
    (``detect_peaks`` defaults), computed once per rate: a device calls with one or two."""
    return fs, _detector_lengths(fs, 0.3), _ADAPTIVE_FRACTION
