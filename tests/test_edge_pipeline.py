"""StreamingPipeline: chunking invariance, alignment across rates, bounded memory, labels, basis, errors."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from biofed.datasets import Annotation, Recording, Signal, make_recording, read_recording
from biofed.edge.pipeline import (
    ChunkError,
    PipelineConfig,
    PipelineError,
    StreamingPipeline,
    extract_features,
    label_pieces,
)
from biofed.kernels import (
    FLOAT32_RTOL,
    band_powers,
    heart_rate_features,
    log_band_energies,
    project,
    sliding_spectral_features,
    sliding_windows,
    spectral_features,
    window_statistics,
)
from biofed.model import FeatureLayout, fit_basis

CONFIG = PipelineConfig()


@pytest.fixture(scope="module")
def multirate():
    """EEG 500 Hz + audio 8 kHz + ECG/PPG 250 Hz, 14 s."""
    return make_recording(
        "rest", duration_s=14.0, eeg_channels=3, eeg_sfreq=500.0, audio_sfreq=8000.0, bio_sfreq=250.0,
        subject="pipe", random_state=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def eegmat_rest(shared_datasets):
    path = shared_datasets / "eegmat" / "Subject02_1.edf"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return read_recording(path)


def _stream_in_random_chunks(recording, config, rng, basis=None, max_chunk_s=3.0):
    """Push every modality in random-sized chunks, modalities interleaved in random order."""
    layout = FeatureLayout.from_recording(recording, config)
    pipe = StreamingPipeline(config, layout, basis)
    positions = {m: 0 for m in layout.modality_names}
    rows = []
    while True:
        open_ = [m for m in positions if positions[m] < recording.signals[m].n_samples]
        if not open_:
            break
        modality = open_[rng.integers(len(open_))]
        sig = recording.signals[modality]
        n = int(rng.integers(0, int(max_chunk_s * sig.sfreq) + 1))
        a = positions[modality]
        b = min(a + n, sig.n_samples)
        rows += pipe.push(modality, sig.data[:, a:b], label=recording.label)
        positions[modality] = b
        for m, fill in pipe.buffer_fill.items():
            assert fill <= pipe.buffer_capacity[m]
    return rows, pipe


def _as_arrays(rows):
    return np.stack([r.vector for r in rows]), [r.label for r in rows], np.array([r.t for r in rows])


# ---------------------------------------------------------------------------------- layout
def test_layout_names_every_column(multirate):
    layout = FeatureLayout.from_recording(multirate, CONFIG)
    assert layout.modality_names == ("eeg", "audio", "bio")
    names = layout.feature_names
    # 3 EEG channels x 5 bands + 1 audio channel x 32 mels + (ECG, PPG) x (5 stats + HR + RMSSD)
    assert layout.n_features == len(names) == 3 * 5 + 32 + 2 * 7
    assert names[:5] == ("eeg:Fp1:delta", "eeg:Fp1:theta", "eeg:Fp1:alpha", "eeg:Fp1:beta", "eeg:Fp1:gamma")
    assert names[15:17] == ("audio:PCG:mel00", "audio:PCG:mel01")
    assert names[-7:] == tuple(f"bio:PPG:{f}" for f in ("mean", "std", "slope", "min", "max", "heart_rate", "rmssd"))
    assert len(set(names)) == len(names)
    # The hash keys the feature store: it changes with feature settings and channels.
    assert layout.hash == FeatureLayout.from_recording(multirate, CONFIG).hash
    assert layout.hash != FeatureLayout.from_recording(multirate, PipelineConfig(n_mels=16)).hash
    assert layout.hash != FeatureLayout.from_recording(multirate, PipelineConfig(hop_s=0.5)).hash
    eeg_only = FeatureLayout.from_recording(multirate, PipelineConfig(modalities=("eeg",)))
    assert eeg_only.modality_names == ("eeg",) and eeg_only.n_features == 15


def test_non_ecg_bio_channels_get_statistics_only():
    sig = Signal(np.zeros((2, 1000)), 100.0, ("RESP", "ECG"), ("resp", "ecg"), ("NU", "V"))
    rec = Recording(source="mixed", signals={"bio": sig})
    layout = FeatureLayout.from_recording(rec, CONFIG)
    assert layout.feature_names == (
        "bio:RESP:mean", "bio:RESP:std", "bio:RESP:slope", "bio:RESP:min", "bio:RESP:max",
        "bio:ECG:mean", "bio:ECG:std", "bio:ECG:slope", "bio:ECG:min", "bio:ECG:max",
        "bio:ECG:heart_rate", "bio:ECG:rmssd",
    )  # fmt: skip


# ---------------------------------------------------------------------------------- chunking
def test_random_chunks_equal_one_chunk_multirate(multirate):
    X1, y1, t1 = extract_features(multirate, CONFIG)
    assert X1.shape == (13, 61)  # windows [j, j+2) for j = 0..12 in a 14 s recording
    np.testing.assert_array_equal(t1, np.arange(13.0))
    assert set(y1) == {"rest"}
    for seed in range(3):
        rows, pipe = _stream_in_random_chunks(multirate, CONFIG, np.random.default_rng(seed))
        X2, y2, t2 = _as_arrays(rows)
        np.testing.assert_allclose(X2, X1, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(t2, t1)
        assert y2 == list(y1)
        assert pipe.flush() == 0


@pytest.mark.slow
def test_random_chunks_equal_one_chunk_on_real_eegmat(eegmat_rest):
    X1, y1, t1 = extract_features(eegmat_rest, CONFIG)
    assert X1.shape == (181, 19 * 5 + 7)  # 182 s, 19 EEG channels + ECG (A2-A1 reference excluded)
    assert set(y1) == {"rest"}
    rows, _ = _stream_in_random_chunks(eegmat_rest, CONFIG, np.random.default_rng(7), max_chunk_s=9.0)
    X2, y2, t2 = _as_arrays(rows)
    np.testing.assert_allclose(X2, X1, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(t2, t1)
    assert set(y2) == {"rest"}
    assert np.isfinite(X1).all()


# ---------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("hop_s", [1.0, 0.5, 0.33])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_modalities_at_different_rates_align_on_the_same_windows(multirate, hop_s, dtype):
    config = PipelineConfig(hop_s=hop_s, dtype=dtype)
    X, _, t = extract_features(multirate, config)
    n_windows = int(np.floor((14.0 - 2.0) / hop_s + 1e-9)) + 1
    assert X.shape[0] == n_windows
    np.testing.assert_allclose(t, np.arange(n_windows) * hop_s)
    eeg, audio, bio = (multirate.signals[m] for m in ("eeg", "audio", "bio"))
    # the segment lengths the layout chose for this hop (shared_nperseg)
    layout = FeatureLayout.from_recording(multirate, config)
    nperseg = {m.modality: m.nperseg for m in layout.modalities}
    assert nperseg == {1.0: {"eeg": 500, "audio": 250, "bio": None}, 0.5: {"eeg": 500, "audio": 250, "bio": None},
                       0.33: {"eeg": 512, "audio": 240, "bio": None}}[hop_s]  # fmt: skip
    for j in (0, 3, n_windows - 1):
        # window j = [j*hop_s, j*hop_s + 2 s) in every modality, computed straight from the kernels
        parts = []
        for sig in (eeg, audio, bio):
            start = int(round(j * hop_s * sig.sfreq))
            parts.append(sig.data[None, :, start : start + int(round(2.0 * sig.sfreq))])
        expected = np.concatenate([
            band_powers(parts[0], eeg.sfreq, log=True, nperseg=nperseg["eeg"]).reshape(-1),
            log_band_energies(parts[1], audio.sfreq, n_bands=32, nperseg=nperseg["audio"]).reshape(-1),
            np.concatenate([window_statistics(parts[2], bio.sfreq)[0], heart_rate_features(parts[2], bio.sfreq)[0]],
                           axis=1).reshape(-1),
        ])  # fmt: skip
        if dtype == "float64":
            np.testing.assert_allclose(X[j], expected, rtol=1e-12, atol=1e-12)
        else:  # spectral features (all logged) within FLOAT32_RTOL, biosensor features in float64
            n_spectral = eeg.n_channels * len(config.bands) + audio.n_channels * config.n_mels
            np.testing.assert_allclose(X[j, :n_spectral], expected[:n_spectral], rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL)
            np.testing.assert_array_equal(X[j, n_spectral:], expected[n_spectral:])


def test_float32_is_the_default_and_shared_segments_equal_the_batch_kernels():
    """256 Hz EEG, 1 s hop: windows are 2 segment steps apart, so each window computes only its new segments."""
    assert PipelineConfig().dtype == "float32"
    rng = np.random.default_rng(5)
    eeg = rng.standard_normal((3, 256 * 12))
    windows = np.ascontiguousarray(
        np.lib.stride_tricks.sliding_window_view(eeg, 512, axis=1)[:, ::256].transpose(1, 0, 2)
    )
    for dtype, tolerance in (("float64", 0.0), ("float32", FLOAT32_RTOL)):
        config = PipelineConfig(dtype=dtype, modalities=("eeg",))
        pipe = StreamingPipeline(
            config, FeatureLayout.from_channels({"eeg": (256.0, ("C3", "Cz", "C4"), ("eeg",) * 3)}, config)
        )
        stream = pipe._streams["eeg"]
        assert stream.plan.n_seg == 3 and stream.plan.step == 128
        rows = []
        for a in range(0, eeg.shape[1], 100):  # chunks smaller than a hop
            rows += pipe.push("eeg", eeg[:, a : a + 100])
        X = _as_arrays(rows)[0]
        expected = band_powers(windows, 256.0, log=True).reshape(len(windows), -1)
        assert X.shape == expected.shape == (11, 15)
        np.testing.assert_allclose(X, expected, rtol=tolerance, atol=tolerance)
    stream = pipe._streams["eeg"]
    assert stream.welch.kept_segments == range(20, 23)  # only the last window's segments are kept between pushes


@pytest.mark.parametrize(("hop_s", "nperseg", "shared"), [(0.33, 512, False), (1.0, 500, True), (0.5, 500, True)])
def test_windows_equal_the_batch_kernel_bit_for_bit(hop_s, nperseg, shared):
    """500 Hz EEG: with a 1 s (or 0.5 s) hop the layout picks 500-sample segments, whose 250-sample
    step divides the hop, and windows share segments; 165 samples (0.33 s) has no divisor near 256,
    so segments stay 512 and the fused kernel reads each window from the buffer. Both give the
    same bits as ``band_powers`` on the stack of windows."""
    rng = np.random.default_rng(6)
    eeg = rng.standard_normal((3, 500 * 9)) + 2.0
    hop = int(round(hop_s * 500))
    for dtype in ("float64", "float32"):
        config = PipelineConfig(dtype=dtype, modalities=("eeg",), hop_s=hop_s)
        pipe = StreamingPipeline(
            config, FeatureLayout.from_channels({"eeg": (500.0, ("C3", "Cz", "C4"), ("eeg",) * 3)}, config)
        )
        stream = pipe._streams["eeg"]
        assert stream.plan.nperseg == nperseg
        rows = []
        for a in range(0, eeg.shape[1], 730):  # chunks that end inside windows
            rows += pipe.push("eeg", eeg[:, a : a + 730])
        # shared: the last window's segments are kept (segment g starts at sample 250 g); else none
        assert stream.welch.kept_segments == (range(14, 17) if shared else range(0))
        windows = np.lib.stride_tricks.sliding_window_view(eeg.astype(dtype), 1000, axis=1)[:, ::hop].transpose(1, 0, 2)
        expected = band_powers(np.ascontiguousarray(windows), 500.0, log=True, nperseg=nperseg)
        expected = expected.reshape(len(windows), -1)
        assert len(rows) == len(windows) == (4500 - 1000) // hop + 1
        np.testing.assert_array_equal(_as_arrays(rows)[0], expected.astype(np.float64))


def test_hop_longer_than_window_skips_samples(multirate):
    config = PipelineConfig(window_s=1.0, hop_s=2.5, modalities=("eeg",))
    X, _, t = extract_features(multirate, config)
    np.testing.assert_allclose(t, [0.0, 2.5, 5.0, 7.5, 10.0, 12.5])
    rows, _ = _stream_in_random_chunks(multirate, config, np.random.default_rng(3))
    np.testing.assert_allclose(_as_arrays(rows)[0], X, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------- memory
@pytest.mark.slow
def test_hours_of_signal_keep_buffers_within_capacity():
    """3 h of EEG (2 ch, 100 Hz) + ECG (128 Hz) in random chunks: buffers never exceed capacity."""
    rng = np.random.default_rng(11)
    config = PipelineConfig(max_pending_windows=50)
    layout = FeatureLayout.from_channels(
        {"eeg": (100.0, ("Cz", "Pz"), ("eeg", "eeg")), "bio": (128.0, ("ECG",), ("ecg",))}, config
    )
    pipe = StreamingPipeline(config, layout)
    capacity = pipe.buffer_capacity
    assert capacity == {"eeg": 2 * 100 + 4 * 100, "bio": 2 * 128 + 4 * 128}
    total_s, sent_s, n_rows, peak_pending = 3 * 3600, 0.0, 0, 0
    fill_peak = {m: 0 for m in capacity}
    while sent_s < total_s:
        dur = float(rng.uniform(0.05, 30.0))
        for modality, fs, n_ch in (("eeg", 100.0, 2), ("bio", 128.0, 1)):
            n = int(round((sent_s + dur) * fs)) - int(round(sent_s * fs))
            tt = (int(round(sent_s * fs)) + np.arange(n)) / fs
            chunk = np.sin(2 * np.pi * 10 * tt) + 0.1 * rng.standard_normal((n_ch, n))
            n_rows += len(pipe.push(modality, chunk, label="rest"))
            for m, fill in pipe.buffer_fill.items():
                fill_peak[m] = max(fill_peak[m], fill)
            peak_pending = max(peak_pending, pipe.pending_windows)
        sent_s += dur
    assert all(fill_peak[m] <= capacity[m] for m in capacity)
    assert peak_pending <= 31  # at most one 30 s chunk of windows waits for the other modality
    assert n_rows == int(np.floor(sent_s - 2.0)) + 1 or n_rows == int(np.floor(sent_s - 2.0))
    assert pipe.windows_dropped == 0


def test_lagging_modality_is_capped_and_windows_dropped(caplog):
    config = PipelineConfig(max_pending_windows=5)
    layout = FeatureLayout.from_channels({"eeg": (100.0, ("Cz",), ("eeg",)), "bio": (64.0, ("ECG",), ("ecg",))}, config)
    pipe = StreamingPipeline(config, layout)
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING, logger="biofed.edge.pipeline"):
        assert pipe.push("eeg", rng.standard_normal((1, 100 * 20))) == []  # 19 windows, bio silent
    assert "dropping 14 feature window(s)" in caplog.text and "bio" in caplog.text
    assert pipe.windows_dropped == 14 and pipe.pending_windows == 5
    rows = pipe.push("bio", rng.standard_normal((1, 64 * 20)))
    assert [r.t for r in rows] == [14.0, 15.0, 16.0, 17.0, 18.0]  # only the kept windows pair up


def test_lagging_modality_catching_up_in_small_chunks_keeps_no_stale_windows():
    config = PipelineConfig(max_pending_windows=5)
    layout = FeatureLayout.from_channels({"eeg": (100.0, ("Cz",), ("eeg",)), "bio": (64.0, ("ECG",), ("ecg",))}, config)
    pipe = StreamingPipeline(config, layout)
    rng = np.random.default_rng(0)
    pipe.push("eeg", rng.standard_normal((1, 100 * 20)))  # windows 0-13 dropped, 14-18 pending
    bio = rng.standard_normal((1, 64 * 20))
    rows = []
    for second in range(20):  # bio's windows 0-13 come too late and are discarded as they come
        rows += pipe.push("bio", bio[:, 64 * second : 64 * (second + 1)])
        assert pipe.pending_windows == (5 if second < 15 else 5 - (second - 14))
    assert [r.t for r in rows] == [14.0, 15.0, 16.0, 17.0, 18.0]
    assert pipe.windows_dropped == 14 and pipe.windows_emitted == 5


# ---------------------------------------------------------------------------------- labels
def test_window_label_is_the_reference_label_at_its_last_sample():
    fs = 100.0
    layout = FeatureLayout.from_channels({"eeg": (fs, ("Cz",), ("eeg",)), "bio": (fs, ("ECG",), ("ecg",))}, CONFIG)
    pipe = StreamingPipeline(CONFIG, layout)
    rng = np.random.default_rng(0)
    rows = []
    rows += pipe.push("eeg", rng.standard_normal((1, 300)), label="rest")  # [0, 3) s rest
    rows += pipe.push("eeg", rng.standard_normal((1, 250)), label="arithmetic")  # [3, 5.5) s
    rows += pipe.push("eeg", rng.standard_normal((1, 1)), label=None)  # 5.5 s unlabelled
    rows += pipe.push("bio", rng.standard_normal((1, 551)), label="ignored")  # bio labels do not count
    assert [(r.t, r.label) for r in rows] == [(0.0, "rest"), (1.0, "rest"), (2.0, "arithmetic"), (3.0, "arithmetic")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extract_features_share_segments_with_the_bits_of_the_windows_kernel(multirate, dtype):
    """A whole recording at once: each segment is transformed once (its windows share them), and
    every spectral feature has the bits of ``spectral_features`` on the sliding windows."""
    config = PipelineConfig(dtype=dtype)
    layout = FeatureLayout.from_recording(multirate, config)
    X, _, _ = extract_features(multirate, config)
    column = 0
    for part in layout.modalities[:2]:  # eeg, audio
        plan = layout.spectral_plan(part)
        hop = layout.hop_samples(part)
        assert hop % plan.step == 0 and plan.nperseg == {"eeg": 500, "audio": 250}[part.modality]
        x = multirate.signals[part.modality].data.astype(dtype)
        expected = spectral_features(np.ascontiguousarray(sliding_windows(x, plan.window, hop)), plan)
        np.testing.assert_array_equal(sliding_spectral_features(x, hop, plan), expected)
        expected = expected.reshape(len(expected), -1).astype(np.float64)
        np.testing.assert_array_equal(X[:, column : column + part.n_features], expected)
        column += part.n_features


def test_extract_features_labels_follow_annotations():
    sig = Signal(np.random.default_rng(0).standard_normal((1, 1000)), 100.0, ("Cz",), ("eeg",), ("V",))
    rec = Recording(
        source="annotated", signals={"eeg": sig}, label="rest",
        annotations=(Annotation(3.0, 2.0, "T1"), Annotation(6.0, 0.0, "beat"), Annotation(0.0, 10.0, "BAD_x")),
    )  # fmt: skip
    # BAD_x and the instant "beat" do not label; T1 covers [3, 5) s
    assert label_pieces(rec, "eeg") == [(0, 300, "rest"), (300, 500, "T1"), (500, 1000, "rest")]
    X, labels, t = extract_features(rec, CONFIG)
    # window j = [j, j+2): its last sample decides -> T1 covers samples in [3, 5)
    assert list(labels) == ["rest", "rest", "T1", "T1", "rest", "rest", "rest", "rest", "rest"]
    rows, _ = _stream_in_random_chunks(rec, CONFIG, np.random.default_rng(0))
    np.testing.assert_allclose(_as_arrays(rows)[0], X, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------- basis
def test_basis_projection(multirate):
    config = PipelineConfig(hop_s=0.25)
    X, _, _ = extract_features(multirate, config)
    layout = FeatureLayout.from_recording(multirate, config)
    exact = fit_basis(X, k=32)
    assert exact.components.shape == (32, 61)
    # With a basis rows are projected, and the layout hash changes with it.
    Xp, _, _ = extract_features(multirate, config, basis=exact)
    np.testing.assert_allclose(
        Xp, project(X, exact.components, mean=exact.mean, scale=exact.scale), rtol=1e-12, atol=1e-12
    )
    projected = StreamingPipeline(config, layout, basis=exact)
    assert projected.row_width == 32 and projected.row_layout_hash != layout.hash
    projected.set_basis(None)
    assert projected.row_width == 61 and projected.row_layout_hash == layout.hash


# ---------------------------------------------------------------------------------- errors
def test_bad_chunks_raise_typed_errors_and_leave_the_pipeline_unchanged(multirate):
    layout = FeatureLayout.from_recording(multirate, CONFIG)
    pipe = StreamingPipeline(CONFIG, layout)
    eeg = multirate.signals["eeg"].data
    nan_chunk = eeg[:, :100].copy()
    nan_chunk[1, 42] = np.nan
    bad = [
        (("emg", eeg[:, :10]), r"unknown modality 'emg'.*\('eeg', 'audio', 'bio'\)"),
        ((["eeg"], eeg[:, :10]), r"unknown modality \['eeg'\]"),
        (("eeg", eeg[:2, :10]), r"eeg chunk has 2 channel\(s\) but the layout has 3 \(Fp1, Fp2, F3\)"),
        (("eeg", eeg[0, :10]), r"must be 2-D \(n_channels=3, n_samples\)"),
        (("eeg", nan_chunk), r"1 NaN/inf sample\(s\), the first in channel 'Fp2' at sample 42"),
        (("eeg", np.full((3, 5), np.inf)), "NaN/inf"),
        (("eeg", np.array([["a"] * 4] * 3)), "real numbers"),
    ]
    for args, match in bad:
        with pytest.raises(ChunkError, match=match):
            pipe.push(*args)
    with pytest.raises(ChunkError, match="label must be a str or None"):
        pipe.push("eeg", eeg[:, :10], label=1)
    assert pipe.buffer_fill == {"eeg": 0, "audio": 0, "bio": 0}
    # The caller logs, drops and carries on: the output is as if the bad chunks never came.
    rows, _ = _stream_in_random_chunks(multirate, CONFIG, np.random.default_rng(0))
    X, _, _ = extract_features(multirate, CONFIG)
    np.testing.assert_allclose(_as_arrays(rows)[0], X, rtol=1e-12, atol=1e-12)
    assert issubclass(ChunkError, PipelineError) and issubclass(PipelineError, ValueError)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_live_chunks_of_one_hop_equal_extract_features_and_refuse_non_finite_samples(multirate, dtype):
    """One hop per push (each completes one window: every stream's append and feature step run
    in one call), with a NaN chunk of every modality refused on the way, give the rows of
    extract_features."""
    config = dataclasses.replace(CONFIG, dtype=dtype)
    layout = FeatureLayout.from_recording(multirate, config)
    pipe = StreamingPipeline(config, layout)
    rows = []
    for t in range(14):  # the recording's seconds
        for modality in layout.modality_names:
            signal = multirate.signals[modality]
            fs = int(signal.sfreq)
            chunk = signal.data[:, t * fs : (t + 1) * fs]
            if t == 4:
                spoiled = chunk.copy()
                spoiled[-1, -1] = np.nan
                fill = pipe.buffer_fill
                with pytest.raises(ChunkError, match="1 NaN/inf sample"):
                    pipe.push(modality, spoiled, label=multirate.label)
                assert pipe.buffer_fill == fill
            rows += pipe.push(modality, chunk, label=multirate.label)
    X, labels, t = extract_features(multirate, config)
    got, got_labels, got_t = _as_arrays(rows)
    np.testing.assert_array_equal(got, X)
    assert list(got_labels) == list(labels) and list(got_t) == list(t)


def test_chunks_larger_than_the_free_buffer_are_checked_before_buffering(multirate):
    # a chunk that does not fit behind the buffered samples is tested before any copy
    config = dataclasses.replace(CONFIG, modalities=("eeg",), max_chunk_s=1.0)
    layout = FeatureLayout.from_recording(multirate, config)
    pipe = StreamingPipeline(config, layout)
    eeg = multirate.signals["eeg"].data
    rows = pipe.push("eeg", eeg[:, :1200])
    fill = pipe.buffer_fill["eeg"]
    big = eeg[:, 1200:4000].copy()  # 2800 samples > the 1500-sample buffer
    big[2, 2000] = np.inf
    with pytest.raises(ChunkError, match=r"1 NaN/inf sample\(s\), the first in channel 'F3' at sample 2000"):
        pipe.push("eeg", big)
    assert pipe.buffer_fill["eeg"] == fill
    rows += pipe.push("eeg", eeg[:, 1200:])
    X, _, _ = extract_features(multirate, config)
    np.testing.assert_array_equal(_as_arrays(rows)[0], X)


@pytest.mark.parametrize("dtype", [np.float16, ">f8", np.int32, "<f4"])
def test_chunks_of_any_real_dtype_equal_float64_chunks(multirate, dtype):
    config = dataclasses.replace(CONFIG, modalities=("bio",))
    layout = FeatureLayout.from_recording(multirate, config)
    bio = np.round(multirate.signals["bio"].data * 100).astype(dtype)
    pipe, reference = StreamingPipeline(config, layout), StreamingPipeline(config, layout)
    for a in range(0, bio.shape[1], 300):
        rows = pipe.push("bio", bio[:, a : a + 300])
        expected = reference.push("bio", bio[:, a : a + 300].astype(np.float64))
        assert len(rows) == len(expected)
        for row, ref in zip(rows, expected):
            np.testing.assert_array_equal(row.vector, ref.vector)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window_s": 0}, r"window_s must be finite and > 0"),
        ({"hop_s": float("nan")}, r"hop_s must be finite"),
        ({"window_s": "2"}, "number of seconds"),
        ({"n_mels": 0}, r"n_mels must be an integer >= 1"),
        ({"k": 2.5}, r"k must be an integer"),
        ({"modalities": ("eeg", "emg")}, "distinct names from"),
        ({"modalities": ()}, "distinct names from"),
        ({"bands": (("alpha", 13, 8),)}, "0 <= lo < hi"),
        ({"bands": (("a", 1, 4), ("a", 4, 8))}, "names must be unique"),
        ({"bands": ("alpha",)}, "triples"),
        ({"max_pending_windows": 0}, "max_pending_windows must be None or an integer >= 1"),
        ({"dtype": "float16"}, r"dtype must be one of \('float32', 'float64'\), got 'float16'"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(PipelineError, match=match):
        PipelineConfig(**kwargs)


def test_bad_layout_and_basis_are_rejected(multirate):
    layout = FeatureLayout.from_recording(multirate, CONFIG)
    with pytest.raises(PipelineError, match="layout was built for feature settings"):
        StreamingPipeline(PipelineConfig(hop_s=0.5), layout)
    with pytest.raises(PipelineError, match=r"basis components must have shape \(k, 61\)"):
        StreamingPipeline(CONFIG, layout, basis=(np.eye(3), np.zeros(3), np.ones(3)))
    with pytest.raises(PipelineError, match="scale > 0"):
        StreamingPipeline(CONFIG, layout, basis=(np.ones((2, 61)), np.zeros(61), np.zeros(61)))
    # the spectral plan is validated once, when the pipeline is built, not at the first window
    thin = PipelineConfig(bands=(("thin", 1.1, 1.2),), modalities=("eeg",))
    thin_layout = FeatureLayout.from_channels({"eeg": (100.0, ("Cz",), ("eeg",))}, thin)
    with pytest.raises(PipelineError, match=r"eeg at 100.0 Hz with 200-sample windows: band 'thin'.*no frequency bin"):
        StreamingPipeline(thin, thin_layout)


def test_flush_reports_unmatched_windows_and_restarts(multirate):
    layout = FeatureLayout.from_recording(multirate, CONFIG)
    pipe = StreamingPipeline(dataclasses.replace(CONFIG), layout)
    for m in ("eeg", "audio"):
        pipe.push(m, multirate.signals[m].data)
    pipe.push("bio", multirate.signals["bio"].data[:, : 250 * 8])  # bio stops after 8 s
    assert pipe.windows_emitted == 7
    assert pipe.flush() == 13 - 7
    assert pipe.buffer_fill == {"eeg": 0, "audio": 0, "bio": 0}
    rows = []
    for m in ("eeg", "audio", "bio"):
        rows += pipe.push(m, multirate.signals[m].data[:, : int(3 * multirate.signals[m].sfreq)])
    assert [r.t for r in rows] == [0.0, 1.0]  # a new stream starts at t = 0
