"""Signal kernels (windowing, spectral, biosensor) against the naive references in naive_signal.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

import naive_signal as naive
from biofed.kernels import (
    BIOSENSOR_FEATURES,
    EEG_BANDS,
    FLOAT32_RTOL,
    SpectralPlan,
    WelchStream,
    band_power_plan,
    band_powers,
    biosensor,
    count_windows,
    detect_peaks,
    heart_rate_features,
    log_band_energies,
    log_band_energy_plan,
    reduce_segments,
    segment_powers,
    shared_nperseg,
    sliding_spectral_features,
    sliding_windows,
    spectral_features,
    window_statistics,
)


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


def ecg_like(fs, duration_s, rr_s, *, rng, noise=0.02, wander=0.5):
    """Synthetic ECG: narrow R, P and T waves, baseline wander, noise; ``rr_s`` is one RR
    interval or a cycle of them."""
    t = np.arange(int(duration_s * fs)) / fs
    rr = np.resize(np.atleast_1d(rr_s), int(duration_s / min(np.atleast_1d(rr_s))) + 2)
    beats = 0.4 + np.concatenate([[0.0], np.cumsum(rr)])
    beats = beats[beats < duration_s - 0.4]
    x = wander * np.sin(2 * np.pi * 0.3 * t) + noise * rng.standard_normal(t.size)
    for b in beats:
        x += 1.0 * np.exp(-0.5 * ((t - b) / 0.010) ** 2)  # R
        x += 0.15 * np.exp(-0.5 * ((t - b + 0.16) / 0.020) ** 2)  # P
        x += 0.30 * np.exp(-0.5 * ((t - b - 0.25) / 0.040) ** 2)  # T
    return x, np.round(beats * fs).astype(np.int64)


# --------------------------------------------------------------------------------------------
# windowing


@pytest.mark.parametrize("buf_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk_dtype", [np.float64, np.float32, np.int16])
def test_append_samples_copies_and_sums(rng, buf_dtype, chunk_dtype):
    from biofed.kernels.windowing import _append_samples

    stream = (rng.standard_normal((3, 400)) * 100).astype(chunk_dtype)
    chunk = stream[:, 50:150]  # a strided view, as a recording's slice
    buf = np.zeros((3, 300), dtype=buf_dtype)
    total = _append_samples(chunk, buf, 120)
    np.testing.assert_array_equal(buf[:, 120:220], chunk.astype(buf_dtype))
    assert not buf[:, :120].any() and not buf[:, 220:].any()
    assert total == pytest.approx(chunk.astype(np.float64).sum(), rel=1e-12)
    if chunk_dtype != np.int16:
        for bad in (np.nan, np.inf, -np.inf):
            spoiled = chunk.copy()
            spoiled[2, 99] = bad
            assert not math.isfinite(_append_samples(spoiled, buf, 0))


def test_count_windows_values():
    assert count_windows(1000, 500, 250) == 3
    assert count_windows(500, 500, 1) == 1
    assert count_windows(499, 500, 1) == 0
    assert count_windows(0, 1, 1) == 0
    assert count_windows(10, 3, 100) == 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("window", "hop"), [(100, 50), (100, 100), (30, 70), (1, 1), (257, 13)])
def test_sliding_windows_match_loop_copy(rng, dtype, window, hop):
    x = rng.standard_normal((3, 1000)).astype(dtype)
    w = sliding_windows(x, window, hop)
    ref = naive.sliding_windows(x, window, hop)
    assert w.dtype == dtype
    assert w.shape == ref.shape == (count_windows(1000, window, hop), 3, window)
    np.testing.assert_array_equal(w, ref)


def test_sliding_windows_is_a_read_only_view(rng):
    x = rng.standard_normal((2, 500))
    w = sliding_windows(x, 100, 50)
    assert np.shares_memory(w, x)
    assert not w.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0, 0] = 1.0


def test_sliding_windows_integer_input_becomes_float64():
    w = sliding_windows(np.arange(20).reshape(2, 10), 4, 2)
    assert w.dtype == np.float64
    np.testing.assert_array_equal(w[1, 1], [12.0, 13.0, 14.0, 15.0])


@pytest.mark.parametrize(("n_samples", "window", "hop"), [(99, 100, 1), (10, 11, 50), (1, 2, 1)])
def test_sliding_windows_too_short_gives_zero_windows(n_samples, window, hop):
    w = sliding_windows(np.ones((4, n_samples)), window, hop)
    assert w.shape == (0, 4, window)


def test_sliding_windows_pass_nan_through_but_reject_inf():
    x = np.ones((1, 10))
    x[0, 5] = np.nan
    w = sliding_windows(x, 4, 2)
    assert np.isnan(w).any(axis=(1, 2)).tolist() == [False, True, True, False]
    x[0, 5] = np.inf
    with pytest.raises(ValueError, match="inf"):
        sliding_windows(x, 4, 2)


@settings(max_examples=60, deadline=None)
@given(
    n_channels=st.integers(1, 4),
    n_samples=st.integers(1, 300),
    window=st.integers(1, 320),
    hop=st.integers(1, 80),
    dtype=st.sampled_from([np.float32, np.float64, np.int16]),
)
def test_sliding_windows_properties(n_channels, n_samples, window, hop, dtype):
    x = (np.arange(n_channels * n_samples) % 97).reshape(n_channels, n_samples).astype(dtype)
    w = sliding_windows(x, window, hop)
    n = count_windows(n_samples, window, hop)
    assert w.shape == (n, n_channels, window)
    assert w.dtype == (np.float32 if dtype == np.float32 else np.float64)
    if n:
        np.testing.assert_array_equal(w[-1], x[:, (n - 1) * hop : (n - 1) * hop + window])
        assert (n - 1) * hop + window <= n_samples < n * hop + window


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((np.ones(10), 2, 1), ValueError, "x must be 2-D"),
        ((np.ones((1, 2, 10)), 2, 1), ValueError, "x must be 2-D"),
        ((np.ones((2, 10)), 0, 1), ValueError, "window must be >= 1"),
        ((np.ones((2, 10)), 2, 0), ValueError, "hop must be >= 1"),
        ((np.ones((2, 10)), 2.5, 1), TypeError, "window must be an integer"),
        ((np.ones((2, 0)), 2, 1), ValueError, "x is empty"),
        ((np.ones((2, 10), dtype=complex), 2, 1), TypeError, "real numeric"),
    ],
)
def test_sliding_windows_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        sliding_windows(*args)


@pytest.mark.parametrize(
    ("args", "match"),
    [((-1, 2, 1), "n_samples must be >= 0"), ((10, 0, 1), "window must be >= 1"), ((10, 2, 0), "hop must be >= 1")],
)
def test_count_windows_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        count_windows(*args)


# --------------------------------------------------------------------------------------------
# spectral: band_powers


@pytest.mark.parametrize(
    ("fs", "window", "nperseg"), [(500.0, 1000, None), (250.0, 500, None), (160.0, 320, 100), (100.0, 333, 65)]
)
def test_band_powers_match_scipy_welch(rng, fs, window, nperseg):
    x = rng.standard_normal((3, 4, window)) + 0.5
    bands = EEG_BANDS if fs >= 100 else EEG_BANDS[:4]
    expected_nperseg = nperseg or min(window, 2 ** math.ceil(math.log2(fs)))
    ref = naive.band_powers(x, fs, bands, expected_nperseg)
    np.testing.assert_allclose(band_powers(x, fs, bands, nperseg=nperseg), ref, rtol=1e-10)
    np.testing.assert_allclose(band_powers(x, fs, bands, nperseg=nperseg, log=True), np.log10(ref), rtol=1e-10)


def test_band_powers_float32_stays_float32(rng):
    x = rng.standard_normal((2, 19, 1000))
    out = band_powers(x.astype(np.float32), 500.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, naive.band_powers(x, 500.0, EEG_BANDS, 512), rtol=1e-4)


def test_band_powers_on_strided_windows_and_zero_windows(rng):
    x = rng.standard_normal((2, 3000))
    w = sliding_windows(x, 1000, 250)
    np.testing.assert_allclose(band_powers(w, 500.0), naive.band_powers(np.array(w), 500.0, EEG_BANDS, 512), rtol=1e-10)
    assert band_powers(sliding_windows(x, 4000, 250), 500.0).shape == (0, 2, 5)


def test_band_powers_sine_lands_in_its_band():
    fs, amplitude = 500.0, 3.0
    t = np.arange(2000) / fs
    x = np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in (2.5, 6.0, 10.5, 20.0, 40.0)])[None]
    p = band_powers(x, fs)[0]
    np.testing.assert_array_equal(np.argmax(p, axis=1), np.arange(5))
    # a sinusoid's power A^2/2 sits (Hann leakage aside) in its band
    np.testing.assert_allclose(p.max(axis=1), amplitude**2 / 2, rtol=0.02)


def _eeg_like(rng, n_channels=19, n_samples=5000, fs=500.0):
    """Synthetic twin of the eegmat crop: 1/f background, alpha burst, line noise, offsets."""
    pink = np.cumsum(rng.standard_normal((n_channels, n_samples)), axis=1) * 0.05
    t = np.arange(n_samples) / fs
    alpha = 2.0 * np.sin(2 * np.pi * 10.2 * t) * (1 + np.sin(2 * np.pi * 0.2 * t))
    return (pink + alpha + 0.3 * np.sin(2 * np.pi * 50 * t) + rng.standard_normal((n_channels, 1))) * 1e-5


def _eegmat_crop(shared_datasets):
    mne = pytest.importorskip("mne")
    raw = mne.io.read_raw_edf(shared_datasets / "eegmat" / "Subject02_1.edf", preload=False, verbose="error")
    picks = [name for name in raw.ch_names if name not in ("EEG A2-A1", "ECG ECG")]
    assert len(picks) == 19 and raw.info["sfreq"] == 500.0
    return raw.get_data(picks=picks, start=0, stop=5000)  # 10 s


@pytest.mark.parametrize("source", ["real", "synthetic"])
def test_band_powers_on_eeg_match_scipy_and_mne(request, rng, source):
    x = _eegmat_crop(request.getfixturevalue("shared_datasets")) if source == "real" else _eeg_like(rng)
    w = sliding_windows(x, 1000, 500)
    out = band_powers(w, 500.0)
    assert out.shape == (9, 19, 5)
    np.testing.assert_allclose(out, naive.band_powers(np.array(w), 500.0, EEG_BANDS, 512), rtol=1e-6)
    mne = pytest.importorskip("mne")
    psd, freqs = mne.time_frequency.psd_array_welch(
        np.array(w), 500.0, n_fft=512, n_per_seg=512, n_overlap=256, window="hann", average="mean", verbose="error"
    )
    df = freqs[1] - freqs[0]
    ref = np.stack([psd[..., (freqs >= lo) & (freqs < hi)].sum(-1) * df for _, lo, hi in EEG_BANDS], -1)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    out32 = band_powers(w.astype(np.float32), 500.0, log=True)
    np.testing.assert_allclose(out32, np.log10(ref), atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    n_windows=st.integers(0, 3),
    n_channels=st.integers(1, 3),
    window=st.integers(8, 300),
    fs=st.sampled_from([100.0, 128.0, 250.0, 1000.0]),
    dtype=st.sampled_from([np.float32, np.float64, np.int32]),
    seed=st.integers(0, 2**16),
)
def test_band_powers_and_energies_properties(n_windows, n_channels, window, fs, dtype, seed):
    x = (np.random.default_rng(seed).standard_normal((n_windows, n_channels, window)) * 100).astype(dtype)
    out_dtype = np.float32 if dtype == np.float32 else np.float64
    bands = (("low", 0.0, fs / 4), ("high", fs / 4, fs / 2))
    p = band_powers(x, fs, bands)
    e = log_band_energies(x, fs, n_bands=2, fmin=0.0, scale="linear")
    assert p.shape == e.shape == (n_windows, n_channels, 2)
    assert p.dtype == e.dtype == out_dtype
    if n_windows:
        nperseg = min(window, 2 ** math.ceil(math.log2(fs)))
        ref = naive.band_powers(x.astype(np.float64), fs, bands, nperseg)
        np.testing.assert_allclose(p, ref, rtol=1e-3 if dtype == np.float32 else 1e-9, atol=1e-6 * ref.max())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"windows": np.full((1, 1, 100), np.nan)}, ValueError, "NaN or inf"),
        ({"windows": np.r_[np.zeros(99), np.inf].reshape(1, 1, 100)}, ValueError, "NaN or inf"),
        ({"windows": np.ones((1, 100))}, ValueError, "windows must be 3-D.*sliding_windows"),
        ({"windows": np.ones((1, 1, 1))}, ValueError, "at least 2"),
        ({"fs": 0.0}, ValueError, "fs must be a finite number > 0"),
        ({"fs": -250.0}, ValueError, "fs must be a finite number > 0"),
        ({"fs": "fast"}, TypeError, "fs must be a number"),
        ({"bands": [("gamma", 30.0, 60.0)]}, ValueError, "'gamma'.*above the Nyquist frequency 50.0"),
        ({"bands": [("alpha", 13.0, 8.0)]}, ValueError, r"'alpha': lo \(13.0 Hz\) must be < hi"),
        ({"bands": [("alpha", 8.0, 8.0)]}, ValueError, "must be < hi"),
        ({"bands": [("neg", -1.0, 8.0)]}, ValueError, ">= 0 Hz"),
        ({"bands": []}, ValueError, "bands is empty"),
        ({"bands": [(1.0, 4.0)]}, ValueError, r"\(name, lo_hz, hi_hz\)"),
        ({"bands": 5}, TypeError, "sequence of"),
        ({"bands": [("thin", 1.1, 1.2)]}, ValueError, "'thin'.*no frequency bin.*increase nperseg"),
        ({"nperseg": 101}, ValueError, r"nperseg \(101\) exceeds the window length \(100"),
        ({"nperseg": 1}, ValueError, "nperseg must be >= 2"),
    ],
)
def test_band_powers_bad_input(kwargs, error, match):
    args = {"windows": np.random.default_rng(0).standard_normal((1, 1, 100)), "fs": 100.0, "bands": EEG_BANDS[:4]}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        band_powers(args.pop("windows"), args.pop("fs"), args.pop("bands"), **args)


# --------------------------------------------------------------------------------------------
# spectral: plans and shared segments


@pytest.mark.parametrize(
    "make_plan",
    [
        lambda: band_power_plan(500.0, 1000, log=True),
        lambda: band_power_plan(256.0, 512, EEG_BANDS[:3], nperseg=200),
        lambda: log_band_energy_plan(8000.0, 4000, n_bands=20),
        lambda: log_band_energy_plan(1000.0, 777, n_bands=8, scale="linear", nperseg=101),
    ],
)
def test_plan_equals_one_call_functions_and_segments_equal_batch(rng, make_plan):
    plan = make_plan()
    assert isinstance(plan, SpectralPlan) and not plan.weights.flags.writeable
    x = rng.standard_normal((3, plan.window * 3)) + 0.3
    hop = 2 * plan.step  # windows two segment steps apart share n_seg - 2 segments
    windows = np.ascontiguousarray(sliding_windows(x, plan.window, hop))
    batch = spectral_features(windows, plan)
    if plan.log == "ln":
        direct = log_band_energies(
            windows, plan.fs, n_bands=plan.n_bands, scale="linear" if plan.fs == 1000.0 else "mel", nperseg=plan.nperseg
        )
    else:
        direct = band_powers(windows, plan.fs, EEG_BANDS[: plan.n_bands], nperseg=plan.nperseg, log=plan.log == "log10")
    np.testing.assert_array_equal(batch, direct)
    # every segment of the stream once, then each window sums its own n_seg of them
    starts = np.arange(0, x.shape[1] - plan.nperseg + 1, plan.step)
    powers = segment_powers(x, starts, plan)
    n_bins = plan.weights.shape[0]
    np.testing.assert_allclose(
        powers, naive.segment_powers(x, starts, plan.nperseg, plan.kmin, n_bins), rtol=1e-10, atol=1e-12
    )
    # starts out of order or apart: each segment sums its halves itself, with the same bits
    picked = [3, 0, 1, 5, 6, 2]
    np.testing.assert_array_equal(segment_powers(x, starts[picked], plan), powers[picked])
    firsts = np.arange(len(windows)) * 2
    np.testing.assert_array_equal(reduce_segments(powers, firsts, plan), batch)  # bit for bit
    for dtype in (np.float32, np.float64):
        shared = reduce_segments(segment_powers(x.astype(dtype), starts, plan), firsts, plan, dtype=dtype)
        assert shared.dtype == dtype
        np.testing.assert_array_equal(shared, spectral_features(windows.astype(dtype), plan))


@pytest.mark.parametrize(
    ("hop", "window", "default", "expected"),
    [
        (500, 1000, 512, 500),  # 500 Hz EEG, 1 s hop: step 250 divides the hop
        (16000, 32000, 512, 500),  # 16 kHz audio, 1 s hop
        (250, 500, 256, 250),
        (512, 1024, 512, 512),  # the default already shares
        (400, 800, 512, 400),  # 200 divides 400 and is >= 3/4 of 256
        (300, 600, 512, 512),  # largest divisor <= 256 is 150 < 192: too coarse
        (509, 1018, 512, 512),  # a prime hop: no divisor near the step
        (380, 760, 512, 512),  # largest divisor <= 256 is 190 < 192: too coarse
        (None, 1000, 512, 512),  # hop not a whole number of samples
        (1000, 1000, 512, 512),  # windows do not overlap
        (1200, 1000, 512, 512),
        (3, 5, 5, 5),  # an odd default: steps up to 5 // 2 = 2, and 2 does not divide 3
        (4, 6, 5, 4),  # an odd default: step 2 divides 4
    ],
)
def test_shared_nperseg_picks_a_step_that_divides_the_hop(hop, window, default, expected):
    nperseg = shared_nperseg(hop, window, default)
    assert nperseg == expected and nperseg <= window
    if nperseg != default:
        assert hop % (nperseg // 2) == 0 and 4 * (nperseg // 2) >= 3 * (default // 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("make_plan", "hop"),
    [
        (lambda: band_power_plan(500.0, 1000, log=True, nperseg=500), 500),  # shares 1 of 3 segments
        (lambda: log_band_energy_plan(16000.0, 32000, nperseg=500), 16000),  # shares 63 of 127
        (lambda: band_power_plan(500.0, 1000, log=True), 500),  # 512: nothing shared
        (lambda: band_power_plan(100.0, 200, EEG_BANDS[:3], nperseg=51), 26),  # odd nperseg, step 26
        (lambda: band_power_plan(100.0, 200, EEG_BANDS[:3], nperseg=50), 300),  # hop beyond the window
    ],
)
def test_sliding_features_equal_the_windows_features_bit_for_bit(rng, make_plan, hop, dtype):
    plan = make_plan()
    x = (rng.standard_normal((2, plan.window + 37 * hop + 11)) + 0.3).astype(dtype)
    windows = np.ascontiguousarray(sliding_windows(x, plan.window, hop))
    features = sliding_spectral_features(x, hop, plan)
    assert features.dtype == dtype and features.shape == (len(windows), 2, plan.n_bands)
    np.testing.assert_array_equal(features, spectral_features(windows, plan))
    assert sliding_spectral_features(x[:, : plan.window - 1], hop, plan).shape == (0, 2, plan.n_bands)
    # computed in the other precision: the bits of casting the samples first
    other = np.float64 if dtype == np.float32 else np.float32
    for scale in (1.0, 1e-3, 37.0):
        y = x * dtype(scale)
        features = sliding_spectral_features(y, hop, plan, dtype=other)
        assert features.dtype == other
        np.testing.assert_array_equal(features, sliding_spectral_features(y.astype(other), hop, plan))


@pytest.mark.parametrize("nperseg", [100, 64])  # shared segments; 64: a 4-sample tail, unshared at hop 50
@pytest.mark.parametrize("where", [0, 120, 249, 299])
def test_sliding_features_find_non_finite_samples_in_every_window(where, nperseg):
    plan = band_power_plan(100.0, 200, EEG_BANDS[:3], nperseg=nperseg)
    x = np.ones((2, 300))
    x[1, where] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        sliding_spectral_features(x, 50, plan)
    x = np.ones((2, 330))
    x[0, 329] = np.nan  # after the last window (300 + 29 samples: no window covers it)
    assert sliding_spectral_features(x, 50, plan).shape == (3, 2, 3)
    x = np.ones((2, 300))
    x[1, where] = 1e39  # finite in float64, inf in float32: computed in float32 it is refused as a cast would be
    assert np.isfinite(sliding_spectral_features(x, 50, plan)).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        sliding_spectral_features(x, 50, plan, dtype=np.float32)


def test_sliding_features_bound_their_memory_in_blocks(rng, monkeypatch):
    from biofed.kernels import spectral

    plan = band_power_plan(100.0, 200, EEG_BANDS[:3], nperseg=50)
    x = rng.standard_normal((3, 200 + 40 * 100))
    whole = sliding_spectral_features(x, 100, plan)
    monkeypatch.setattr(spectral, "_SHARED_BLOCK_VALUES", 1)  # one window per block
    np.testing.assert_array_equal(sliding_spectral_features(x, 100, plan), whole)
    np.testing.assert_array_equal(whole, spectral_features(np.ascontiguousarray(sliding_windows(x, 200, 100)), plan))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("make_plan", "hop", "new_per_window"),
    [
        (lambda: band_power_plan(500.0, 1000, log=True, nperseg=500), 500, 2),  # 2 of 3 segments new
        (lambda: log_band_energy_plan(16000.0, 32000, nperseg=500), 16000, 64),  # 64 of 127
        (lambda: band_power_plan(500.0, 1000, log=True), 500, None),  # 512: starts off the step
        (lambda: band_power_plan(100.0, 200, EEG_BANDS[:3], nperseg=50), 300, None),  # no overlap
    ],
)
def test_welch_stream_equals_the_windows_features_bit_for_bit(rng, make_plan, hop, new_per_window, dtype):
    plan = make_plan()
    x = (rng.standard_normal((2, plan.window + 9 * hop)) + 0.3).astype(dtype)
    expected = spectral_features(np.ascontiguousarray(sliding_windows(x, plan.window, hop)), plan)
    stream = WelchStream(plan, 2, dtype)
    rows = []
    for i in range(len(expected)):  # one window per call, the buffer holding just that window
        window = np.ascontiguousarray(x[:, i * hop : i * hop + plan.window])
        rows.append(stream.features(window, i * hop, [i * hop]))
        if new_per_window and i:
            assert stream.kept_segments == range(i * new_per_window, i * new_per_window + plan.n_seg)
    np.testing.assert_array_equal(np.concatenate(rows), expected)
    # several windows per call, from a buffer that starts mid-stream; then a jump back to the start
    starts = [hop * i for i in range(3, 7)]
    np.testing.assert_array_equal(stream.features(x[:, hop * 2 :].copy(), hop * 2, starts), expected[3:7])
    np.testing.assert_array_equal(stream.features(x, 0, [0, hop]), expected[:2])
    assert stream.features(x, 0, []).shape == (0, 2, plan.n_bands)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("make_plan", "hop"),
    [
        (lambda: band_power_plan(500.0, 1000, log=True, nperseg=500), 500),
        (lambda: log_band_energy_plan(16000.0, 32000, nperseg=500), 16000),
    ],
)
def test_welch_stream_append_features_equals_append_then_features(rng, make_plan, hop, dtype):
    """The fused live step (copy a chunk into the buffer, Welch of the window it completes) has
    the bits of the windows' features; a NaN chunk leaves the kept segments as they were."""
    plan = make_plan()
    x = (rng.standard_normal((2, plan.window + 6 * hop)) + 0.3).astype(dtype)
    expected = spectral_features(np.ascontiguousarray(sliding_windows(x, plan.window, hop)), plan)
    stream = WelchStream(plan, 2, dtype)
    buf = np.empty((2, plan.window + 2 * hop), dtype=dtype)
    buf[:, : plan.window - hop] = x[:, : plan.window - hop]
    for i in range(len(expected)):  # the buffer holds window i - 1's last hop, then the new chunk
        fill = plan.window - hop
        chunk = x[:, i * hop + fill : i * hop + plan.window]  # a strided float64 or float32 view
        if i == 3:
            spoiled = chunk.astype(np.float64)
            spoiled[1, 7] = np.inf
            kept = stream.kept_segments
            assert stream.append_features(spoiled, buf, fill, i * hop, i * hop) is None
            assert stream.kept_segments == kept
        row = stream.append_features(chunk, buf, fill, i * hop, i * hop)
        np.testing.assert_array_equal(row, expected[i : i + 1])
        np.testing.assert_array_equal(buf[:, : plan.window], x[:, i * hop : i * hop + plan.window])
        buf[:, :fill] = buf[:, hop : hop + fill]


