"""ONNX export (coordinator.onnx_export) and on-device inference (edge.inference) vs the Numba path."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest

from biofed import __version__
from biofed.coordinator.onnx_export import (
    OPSET,
    ExportError,
    build_feature_extractor,
    build_model,
    export_round,
)
from biofed.datasets import Recording, Signal, make_recording, read_recording
from biofed.edge.inference import InferenceError, LayoutMismatch, OnnxModel
from biofed.edge.pipeline import PipelineConfig, extract_features
from biofed.kernels import (
    band_powers,
    heart_rate_features,
    init_params,
    log_band_energies,
    predict_proba,
    project,
    sliding_windows,
    train,
    window_statistics,
)
from biofed.model import METADATA_KEYS, FeatureLayout, ModelFile, ModelFileError, ModelMetadata, PrivacySpec, fit_basis
from biofed.model.format import KEY_FORMAT

CLASSES = ("rest", "arithmetic")
PRIVACY = PrivacySpec(
    epsilon=2.5,
    delta=1e-5,
    accountant="rdp",
    epsilons={"rdp": 2.5, "pld": 2.1},
    trust_mode="central",
    noise_multiplier=1.1,
)


def _model_file(X, y, spec, hidden, *, k=32, seed=0) -> ModelFile:
    """Fit a basis and train a classifier on (X, y) exactly as a device would (no federation)."""
    basis = fit_basis(X, k)
    Z = project(X, basis.components, mean=basis.mean, scale=basis.scale)
    params = init_params(Z.shape[1], len(CLASSES), hidden, random_state=seed)
    params, _ = train(params, Z, y, len(CLASSES), hidden, epochs=15, lr=0.1, random_state=seed)
    return ModelFile(
        params,
        CLASSES,
        hidden,
        basis,
        basis_version=3,
        fleet="ward7",
        round=12,
        train_round=9,
        layout=spec,
        privacy=PRIVACY,
    )


def _numba_proba(model: ModelFile, X) -> np.ndarray:
    Z = project(X, model.basis.components, mean=model.basis.mean, scale=model.basis.scale)
    return predict_proba(model.params, Z, len(model.classes), model.hidden)


def _load(model: ModelFile, **kwargs) -> OnnxModel:
    return OnnxModel(build_model(model, **kwargs).SerializeToString(), name="test.onnx")


@pytest.fixture(scope="module")
def synthetic():
    """Two short synthetic sessions (EEG 19 ch, ECG + PPG, audio) with their raw feature rows."""
    recordings = [make_recording(label, duration_s=20.0, random_state=i) for i, label in enumerate(CLASSES)]
    config = PipelineConfig()
    rows = [extract_features(r, config) for r in recordings]
    X = np.vstack([r[0] for r in rows])
    y = np.concatenate([np.full(len(r[0]), i, dtype=np.int64) for i, r in enumerate(rows)])
    spec = FeatureLayout.from_recording(recordings[0], config)
    return recordings, X, y, spec


@pytest.fixture(scope="module")
def eegmat(shared_datasets):
    """Real windows: eegmat Subject02 rest (first 40 s) and arithmetic, EEG 19 ch + ECG at 500 Hz."""
    folder = shared_datasets / "eegmat"
    recordings = [read_recording(folder / "Subject02_1.edf"), read_recording(folder / "Subject02_2.edf")]
    config = PipelineConfig()
    rows = [extract_features(r, config) for r in recordings]
    X = np.vstack([r[0][:40] for r in rows])
    y = np.concatenate([np.full(len(r[0][:40]), i, dtype=np.int64) for i, r in enumerate(rows)])
    spec = FeatureLayout.from_recording(recordings[0], config)
    return recordings, X, y, spec


# ----------------------------------------------------------------------------- features graph
@pytest.mark.parametrize("hidden", [0, 16], ids=["logreg", "mlp"])
def test_features_graph_matches_numba_synthetic(synthetic, hidden):
    _, X, y, spec = synthetic
    model = _model_file(X, y, spec, hidden)
    expected = _numba_proba(model, X)
    np.testing.assert_allclose(_load(model).predict_features(X), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_load(model, dtype="float64").predict_features(X), expected, rtol=0, atol=1e-12)
    assert expected.min() < 0.4  # the classifier is not trivially constant


@pytest.mark.parametrize("hidden", [0, 16], ids=["logreg", "mlp"])
def test_features_graph_matches_numba_eegmat(eegmat, hidden):
    _, X, y, spec = eegmat
    model = _model_file(X, y, spec, hidden)
    expected = _numba_proba(model, X)
    np.testing.assert_allclose(_load(model).predict_features(X), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_load(model, dtype="float64").predict_features(X), expected, rtol=0, atol=1e-12)


def test_checker_opset_and_metadata_round_trip(synthetic):
    _, X, y, spec = synthetic
    model = _model_file(X, y, spec, hidden=8)
    for kind in ("features", "window"):
        proto = build_model(model, input_kind=kind)
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version == OPSET >= 17
        props = {p.key: p.value for p in proto.metadata_props}
        assert set(props) == set(METADATA_KEYS)
        meta = _load(model, input_kind=kind).metadata
        assert meta == ModelMetadata.from_props(props)
        assert (meta.biofed_version, meta.fleet, meta.round, meta.train_round, meta.basis_version) == (
            __version__,
            "ward7",
            12,
            9,
            3,
        )
        assert (meta.classes, meta.kind, meta.hidden) == (CLASSES, "mlp", 8)
        assert (meta.k, meta.n_features) == (model.k, X.shape[1])
        assert meta.input_kind == kind and meta.dtype == "float32"
        assert meta.layout == spec and meta.layout.feature_names == spec.feature_names
        assert meta.privacy.epsilon == 2.5 and meta.privacy.delta == 1e-5 and meta.privacy.accountant == "rdp"
        assert dict(meta.privacy.epsilons) == {"rdp": 2.5, "pld": 2.1} and meta.privacy.trust_mode == "central"
    assert FeatureLayout.from_json(spec.to_json()) == spec


# ----------------------------------------------------------------------------- window graph
def _extractor(spec: FeatureLayout, dtype: str):
    import onnxruntime as ort

    return ort.InferenceSession(
        build_feature_extractor(spec, dtype=dtype).SerializeToString(), providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_window_features_match_kernels(synthetic, dtype, rtol):
    """EEG band powers, audio log-mel energies and bio statistics of the graph vs the kernels."""
    recordings, _, _, spec = synthetic
    rec = recordings[1]
    session = _extractor(spec, dtype)
    feeds, expected = {}, []
    for part in spec.modalities:
        signal = rec.signals[part.modality]
        W, hop = spec.window_samples(part), int(spec.hop_s * part.sfreq)
        windows = np.ascontiguousarray(sliding_windows(signal.data, W, hop)[:10])
        feeds[part.modality] = windows.astype(dtype)
        if part.modality == "eeg":  # the segment length the layout chose (500 at 500 Hz with a 1 s hop)
            expected.append(
                band_powers(windows, part.sfreq, spec.bands, log=True, nperseg=part.nperseg).reshape(10, -1)
            )
        elif part.modality == "audio":
            expected.append(
                log_band_energies(windows, part.sfreq, n_bands=spec.n_mels, nperseg=part.nperseg).reshape(10, -1)
            )
        else:
            stats = window_statistics(windows, part.sfreq)
            hr = heart_rate_features(np.ascontiguousarray(windows[:, list(part.hr_channels)]), part.sfreq)
            feeds["bio_hr"] = hr.astype(dtype)
            cols = []
            for c in range(len(part.ch_names)):
                cols.append(stats[:, c])
                if c in part.hr_channels:
                    cols.append(hr[:, part.hr_channels.index(c)])
            expected.append(np.concatenate(cols, axis=1))
    (out,) = session.run(None, feeds)
    expected = np.concatenate(expected, axis=1)
    # band powers are log10 values: compare the powers themselves relatively
    eeg = spec.modality("eeg")
    n_eeg = len(eeg.feature_names)
    np.testing.assert_allclose(10.0 ** out[:, :n_eeg], 10.0 ** expected[:, :n_eeg], rtol=rtol)
    np.testing.assert_allclose(out[:, n_eeg:], expected[:, n_eeg:], rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("hidden", [0, 16], ids=["logreg", "mlp"])
def test_window_model_matches_pipeline_synthetic(synthetic, hidden):
    recordings, X, y, spec = synthetic
    model = _model_file(X, y, spec, hidden)
    rec = recordings[0]
    for dtype, atol in (("float32", 1e-5), ("float64", 1e-10)):
        # the device pipeline computes its spectral features in float32 by default
        rows, labels, t = extract_features(rec, dataclasses.replace(PipelineConfig.from_layout(spec), dtype=dtype))
        expected = _numba_proba(model, rows)
        result = _load(model, input_kind="window", dtype=dtype).predict_recording(rec)
        np.testing.assert_allclose(result.proba, expected, rtol=0, atol=atol)
        np.testing.assert_array_equal(result.labels, labels)
        np.testing.assert_allclose(result.t, t)


def test_window_features_match_band_powers_eegmat(eegmat):
    recordings, _, _, spec = eegmat
    eeg_only = dataclasses.replace(spec, modalities=(spec.modality("eeg"),))
    session = _extractor(eeg_only, "float64")
    signal = recordings[1].signals["eeg"]
    windows = np.ascontiguousarray(sliding_windows(signal.data, 1000, 500)[:20])
    (out,) = session.run(None, {"eeg": windows})
    assert eeg_only.modality("eeg").nperseg == 500  # shared_nperseg of 500 Hz EEG with a 1 s hop
    expected = band_powers(windows, 500.0, spec.bands, nperseg=500).reshape(20, -1)
    np.testing.assert_allclose(10.0**out, expected, rtol=1e-5)


def test_window_model_matches_pipeline_eegmat(eegmat):
    recordings, X, y, spec = eegmat
    model = _model_file(X, y, spec, hidden=0)
    rows, _, _ = extract_features(recordings[1], dataclasses.replace(PipelineConfig.from_layout(spec), dtype="float64"))
    result = _load(model, input_kind="window", dtype="float64").predict_recording(recordings[1])
    np.testing.assert_allclose(result.proba, _numba_proba(model, rows), rtol=0, atol=1e-10)
    assert set(result.labels) == {"arithmetic"}


# ----------------------------------------------------------------------------- layout checks
def test_wrong_layout_refused(synthetic, eegmat):
    recordings, X, y, spec = synthetic
    model = _load(_model_file(X, y, spec, hidden=0))
    needs = r"needs modalities \('eeg', 'audio', 'bio'\) but the data has \('eeg', 'bio'\)"
    with pytest.raises(LayoutMismatch, match=needs):
        model.predict_recording(eegmat[0][1])
    eeg_bio = dataclasses.replace(spec, modalities=(spec.modality("eeg"), spec.modality("bio")))
    X_eb = X[:, [i for i, n in enumerate(spec.feature_names) if not n.startswith("audio:")]]
    eeg_model = _load(_model_file(X_eb, y, eeg_bio, hidden=0))
    with pytest.raises(LayoutMismatch, match=r"eeg: the model expects 250 Hz but the data is sampled at 500 Hz"):
        eeg_model.predict_recording(eegmat[0][1])
    # same shapes, channels swapped: widths agree, the layout check still refuses
    rec = recordings[0]
    eeg = rec.signals["eeg"]
    names = list(eeg.ch_names)
    names[0], names[1] = names[1], names[0]
    swapped = Recording(
        rec.source,
        {**rec.signals, "eeg": Signal(eeg.data, eeg.sfreq, tuple(names), eeg.ch_types, eeg.units)},
        label=rec.label,
    )
    with pytest.raises(
        LayoutMismatch,
        match=rf"eeg: channel 0 is '{eeg.ch_names[0]}' in the model but "
        rf"'{eeg.ch_names[1]}' in the data",
    ):
        model.predict_recording(swapped)
    other = dataclasses.replace(spec, window_s=4.0)
    with pytest.raises(LayoutMismatch, match=r"window_s = 2.0 but the data's pipeline uses window_s = 4.0"):
        model.check_layout(other)


def test_bad_inputs(synthetic, tmp_path):
    _, X, y, spec = synthetic
    model = _model_file(X, y, spec, hidden=0)
    features = _load(model)
    with pytest.raises(InferenceError, match=rf"needs feature rows of shape \(N, {X.shape[1]}\), got \(3, 5\)"):
        features.predict_features(np.zeros((3, 5)))
    with pytest.raises(InferenceError, match="takes feature rows, not raw windows"):
        features.predict_windows({})
    with pytest.raises(InferenceError, match="no such model file"):
        OnnxModel(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_text("not a model")
    with pytest.raises(InferenceError, match="not a loadable ONNX model"):
        OnnxModel(tmp_path / "junk.onnx")
    proto = build_model(model)
    del proto.metadata_props[:]
    with pytest.raises(InferenceError, match="not a biofed model"):
        OnnxModel(proto.SerializeToString())
    proto = build_model(model)
    for prop in proto.metadata_props:
        if prop.key == KEY_FORMAT:
            prop.value = "99"
    with pytest.raises(InferenceError, match="biofed model format 99; this biofed reads format 1"):
        OnnxModel(proto.SerializeToString())
    with pytest.raises(ExportError, match="input kind must be one of"):
        build_model(model, input_kind="spectrogram")
    with pytest.raises(ExportError, match="no feature layout"):
        build_model(dataclasses.replace(model, layout=None))
    with pytest.raises(ModelFileError, match=r"params has shape \(5,\), expected \(66,\)"):
        dataclasses.replace(model, params=np.zeros(5))


# ----------------------------------------------------------------------------- per-round export
def test_export_round_writes_per_round_and_latest(synthetic, tmp_path):
    _, X, y, spec = synthetic
    model = _model_file(X, y, spec, hidden=0)
    npz, onnx_path = export_round(tmp_path, model)
    assert npz == tmp_path / "models" / "round_00012.npz" and onnx_path == tmp_path / "models" / "round_00012.onnx"
    assert (tmp_path / "model_latest.onnx").read_bytes() == onnx_path.read_bytes()
    assert OnnxModel(tmp_path / "model_latest.onnx").metadata.round == 12
    assert ModelFile.load(tmp_path / "model_latest.npz").round == 12
    npz, onnx_path = export_round(tmp_path, dataclasses.replace(model, round=13, layout=None))
    assert onnx_path is None and ModelFile.load(tmp_path / "model_latest.npz").round == 13
    assert not (tmp_path / "model_latest.onnx").exists()  # no stale ONNX beside a newer model file
    assert math.isclose(OnnxModel(tmp_path / "models" / "round_00012.onnx").metadata.privacy.epsilon, 2.5)
