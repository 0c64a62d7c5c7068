"""The biosensor kernels' fast paths against plain NumPy/SciPy twins of the detector, bit for bit.

The detector's stages (local maxima, distance selection, prominences) take shortcuts that must
not change a single index: every test compares exact outputs with SciPy or with the twin in
``naive_signal.py``, on random, realistic and degenerate signals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal

import naive_signal as naive
from biofed.datasets import make_recording
from biofed.kernels import biosensor, detect_peaks, heart_rate_features, sliding_windows, window_statistics


def adaptive_beats(x, fs, min_distance_s=0.3):
    """Steps 1-6 of the biosensor module docstring with NumPy and SciPy: the box envelope's peaks
    and their prominences, the adaptive threshold, each kept peak moved to the triangular
    envelope's maximum."""
    if len(x) < 3:
        return np.empty(0, dtype=np.int64)
    box, tri = naive.beat_envelopes(x, fs)
    # distance selection: ties in height go to the later peak (a stable order; scipy's own sort
    # leaves their order to the sorting algorithm)
    candidates = naive.select_by_distance(box, scipy.signal.find_peaks(box)[0], math.ceil(min_distance_s * fs))
    prominences = scipy.signal.peak_prominences(box, candidates, wlen=2 * max(1, round(fs)) + 1)[0]
    reach = max(1, round(1.5 * fs))
    kept = [
        c
        for c, p in zip(candidates, prominences)
        if p >= 0.2 * prominences[np.abs(candidates - c) <= reach].max(initial=0.0)
    ]
    return naive.beat_times(tri, kept, fs)


def heart_rate_of(beats, fs):
    """(heart rate, RMSSD) of beat indices in the kernel's arithmetic (integer sample differences)."""
    heart_rate = 60.0 * fs * (len(beats) - 1) / (beats[-1] - beats[0]) if len(beats) >= 2 else 0.0
    if len(beats) < 3:
        return heart_rate, 0.0
    ss = 0.0
    for p in range(2, len(beats)):
        d = ((beats[p] - beats[p - 1]) - (beats[p - 1] - beats[p - 2])) / fs
        ss += d * d
    return heart_rate, 1000.0 * math.sqrt(ss / (len(beats) - 2))