def test_welch_stream_bad_input_and_non_finite_samples(rng):
    plan = band_power_plan(100.0, 200, EEG_BANDS[:3], nperseg=100)
    stream = WelchStream(plan, 2, np.float64)
    x = rng.standard_normal((2, 600))
    for call, error, match in [
        (lambda: stream.features(x.astype(np.float32), 0, [0]), TypeError, "C-contiguous 2-D float64"),
        (lambda: stream.features(x[:, ::2], 0, [0]), TypeError, "C-contiguous"),
        (lambda: stream.features(x[:1].copy(), 0, [0]), ValueError, r"1 channel\(s\) but the stream has 2"),
        (lambda: stream.features(x, 100, [50]), ValueError, r"outside the buffer \[100, 700\)"),
        (lambda: stream.features(x, 0, [450]), ValueError, "outside the buffer"),
        (lambda: stream.features(x, 0, [100, 100]), ValueError, "ascending, got 100 then 100"),
        (lambda: WelchStream(plan, 0), ValueError, "n_channels must be >= 1"),
        (lambda: WelchStream(plan, 1, np.int64), TypeError, "float32 or float64"),
        (lambda: WelchStream("plan", 1), TypeError, "plan must be a SpectralPlan"),
    ]:
        with pytest.raises(error, match=match):
            call()
    expected = stream.features(x, 0, [0, 100, 200])
    bad = x.copy()
    bad[1, 350] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        stream.features(bad, 0, [300])
    assert stream.kept_segments == range(0)  # forgotten: the next window recomputes its segments
    np.testing.assert_array_equal(stream.features(x, 0, [200]), expected[2:])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: sliding_spectral_features(np.ones((1, 300)), 0, p), ValueError, "hop must be >= 1"),
        (lambda p: sliding_spectral_features(np.ones((1, 300)), 1.5, p), TypeError, "hop must be an integer"),
        (lambda p: sliding_spectral_features(np.ones(300), 50, p), ValueError, "x must be 2-D"),
        (lambda p: sliding_spectral_features(np.full((1, 300), np.inf), 50, p), ValueError, "NaN or inf"),
        (lambda p: sliding_spectral_features(np.ones((1, 300)), 50, "plan"), TypeError, "plan must be a SpectralPlan"),
        (lambda p: sliding_spectral_features(np.ones((1, 300)), 50, p, dtype=np.int32), TypeError, "dtype must be"),
        (lambda p: shared_nperseg(50, 100, 1), ValueError, "default must be >= 2"),
    ],
)
def test_sliding_features_bad_input(call, error, match):
    plan = band_power_plan(100.0, 100, EEG_BANDS[:4], nperseg=64)
    with pytest.raises(error, match=match):
        call(plan)


