"""biofed.model: the feature layout, the basis, the model file and the one scale rule."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from biofed.coordinator.basis import standardization_from_moments
from biofed.edge.pipeline import PipelineConfig, StreamingPipeline
from biofed.edge.split import device_standardization
from biofed.kernels import (
    heart_rate_features,
    init_params,
    moments_init,
    moments_scale,
    moments_update,
    n_params,
    standard_scale,
    window_statistics,
)
from biofed.model import (
    BIO_STATISTICS,
    HR_FEATURES,
    Basis,
    BasisError,
    FeatureLayout,
    LayoutError,
    ModelFile,
    ModelFileError,
    ModelFormatError,
    PrivacySpec,
    fit_basis,
    save_arrays,
)

CONFIG = PipelineConfig()
CHANNELS = {
    "eeg": (250.0, ("Fp1", "Cz"), ("eeg", "eeg")),
    "bio": (100.0, ("ECG", "EDA", "PPG"), ("ecg", "eda", "ppg")),
}


@pytest.fixture(scope="module")
def layout():
    return FeatureLayout.from_channels(CHANNELS, CONFIG)


# ---------------------------------------------------------------------------------- layout
def test_columns_are_named_modality_channel_feature(layout):
    assert layout.modality_names == ("eeg", "bio")
    bands = [name for name, _, _ in CONFIG.bands]
    eeg = [f"eeg:{ch}:{band}" for ch in ("Fp1", "Cz") for band in bands]
    bio = (
        [f"bio:ECG:{f}" for f in BIO_STATISTICS + HR_FEATURES]
        + [f"bio:EDA:{f}" for f in BIO_STATISTICS]
        + [f"bio:PPG:{f}" for f in BIO_STATISTICS + HR_FEATURES]
    )
    assert layout.feature_names == tuple(eeg + bio)
    assert layout.n_features == len(eeg) + len(bio) == 10 + 19
    assert layout.modality("bio").hr_channels == (0, 2) and layout.modality("audio") is None
    assert layout.window_samples(layout.modality("eeg")) == 500
    assert layout.hop_samples(layout.modality("bio")) == 100
    odd = FeatureLayout.from_channels(CHANNELS, CONFIG, hop_s=0.333)
    assert odd.hop_samples(odd.modality("eeg")) is None and odd.hop_samples(odd.modality("bio")) is None


def test_bio_columns_place_what_the_kernels_compute(layout):
    bio = layout.modality("bio")
    statistics, heart_rate = bio.bio_columns()
    names = bio.feature_names
    assert [names[i].rsplit(":", 1)[1] for i in statistics] == list(BIO_STATISTICS) * 3
    assert [names[i].rsplit(":", 1)[1] for i in heart_rate] == list(HR_FEATURES) * 2
    assert sorted(statistics + heart_rate) == list(range(bio.n_features))
    # the streaming pipeline fills the columns in exactly this order
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 200))
    t = np.arange(200) / 100.0
    x[0] += 3 * (np.sin(2 * np.pi * 1.2 * t) > 0.95)  # beats for the heart-rate detector
    bio_only = FeatureLayout.from_channels({"bio": CHANNELS["bio"]}, CONFIG)
    (row,) = StreamingPipeline(CONFIG, bio_only).push("bio", x)
    expected = np.empty(bio.n_features)
    expected[list(statistics)] = window_statistics(x[None], 100.0).ravel()
    expected[list(heart_rate)] = heart_rate_features(np.ascontiguousarray(x[None, [0, 2]]), 100.0).ravel()
    np.testing.assert_allclose(row.vector, expected, rtol=1e-12, equal_nan=True)


def test_hash_keys_the_store_and_json_round_trips(layout):
    # the feature store is keyed by this hash: its formula must not drift
    params = {"window_s": 2.0, "hop_s": 1.0, "bands": [list(b) for b in CONFIG.bands], "n_mels": 32}
    recorded = {**params, "nperseg": {"eeg": 250}}  # 250 Hz EEG, 1 s hop: segments of 250, not 256

    def digest(params):
        payload = json.dumps(
            {
                "params": json.dumps(params, sort_keys=True),
                "modalities": [dataclasses.astuple(m)[:5] for m in layout.modalities],
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    assert layout.hash == digest(recorded) == "dbd622c948a66707"
    assert digest(params) == "3d98cdbbfa0ab63e"  # layouts recorded before nperseg keep their hash
    assert FeatureLayout.from_json(layout.to_json()) == layout
    assert FeatureLayout.from_json(layout.to_json()).hash == layout.hash
    assert layout.hash != FeatureLayout.from_channels(CHANNELS, CONFIG, n_mels=16).hash
    assert layout.mismatch(layout) is None
    other = FeatureLayout.from_channels(CHANNELS, CONFIG, hop_s=0.5)
    assert layout.mismatch(other) == "the model was trained with hop_s = 1.0 but the data's pipeline uses hop_s = 0.5"
    assert PipelineConfig.from_layout(layout) == PipelineConfig(modalities=("eeg", "bio"))


def test_segment_length_is_recorded_so_windows_share_segments(layout):
    eeg = layout.modality("eeg")
    assert eeg.nperseg == 250 and layout.modality("bio").nperseg is None
    assert layout.spectral_plan(eeg).nperseg == 250 and layout.hop_samples(eeg) % 125 == 0
    data = json.loads(layout.to_json())
    assert [m.get("nperseg") for m in data["modalities"]] == [250, None]
    # the profile of a device: 500 Hz EEG and 16 kHz audio with a 1 s hop both get 500
    profile = FeatureLayout.from_channels(
        {"eeg": (500.0, ("Cz",), ("eeg",)), "audio": (16000.0, ("PCG",), ("audio",))}, CONFIG
    )
    assert [m.nperseg for m in profile.modalities] == [500, 500]
    # no divisor of the hop near the default step (509 samples, a prime), or a fractional hop: the default
    for fs, hop_s in ((509.0, 1.0), (500.0, 0.9993)):
        odd = FeatureLayout.from_channels({"eeg": (fs, ("Cz",), ("eeg",))}, CONFIG, hop_s=hop_s)
        assert odd.modality("eeg").nperseg == 512
    # the shared length would leave a band without a bin: the default is kept
    narrow = FeatureLayout.from_channels(
        {"eeg": (500.0, ("Cz",), ("eeg",))}, CONFIG, hop_s=0.8, bands=(("narrow", 10.1, 10.9),)
    )
    assert narrow.modality("eeg").nperseg == 512  # 2 * 200 = 400 samples: bins 1.25 Hz apart


def test_layouts_recorded_without_segment_length_use_the_kernels_default(layout):
    data = json.loads(layout.to_json())
    for m in data["modalities"]:
        m.pop("nperseg", None)
    old = FeatureLayout.from_json(json.dumps(data))
    assert old.modality("eeg").nperseg is None and old.spectral_plan(old.modality("eeg")).nperseg == 256
    assert old.hash == "3d98cdbbfa0ab63e" and FeatureLayout.from_json(old.to_json()) == old
    assert old.mismatch(layout) == (
        "eeg: the model was trained on Welch segments of 256 samples but the data's pipeline uses 250; "
        "retrain the model on this pipeline's features"
    )
    assert old.mismatch(old) is None and layout.mismatch(layout) is None
    for bad in (1, 2.5, True, "250"):
        data["modalities"][0]["nperseg"] = bad
        with pytest.raises(ModelFormatError, match="nperseg must be an integer >= 2"):
            FeatureLayout.from_json(json.dumps(data))
    data["modalities"][0]["nperseg"] = 250
    data["modalities"][1]["nperseg"] = 250
    with pytest.raises(ModelFormatError, match=r"bio nperseg .*eeg / audio only"):
        FeatureLayout.from_json(json.dumps(data))


def test_spectral_plan_is_the_kernels_plan(layout):
    eeg = layout.modality("eeg")
    plan = layout.spectral_plan(eeg)
    assert plan.window == 500 and plan.n_bands == len(CONFIG.bands) and plan.log == "log10"
    assert layout.spectral_plan(layout.modality("bio")) is None
    assert plan.log_floor(np.float32) == np.finfo(np.float32).tiny
    thin = FeatureLayout.from_channels({"eeg": (100.0, ("Cz",), ("eeg",))}, CONFIG, bands=(("thin", 1.1, 1.2),))
    with pytest.raises(LayoutError, match=r"eeg at 100.0 Hz with 200-sample windows: band 'thin'.*no frequency bin"):
        thin.spectral_plan(thin.modality("eeg"))


@pytest.mark.parametrize(
    ("channels", "match"),
    [
        ({}, "none of the configured modalities"),
        ({"emg": (100.0, ("x",), ("misc",))}, "unknown modality 'emg'"),
        ({"bio": (0.5, ("x",), ("eda",))}, r"sample\(s\) per 2.0 s window"),
        ({"eeg": (64.0, ("Cz",), ("eeg",))}, r"band\(s\) \['gamma'\] reach above the Nyquist frequency 32.0 Hz"),
        ({"eeg": (100.0, ("Cz", "Cz"), ("eeg", "eeg"))}, "unique channel names"),
        ({"eeg": (float("nan"), ("Cz",), ("eeg",))}, "finite and > 0 Hz"),
    ],
)
def test_bad_channels_are_refused(channels, match):
    with pytest.raises(LayoutError, match=match):
        FeatureLayout.from_channels(channels, CONFIG)


def test_settings_come_from_a_config_or_keywords(layout):
    explicit = FeatureLayout.from_channels(
        CHANNELS, window_s=2.0, hop_s=1.0, bands=CONFIG.bands, n_mels=32, modalities=("eeg", "bio")
    )
    assert explicit == layout
    with pytest.raises(TypeError, match="needs settings .* or hop_s, bands, n_mels, modalities"):
        FeatureLayout.from_channels(CHANNELS, window_s=2.0)


def test_malformed_layout_json_is_a_format_error(layout):
    data = json.loads(layout.to_json())
    data["modalities"][0]["modality"] = "emg"
    with pytest.raises(ModelFormatError, match="not eeg, audio or bio"):
        FeatureLayout.from_json(json.dumps(data))
    with pytest.raises(ModelFormatError, match="lacks"):
        FeatureLayout.from_json("{}")


# ---------------------------------------------------------------------------------- basis
def test_fit_basis_is_the_standardized_pca_basis():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) * [1e3, 1.0, 5.0, 0.1, 2.0, 1.0] + 4.0
    X[:, 5] = 7.0  # constant: scale 1
    basis = fit_basis(X, k=3)
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale[5] = 1.0
    np.testing.assert_allclose(basis.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(basis.scale, scale, rtol=1e-10)
    _, _, vt = np.linalg.svd((X - mean) / scale, full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(basis.components * vt[:3], axis=1)), 1.0, atol=1e-8)
    assert (basis.k, basis.n_features) == (3, 6)


@pytest.mark.parametrize(
    ("basis", "n_features", "match"),
    [
        ((np.eye(2), np.zeros(2)), None, r"\(components, mean, scale\) tuple"),
        ((np.eye(3), np.zeros(3), np.ones(3)), 4, r"shape \(k, 4\)"),
        ((np.eye(3), np.zeros(2), np.ones(3)), None, r"shape \(3,\)"),
        ((np.eye(3), np.zeros(3), np.array([1.0, 0.0, 1.0])), None, "scale > 0"),
        ((np.full((1, 3), np.nan), np.zeros(3), np.ones(3)), None, "finite"),
    ],
)
def test_bad_basis_is_refused(basis, n_features, match):
    with pytest.raises(BasisError, match=match):
        Basis.checked(basis, n_features)


def test_fit_basis_needs_two_rows():
    with pytest.raises(BasisError, match=r"\(N >= 2, F\)"):
        fit_basis(np.ones((1, 4)))


# ---------------------------------------------------------------------------------- one scale rule
def test_every_standardization_uses_the_one_scale_rule():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((50, 5)) * [1.0, 1e-12, 3.0, 0.0, 1e-3] + [0.0, 1e6, 2.0, 0.1, 5.0]
    mean, var = X.mean(axis=0), X.var(axis=0)
    expected = standard_scale(mean, var)
    np.testing.assert_array_equal(expected[[1, 3]], [1.0, 1.0])  # constant up to rounding, and constant
    np.testing.assert_allclose(expected[[0, 2, 4]], np.sqrt(var[[0, 2, 4]]), rtol=1e-12)
    np.testing.assert_allclose(device_standardization(X)[1], expected, rtol=1e-12)
    np.testing.assert_allclose(moments_scale(moments_update(moments_init(5), X)), expected, rtol=1e-9)
    _, from_moments = standardization_from_moments(np.concatenate([mean, (X**2).mean(axis=0)]))
    np.testing.assert_allclose(from_moments[[0, 2, 4]], expected[[0, 2, 4]], rtol=1e-6)
    np.testing.assert_array_equal(from_moments[[1, 3]], [1.0, 1.0])
    with pytest.raises(ValueError, match="1-D of equal length"):
        standard_scale(np.zeros(2), np.zeros(3))


# ---------------------------------------------------------------------------------- model file
def _model(layout, hidden=0, **changes) -> ModelFile:
    rng = np.random.default_rng(1)
    basis = fit_basis(rng.standard_normal((40, layout.n_features)), k=4)
    params = init_params(4, 2, hidden, random_state=0)
    model = ModelFile(
        params,
        ("rest", "task"),
        hidden,
        basis,
        3,
        "ward7",
        12,
        9,
        layout,
        PrivacySpec(2.5, 1e-5, "rdp", {"rdp": 2.5, "pld": 2.1}, "central", 1.1),
    )
    return dataclasses.replace(model, **changes)


def test_model_file_round_trip(layout, tmp_path):
    model = _model(layout, hidden=3, stop_reason="budget")
    loaded = ModelFile.load(model.save(tmp_path / "model.npz"))
    assert loaded.params.shape == (n_params(4, 2, 3),)
    np.testing.assert_array_equal(loaded.params, model.params)
    for mine, theirs in zip(loaded.basis, model.basis):
        np.testing.assert_array_equal(mine, theirs)
    assert (
        loaded.classes,
        loaded.hidden,
        loaded.basis_version,
        loaded.fleet,
        loaded.round,
        loaded.train_round,
        loaded.layout,
        loaded.privacy,
        loaded.standardization,
        loaded.stop_reason,
    ) == (model.classes, 3, 3, "ward7", 12, 9, layout, model.privacy, "global", "budget")
    arrays = model.to_arrays()
    del arrays["layout"], arrays["epsilon"], arrays["standardization"], arrays["stop_reason"]
    old = ModelFile.load(save_arrays(tmp_path / "old.npz", arrays))  # written before these keys existed
    assert (old.layout, old.privacy.epsilon, old.standardization, old.stop_reason) == (None, None, "global", "")


def test_bad_model_files_are_refused(layout, tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        ModelFile.load(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ModelFileError, match="text.npz: not a biofed model file.*not a NumPy .npz archive"):
        ModelFile.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ModelFileError, match=r"other.npz: not a biofed model file: lacks \['params'"):
        ModelFile.load(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", params=np.array([object()], dtype=object))
    with pytest.raises(ModelFileError, match="pickled Python objects, which biofed never loads"):
        ModelFile.load(tmp_path / "pickled.npz")
    arrays = _model(layout).to_arrays()
    save_arrays(tmp_path / "wide.npz", {**arrays, "basis_scale": np.zeros(layout.n_features)})
    with pytest.raises(ModelFileError, match="wide.npz: basis must be finite with scale > 0"):
        ModelFile.load(tmp_path / "wide.npz")
    with pytest.raises(ModelFileError, match=r"params has shape \(5,\), expected \(10,\)"):
        _model(layout, params=np.zeros(5))
    with pytest.raises(ModelFileError, match="at least 2 classes"):
        _model(layout, classes=("rest",))
    narrow = FeatureLayout.from_channels({"bio": CHANNELS["bio"]}, CONFIG)
    with pytest.raises(ModelFileError, match=f"names {narrow.n_features} features but the basis has 29"):
        dataclasses.replace(_model(layout), layout=narrow)
