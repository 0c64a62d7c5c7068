"""ONNX models of a device-standardized fleet: metadata, model file and ``predict_recording``.

The graph of such a model standardizes with mean 0 / scale 1: its input rows must already be
z-scored with the subject's own statistics. The metadata says so, and
:meth:`OnnxModel.predict_recording` (``biofed predict``) calibrates on the recording itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from biofed.coordinator.onnx_export import ModelFile, build_model
from biofed.coordinator.state import write_final_model
from biofed.datasets import make_recording
from biofed.edge.inference import InferenceError, OnnxModel, layout_spec
from biofed.edge.pipeline import FeatureLayout, PipelineConfig, extract_features, fit_basis
from biofed.edge.split import device_standardization
from biofed.kernels import init_params, predict_proba, train
from biofed.model_format import KEY_STANDARDIZATION, ModelFormatError, ModelMetadata, PrivacySpec

CLASSES = ("rest", "arithmetic")
PRIVACY = PrivacySpec(epsilon=8.1, delta=1e-5, accountant="rdp", epsilons={"rdp": 8.1}, trust_mode="central",
                      noise_multiplier=2.0)


@pytest.fixture(scope="module")
def device_model():
    """A recording, its raw rows and a logistic regression trained on its z-scored rows (device mode)."""
    recordings = [make_recording(label, duration_s=20.0, subject="s7", random_state=i)
                  for i, label in enumerate(CLASSES)]
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
    spec = layout_spec(FeatureLayout.from_recording(recordings[0], config), config)
    model = ModelFile(params, CLASSES, 0, basis.components, np.zeros(d), np.ones(d), basis_version=1, fleet="f",
                      round=11, train_round=10, layout=spec, privacy=PRIVACY, standardization="device")
    return recordings, model


def test_metadata_and_model_file_carry_device_standardization(device_model, tmp_path):
    _, model = device_model
    onnx_model = OnnxModel(build_model(model).SerializeToString(), name="device.onnx")
    assert onnx_model.metadata.standardization == "device"
    path = tmp_path / "model.npz"
    write_final_model(path, model.to_arrays())
    assert ModelFile.load(path).standardization == "device"
    # a global model keeps the metadata keys of older biofed versions; files without the key read as global
    arrays = {k: v for k, v in model.to_arrays().items() if k != "standardization"}
    write_final_model(path, {**arrays, "basis_mean": np.full(model.n_features, 0.5)})
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
    expected = predict_proba(model.params, ((X - mean) / scale) @ model.components.T, 2)
    np.testing.assert_allclose(result.proba, expected, rtol=0, atol=1e-12)


def test_window_graph_of_a_device_model_is_refused(device_model):
    recordings, model = device_model
    onnx_model = OnnxModel(build_model(model, input_kind="window").SerializeToString(), name="device.onnx")
    with pytest.raises(InferenceError, match="device-standardized rows .* export the features graph"):
        onnx_model.predict_recording(recordings[0])


def test_model_file_rejects_unknown_standardization(device_model):
    from biofed.coordinator.onnx_export import ExportError

    _, model = device_model
    with pytest.raises(ExportError, match='standardization must be "global" or "device"'):
        ModelFile(model.params, CLASSES, 0, model.components, model.mean, model.scale, basis_version=1, fleet="f",
                  round=1, train_round=1, layout=None, privacy=PRIVACY, standardization="subject")