@pytest.mark.parametrize("source", ["real", "synthetic"])
def test_float32_features_within_documented_tolerance(request, rng, source):
    x = _eegmat_crop(request.getfixturevalue("shared_datasets")) if source == "real" else _eeg_like(rng)
    w = np.ascontiguousarray(sliding_windows(x, 1000, 500))
    plan = band_power_plan(500.0, 1000)
    p64, p32 = spectral_features(w, plan), spectral_features(w.astype(np.float32), plan)
    assert p32.dtype == np.float32
    np.testing.assert_allclose(p32, p64, rtol=FLOAT32_RTOL, atol=0)
    audio = np.cumsum(rng.standard_normal((1, 64000)), axis=1) * 1e-3 + 0.2 * rng.standard_normal((1, 64000))
    wa = np.ascontiguousarray(sliding_windows(audio, 32000, 16000))
    mel = log_band_energy_plan(16000.0, 32000)
    np.testing.assert_allclose(
        spectral_features(wa.astype(np.float32), mel), spectral_features(wa, mel), rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL
    )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: spectral_features(np.ones((1, 1, 100)), "plan"), TypeError, "plan must be a SpectralPlan"),
        (lambda p: spectral_features(np.ones((1, 1, 99)), p), ValueError, "plan was built for 100"),
        (lambda p: spectral_features(np.full((1, 1, 100), np.nan), p), ValueError, "NaN or inf"),
        (lambda p: band_power_plan(100.0, 1), ValueError, "window must be >= 2"),
        (lambda p: band_power_plan(100.0, 100.0), TypeError, "window must be an integer"),
        (lambda p: log_band_energy_plan(100.0, 100, n_bands=0), ValueError, "n_bands must be >= 1"),
        (lambda p: segment_powers(np.ones((1, 100)), [0, 37], p), ValueError, r"segment starts must lie in \[0, 36\]"),
        (lambda p: segment_powers(np.ones((1, 100)), [-1], p), ValueError, "segment starts must lie"),
        (lambda p: segment_powers(np.ones((1, 100)), [0.5], p), TypeError, "starts must be a 1-D array of integers"),
        (lambda p: segment_powers(np.ones(100), [0], p), ValueError, "x must be 2-D"),
        (
            lambda p: reduce_segments(np.ones((1, 1, 3)), [0], p),
            ValueError,
            r"powers must have shape \(n_segments, n_channels, \d+\)",
        ),
        (
            lambda p: reduce_segments(segment_powers(np.ones((1, 100)), [0, 32], p), [1], p),
            ValueError,
            "needs 2 segments",
        ),
    ],
)
def test_plan_and_segment_bad_input(call, error, match):
    plan = band_power_plan(100.0, 100, EEG_BANDS[:4], nperseg=64)
    with pytest.raises(error, match=match):
        call(plan)


