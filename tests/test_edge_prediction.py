"""edge.prediction: which global model a device predicts with, on raw rows, without a broker.

The ONNX path (a model carrying the coordinator's export, refused on another feature layout)
runs through the agent in tests/test_onnx_agent.py.
"""

from __future__ import annotations

import numpy as np

from biofed.edge.prediction import DevicePredictor
from biofed.edge.tasks import labelled_split
from biofed.kernels import init_params, predict_proba, project
from biofed.protocol import Basis, Model

CLASSES = ("rest", "arithmetic")


def rows(n: int = 12, d: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    labels = np.array([CLASSES[i % 2] for i in range(n)])
    return X, labels, np.arange(n, dtype=np.float64)


def test_a_model_without_onnx_is_scored_with_the_devices_basis():
    X, labels, t = rows()
    basis = Basis(round=1, version=2, components=np.eye(5)[:3], mean=X.mean(0), scale=X.std(0))
    params = init_params(3, 2, random_state=4)
    predictor = DevicePredictor("pi-01")
    prediction = predictor.on_model(
        Model(round=9, params=params, basis_version=2, classes=CLASSES),
        basis,
        X,
        t,
        lambda classes: labelled_split(X, labels, t, classes),
    )
    expected = predict_proba(params, project(X, basis.components, mean=basis.mean, scale=basis.scale), 2)
    np.testing.assert_allclose(prediction.proba, expected, rtol=1e-12)
    assert prediction.round == 9 and list(prediction.t) == list(t) and predictor.model is None
    assert predictor.predict_rows([], 0.0) is None  # no ONNX model: nothing to classify live rows with


def test_a_model_of_another_basis_or_size_predicts_nothing():
    X, labels, t = rows()
    basis = Basis(round=1, version=2, components=np.eye(5)[:3], mean=np.zeros(5), scale=np.ones(5))
    predictor = DevicePredictor("pi-01")

    def split(classes):
        return labelled_split(X, labels, t, classes)

    stale = Model(round=9, params=init_params(3, 2), basis_version=1, classes=CLASSES)
    assert predictor.on_model(stale, basis, X, t, split) is None
    wrong_size = Model(round=9, params=np.zeros(4), basis_version=2, classes=CLASSES)
    assert predictor.on_model(wrong_size, basis, X, t, split) is None
    assert (
        predictor.on_model(
            Model(round=9, params=init_params(3, 2), basis_version=2, classes=CLASSES), None, X, t, split
        )
        is None
    )


def test_a_device_standardized_model_needs_training_windows():
    X, _, t = rows()
    basis = Basis(
        round=1, version=2, components=np.eye(5)[:3], mean=np.zeros(5), scale=np.ones(5), standardization="device"
    )
    unlabelled = np.array([""] * X.shape[0])
    predictor = DevicePredictor("pi-01")
    model = Model(round=9, params=init_params(3, 2), basis_version=2, classes=CLASSES)
    assert predictor.on_model(model, basis, X, t, lambda classes: labelled_split(X, unlabelled, t, classes)) is None
    labels = np.array([CLASSES[i % 2] for i in range(X.shape[0])])
    data = labelled_split(X, labels, t, CLASSES)
    prediction = predictor.on_model(model, basis, X, t, lambda classes: data)
    mean, scale = data.standardization()
    expected = predict_proba(model.params, project(X, basis.components, mean=mean, scale=scale), 2)
    np.testing.assert_allclose(prediction.proba, expected, rtol=1e-12)
