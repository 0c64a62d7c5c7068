"""The biofed ONNX model format: graph contract and metadata keys.

Shared by the coordinator (which exports models, :mod:`biofed.coordinator.onnx_export`) and
the devices (which load and check them, :mod:`biofed.edge.inference`); like
:mod:`biofed.protocol` it imports nothing from either side.

Graph contract
--------------
Every exported model has one output, ``proba`` (N, n_classes): softmax class probabilities
in the order of the ``biofed.classes`` metadata. Its inputs depend on ``biofed.input``:

``"features"``
    one input ``features`` (N, F): raw feature rows in the order of the layout's
    ``feature_names`` (what :func:`biofed.edge.pipeline.extract_features` returns without a
    basis). The graph standardizes, projects onto the basis and applies the classifier.
``"window"``
    one input per modality of the layout, named after it (``eeg``, ``audio``, ``bio``), each
    (N, n_channels, round(window_s * sfreq)) raw samples of aligned windows; when the bio
    modality has heart-rate channels (ECG/PPG) also ``bio_hr`` (N, n_hr_channels, 2): mean
    heart rate and RMSSD per heart-rate channel (:func:`biofed.kernels.heart_rate_features`),
    which peak detection makes impossible to express in ONNX. The graph computes the spectral
    features and window statistics itself, then continues as the ``"features"`` graph.

Inputs and output use the element type named by ``biofed.model`` ``dtype`` (float32 or float64).

Metadata (``ModelProto.metadata_props``, every value a string)
-------------------------------------------------------------
========================  ==============================================================
key                       value
========================  ==============================================================
biofed.format_version     :data:`FORMAT_VERSION` (integer as text)
biofed.version            the exporting biofed version
biofed.fleet              fleet id
biofed.round              task round number of the model (0 for models trained offline)
biofed.train_round        training rounds aggregated into it
biofed.basis_version      version of the shared basis it projects onto
biofed.input              ``"features"`` or ``"window"``
biofed.classes            JSON list of class labels
biofed.model              JSON ``{"kind": "logreg"|"mlp", "hidden", "n_features", "k", "dtype"}``
biofed.layout             JSON of :class:`~biofed.model.FeatureLayout` (channels, rates, window/hop, bands, ...)
biofed.privacy            JSON of :class:`PrivacySpec` (epsilon, delta, accountant, ...)
biofed.standardization    only in ``"device"`` models (absent means ``"global"``): the
                          graph's mean/scale are 0/1 and its input rows must already be
                          z-scored with the subject's own statistics (a fleet trained with
                          ``[model] standardization = "device"``)
========================  ==============================================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from biofed.model._json import ModelFormatError, names
from biofed.model.layout import FeatureLayout
from biofed.protocol import STANDARDIZATIONS

__all__ = [
    "FORMAT_VERSION",
    "HR_INPUT",
    "INPUT_FEATURES",
    "INPUT_KINDS",
    "INPUT_WINDOW",
    "KEY_BASIS_VERSION",
    "KEY_CLASSES",
    "KEY_FLEET",
    "KEY_FORMAT",
    "KEY_INPUT",
    "KEY_LAYOUT",
    "KEY_MODEL",
    "KEY_PRIVACY",
    "KEY_ROUND",
    "KEY_STANDARDIZATION",
    "KEY_TRAIN_ROUND",
    "KEY_VERSION",
    "METADATA_KEYS",
    "OUTPUT_PROBA",
    "STANDARDIZATIONS",
    "DTYPES",
    "ModelFormatError",
    "ModelMetadata",
    "PrivacySpec",
]

FORMAT_VERSION = 1
"""Bump on an incompatible change of the graph contract or the metadata."""

KEY_FORMAT = "biofed.format_version"
KEY_VERSION = "biofed.version"
KEY_FLEET = "biofed.fleet"
KEY_ROUND = "biofed.round"
KEY_TRAIN_ROUND = "biofed.train_round"
KEY_BASIS_VERSION = "biofed.basis_version"
KEY_INPUT = "biofed.input"
KEY_CLASSES = "biofed.classes"
KEY_MODEL = "biofed.model"
KEY_LAYOUT = "biofed.layout"
KEY_PRIVACY = "biofed.privacy"
KEY_STANDARDIZATION = "biofed.standardization"
METADATA_KEYS = (
    KEY_FORMAT,
    KEY_VERSION,
    KEY_FLEET,
    KEY_ROUND,
    KEY_TRAIN_ROUND,
    KEY_BASIS_VERSION,
    KEY_INPUT,
    KEY_CLASSES,
    KEY_MODEL,
    KEY_LAYOUT,
    KEY_PRIVACY,
)

INPUT_FEATURES = "features"
INPUT_WINDOW = "window"
INPUT_KINDS = (INPUT_FEATURES, INPUT_WINDOW)
OUTPUT_PROBA = "proba"
HR_INPUT = "bio_hr"
"""Second input of a window model whose bio modality has heart-rate channels."""
DTYPES = ("float32", "float64")
_MODEL_KINDS = ("logreg", "mlp")


# --------------------------------------------------------------------------- privacy
@dataclass(frozen=True)
class PrivacySpec:
    """The differential-privacy guarantee a model was trained under.

    ``epsilon`` is ``None`` when no finite guarantee exists (no noise, or a model trained
    outside a federation); ``epsilons`` holds the value of every accountant that was run.
    """

    epsilon: float | None
    delta: float | None
    accountant: str
    epsilons: Mapping[str, float | None] = field(default_factory=dict)
    trust_mode: str = ""
    noise_multiplier: float | None = None

    def to_json(self) -> str:
        def finite(v):
            return None if v is None or not math.isfinite(v) else float(v)

        return json.dumps(
            {
                "epsilon": finite(self.epsilon),
                "delta": self.delta,
                "accountant": self.accountant,
                "epsilons": {k: finite(v) for k, v in self.epsilons.items()},
                "trust_mode": self.trust_mode,
                "noise_multiplier": self.noise_multiplier,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacySpec:
        try:
            data = json.loads(text)
            return cls(
                data["epsilon"],
                data["delta"],
                str(data["accountant"]),
                dict(data.get("epsilons", {})),
                str(data.get("trust_mode", "")),
                data.get("noise_multiplier"),
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFormatError(f"privacy metadata is malformed ({exc!r}): {text!r}") from None

    def describe(self) -> str:
        """One line such as ``epsilon 3.21 at delta 1e-05 (rdp, central)``."""
        if self.epsilon is None:
            return "no finite differential-privacy guarantee (no noise or trained offline)"
        mode = f", {self.trust_mode}" if self.trust_mode else ""
        return f"epsilon {self.epsilon:.4g} at delta {self.delta:g} ({self.accountant}{mode})"


# --------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class ModelMetadata:
    """Everything ``metadata_props`` of a biofed ONNX model says (see the module docstring)."""

    biofed_version: str
    fleet: str
    round: int
    train_round: int
    basis_version: int
    input_kind: str
    classes: tuple[str, ...]
    kind: str
    hidden: int
    n_features: int
    k: int
    dtype: str
    layout: FeatureLayout
    privacy: PrivacySpec
    format_version: int = FORMAT_VERSION
    standardization: str = "global"

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` key/value strings."""
        return {
            KEY_FORMAT: str(self.format_version),
            KEY_VERSION: self.biofed_version,
            KEY_FLEET: self.fleet,
            KEY_ROUND: str(self.round),
            KEY_TRAIN_ROUND: str(self.train_round),
            KEY_BASIS_VERSION: str(self.basis_version),
            KEY_INPUT: self.input_kind,
            KEY_CLASSES: json.dumps(list(self.classes)),
            KEY_MODEL: json.dumps(
                {
                    "kind": self.kind,
                    "hidden": self.hidden,
                    "n_features": self.n_features,
                    "k": self.k,
                    "dtype": self.dtype,
                },
                sort_keys=True,
            ),
            KEY_LAYOUT: self.layout.to_json(),
            KEY_PRIVACY: self.privacy.to_json(),
            **({KEY_STANDARDIZATION: self.standardization} if self.standardization != "global" else {}),
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> ModelMetadata:
        """Parse ``metadata_props``; :class:`ModelFormatError` when it is not a biofed model."""
        if KEY_FORMAT not in props:
            raise ModelFormatError(
                f"{source} is an ONNX model but not a biofed model (no {KEY_FORMAT!r} metadata); "
                "export one with `biofed export`"
            )
        missing = [k for k in METADATA_KEYS if k not in props]
        if missing:
            raise ModelFormatError(f"{source}: biofed metadata lacks {missing}")
        try:
            version = int(props[KEY_FORMAT])
            numbers = {k: int(props[k]) for k in (KEY_ROUND, KEY_TRAIN_ROUND, KEY_BASIS_VERSION)}
            classes = names(json.loads(props[KEY_CLASSES]), "classes")
            model = json.loads(props[KEY_MODEL])
            kind, hidden, n_features, k, dtype = (model[x] for x in ("kind", "hidden", "n_features", "k", "dtype"))
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFormatError(f"{source}: malformed biofed metadata ({exc!r})") from None
        if version != FORMAT_VERSION:
            raise ModelFormatError(
                f"{source} has biofed model format {version}; this biofed reads format "
                f"{FORMAT_VERSION} (re-export it with this version's `biofed export`)"
            )
        standardization = props.get(KEY_STANDARDIZATION, "global")
        if standardization not in STANDARDIZATIONS:
            raise ModelFormatError(
                f"{source}: unknown {KEY_STANDARDIZATION} {standardization!r}; expected one of {STANDARDIZATIONS}"
            )
        if props[KEY_INPUT] not in INPUT_KINDS or kind not in _MODEL_KINDS or dtype not in DTYPES:
            raise ModelFormatError(
                f"{source}: unknown input {props[KEY_INPUT]!r}, model kind {kind!r} or dtype {dtype!r}"
            )
        return cls(
            biofed_version=props[KEY_VERSION],
            fleet=props[KEY_FLEET],
            round=numbers[KEY_ROUND],
            train_round=numbers[KEY_TRAIN_ROUND],
            basis_version=numbers[KEY_BASIS_VERSION],
            input_kind=props[KEY_INPUT],
            classes=classes,
            kind=kind,
            hidden=int(hidden),
            n_features=int(n_features),
            k=int(k),
            dtype=dtype,
            layout=FeatureLayout.from_json(props[KEY_LAYOUT]),
            privacy=PrivacySpec.from_json(props[KEY_PRIVACY]),
            format_version=version,
            standardization=standardization,
        )