# --------------------------------------------------------------------------------------------
# spectral: log_band_energies


@pytest.mark.parametrize(
    ("fs", "window", "kwargs", "nperseg"),
    [
        (16000.0, 32000, {}, 512),
        (8000.0, 4000, {"n_bands": 20, "fmin": 50.0, "fmax": 3000.0}, 256),
        (1000.0, 2000, {"n_bands": 8, "scale": "linear"}, 32),
        (4000.0, 600, {"n_bands": 10, "nperseg": 300}, 300),
    ],
)
def test_log_band_energies_match_naive_filterbank(rng, fs, window, kwargs, nperseg):
    x = rng.standard_normal((2, 2, window)) + 0.1
    n_bands, fmin = kwargs.get("n_bands", 32), kwargs.get("fmin", 20.0)
    fmax, scale = kwargs.get("fmax", fs / 2), kwargs.get("scale", "mel")
    ref = naive.log_band_energies(x, fs, n_bands, fmin, fmax, nperseg, scale)
    out = log_band_energies(x, fs, **kwargs)
    assert out.shape == (2, 2, n_bands) and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)
    out32 = log_band_energies(x.astype(np.float32), fs, **kwargs)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ref, atol=1e-4)


def test_log_band_energies_default_frame_grows_for_narrow_bands(rng):
    # at 1 kHz with 32 mel bands from 20 Hz the lowest band is ~22 Hz wide: 32 ms frames
    # (df = 31 Hz) would leave bands empty, so the frame grows to 64 samples
    x = rng.standard_normal((1, 1, 2000))
    np.testing.assert_allclose(
        log_band_energies(x, 1000.0), naive.log_band_energies(x, 1000.0, 32, 20.0, 500.0, 64), rtol=1e-10
    )


