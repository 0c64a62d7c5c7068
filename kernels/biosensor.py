"""Time-domain biosensor features: window statistics, beat detection, heart rate and RMSSD.

Beat detector (``detect_peaks``)
--------------------------------
Local maxima with a refractory distance and a prominence threshold, the same selection as
``scipy.signal.find_peaks(x, distance=ceil(min_distance_s * fs), prominence=p, wlen=wlen)``:

1. local maxima (plateaus give their middle sample; the first and last samples never count);
2. refractory distance: from the highest maximum down, every lower maximum closer than
   ``ceil(min_distance_s * fs)`` samples is dropped (ties: the later sample wins);
3. prominence of each survivor (height above the higher of its two bases) inside a window of
   ``wlen = 2 * round(1.0 * fs) + 1`` samples (+-1 s: it reaches the pulse foot of a PPG beat
   and the baseline around a QRS, and makes slow baseline wander irrelevant);
4. threshold: a fixed ``prominence`` when given; otherwise adaptive, a survivor is kept when its
   prominence is at least 0.4 times the largest prominence among survivors within +-1.5 s
   (a beat at >= 40 bpm is always in reach, so the threshold follows amplitude changes; T waves
   and dicrotic/diastolic PPG peaks stay below it).

The detector expects beats as positive deflections (R peaks of the usual leads, systolic PPG
peaks): negate an inverted lead first. On pure noise it finds noise peaks about
``min_distance_s`` apart; there is no absolute amplitude floor.

Heart-rate features (``heart_rate_features``): from the peaks of each window and channel,
inter-beat intervals ``ibi = diff(peaks) / fs``; heart rate ``60 / mean(ibi)`` beats/min
(0 with fewer than 2 peaks); RMSSD ``sqrt(mean(diff(ibi) ** 2))`` in ms (0 with fewer than
3 peaks). Both are always finite.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from biofed.kernels._validation import check_float_array, check_positive_float
from biofed.kernels.windowing import _check_windows

__all__ = ["BIOSENSOR_FEATURES", "detect_peaks", "heart_rate_features", "window_statistics"]

BIOSENSOR_FEATURES = ("mean", "std", "slope", "min", "max", "heart_rate", "rmssd")

_PROMINENCE_WINDOW_S = 1.0  # prominence bases are searched within +-1 s of a peak
_ADAPTIVE_WINDOW_S = 1.5  # adaptive threshold: reference amplitude within +-1.5 s
_ADAPTIVE_FRACTION = 0.4  # keep peaks with prominence >= 0.4 * local reference


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
    n_windows, n_channels, n = windows.shape
    t_mean = (n - 1) / 2.0
    t_ss = n * (n * n - 1.0) / 12.0  # sum_j (j - t_mean)^2
    for i in range(n_windows):
        for c in range(n_channels):
            lo = windows[i, c, 0]
            hi = windows[i, c, 0]
            total = 0.0
            for j in range(n):
                v = windows[i, c, j]
                total += v
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            mean = total / n
            ss = 0.0
            sxy = 0.0
            for j in range(n):
                d = windows[i, c, j] - mean
                ss += d * d
                sxy += (j - t_mean) * d
            out[i, c, 0] = mean
            out[i, c, 1] = math.sqrt(ss / n)
            out[i, c, 2] = sxy / t_ss * fs if t_ss > 0.0 else 0.0
            out[i, c, 3] = lo
            out[i, c, 4] = hi


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
    windows = _check_windows(windows)
    fs = check_positive_float(fs, "fs")
    out = np.empty(windows.shape[:2] + (5,), dtype=windows.dtype)
    if windows.shape[0]:
        _window_statistics(windows, fs, out)
    return out


@njit(cache=True, nogil=True)
def _local_maxima(x):
    """Indices of local maxima (plateau middles), as ``scipy.signal._peak_finding_utils._local_maxima_1d``."""
    n = x.shape[0]
    peaks = np.empty(max(n // 2, 1), dtype=np.int64)
    m = 0
    i = 1
    i_max = n - 1
    while i < i_max:
        if x[i - 1] < x[i]:
            i_ahead = i + 1
            while i_ahead < i_max and x[i_ahead] == x[i]:
                i_ahead += 1
            if x[i_ahead] < x[i]:
                peaks[m] = (i + i_ahead - 1) // 2
                m += 1
                i = i_ahead
        i += 1
    return peaks[:m]


@njit(cache=True, nogil=True)
def _select_by_distance(x, peaks, distance):
    """Keep-mask enforcing ``distance`` samples between peaks, highest first."""
    n_peaks = peaks.shape[0]
    keep = np.ones(n_peaks, dtype=np.bool_)
    order = np.argsort(x[peaks], kind="mergesort")
    for idx in range(n_peaks - 1, -1, -1):
        j = order[idx]
        if not keep[j]:
            continue
        k = j - 1
        while k >= 0 and peaks[j] - peaks[k] < distance:
            keep[k] = False
            k -= 1
        k = j + 1
        while k < n_peaks and peaks[k] - peaks[j] < distance:
            keep[k] = False
            k += 1
    return keep


@njit(cache=True, nogil=True)
def _prominences(x, peaks, half_window):
    """Prominence of each peak with bases searched within ``+-half_window`` samples."""
    n = x.shape[0]
    prom = np.empty(peaks.shape[0], dtype=np.float64)
    for p in range(peaks.shape[0]):
        peak = peaks[p]
        height = x[peak]
        i_min = max(peak - half_window, 0)
        i_max = min(peak + half_window, n - 1)
        left_min = height
        i = peak
        while i >= i_min and x[i] <= height:
            if x[i] < left_min:
                left_min = x[i]
            i -= 1
        right_min = height
        i = peak
        while i <= i_max and x[i] <= height:
            if x[i] < right_min:
                right_min = x[i]
            i += 1
        prom[p] = height - max(left_min, right_min)
    return prom


@njit(cache=True, nogil=True)
def _detect_peaks(x, distance, half_window, prominence, adaptive_half, adaptive_fraction):
    """Beat indices of ``x`` (see the module docstring); ``prominence < 0`` selects the adaptive threshold."""
    peaks = _local_maxima(x)
    if peaks.shape[0] == 0:
        return peaks
    peaks = peaks[_select_by_distance(x, peaks, distance)]
    prom = _prominences(x, peaks, half_window)
    n_peaks = peaks.shape[0]
    keep = np.empty(n_peaks, dtype=np.bool_)
    if prominence >= 0.0:
        for p in range(n_peaks):
            keep[p] = prom[p] >= prominence
    else:
        lo = 0
        hi = 0
        for p in range(n_peaks):
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
            keep[p] = prom[p] >= adaptive_fraction * reference
    return peaks[keep]


def _detector_args(fs: float, min_distance_s: float) -> tuple[int, int, int]:
    """Sample counts of the refractory distance, prominence half-window and adaptive half-window."""
    distance = max(1, math.ceil(min_distance_s * fs))
    half_window = max(1, round(_PROMINENCE_WINDOW_S * fs))
    adaptive_half = max(1, round(_ADAPTIVE_WINDOW_S * fs))
    return distance, half_window, adaptive_half


def detect_peaks(x, fs: float, *, min_distance_s: float = 0.3, prominence: float | None = None) -> np.ndarray:
    """Beat (R peak / systolic peak) indices of an ECG or PPG trace.

    Parameters
    ----------
    x : array-like, shape (n_samples,)
        One channel, beats as positive deflections (negate an inverted lead); finite values.
    fs : float
        Sampling rate in Hz (> 0).
    min_distance_s : float, default 0.3
        Refractory period in seconds (> 0): peaks closer than this are merged into the highest
        one. 0.3 s allows up to 200 beats/min.
    prominence : float or None, default None
        Minimum prominence in signal units (>= 0). None uses the adaptive threshold (0.4 x the
        largest prominence within +-1.5 s), which follows amplitude changes and needs no
        calibration.

    Returns
    -------
    peaks : ndarray of int64, shape (n_peaks,)
        Sorted sample indices. With a fixed ``prominence`` they equal
        ``scipy.signal.find_peaks(x, distance=ceil(min_distance_s * fs), prominence=prominence,
        wlen=2 * round(fs) + 1)[0]`` (up to the order of ties between equal heights).

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
    >>> detect_peaks(pulses, fs)
    array([ 50, 150, 250, 350, 450])
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
            raise ValueError(f"prominence must be a finite number >= 0 (signal units) or None, got {prominence!r}.")
    distance, half_window, adaptive_half = _detector_args(fs, min_distance_s)
    return _detect_peaks(x, distance, half_window, threshold, adaptive_half, _ADAPTIVE_FRACTION)


