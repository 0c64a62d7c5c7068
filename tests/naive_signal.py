"""Slow, obvious NumPy/SciPy references for the signal kernels (windowing, spectral, biosensor)."""

from __future__ import annotations

import math

import numpy as np
import scipy.signal


def sliding_windows(x, window, hop):
    """Copy of every window, one Python loop step at a time."""
    x = np.asarray(x)
    out = []
    start = 0
    while start + window <= x.shape[1]:
        out.append(x[:, start : start + window].copy())
        start += hop
    return np.array(out).reshape(len(out), x.shape[0], window)


def welch(x, fs, nperseg):
    """``scipy.signal.welch`` with the kernels' fixed settings, over the last axis."""
    return scipy.signal.welch(
        x,
        fs,
        window="hann",
        nperseg=nperseg,
        noverlap=nperseg // 2,
        detrend="constant",
        scaling="density",
        average="mean",
    )


def band_powers(windows, fs, bands, nperseg):
    """Welch PSD summed over the bins ``lo <= f < hi``, times the bin width."""
    freqs, psd = welch(windows, fs, nperseg)
    df = freqs[1] - freqs[0]
    return np.stack([psd[..., (freqs >= lo) & (freqs < hi)].sum(axis=-1) * df for _, lo, hi in bands], axis=-1)


def segment_powers(x, starts, nperseg, kmin, n_bins):
    """``|rfft((seg - mean) * hann)|^2`` of bins ``kmin .. kmin + n_bins - 1`` for each segment start."""
    taper = scipy.signal.get_window("hann", nperseg)
    out = np.empty((len(starts), x.shape[0], n_bins))
    for g, start in enumerate(starts):
        seg = np.asarray(x[:, start : start + nperseg], dtype=np.float64)
        spectrum = np.fft.rfft((seg - seg.mean(axis=1, keepdims=True)) * taper, axis=1)
        out[g] = np.abs(spectrum[:, kmin : kmin + n_bins]) ** 2
    return out


def filter_edges(n_bands, fmin, fmax, scale="mel"):
    """Band edges equally spaced on the HTK mel scale (or in Hz), one value at a time."""
    if scale == "mel":
        to_scale = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
        to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    else:
        to_scale = to_hz = lambda v: v  # noqa: E731
    lo, hi = to_scale(fmin), to_scale(fmax)
    edges = [to_hz(lo + (hi - lo) * i / (n_bands + 1)) for i in range(n_bands + 2)]
    edges[0], edges[-1] = fmin, fmax
    return edges


def triangular_filterbank(freqs, edges):
    """``(n_bands, n_freqs)`` triangles of height 1, by explicit loops."""
    n_bands = len(edges) - 2
    fb = np.zeros((n_bands, len(freqs)))
    for b in range(n_bands):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        for k, f in enumerate(freqs):
            if lo < f <= mid:
                fb[b, k] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                fb[b, k] = (hi - f) / (hi - mid)
    return fb


def log_band_energies(windows, fs, n_bands, fmin, fmax, nperseg, scale="mel"):
    """ln(triangle-weighted Welch PSD * df + 1e-10)."""
    freqs, psd = welch(windows, fs, nperseg)
    fb = triangular_filterbank(freqs, filter_edges(n_bands, fmin, fmax, scale))
    return np.log(psd @ fb.T * (freqs[1] - freqs[0]) + 1e-10)


def window_statistics(windows, fs):
    """mean, std, polyfit slope per second, min, max with plain NumPy."""
    windows = np.asarray(windows, dtype=np.float64)
    n_windows, n_channels, n = windows.shape
    t = np.arange(n) / fs
    out = np.zeros((n_windows, n_channels, 5))
    for i in range(n_windows):
        for c in range(n_channels):
            w = windows[i, c]
            slope = np.polyfit(t, w, 1)[0] if n > 1 else 0.0
            out[i, c] = (w.mean(), w.std(), slope, w.min(), w.max())
    return out


def heart_rate(peaks, fs):
    """(beats/min, RMSSD ms) from peak indices; zeros when too few peaks."""
    ibi = np.diff(peaks) / fs
    hr = 60.0 / ibi.mean() if ibi.size >= 1 else 0.0
    rmssd = 1000.0 * np.sqrt(np.mean(np.diff(ibi) ** 2)) if ibi.size >= 2 else 0.0
    return hr, rmssd


def moving_average(x, half):
    """Centred mean over the samples of ``[i - half, i + half]`` that exist."""
    x = np.asarray(x, dtype=np.float64).tolist()
    windows = [x[max(0, i - half) : i + half + 1] for i in range(len(x))]
    return np.array([sum(w) * (1.0 / len(w)) for w in windows])


def prefix_moving_average(x, half):
    """Centred mean of the samples of ``[i - half, i + half]`` that exist, as differences of ``np.cumsum``."""
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(x, dtype=np.float64))])
    i = np.arange(len(x))
    first, stop = np.maximum(i - half, 0), np.minimum(i + half + 1, len(x))
    return (prefix[stop] - prefix[first]) * (1.0 / (stop - first))


def beat_envelopes(x, fs):
    """(box envelope, triangular envelope) of the squared rising slope, per the biosensor module docstring."""
    smoothed = moving_average(x, round(0.01 * fs))
    d2 = np.maximum(np.gradient(smoothed) * fs, 0.0) ** 2  # rising slopes only
    fine = max(1, round(0.025 * fs))
    return prefix_moving_average(d2, max(1, round(0.05 * fs))), prefix_moving_average(
        prefix_moving_average(d2, fine), fine
    )


def detect_beats(x, fs, prominence, min_distance_s=0.3):
    """scipy.signal.find_peaks on the box envelope, each peak moved to the triangular envelope's maximum."""
    box, tri = beat_envelopes(x, fs)
    candidates = scipy.signal.find_peaks(
        box, distance=math.ceil(min_distance_s * fs), prominence=prominence, wlen=2 * round(fs) + 1
    )[0]
    return beat_times(tri, candidates, fs)


def beat_times(tri, candidates, fs):
    """Each candidate moved to the triangular envelope's maximum within +-0.05 s (distinct, increasing)."""
    half = max(1, round(0.05 * fs))
    beats = []
    for c in candidates:
        lo = max(c - half, 0)
        best = lo + int(np.argmax(tri[lo : c + half + 1]))
        if not beats or best > beats[-1]:
            beats.append(best)
    return np.array(beats, dtype=np.int64)


def select_by_distance(x, peaks, distance):
    """Peaks kept highest first (Python's stable sort: of equal heights the later wins),
    each dropping the others closer than ``distance`` samples."""
    order = sorted(range(len(peaks)), key=lambda k: x[peaks[k]])
    keep = [True] * len(peaks)
    for j in reversed(order):
        if keep[j]:
            for k in range(len(peaks)):
                if k != j and abs(peaks[k] - peaks[j]) < distance:
                    keep[k] = False
    return np.array([p for p, kept in zip(peaks, keep) if kept], dtype=np.int64)