@pytest.mark.parametrize("tone_hz", [150.0, 1000.0, 3500.0])
def test_log_band_energies_pure_tone_lands_in_its_band(tone_hz):
    fs, amplitude = 16000.0, 0.5
    x = amplitude * np.sin(2 * np.pi * tone_hz * np.arange(32000) / fs)[None, None]
    e = log_band_energies(x, fs)[0, 0]
    edges = np.array(naive.filter_edges(32, 20.0, 8000.0))
    assert int(np.argmax(e)) == int(np.argmin(np.abs(edges[1:-1] - tone_hz)))
    # the tone's power A^2/2 is split between the (at most two) overlapping triangles
    assert math.exp(e.max()) == pytest.approx(amplitude**2 / 2, rel=0.5)
    # bands further than 3 bins (df = 31.25 Hz) from the tone only see Hann leakage
    far = (edges[:-2] > tone_hz + 3 * 31.25) | (edges[2:] < tone_hz - 3 * 31.25)
    assert far.sum() >= 20 and e[far].max() < e.max() - 5


def test_log_band_energies_on_real_heart_sound(shared_datasets):
    path = shared_datasets / "biosppy" / "pcg.txt"
    header = path.read_text().splitlines()[1]
    assert "Sampling Rate" in header
    fs = float(header.split("=")[-1])
    x = np.loadtxt(path)[None]
    w = sliding_windows(x, int(2 * fs), int(fs))
    out = log_band_energies(w, fs, n_bands=16)  # default frame at 1 kHz: 32 ms = 32 samples
    np.testing.assert_allclose(
        out, naive.log_band_energies(np.array(w), fs, 16, 20.0, fs / 2, 32), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"windows": np.full((1, 1, 800), np.nan)}, ValueError, "NaN or inf"),
        ({"windows": np.full((1, 1, 800), -np.inf)}, ValueError, "NaN or inf"),
        ({"windows": np.ones(800)}, ValueError, "windows must be 3-D"),
        ({"fs": 0.0}, ValueError, "fs must be a finite number > 0"),
        ({"n_bands": 0}, ValueError, "n_bands must be >= 1"),
        ({"n_bands": 2.0}, TypeError, "n_bands must be an integer"),
        ({"fmax": 5000.0}, ValueError, r"fmax \(5000.0 Hz\) is above the Nyquist frequency 4000.0"),
        ({"fmin": 3000.0, "fmax": 2000.0}, ValueError, r"fmin \(3000.0 Hz\) must be < fmax"),
        ({"fmin": -5.0}, ValueError, "fmin must be a finite frequency >= 0"),
        ({"fmin": "low"}, TypeError, "fmin and fmax must be numbers"),
        ({"scale": "bark"}, ValueError, "scale must be one of"),
        ({"n_bands": 200, "nperseg": 256}, ValueError, "bands contain no frequency bin.*Use fewer bands"),
        ({"nperseg": 1000}, ValueError, "exceeds the window length"),
    ],
)
def test_log_band_energies_bad_input(kwargs, error, match):
    args = {"windows": np.random.default_rng(0).standard_normal((1, 1, 800)), "fs": 8000.0}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        log_band_energies(args.pop("windows"), args.pop("fs"), **args)