@njit(cache=True, nogil=True)
def _heart_rate_features(windows, fs, distance, half_window, adaptive_half, adaptive_fraction, out):
    """Mean heart rate (beats/min) and RMSSD (ms) of each window and channel, into ``out``."""
    n_windows, n_channels, _ = windows.shape
    for i in range(n_windows):
        for c in range(n_channels):
            peaks = _detect_peaks(windows[i, c], distance, half_window, -1.0, adaptive_half, adaptive_fraction)
            n_peaks = peaks.shape[0]
            heart_rate = 0.0
            rmssd = 0.0
            if n_peaks >= 2:
                heart_rate = 60.0 * fs * (n_peaks - 1) / (peaks[n_peaks - 1] - peaks[0])
            if n_peaks >= 3:
                ss = 0.0
                for p in range(2, n_peaks):
                    d = ((peaks[p] - peaks[p - 1]) - (peaks[p - 1] - peaks[p - 2])) / fs
                    ss += d * d
                rmssd = 1000.0 * math.sqrt(ss / (n_peaks - 2))
            out[i, c, 0] = heart_rate
            out[i, c, 1] = rmssd


def heart_rate_features(windows, fs: float) -> np.ndarray:
    """Mean heart rate and RMSSD of every window and channel (ECG or PPG channels).

    Parameters
    ----------
    windows : array-like, shape (n_windows, n_channels, window)
        Windows of ECG/PPG channels (beats as positive deflections); finite values.
        ``n_windows`` may be 0. Beats are found by ``detect_peaks`` with its defaults.
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
    windows = _check_windows(windows)
    fs = check_positive_float(fs, "fs")
    out = np.empty(windows.shape[:2] + (2,), dtype=windows.dtype)
    if windows.shape[0]:
        distance, half_window, adaptive_half = _detector_args(fs, 0.3)
        _heart_rate_features(windows, fs, distance, half_window, adaptive_half, _ADAPTIVE_FRACTION, out)
    return out
