"""On-device inference with the coordinator's ONNX models (onnxruntime).

A biofed ONNX model (graph contract and metadata: :mod:`biofed.model.format`) is loaded from a
file or from the bytes a :class:`biofed.protocol.Model` message carries. Loading checks that
it is a biofed model of a format this version reads; before any data goes in, the model's
feature layout (channels, rates, window/hop, bands, mels) is compared with the data's and a
mismatch is refused with :class:`LayoutMismatch`, whose message names the first difference
(a model trained on 19-channel 500 Hz EEG must not silently score a 64-channel 160 Hz
recording just because the widths happen to agree).

Two input kinds:

``features`` models take the raw feature rows of :mod:`biofed.edge.pipeline` (N, F).
``window`` models take aligned raw windows per modality (N, C, W) plus, when the bio
modality has ECG/PPG channels, the heart-rate features ``bio_hr`` (N, n_hr, 2) computed here
with :func:`biofed.kernels.heart_rate_features` (peak detection is not expressible in ONNX).

Sessions run with one intra-op thread by default (a device shares its cores with the
feature pipeline and MQTT); pass ``threads`` to change it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from biofed.edge.pipeline import PipelineConfig, extract_features, label_pieces
from biofed.edge.split import device_standardization
from biofed.kernels import heart_rate_features, sliding_windows
from biofed.model import (
    HR_INPUT,
    INPUT_FEATURES,
    OUTPUT_PROBA,
    FeatureLayout,
    LayoutError,
    ModelFormatError,
    ModelMetadata,
)

__all__ = ["InferenceError", "LayoutMismatch", "OnnxModel", "RecordingPrediction"]

logger = logging.getLogger(__name__)


class InferenceError(ValueError):
    """A model cannot be loaded or run (missing file, not ONNX, not biofed, bad input)."""


class LayoutMismatch(InferenceError):
    """The model was trained on another feature layout than the data's (the message names the difference)."""


class RecordingPrediction(NamedTuple):
    """Per-window output of :meth:`OnnxModel.predict_recording`.

    ``proba`` (N, c), ``predicted`` (N,) class labels, ``labels`` (N,) the recording's labels
    (``""`` where unlabelled), ``t`` (N,) window starts in seconds.
    """

    proba: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray
    t: np.ndarray


