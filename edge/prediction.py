"""On-device predictions with the current global model (``predict = true``).

Every retained global :class:`~biofed.protocol.Model` carries the coordinator's ONNX export
(``Model.onnx``, see :mod:`biofed.coordinator.onnx_export`). :class:`DevicePredictor` loads
it into onnxruntime (:class:`biofed.edge.inference.OnnxModel`), refuses it when its feature
layout is not the device's (logged), classifies the newest stored windows at once and then
every new window as ingestion produces it, each time as a
:class:`~biofed.protocol.Prediction` (``t`` = the windows' times on the device clock of the
store), logging the predicted class counts. A model without ONNX bytes (a coordinator that
knows no feature layout, or the device's own personal model: ``[personalization]
predict_with_personal``) is scored with the Numba kernels and the device's basis instead,
the stored windows and every new one alike.

A model of a ``standardization = "device"`` basis takes rows z-scored with the device's own
training statistics, taken when the model arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from biofed.edge.inference import InferenceError, OnnxModel
from biofed.edge.tasks import LocalData
from biofed.kernels import n_params, predict_proba, project
from biofed.model import FeatureLayout
from biofed.protocol import Basis, Model, Prediction

__all__ = ["DevicePredictor"]

logger = logging.getLogger(__name__)


class DevicePredictor:
    """The global model a device classifies its windows with, and the rule for changing it.

    Parameters
    ----------
    device_id : str
        Names the device in the log.
    layout_json : str
        The device's feature layout (JSON of :class:`biofed.model.FeatureLayout`), ""
        until known; :meth:`set_layout` updates it.
    """

    def __init__(self, device_id: str, layout_json: str = "") -> None:
        self.device_id = device_id
        self.layout_json = layout_json
        self.model: OnnxModel | None = None
        """The ONNX global model predictions are made with (None: none)."""
        self.kernel_model: tuple[Model, Basis] | None = None
        """A model without ONNX bytes and its basis, that predictions are made with through the
        Numba kernels (None: none)."""
        self._standardization: tuple[np.ndarray, np.ndarray] | None = None
        """``(mean, scale)`` of the device's training rows as of the model's arrival, for a
        device-standardized model (None: the rows are not z-scored by the device)."""

    def set_layout(self, layout_json: str) -> None:
        """The device's layout is now ``layout_json``: stop predicting with a model that does not fit it."""
        self.layout_json = layout_json
        model = self.model
        if model is not None and not self._fits(model):
            self.model = None

    def _fits(self, model: OnnxModel) -> bool:
        """Whether ``model`` was trained on this device's feature layout (logged when not)."""
        if not self.layout_json:
            return True  # nothing ingested yet: checked again when the first stream fixes the layout
        problem = model.layout.mismatch(FeatureLayout.from_json(self.layout_json))
        if problem is not None:
            logger.error(
                "%s: %s does not fit this device: %s; no predictions with it", self.device_id, model.name, problem
            )
            return False
        return True

    def on_model(
        self,
        model: Model,
        basis: Basis | None,
        X: np.ndarray,
        t: np.ndarray,
        local_data: Callable[[tuple[str, ...]], LocalData],
    ) -> Prediction | None:
        """Predict with the new global ``model`` from now on; the prediction of the newest stored
        raw rows ``X`` (n, d) at times ``t`` (n,), if any.

        ``basis`` is the device's; ``local_data(classes)`` gives the device's labelled rows
        (read only for a device-standardized model).
        """
        self.kernel_model = None  # predictions follow the latest model, or stop
        device_mode = basis is not None and basis.version == model.basis_version and basis.standardization == "device"
        data = local_data(model.classes) if device_mode else None
        if device_mode and not data.train.any():
            self.model = None
            logger.warning(
                "%s: the model of round %d needs this device's standardization, but the device has no "
                "training windows of classes %s yet; no predictions",
                self.device_id,
                model.round,
                model.classes,
            )
            return None
        # device standardization: z-score with the training statistics as of the model's arrival
        # (kept, not the rows: predicting a window must not hold or rescan the training set)
        standardization = None if data is None else data.standardization()
        del data
        if model.onnx.size:
            self.model = None  # predictions follow the latest global model, or stop
            try:
                onnx_model = OnnxModel(model.onnx.tobytes(), name=f"the global model of round {model.round}")
            except InferenceError as exc:
                logger.error("%s: %s; no predictions with it", self.device_id, exc)
                return None
            if not self._fits(onnx_model):
                return None
            self._standardization = standardization
            self.model = onnx_model
            logger.info("%s: predicting with %s", self.device_id, onnx_model.describe())
            return self._predict(onnx_model, X, t) if X.shape[0] else None
        # a coordinator without a feature layout sends no ONNX: the Numba path with this device's basis
        self.model = None
        if basis is None or model.basis_version != basis.version:
            return None
        k = basis.components.shape[0]
        if model.params.shape[0] != n_params(k, len(model.classes), model.hidden):
            return None
        self.kernel_model = (model, basis)
        self._standardization = standardization
        return self._predict_with_kernels(X, t) if X.shape[0] else None

    def _predict_with_kernels(self, X: np.ndarray, t: np.ndarray) -> Prediction:
        model, basis = self.kernel_model
        mean, scale = (basis.mean, basis.scale) if self._standardization is None else self._standardization
        Z = project(X, basis.components, mean=mean, scale=scale)
        proba = predict_proba(model.params, Z, len(model.classes), model.hidden)
        return Prediction(round=model.round, t=t, proba=proba, classes=model.classes)

    def _predict(self, model: OnnxModel, X: np.ndarray, t: np.ndarray) -> Prediction:
        """Classify raw rows ``X`` (n, d) at times ``t`` (n,) with ``model``; log the class counts."""
        standardization = self._standardization
        if standardization is not None:  # the model of a device-standardized fleet takes z-scored rows
            X = (X - standardization[0]) / standardization[1]
        proba = model.predict_features(X)
        counts = np.bincount(proba.argmax(axis=1), minlength=len(model.classes))
        logger.info(
            "%s: predicted %d window(s) at t=%.0f-%.0f s: %s",
            self.device_id,
            len(t),
            t[0],
            t[-1],
            ", ".join(f"{c} {n}" for c, n in zip(model.classes, counts, strict=True)),
        )
        return Prediction(round=model.metadata.round, t=t, proba=proba, classes=model.classes)

    def predict_rows(self, rows: list, offset: float) -> Prediction | None:
        """The prediction of new feature rows (``FeatureRow``, ``t`` = session seconds from
        ``offset`` on the device clock); None without a model. A failing model is dropped
        (logged): predictions stop until the next global model."""
        model = self.model
        if not rows or (model is None and self.kernel_model is None):
            return None
        t = offset + np.array([r.t for r in rows])
        if model is None:
            return self._predict_with_kernels(np.stack([r.vector for r in rows]), t)
        try:
            return self._predict(model, np.stack([r.vector for r in rows]), t)
        except InferenceError as exc:
            logger.error("%s: prediction failed, predictions stopped: %s", self.device_id, exc)
            self.model = None
            return None