def signals(seed, n):
    """Named test signals of ``n`` samples at 250 Hz: realistic ECG and PPG, noise, random walks,
    quantized (plateau-rich) and degenerate ones."""
    rng = np.random.default_rng(seed)
    bio = make_recording("rest", duration_s=n / 250.0 + 1.0, eeg_channels=1, random_state=seed).signals["bio"]
    ecg, ppg = bio.data[0, :n], bio.data[1, :n]
    t = np.arange(n) / 250.0
    single = np.exp(-0.5 * ((t - t[n // 2]) / 0.02) ** 2) if n else t
    return {
        "ecg": ecg,
        "inverted ecg": -ecg + 1e-4 * rng.standard_normal(n),
        "ppg": ppg,
        "noise": rng.standard_normal(n),
        "random walk": np.cumsum(rng.standard_normal(n)),
        "quantized": np.round(4.0 * np.sin(2 * np.pi * 1.3 * t) + rng.integers(0, 2, n)),
        "steps": np.repeat(rng.integers(0, 3, n // 7 + 1), 7)[:n].astype(np.float64),
        "flat": np.full(n, 3.5),
        "single beat": single,
        "sine (no beat)": np.sin(2 * np.pi * 0.2 * t),
    }


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [500, 1, 2, 3, 4, 37, 250, 1250])
def test_detector_equals_scipy_twin_bit_for_bit(seed, n):
    fs = 250.0
    for name, x in signals(seed, n).items():
        expected = adaptive_beats(x, fs)
        np.testing.assert_array_equal(detect_peaks(x, fs), expected, err_msg=name)
        # the pair path of the device: every signal next to every kind of neighbour
        w = np.stack([x, np.roll(x, 17), x[::-1].copy()])[None]
        out = np.empty((1, 3, 2))
        assert biosensor._heart_rate_features(w, np.array([0, 1, 2]), *biosensor._heart_rate_args(fs), out)
        np.testing.assert_array_equal(out[0, 0], heart_rate_of(expected, fs), err_msg=name)
        np.testing.assert_array_equal(out[0, 2], heart_rate_of(adaptive_beats(w[0, 2], fs), fs), err_msg=name)


@pytest.mark.parametrize("fs", [100.0, 360.0, 1000.0, 1500.0])
def test_detector_equals_scipy_twin_at_other_rates(fs):
    # other smoothing, envelope and block widths: wide ones take the running sums
    rng = np.random.default_rng(int(fs))
    for seed in range(3):
        x = make_recording("arithmetic", duration_s=8.0, eeg_channels=1, bio_sfreq=fs, random_state=seed)
        for channel in x.signals["bio"].data:
            noisy = channel + 0.05 * np.std(channel) * rng.standard_normal(channel.size)
            np.testing.assert_array_equal(detect_peaks(noisy, fs), adaptive_beats(noisy, fs))


@pytest.mark.parametrize("seed", range(20))
def test_local_maxima_equal_scipy_with_plateaus_and_edges(seed):
    rng = np.random.default_rng(seed)
    peaks = np.empty(200, dtype=np.int64)
    for n in (0, 1, 2, 3, 5, 64, 400):
        for x in (
            rng.integers(0, 3, n).astype(np.float64),  # plateaus everywhere, some up to the edges
            rng.standard_normal(n),
            np.repeat(rng.standard_normal(n // 4 + 1), rng.integers(1, 6))[:n].copy(),
        ):
            count = biosensor._local_maxima_into(x, peaks[: max(n // 2, 1)])
            np.testing.assert_array_equal(peaks[:count], scipy.signal.find_peaks(x)[0])  # no conditions: all maxima


@pytest.mark.parametrize("seed", range(20))
def test_distance_selection_both_ways_equal_stable_reference(seed):
    # few keepable peaks take the search for the highest remaining one, many take the sort
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 3000))
    x = rng.integers(0, 5, n).astype(np.float64)  # many equal heights: the later must win
    for distance in (1, 2, 7, n // 15 + 1, n // 3 + 1, n + 5):
        peaks = np.sort(rng.choice(n, min(n, int(rng.integers(1, 120))), replace=False)).astype(np.int64)
        selected = peaks.copy()
        count = biosensor._select_by_distance(x, selected, distance, np.empty(peaks.size, dtype=np.int64))
        np.testing.assert_array_equal(selected[:count], naive.select_by_distance(x, peaks, distance))


@pytest.mark.filterwarnings("ignore:some peaks have a prominence of 0")  # plateaus: bases at the peak's height
@pytest.mark.parametrize("seed", range(20))
def test_prominences_equal_scipy_across_blocks(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 1500))
    x = np.cumsum(rng.standard_normal(n))
    if seed % 2:
        x = np.round(x)  # equal samples: plateaus and bases that equal the peak
    peaks = scipy.signal.find_peaks(x)[0].astype(np.int64)
    for half_window in (1, 15, 16, 17, 100, 2 * n):
        prom = np.empty(biosensor._prominence_scratch_size(n))
        biosensor._prominences_into(x, peaks, half_window, prom, prom[max(n // 2, 1) :])
        expected = scipy.signal.peak_prominences(x, peaks, wlen=2 * half_window + 1)[0]
        np.testing.assert_array_equal(prom[: peaks.size], expected)


@pytest.mark.parametrize("n_channels", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_window_statistics_of_each_channel_alone_and_in_groups_have_the_same_bits(n_channels, dtype):
    # channels share passes four at a time: a channel's statistics must not depend on its company
    rng = np.random.default_rng(n_channels)
    stream = (rng.standard_normal((n_channels, 2000)) * rng.uniform(0.1, 10.0, (n_channels, 1)) + 5.0).astype(dtype)
    w = sliding_windows(stream, 500, 250)
    out = window_statistics(w, 250.0)
    for c in range(n_channels):
        np.testing.assert_array_equal(out[:, c], window_statistics(np.ascontiguousarray(w[:, c : c + 1]), 250.0)[:, 0])
    np.testing.assert_allclose(out, naive.window_statistics(w, 250.0), rtol=1e-10 if dtype == np.float64 else 1e-5)


def test_biosensor_rows_of_the_device_profile_equal_the_public_functions():
    # the device's call: 4 channels, heart rate of ECG and PPG, strided windows of its buffer
    fs = 250.0
    rec = make_recording("rest", duration_s=30.0, eeg_channels=1, random_state=3).signals["bio"].data
    rng = np.random.default_rng(3)
    stream = np.vstack(
        [rec, np.cumsum(rng.standard_normal((1, rec.shape[1]))) * 1e-3 + 2.0, rng.standard_normal((1, rec.shape[1]))]
    )
    w = sliding_windows(stream, 500, 250)
    rows = np.empty((w.shape[0], 24))
    columns = np.arange(24, dtype=np.intp)
    biosensor._biosensor_rows(
        w, np.array([0, 1], dtype=np.intp), *biosensor._heart_rate_args(fs), columns[:20], columns[20:], rows
    )
    np.testing.assert_array_equal(rows[:, :20], window_statistics(w, fs).reshape(w.shape[0], -1))
    np.testing.assert_array_equal(rows[:, 20:], heart_rate_features(w[:, :2], fs).reshape(w.shape[0], -1))
    for i in range(w.shape[0]):
        for c in range(2):
            np.testing.assert_array_equal(
                rows[i, 20 + 2 * c : 22 + 2 * c], heart_rate_of(adaptive_beats(w[i, c], fs), fs)
            )
    assert 50.0 < np.median(rows[:, 20]) < 100.0  # the ECG's beats are found


def test_heart_rate_features_flag_non_finite_samples_of_either_channel_of_a_pair():
    w = np.tile(np.sin(np.linspace(0.0, 20.0, 500)), (1, 3, 1))
    channels = np.array([0, 1, 2])
    out = np.empty((1, 3, 2))
    args = biosensor._heart_rate_args(250.0)
    assert biosensor._heart_rate_features(w, channels, *args, out)
    for c in range(3):
        bad = w.copy()
        bad[0, c, 123] = np.nan
        assert not biosensor._heart_rate_features(bad, channels, *args, out)
    short = np.full((1, 2, 2), np.inf)
    assert not biosensor._heart_rate_features(short, np.array([0, 1]), *args, np.empty((1, 2, 2)))
