"""ONNX models of a device-standardized fleet: metadata, model file and ``predict_recording``.

The graph of such a model standardizes with mean 0 / scale 1: its input rows must already be
z-scored with the subject's own statistics. The metadata says so, and
:meth:`OnnxModel.predict_recording` (``biofed predict``) calibrates on the recording itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import helper

from biofed.coordinator.onnx_export import ExportError, build_model
from biofed.datasets import make_recording
from biofed.edge.inference import InferenceError, LayoutMismatch, OnnxModel
from biofed.edge.pipeline import PipelineConfig, extract_features
from biofed.edge.split import device_standardization
from biofed.kernels import init_params, predict_proba, train
from biofed.model import (
    Basis,
    FeatureLayout,
    ModelFile,
    ModelFileError,
    ModelFormatError,
    ModelMetadata,
    PrivacySpec,
    fit_basis,
    save_arrays,
)
from biofed.model.format import KEY_STANDARDIZATION

CLASSES = ("rest", "arithmetic")
PRIVACY = PrivacySpec(
    epsilon=8.1, delta=1e-5, accountant="rdp", epsilons={"rdp": 8.1}, trust_mode="central", noise_multiplier=2.0
)


@pytest.fixture(scope="module")
def device_model():
    """A recording, its raw rows and a logistic regression trained on its z-scored rows (device mode)."""
    recordings = [
        make_recording(label, duration_s=20.0, subject="s7", random_state=i) for i, label in enumerate(CLASSES)
    ]
    config = PipelineConfig()
    rows = [extract_features(r, config) for r in recordings]
    X = np.vstack([r[0] for r in rows])
    y = np.concatenate([np.full(len(r[0]), i, dtype=np.int64) for i, r in enumerate(rows)])
    mean, scale = device_standardization(X)
    Z = (X - mean) / scale
    basis = fit_basis(Z, 16)
    d = Z.shape[1]
    params = init_params(basis.components.shape[0], 2, random_state=0)
    params, _ = train(params, Z @ basis.components.T, y, 2, epochs=15, lr=0.1, random_state=0)
    spec = FeatureLayout.from_recording(recordings[0], config)
    model = ModelFile(
        params,
        CLASSES,
        0,
        Basis(basis.components, np.zeros(d), np.ones(d)),
        basis_version=1,
        fleet="f",
        round=11,
        train_round=10,
        layout=spec,
        privacy=PRIVACY,
        standardization="device",
    )
    return recordings, model


def test_metadata_and_model_file_carry_device_standardization(device_model, tmp_path):
    _, model = device_model
    onnx_model = OnnxModel(build_model(model).SerializeToString(), name="device.onnx")
    assert onnx_model.metadata.standardization == "device"
    path = tmp_path / "model.npz"
    save_arrays(path, model.to_arrays())
    assert ModelFile.load(path).standardization == "device"
    # a global model keeps the metadata keys of older biofed versions; files without the key read as global
    arrays = {k: v for k, v in model.to_arrays().items() if k != "standardization"}
    save_arrays(path, {**arrays, "basis_mean": np.full(model.n_features, 0.5)})
    assert ModelFile.load(path).standardization == "global"
    meta = onnx_model.metadata.to_props()
    assert meta[KEY_STANDARDIZATION] == "device"
    with pytest.raises(ModelFormatError, match="unknown biofed.standardization 'subject'"):
        ModelMetadata.from_props({**meta, KEY_STANDARDIZATION: "subject"})


def test_predict_recording_calibrates_on_the_recording(device_model):
    recordings, model = device_model
    onnx_model = OnnxModel(build_model(model, dtype="float64").SerializeToString(), name="device.onnx")
    result = onnx_model.predict_recording(recordings[1])
    X, _, _ = extract_features(recordings[1], PipelineConfig())
    mean, scale = device_standardization(X)  # the session's own mean and scale
    expected = predict_proba(model.params, ((X - mean) / scale) @ model.basis.components.T, 2)
    np.testing.assert_allclose(result.proba, expected, rtol=0, atol=1e-12)


def test_predict_recording_calibrates_on_the_given_recordings(device_model):
    recordings, model = device_model
    onnx_model = OnnxModel(build_model(model, dtype="float64").SerializeToString(), name="device.onnx")
    result = onnx_model.predict_recording(recordings[1], calibration=recordings)
    rows = [extract_features(r, PipelineConfig())[0] for r in recordings]
    mean, scale = device_standardization(np.vstack(rows))  # both sessions of the subject, as its device does
    expected = predict_proba(model.params, ((rows[1] - mean) / scale) @ model.basis.components.T, 2)
    np.testing.assert_allclose(result.proba, expected, rtol=0, atol=1e-12)
    self_calibrated = onnx_model.predict_recording(recordings[1]).proba
    assert np.abs(self_calibrated - result.proba).max() > 1e-3  # the reference changes the answer


def test_predict_recording_refuses_bad_calibration(device_model):
    recordings, model = device_model
    onnx_model = OnnxModel(build_model(model).SerializeToString(), name="device.onnx")
    short = make_recording("rest", duration_s=1.0, subject="s7", random_state=5)  # shorter than one window
    with pytest.raises(InferenceError, match="calibration recordings hold no complete window"):
        onnx_model.predict_recording(recordings[0], calibration=[short])
    other = make_recording("rest", duration_s=20.0, subject="s7", random_state=6, eeg_channels=8)
    with pytest.raises(LayoutMismatch, match="does not fit"):
        onnx_model.predict_recording(recordings[0], calibration=[other])
    global_model = dataclasses.replace(model, standardization="global")
    onnx_global = OnnxModel(build_model(global_model).SerializeToString(), name="global.onnx")
    with pytest.raises(InferenceError, match="calibration recordings apply only to models of a device-standardized"):
        onnx_global.predict_recording(recordings[0], calibration=recordings)


def test_window_graph_of_a_device_model_is_refused(device_model):
    recordings, model = device_model
    with pytest.raises(ExportError, match="device-standardized rows .* export the features graph"):
        build_model(model, input_kind="window")
    # a window graph whose metadata says "device" (another tool's file) is refused at prediction too
    graph = build_model(dataclasses.replace(model, standardization="global"), input_kind="window")
    helper.set_model_props(graph, {**{p.key: p.value for p in graph.metadata_props}, KEY_STANDARDIZATION: "device"})
    onnx_model = OnnxModel(graph.SerializeToString(), name="device.onnx")
    with pytest.raises(InferenceError, match="device-standardized rows .* export the features graph"):
        onnx_model.predict_recording(recordings[0])


def test_model_file_rejects_unknown_standardization(device_model):
    _, model = device_model
    with pytest.raises(ModelFileError, match=r"standardization must be one of \('global', 'device'\)"):
        ModelFile(
            model.params,
            CLASSES,
            0,
            model.basis,
            basis_version=1,
            fleet="f",
            round=1,
            train_round=1,
            layout=None,
            privacy=PRIVACY,
            standardization="subject",
        )