# --------------------------------------------------------------------------------------------
# biosensor


def test_biosensor_feature_names():
    assert BIOSENSOR_FEATURES == ("mean", "std", "slope", "min", "max", "heart_rate", "rmssd")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_window_statistics_match_numpy(rng, dtype):
    t = np.arange(400) / 200.0
    x = rng.standard_normal((5, 3, 400)) + 3.0 * t - 1.0
    out = window_statistics(x.astype(dtype), 200.0)
    assert out.shape == (5, 3, 5) and out.dtype == dtype
    ref = naive.window_statistics(x.astype(dtype), 200.0)
    np.testing.assert_allclose(out, ref, rtol=1e-10 if dtype == np.float64 else 1e-5, atol=1e-5)
    assert np.allclose(out[..., 2], 3.0, atol=0.5)


def test_window_statistics_edge_shapes():
    out = window_statistics(np.array([[[7.0]]]), 10.0)
    np.testing.assert_array_equal(out, [[[7.0, 0.0, 0.0, 7.0, 7.0]]])
    assert window_statistics(np.ones((0, 2, 10)), 10.0).shape == (0, 2, 5)
    np.testing.assert_allclose(window_statistics(np.full((1, 1, 50), 2.0), 5.0)[0, 0], [2, 0, 0, 2, 2], atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("prominence", [0.0, 50.0, 500.0])
def test_detect_peaks_with_fixed_prominence_equals_scipy_on_envelope(seed, prominence):
    fs = 250.0
    x = np.cumsum(np.random.default_rng(seed).standard_normal(3000))
    np.testing.assert_array_equal(detect_peaks(x, fs, prominence=prominence), naive.detect_beats(x, fs, prominence))


def test_detect_peaks_envelope_matches_naive_on_ecg(rng):
    fs = 360.0
    x, _ = ecg_like(fs, 8.0, 0.8, rng=rng)
    box, _ = naive.beat_envelopes(x, fs)
    threshold = 0.2 * box.max()
    np.testing.assert_array_equal(detect_peaks(x, fs, prominence=threshold), naive.detect_beats(x, fs, threshold))


@pytest.mark.parametrize("half", [0, 1, 12, 13, 300, 700])
def test_moving_average_matches_fresh_sums(rng, half):
    # tall spikes next to tiny values and runs of exact zeros, as in a squared rising slope
    x = np.maximum(rng.standard_normal(1200), 0.0) ** 2 * 1e-6
    x[::97] = 1e6
    x[400:700] = 0.0
    if 2 * half + 1 <= biosensor._DIRECT_SUM_MAX_WIDTH:  # summed directly: the reference's bits
        check = np.testing.assert_array_equal
    else:  # the running sum

        def check(actual, expected):
            np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=0)

    out = biosensor._moving_average(x, half)
    check(out, naive.moving_average(x, half))
    assert np.all(out[400 + half : 700 - half] == 0.0)
    check(biosensor._moving_average(x[:7], half), naive.moving_average(x[:7], half))  # no interior window
    plateau = biosensor._moving_average(np.full(50, 0.1), 3)[3:-3]  # full windows of a constant
    assert np.all(plateau == plateau[0])  # exactly flat: no spurious local maxima on a plateau
    plateau = biosensor._moving_average(np.full(100, 0.1), 20)[20:-20]
    assert np.all(plateau == plateau[0])


@pytest.mark.parametrize("half", [0, 1, 12, 18, 25, 300, 700])
def test_prefix_average_equals_cumsum_reference_and_keeps_zeros_and_plateaus(rng, half):
    # the detector's box envelope: a squared rising slope with tall beats, tiny values, zero runs
    x = np.maximum(rng.standard_normal(1200), 0.0) ** 2 * 1e-6
    x[::97] = 1e6
    x[400:700] = 0.0
    x[850:1000] = 0.0
    x[925] = 3.0  # one isolated value: every window holding it alone averages to the same bits
    out, reversed_out = np.empty(1200), np.empty(1200)
    biosensor._prefix_average_into(x, x[::-1].copy(), half, np.empty(1201), np.empty(1201), out, reversed_out)
    np.testing.assert_array_equal(out, naive.prefix_moving_average(x, half))
    np.testing.assert_array_equal(reversed_out, naive.prefix_moving_average(x[::-1], half))  # its pair's own
    np.testing.assert_allclose(out, naive.moving_average(x, half), rtol=1e-12, atol=4 * np.finfo(float).eps * x.sum())
    assert np.all(out[400 + half : 700 - half] == 0.0)
    if 2 * half + 1 <= 150:
        plateau = out[max(850 + half, 925 - half) : min(1000 - half, 926 + half)]
        assert plateau.size and np.all(plateau == plateau[0])
    short = np.empty(7)
    prefix = np.empty(8)
    biosensor._prefix_average_into(x[:7], x[:7], half, prefix, prefix, short, short)  # no interior window
    np.testing.assert_array_equal(short, naive.prefix_moving_average(x[:7], half))


@pytest.mark.parametrize(("lo", "hi"), [(0, 60), (0, 5), (3, 17), (40, 60), (55, 60), (20, 21)])
@pytest.mark.parametrize("half", [0, 2, 6, 12])
def test_moving_average_over_a_range_equals_the_whole_array(rng, half, lo, hi):
    # the detector sums its triangular envelope only around candidates: same bits as everywhere
    x = np.maximum(rng.standard_normal(60), 0.0) ** 2
    out = np.full(60, -1.0)
    biosensor._moving_average_into(x, half, lo, hi, out)
    np.testing.assert_array_equal(out[lo:hi], naive.moving_average(x, half)[lo:hi])
    assert np.all(out[:lo] == -1.0) and np.all(out[hi:] == -1.0)


@pytest.mark.parametrize("n_peaks", [5, 64, 65, 400])  # insertion sort up to 64, mergesort beyond
def test_distance_selection_with_ties_equals_stable_reference(rng, n_peaks):
    x = rng.integers(0, 4, 4 * n_peaks).astype(np.float64)  # many equal heights
    peaks = np.sort(rng.choice(x.size, n_peaks, replace=False)).astype(np.int64)
    for distance in (1, 3, 9):
        selected = peaks.copy()
        count = biosensor._select_by_distance(x, selected, distance, np.empty(n_peaks, dtype=np.int64))
        np.testing.assert_array_equal(selected[:count], naive.select_by_distance(x, peaks, distance))


