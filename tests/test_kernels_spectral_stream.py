"""The Welch reduction of the spectral kernels: sparse band weights, the two-half segment sums a
stream continues from window to window, and the output transform every path applies itself."""

from __future__ import annotations

import numpy as np
import pytest

import naive_signal as naive
from biofed.kernels import (
    EEG_BANDS,
    WelchStream,
    band_power_plan,
    log_band_energy_plan,
    reduce_segments,
    segment_powers,
    sliding_spectral_features,
    sliding_windows,
    spectral_features,
)


@pytest.fixture
def rng():
    return np.random.default_rng(20261202)


def random_plans(rng, n):
    """Plans of every shape of weight matrix: random (overlapping, single-bin, DC and Nyquist)
    rectangles and mel or linear triangles, even and odd segment lengths."""
    plans = [
        band_power_plan(100.0, 200, (("dc", 0.0, 1.0), ("nyquist", 49.0, 50.0)), nperseg=100),
        band_power_plan(100.0, 200, (("wide", 0.0, 50.0), ("inner", 9.0, 10.0), ("over", 5.0, 20.0)), nperseg=51),
        log_band_energy_plan(16000.0, 32000, nperseg=500),  # the device's audio plan
        band_power_plan(500.0, 1000, log=True, nperseg=500),  # the device's EEG plan
    ]
    while len(plans) < n:
        fs = float(rng.choice([100.0, 250.0, 500.0, 8000.0]))
        nperseg = int(rng.integers(16, 300))
        window = nperseg + int(rng.integers(0, 3 * nperseg))
        df = fs / nperseg
        if rng.random() < 0.5:
            bands = []
            for i in range(int(rng.integers(1, 7))):
                lo = float(rng.uniform(0.0, fs / 2 - df))
                bands.append((f"b{i}", lo, float(min(fs / 2, lo + rng.uniform(df, fs / 2)))))
            plans.append(band_power_plan(fs, window, bands, nperseg=nperseg, log=bool(rng.random() < 0.5)))
        else:
            n_bands = int(rng.integers(1, max(2, min(40, nperseg // 8))))
            scale = "mel" if rng.random() < 0.5 else "linear"
            try:
                plans.append(log_band_energy_plan(fs, window, n_bands=n_bands, fmin=0.0, scale=scale, nperseg=nperseg))
            except ValueError:  # a band without a bin at this resolution: draw again
                continue
    return plans


def dense_reduction(powers, weights, n_seg):
    """``(sum of a window's segment powers) @ weights`` with every term of the dense product,
    each band summed in order of the bin, the segments in the kernels' two halves."""
    first_half = (n_seg + 1) // 2
    power = np.add.accumulate(powers[:first_half].astype(np.float64), axis=0)[-1]
    if n_seg > first_half:
        power = power + np.add.accumulate(powers[first_half:n_seg].astype(np.float64), axis=0)[-1]
    terms = power[:, :, None] * weights[None]  # (n_channels, n_bins, n_bands)
    return np.add.accumulate(terms, axis=1)[:, -1]


def test_sparse_band_weights_describe_the_dense_matrix(rng):
    for plan in random_plans(rng, 40):
        n_bins, n_bands = plan.weights.shape
        assert plan.band_bins.shape == (n_bands, 2) and plan.band_bins.dtype == np.int64
        packed = []
        for b, (lo, hi) in enumerate(plan.band_bins):
            assert 0 <= lo < hi <= n_bins
            column = plan.weights[:, b]
            assert column[lo] != 0.0 and column[hi - 1] != 0.0
            assert not column[:lo].any() and not column[hi:].any()
            packed.append(column[lo:hi])
        np.testing.assert_array_equal(plan.band_weights, np.concatenate(packed))
        assert not plan.band_bins.flags.writeable and not plan.band_weights.flags.writeable


def test_sparse_reduction_equals_the_dense_product_bit_for_bit(rng):
    for plan in random_plans(rng, 40):
        n_bins = plan.weights.shape[0]
        powers = rng.exponential(size=(plan.n_seg, 3, n_bins)) * 10.0 ** rng.uniform(-30, 30, size=(1, 3, 1))
        powers[:, 0, rng.random(n_bins) < 0.3] = 0.0  # silent bins
        linear = reduce_segments(powers, [0], plan._replace(log="none"))
        np.testing.assert_array_equal(linear[0], dense_reduction(powers, plan.weights, plan.n_seg))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "make_plan",
    [
        lambda: band_power_plan(500.0, 1000, log=True, nperseg=500),
        lambda: band_power_plan(500.0, 1000, EEG_BANDS, nperseg=256),
        lambda: log_band_energy_plan(8000.0, 4000, n_bands=20),
    ],
)
def test_every_path_finishes_its_features_with_one_transform(rng, make_plan, dtype):
    """Each kernel's logarithm is that of the linear features plus the floor, in the features'
    dtype, to two units in the last place of the correctly rounded value; all paths agree bit for bit."""
    plan = make_plan()
    linear_plan = plan._replace(log="none")
    x = (rng.standard_normal((2, plan.window + 5 * plan.step * 2)) * 3.0 + 0.3).astype(dtype)
    x[1] *= 1e-12  # faint bands
    windows = np.ascontiguousarray(sliding_windows(x, plan.window, 2 * plan.step))
    linear = spectral_features(windows, linear_plan)
    assert linear.dtype == dtype
    floor = dtype(plan.log_floor(dtype))
    if plan.log == "none":
        expected = linear
    else:
        log = np.log10 if plan.log == "log10" else np.log
        expected = log((linear + floor).astype(np.float64)).astype(dtype)  # correctly rounded (nearly always)
    finished = spectral_features(windows, plan)
    np.testing.assert_array_max_ulp(finished, expected, maxulp=2)
    np.testing.assert_array_equal(sliding_spectral_features(x, 2 * plan.step, plan), finished)
    starts = np.arange(0, x.shape[1] - plan.nperseg + 1, plan.step)
    powers = segment_powers(x, starts, plan)
    np.testing.assert_array_equal(reduce_segments(powers, np.arange(len(windows)) * 2, plan, dtype=dtype), finished)
    stream = WelchStream(plan, 2, dtype)
    for i in range(len(windows)):
        np.testing.assert_array_equal(
            stream.features(windows[i], i * 2 * plan.step, [i * 2 * plan.step]), finished[i : i + 1]
        )


# window = (n_seg - 1) * step + nperseg, every plan with step 25 (nperseg 50): first halves of
# 1, 2, 2, 3, 9 and 64 segments; hops of that many steps continue the previous window's second
# half; halves of 8 or more segments are summed 8 segments per pass, with a remainder
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n_seg", "hop_steps"),
    [(1, 1), (2, 1), (4, 2), (5, 3), (5, 1), (5, 2), (4, 3), (127, 64), (3, 2), (17, 9), (20, 7)],
)
def test_stream_continues_half_sums_with_the_bits_of_the_batch_path(rng, n_seg, hop_steps, dtype):
    step = 25
    plan = log_band_energy_plan(1000.0, (n_seg - 1) * step + 50, n_bands=6, nperseg=50)
    assert plan.n_seg == n_seg
    hop = hop_steps * step
    n_windows = 12
    x = (rng.standard_normal((2, plan.window + (n_windows - 1) * hop)) + 0.3).astype(dtype)
    windows = np.ascontiguousarray(sliding_windows(x, plan.window, hop))
    expected = spectral_features(windows, plan)
    reference = naive.log_band_energies(windows, 1000.0, 6, 20.0, 500.0, 50)  # scipy's Welch, in float64
    np.testing.assert_allclose(expected, reference, rtol=1e-12 if dtype == np.float64 else 1e-4, atol=1e-5)
    np.testing.assert_array_equal(sliding_spectral_features(x, hop, plan), expected)
    # one window per call from its own buffer, then several per call, then the live step
    stream = WelchStream(plan, 2, dtype)
    rows = [stream.features(windows[i], i * hop, [i * hop]) for i in range(n_windows)]
    np.testing.assert_array_equal(np.concatenate(rows), expected)
    stream.reset()
    np.testing.assert_array_equal(stream.features(x, 0, [i * hop for i in range(5)]), expected[:5])
    np.testing.assert_array_equal(stream.features(x, 0, [i * hop for i in range(5, n_windows)]), expected[5:])
    if hop < plan.window:
        stream = WelchStream(plan, 2, dtype)
        buf = np.empty((2, plan.window + hop), dtype=dtype)
        fill = plan.window - hop
        buf[:, :fill] = x[:, :fill]
        for i in range(n_windows):
            row = stream.append_features(x[:, i * hop + fill : i * hop + plan.window], buf, fill, i * hop, i * hop)
            np.testing.assert_array_equal(row, expected[i : i + 1])
            buf[:, :fill] = buf[:, hop : hop + fill]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stream_recovers_from_refused_chunks_jumps_and_unshared_windows(rng, dtype):
    """Whatever came before (a refused NaN chunk, a refused window, a jump back, a window off the
    segment grid, live steps after windows computed from a whole buffer), each window has the
    bits of the batch path."""
    plan = log_band_energy_plan(16000.0, 32000, nperseg=500)
    hop = 16000
    x = (rng.standard_normal((1, plan.window + 8 * hop)) + 0.3).astype(dtype)
    expected = spectral_features(np.ascontiguousarray(sliding_windows(x, plan.window, hop)), plan)
    stream = WelchStream(plan, 1, dtype)
    buf = np.empty((1, plan.window + hop), dtype=dtype)
    fill = plan.window - hop
    buf[:, :fill] = x[:, :fill]

    def live(i):  # the buffer then holds the window's last hop: the next window's first
        row = stream.append_features(x[:, i * hop + fill : i * hop + plan.window], buf, fill, i * hop, i * hop)
        buf[:, :fill] = buf[:, hop : hop + fill]
        return row

    np.testing.assert_array_equal(live(0), expected[:1])
    np.testing.assert_array_equal(live(1), expected[1:2])
    spoiled = x[:, 2 * hop + fill : 2 * hop + plan.window].copy()
    spoiled[0, -1] = np.nan
    assert stream.append_features(spoiled, buf, fill, 2 * hop, 2 * hop) is None
    np.testing.assert_array_equal(live(2), expected[2:3])
    bad = x[:, 3 * hop : 3 * hop + plan.window].copy()
    bad[0, -5] = np.inf  # in the segments the window adds
    with pytest.raises(ValueError, match="NaN or inf"):
        stream.features(bad, 3 * hop, [3 * hop])
    np.testing.assert_array_equal(stream.features(x, 0, [3 * hop]), expected[3:4])
    np.testing.assert_array_equal(stream.features(x, 0, [0]), expected[:1])  # a jump back
    np.testing.assert_array_equal(stream.features(x, 0, [hop]), expected[1:2])
    off_grid = spectral_features(np.ascontiguousarray(x[None, :, hop + 7 : hop + 7 + plan.window]), plan)
    np.testing.assert_array_equal(stream.features(x, 0, [hop + 7]), off_grid)
    np.testing.assert_array_equal(stream.features(x, 0, [2 * hop, 3 * hop]), expected[2:4])
    np.testing.assert_array_equal(stream.features(x, 0, [4 * hop]), expected[4:5])
    # live steps again: the first continues the half sums the last features call kept
    buf[:, :fill] = x[:, 5 * hop : 5 * hop + fill]
    for i in (5, 6, 7):
        np.testing.assert_array_equal(live(i), expected[i : i + 1])