class OnnxModel:
    """A loaded biofed ONNX model.

    Parameters
    ----------
    source : path or bytes
        An ``.onnx`` file, or the serialized model (``Model.onnx`` of a protocol message).
    name : str or None
        How errors and logs call the model (default: the path, or ``"model"``).
    threads : int, default 1
        onnxruntime intra-op threads.

    Raises
    ------
    InferenceError
        The file is missing, is not an ONNX model, or is not a biofed model of this format.
    """

    def __init__(self, source: str | Path | bytes, *, name: str | None = None, threads: int = 1) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            self.name = name or "model"
        else:
            path = Path(source)
            self.name = name or str(path)
            if not path.is_file():
                raise InferenceError(f"{path}: no such model file")
            data = path.read_bytes()
        import onnxruntime as ort  # only a device that runs ONNX models pays for the runtime

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InferenceError(f"{self.name}: not a loadable ONNX model ({first})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            self.metadata: ModelMetadata = ModelMetadata.from_props(props, self.name)
        except ModelFormatError as exc:
            raise InferenceError(str(exc)) from None
        self.dtype = np.dtype(self.metadata.dtype).type
        self.input_names = tuple(i.name for i in self.session.get_inputs())

    # ---------------------------------------------------------------- properties
    @property
    def classes(self) -> tuple[str, ...]:
        return self.metadata.classes

    @property
    def layout(self) -> FeatureLayout:
        return self.metadata.layout

    @property
    def input_kind(self) -> str:
        return self.metadata.input_kind

    def describe(self) -> str:
        """One line: fleet, round, model kind, classes, privacy."""
        m = self.metadata
        model = "logistic regression" if m.kind == "logreg" else f"MLP ({m.hidden} hidden units)"
        return (
            f"fleet {m.fleet or '-'}, round {m.round} ({m.train_round} training rounds), basis v{m.basis_version}, "
            f"{model} on k={m.k} of {m.n_features} features ({m.input_kind} input, {m.dtype}), classes "
            f"{', '.join(m.classes)}; {m.privacy.describe()}"
        )

    # ---------------------------------------------------------------- checks
    def check_layout(self, layout: FeatureLayout, data_name: str = "the data") -> None:
        """Raise :class:`LayoutMismatch` unless ``layout`` is the model's layout."""
        problem = self.layout.mismatch(layout)
        if problem is not None:
            raise LayoutMismatch(f"{self.name} does not fit {data_name}: {problem}")

    # ---------------------------------------------------------------- running
    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            (proba,) = self.session.run([OUTPUT_PROBA], feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's error types are not part of its API
            raise InferenceError(f"{self.name}: inference failed: {exc}") from None
        return np.asarray(proba, dtype=np.float64)

    def predict_features(self, X) -> np.ndarray:
        """Class probabilities (N, c) of raw feature rows ``X`` (N, F) (``features`` models).

        For a ``metadata.standardization == "device"`` model, ``X`` must already be z-scored
        with the subject's own statistics (:func:`biofed.edge.split.device_standardization`).
        """
        if self.input_kind != INPUT_FEATURES:
            raise InferenceError(f"{self.name} takes raw windows, not feature rows; use predict_windows")
        X = np.asarray(X)
        F = self.metadata.n_features
        if X.ndim != 2 or X.shape[1] != F:
            raise InferenceError(f"{self.name} needs feature rows of shape (N, {F}), got {X.shape}")
        if X.shape[0] == 0:
            return np.empty((0, len(self.classes)))
        return self._run({INPUT_FEATURES: np.ascontiguousarray(X, dtype=self.dtype)})

    def predict_windows(self, windows: Mapping[str, np.ndarray], hr=None) -> np.ndarray:
        """Class probabilities (N, c) of raw windows (``window`` models).

        ``windows`` maps each modality of the layout to (N, C, W); ``hr`` (N, n_hr, 2) is
        required when the bio modality has heart-rate channels (computed from the bio windows
        when None).
        """
        if self.input_kind == INPUT_FEATURES:
            raise InferenceError(f"{self.name} takes feature rows, not raw windows; use predict_features")
        feeds = {}
        n = None
        for part in self.layout.modalities:
            if part.modality not in windows:
                raise InferenceError(f"{self.name} needs {part.modality} windows; got {sorted(windows)}")
            w = np.asarray(windows[part.modality])
            expected = (part.n_channels, self.layout.window_samples(part))
            if w.ndim != 3 or w.shape[1:] != expected or (n is not None and w.shape[0] != n):
                raise InferenceError(
                    f"{self.name}: {part.modality} windows must have shape (N, {expected[0]}, "
                    f"{expected[1]}) with one N for all modalities, got {w.shape}"
                )
            n = w.shape[0]
            feeds[part.modality] = np.ascontiguousarray(w, dtype=self.dtype)
            if part.hr_channels:
                if hr is None:
                    hr_windows = np.ascontiguousarray(w[:, list(part.hr_channels)], dtype=np.float64)
                    hr = heart_rate_features(hr_windows, part.sfreq)
                feeds[HR_INPUT] = np.ascontiguousarray(hr, dtype=self.dtype)
        if n == 0:
            return np.empty((0, len(self.classes)))
        return self._run(feeds)

    def predict_recording(self, recording, *, calibration: Sequence = ()) -> RecordingPrediction:
        """Classify every window of a :class:`biofed.datasets.Recording`.

        The recording's layout (under the model's pipeline settings) must equal the model's
        (:class:`LayoutMismatch` otherwise). ``features`` models get the rows of
        :func:`biofed.edge.pipeline.extract_features`; ``window`` models get the same aligned
        windows directly (window ``j`` starts at ``j * hop_s``) and the same labels (the label
        in force at a window's last sample).

        A model of a device-standardized fleet (``metadata.standardization == "device"``)
        gets the recording's feature rows z-scored with the subject's own mean and scale, as
        each device does with its own training windows: those of the ``calibration``
        recordings (e.g. the subject's other sessions) or, without them, of the recording
        itself. Self-calibration removes any level that is constant over the recording, so a
        session of one class should be calibrated with sessions of the others.

        Parameters
        ----------
        recording : Recording
            What to classify.
        calibration : sequence of Recording
            Recordings of the same subject for the standardization (device models only); each
            must fit the model's layout on its own.
        """
        config = PipelineConfig.from_layout(self.layout)
        device = self.metadata.standardization == "device"
        if calibration and not device:
            raise InferenceError(
                f"{self.name} has one global standardization; calibration recordings apply only "
                "to models of a device-standardized fleet"
            )
        if self.input_kind == INPUT_FEATURES:
            X, labels, t = self._features(recording, config)
            if device and X.shape[0]:
                reference = np.concatenate([self._features(r, config)[0] for r in calibration]) if calibration else X
                if reference.shape[0] == 0:
                    raise InferenceError("the calibration recordings hold no complete window")
                mean, scale = device_standardization(reference)
                X = (X - mean) / scale
            proba = self.predict_features(X)
        elif device:
            raise InferenceError(
                f"{self.name} was trained on device-standardized rows (each subject z-scored with its own "
                "statistics), which a window graph cannot compute; export the features graph instead"
            )
        else:
            self._features_layout(recording, config)
            windows, labels, t = self._recording_windows(recording)
            proba = self.predict_windows(windows)
        predicted = (
            np.array([self.classes[i] for i in proba.argmax(axis=1)], dtype=str)
            if len(proba)
            else np.empty(0, dtype=str)
        )
        return RecordingPrediction(proba, predicted, labels, t)

    def _features_layout(self, recording, config: PipelineConfig) -> None:
        """Raise :class:`LayoutMismatch` unless ``recording`` has the model's feature layout."""
        try:
            layout = FeatureLayout.from_recording(recording, config)
        except LayoutError as exc:
            raise LayoutMismatch(f"{self.name} does not fit {recording.source}: {exc}") from None
        self.check_layout(layout, recording.source)

    def _features(self, recording, config: PipelineConfig):
        """``extract_features`` of a recording checked against the model's layout."""
        self._features_layout(recording, config)
        return extract_features(recording, config)

    def _recording_windows(self, recording):
        spec = self.layout
        windows, hops = {}, {}
        for part in spec.modalities:
            signal = recording.signals[part.modality]
            hop = spec.hop_samples(part)
            if hop is None:
                raise InferenceError(
                    f"{self.name}: hop_s * sfreq = {spec.hop_s * part.sfreq:g} samples is not an "
                    f"integer for {part.modality}; use the features model for this layout"
                )
            hops[part.modality] = hop
            windows[part.modality] = sliding_windows(signal.data, spec.window_samples(part), hops[part.modality])
        n = min(w.shape[0] for w in windows.values())
        windows = {m: w[:n] for m, w in windows.items()}
        reference = spec.modalities[0]
        pieces = label_pieces(recording, reference.modality)  # the labels extract_features gives
        ends = np.arange(n) * hops[reference.modality] + spec.window_samples(reference) - 1
        index = np.searchsorted(np.array([first for first, _, _ in pieces]), ends, side="right") - 1
        labels = np.array(["" if pieces[i][2] is None else pieces[i][2] for i in index], dtype=str)
        return windows, labels, np.arange(n) * spec.hop_s