def test_heart_rate_features_of_a_channel_subset_read_in_place(rng):
    fs = 250.0
    x, _ = ecg_like(fs, 12.0, 0.8, rng=rng)
    stream = np.stack([0.1 * rng.standard_normal(x.size), x, -x, rng.standard_normal(x.size)])
    w = sliding_windows(stream, 500, 250)  # a strided view: the kernel reads it without a copy
    channels = np.array([2, 1], dtype=np.intp)
    out = np.empty((w.shape[0], 2, 2))
    assert biosensor._heart_rate_features(w, channels, *biosensor._heart_rate_args(fs), out)
    np.testing.assert_array_equal(out, heart_rate_features(np.ascontiguousarray(w[:, channels]), fs))
    np.testing.assert_allclose(out[:-1, 1, 0], 75.0, atol=1.0)  # the ECG channel (the last window: no beats)
    # the pipeline's windows are views into its buffer: the statistics have the same bits there too
    stats = np.empty((w.shape[0], 4, 5))
    biosensor._window_statistics(w, fs, stats)
    np.testing.assert_array_equal(stats, window_statistics(np.ascontiguousarray(w), fs))
    # one call for the whole feature row: both kernels' outputs scattered into given columns
    columns = rng.permutation(4 * 5 + 2 * 2)
    rows = np.full((w.shape[0], columns.size), np.nan)
    args = biosensor._heart_rate_args(fs)
    biosensor._biosensor_rows(w, channels, *args, columns[:20], columns[20:], rows)
    np.testing.assert_array_equal(rows[:, columns[:20]], stats.reshape(w.shape[0], -1))
    np.testing.assert_array_equal(rows[:, columns[20:]], out.reshape(w.shape[0], -1))


def test_peak_selection_plateaus_and_edges_equal_scipy():
    # the candidate stage on its own: local maxima (plateau middles), distance, prominence
    x = np.array([5.0, 0.0, 1.0, 3.0, 3.0, 3.0, 0.0, 0.0, 2.0, 2.0, 0.0, 4.0, 1.0, 1.5, 0.0])
    for distance, prominence in [(1, 0.0), (4, 0.0), (1, 2.5)]:
        ref = scipy.signal.find_peaks(x, distance=distance, prominence=prominence, wlen=9)[0]
        np.testing.assert_array_equal(biosensor._select_peaks(x, distance, 4, prominence, 10, 0.2), ref)


def test_detect_peaks_degenerate_inputs():
    assert detect_peaks(np.ones(100), 100.0).size == 0
    assert detect_peaks(np.ones(1), 100.0).dtype == np.int64
    assert detect_peaks(np.array([0.0, 1.0]), 100.0).size == 0


def test_detect_peaks_synthetic_ecg_finds_every_beat(rng):
    fs = 360.0
    x, beats = ecg_like(fs, 30.0, 60.0 / 72.0, rng=rng)
    for sign in (1.0, -1.0):  # either polarity
        peaks = detect_peaks(sign * x, fs)
        assert peaks.dtype == np.int64
        assert peaks.size == beats.size
        assert np.max(np.abs(peaks - beats)) <= 0.02 * fs  # steepest rise: just before/after the R


def test_detect_peaks_ignores_tall_t_waves_of_an_inverted_lead(rng):
    # QS complexes pointing down, T waves as tall as the QRS is deep (eegmat Subject04/06/07)
    fs = 500.0
    t = np.arange(int(20 * fs)) / fs
    beats = np.arange(0.3, 19.7, 0.75)
    x = 0.01 * rng.standard_normal(t.size)
    for b in beats:
        x += -1.0 * np.exp(-0.5 * ((t - b) / 0.012) ** 2) + 0.9 * np.exp(-0.5 * ((t - b - 0.28) / 0.05) ** 2)
    peaks = detect_peaks(x, fs)
    np.testing.assert_array_equal(peaks.size, beats.size)
    assert np.max(np.abs(peaks - np.round(beats * fs))) <= 0.02 * fs
    np.testing.assert_allclose(heart_rate_features(x[None, None], fs)[0, 0, 0], 80.0, atol=0.5)


def ppg_like(fs, duration_s, rate_bpm, *, rng):
    """Synthetic PPG: skewed systolic wave plus a dicrotic wave, respiratory amplitude modulation."""
    t = np.arange(int(duration_s * fs)) / fs
    period = 60.0 / rate_bpm
    phase = (t % period) / period
    pulse = phase**2 * np.exp(-phase / 0.12) * 100 + 0.25 * np.exp(-0.5 * ((phase - 0.55) / 0.07) ** 2)
    return (
        pulse * (1 + 0.2 * np.sin(2 * np.pi * 0.25 * t))
        + 0.3 * np.sin(2 * np.pi * 0.1 * t)
        + 0.01 * rng.standard_normal(t.size)
    )


@pytest.mark.parametrize("rate_bpm", [55.0, 72.0, 110.0])
def test_heart_rate_features_on_synthetic_ppg(rng, rate_bpm):
    fs = 125.0
    x = ppg_like(fs, 30.0, rate_bpm, rng=rng)
    w = sliding_windows(x[None], int(10 * fs), int(5 * fs))
    out = heart_rate_features(w, fs)
    np.testing.assert_allclose(out[..., 0], rate_bpm, atol=1.0)
    assert np.all(out[..., 1] < 25.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_heart_rate_features_at_known_bpm(rng, dtype):
    fs = 250.0
    x, _ = ecg_like(fs, 60.0, 60.0 / 72.0, rng=rng)
    w = sliding_windows(x[None].astype(dtype), int(10 * fs), int(5 * fs))
    out = heart_rate_features(w, fs)
    assert out.shape == (w.shape[0], 1, 2) and out.dtype == dtype
    np.testing.assert_allclose(out[..., 0], 72.0, atol=1.0)
    assert np.all(out[..., 1] < 10.0)  # regular rhythm: RMSSD ~ sampling jitter only


def test_heart_rate_features_rmssd_of_alternating_intervals(rng):
    fs = 500.0
    x, beats = ecg_like(fs, 20.0, [0.8, 0.9], rng=rng, noise=0.01)
    out = heart_rate_features(x[None, None], fs)[0, 0]
    hr, rmssd = naive.heart_rate(beats, fs)
    assert out[0] == pytest.approx(hr, abs=0.5)
    assert out[1] == pytest.approx(100.0, abs=5.0) and rmssd == pytest.approx(100.0, abs=5.0)


def test_heart_rate_features_are_zero_with_too_few_peaks(rng):
    fs = 100.0
    one_beat, _ = ecg_like(fs, 1.2, 2.0, rng=rng, noise=0.0, wander=0.0)
    two_beats, _ = ecg_like(fs, 2.0, 1.0, rng=rng, noise=0.0, wander=0.0)
    flat = np.zeros(200)
    # beats at samples 40 (one_beat) and 40, 140 (two_beats); windows of 120 samples
    w = np.stack([np.stack([one_beat[:120], np.zeros(120)]), np.stack([two_beats[:120], two_beats[30:150]])])
    out = heart_rate_features(w, fs)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], [[0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(out[1, 0], [0.0, 0.0])
    assert out[1, 1, 0] == pytest.approx(60.0, abs=1.0) and out[1, 1, 1] == 0.0
    np.testing.assert_array_equal(heart_rate_features(flat[None, None], fs), [[[0.0, 0.0]]])
    assert heart_rate_features(np.ones((0, 3, 10)), fs).shape == (0, 3, 2)


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # wfdb with pandas 3
def test_real_ecg_beats_match_annotations(shared_datasets):
    wfdb = pytest.importorskip("wfdb")
    record = wfdb.rdrecord(str(shared_datasets / "wfdb" / "100"), sampto=180 * 360)
    ann = wfdb.rdann(str(shared_datasets / "wfdb" / "100"), "atr", sampto=180 * 360)
    fs = float(record.fs)
    assert fs == 360.0
    x = record.p_signal[:, 0]  # MLII
    beats = ann.sample[np.isin(ann.symbol, list("NLRBAaJSVrFejnE/fQ"))]
    peaks = detect_peaks(x, fs)
    assert abs(peaks.size - beats.size) <= 0.02 * beats.size
    matched = np.abs(peaks[:, None] - beats[None, :]).min(axis=1) <= 0.05 * fs
    assert matched.mean() > 0.98
    w = sliding_windows(x[None], int(10 * fs), int(10 * fs))
    out = heart_rate_features(w, fs)
    for i, (hr, rmssd) in enumerate(out[:, 0]):
        in_window = beats[(beats >= i * 10 * fs) & (beats < (i + 1) * 10 * fs)] - i * 10 * fs
        ref_hr, ref_rmssd = naive.heart_rate(in_window, fs)
        assert hr == pytest.approx(ref_hr, rel=0.03)
        assert rmssd == pytest.approx(ref_rmssd, abs=15.0)


def test_real_ecg_text_matches_find_peaks_reference(shared_datasets):
    path = shared_datasets / "biosppy" / "ecg.txt"
    fs = float(path.read_text().splitlines()[1].split("=")[-1])
    x = np.loadtxt(path)
    peaks = detect_peaks(x, fs)
    ref = scipy.signal.find_peaks(x, distance=0.3 * fs, prominence=0.4 * np.ptp(x))[0]  # upright R peaks
    assert peaks.size == ref.size
    assert np.max(np.abs(peaks - ref)) <= 0.02 * fs
    out = heart_rate_features(x[None, None], fs)[0, 0]
    assert out[0] == pytest.approx(naive.heart_rate(ref, fs)[0], rel=0.02)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: detect_peaks(np.r_[0.0, np.nan, 0.0], 100.0), ValueError, "NaN or inf"),
        (lambda: detect_peaks(np.r_[0.0, np.inf, 0.0], 100.0), ValueError, "NaN or inf"),
        (lambda: detect_peaks(np.ones((2, 10)), 100.0), ValueError, "x must be 1-D"),
        (lambda: detect_peaks(np.ones(10), 0.0), ValueError, "fs must be a finite number > 0"),
        (lambda: detect_peaks(np.ones(10), 100.0, min_distance_s=0.0), ValueError, "min_distance_s must be"),
        (
            lambda: detect_peaks(np.ones(10), 100.0, prominence=-1.0),
            ValueError,
            "prominence must be a finite number >= 0",
        ),
        (lambda: detect_peaks(np.ones(10), 100.0, prominence="high"), TypeError, "prominence must be a number"),
        (lambda: window_statistics(np.full((1, 1, 5), np.nan), 10.0), ValueError, "NaN or inf"),
        (lambda: window_statistics(np.ones((1, 5)), 10.0), ValueError, "windows must be 3-D"),
        (lambda: window_statistics(np.ones((1, 1, 5)), -1.0), ValueError, "fs must be a finite number > 0"),
        (lambda: window_statistics(np.ones((1, 1, 0)), 10.0), ValueError, "windows is empty"),
        (lambda: heart_rate_features(np.full((1, 1, 5), np.inf), 10.0), ValueError, "NaN or inf"),
        (lambda: heart_rate_features(np.ones(5), 10.0), ValueError, "windows must be 3-D"),
        (lambda: heart_rate_features(np.ones((1, 1, 5)), float("nan")), ValueError, "fs must be a finite number > 0"),
    ],
)
def test_biosensor_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("subject", ["Subject04", "Subject05"])  # QS complexes with tall T waves / upright R
def test_real_eegmat_ecg_beats_match_band_pass_reference(shared_datasets, subject):
    mne = pytest.importorskip("mne")
    raw = mne.io.read_raw_edf(shared_datasets / "eegmat" / f"{subject}_1.edf", preload=False, verbose="error")
    fs = raw.info["sfreq"]
    x = raw.get_data(picks=["ECG ECG"], start=0, stop=int(60 * fs))[0]
    # reference: largest |5-15 Hz band-passed| deflection of each QRS, whatever its polarity
    band = np.abs(scipy.signal.filtfilt(*scipy.signal.butter(2, [5.0, 15.0], btype="band", fs=fs), x))
    ref = scipy.signal.find_peaks(band, distance=0.3 * fs, prominence=0.4 * np.percentile(band, 99.5))[0]
    peaks = detect_peaks(x, fs)
    assert abs(peaks.size - ref.size) <= 2
    assert (np.abs(peaks[:, None] - ref[None, :]).min(axis=1) <= 0.06 * fs).mean() > 0.97
    hr = heart_rate_features(x[None, None], fs)[0, 0, 0]
    assert hr == pytest.approx(naive.heart_rate(ref, fs)[0], rel=0.02)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "where",
    [(0, 0, 0), (1, 2, 400), (2, 1, 767), (2, 2, 768), (1, 0, 999)],  # 768..999: after the last segment
)
def test_spectral_features_find_non_finite_samples_anywhere_in_the_window(dtype, bad, where):
    # 1000-sample windows with nperseg=512: the two segments cover samples 0..767, the kernel's
    # finiteness test must also see the tail that Welch ignores.
    plan = band_power_plan(500.0, 1000)
    w = np.random.default_rng(0).standard_normal((3, 3, 1000)).astype(dtype)
    w[where] = bad
    expected = rf"windows contains 1 NaN or inf value\(s\), the first at index \({where[0]}, {where[1]}, {where[2]}\)"
    with pytest.raises(ValueError, match=expected):
        spectral_features(w, plan)
    with pytest.raises(ValueError, match="NaN or inf"):
        band_powers(w, 500.0)


def test_spectral_features_accept_finite_float64_samples_whose_sum_overflows():
    plan = band_power_plan(500.0, 1000, log=True)
    w = np.full((1, 1, 1000), 1e306)
    w[0, 0, ::2] = 1.5e306
    out = spectral_features(w, plan)  # the kernel's sum overflows; the samples are finite
    assert out.shape == (1, 1, 5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0, 0), (2, 1, 250), (1, 1, 499)])
def test_biosensor_features_find_non_finite_samples_in_their_own_pass(dtype, bad, where):
    t = np.arange(500) / 250.0
    w = np.tile(np.exp(-((np.mod(2 * np.pi * 1.2 * t, 2 * np.pi) - np.pi) ** 2) / 0.02), (3, 2, 1)).astype(dtype)
    w[where] = bad
    expected = rf"windows contains 1 NaN or inf value\(s\), the first at index \({where[0]}, {where[1]}, {where[2]}\)"
    with pytest.raises(ValueError, match=expected):
        window_statistics(w, 250.0)
    with pytest.raises(ValueError, match=expected):
        heart_rate_features(w, 250.0)


def test_biosensor_features_accept_finite_float64_samples_whose_sums_overflow():
    w = np.full((2, 1, 500), 1.7e308)
    w[:, :, ::7] = 1.6e308
    assert np.isfinite(window_statistics(w, 250.0)[..., [3, 4]]).all()  # min and max
    assert np.isfinite(heart_rate_features(w, 250.0)).all()
