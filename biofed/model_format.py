"""The biofed ONNX model format: metadata keys and the JSON encoding of a feature layout.

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
biofed.layout             JSON of :class:`LayoutSpec` (channels, rates, window/hop, bands, ...)
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
    "LayoutSpec",
    "ModalitySpec",
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
STANDARDIZATIONS = ("global", "device")
METADATA_KEYS = (KEY_FORMAT, KEY_VERSION, KEY_FLEET, KEY_ROUND, KEY_TRAIN_ROUND, KEY_BASIS_VERSION, KEY_INPUT,
                 KEY_CLASSES, KEY_MODEL, KEY_LAYOUT, KEY_PRIVACY)

INPUT_FEATURES = "features"
INPUT_WINDOW = "window"
INPUT_KINDS = (INPUT_FEATURES, INPUT_WINDOW)
OUTPUT_PROBA = "proba"
HR_INPUT = "bio_hr"
"""Second input of a window model whose bio modality has heart-rate channels."""
HR_TYPES = ("ecg", "ppg")
"""Bio channel types with heart-rate features (mean HR, RMSSD), as in the edge pipeline."""
DTYPES = ("float32", "float64")
_MODEL_KINDS = ("logreg", "mlp")


class ModelFormatError(ValueError):
    """A model's metadata or layout is missing, malformed or of another format version."""


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ModelFormatError(f"{what} must be a finite number, got {value!r}")
    return float(value)


MAX_LAYOUT_JSON_CHARS = 64 * 1024
"""Longest layout JSON read (a device's :class:`biofed.protocol.Status` carries it)."""
_MAX_JSON_DEPTH = 4  # layout -> modalities -> modality -> names
_MAX_JSON_INT_DIGITS = 19


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of ``text`` outside JSON strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer with {len(digits)} digits")
    return int(digits)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _load_bounded_json(text: object, what: str):
    """``json.loads`` of untrusted text with bounded size, nesting and integers: any input
    gives the parsed value or a :class:`ModelFormatError`."""
    if not isinstance(text, str):
        raise ModelFormatError(f"{what} must be JSON text, got {type(text).__name__}")
    if len(text) > MAX_LAYOUT_JSON_CHARS:
        raise ModelFormatError(f"{what} is {len(text)} characters long, at most {MAX_LAYOUT_JSON_CHARS}")
    if _json_depth(text) > _MAX_JSON_DEPTH:
        raise ModelFormatError(f"{what} nests deeper than {_MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_reject_constant)
    except (ValueError, RecursionError, OverflowError) as exc:
        raise ModelFormatError(f"{what} is not valid JSON: {exc}") from None


def _names(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ModelFormatError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ModalitySpec:
    """Channels and feature columns of one modality (``edge.pipeline.ModalityLayout`` extends it)."""

    modality: str
    sfreq: float
    ch_names: tuple[str, ...]
    ch_types: tuple[str, ...]
    feature_names: tuple[str, ...]

    @property
    def hr_channels(self) -> tuple[int, ...]:
        """Indices of the heart-rate channels (bio ECG/PPG), empty for other modalities."""
        if self.modality != "bio":
            return ()
        return tuple(i for i, t in enumerate(self.ch_types) if t in HR_TYPES)


@dataclass(frozen=True)
class LayoutSpec:
    """The feature layout a model was trained on: what a device must record and compute.

    Attributes
    ----------
    window_s, hop_s : float
        Window length and hop in seconds.
    bands : tuple of (name, lo_hz, hi_hz)
        EEG bands (log10 Welch band powers).
    n_mels : int
        Mel bands per audio channel (natural-log energies).
    modalities : tuple of ModalitySpec
        In feature order (eeg, audio, bio).
    """

    window_s: float
    hop_s: float
    bands: tuple[tuple[str, float, float], ...]
    n_mels: int
    modalities: tuple[ModalitySpec, ...] = field(default=())

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every raw feature column, modality by modality."""
        return tuple(name for m in self.modalities for name in m.feature_names)

    @property
    def n_features(self) -> int:
        return sum(len(m.feature_names) for m in self.modalities)

    def modality(self, name: str) -> ModalitySpec | None:
        return next((m for m in self.modalities if m.modality == name), None)

    def window_samples(self, modality: ModalitySpec) -> int:
        """Samples per window of ``modality`` (``round(window_s * sfreq)``, as the pipeline)."""
        return int(round(self.window_s * modality.sfreq))

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> str:
        """Compact, key-sorted JSON (equal layouts give equal strings)."""
        return json.dumps({
            "window_s": self.window_s, "hop_s": self.hop_s, "bands": [list(b) for b in self.bands],
            "n_mels": self.n_mels,
            "modalities": [{"modality": m.modality, "sfreq": m.sfreq, "ch_names": list(m.ch_names),
                            "ch_types": list(m.ch_types), "feature_names": list(m.feature_names)}
                           for m in self.modalities],
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> LayoutSpec:
        """Parse :meth:`to_json` output; :class:`ModelFormatError` names what is wrong.

        Total on untrusted text (a device's status carries it): size, nesting and numbers
        are bounded, and any other failure is a :class:`ModelFormatError` too.
        """
        data = _load_bounded_json(text, "feature layout")
        try:
            return cls._from_dict(data)
        except ModelFormatError:
            raise
        except (TypeError, ValueError, OverflowError, KeyError, AttributeError) as exc:
            raise ModelFormatError(f"feature layout is malformed: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_dict(cls, data) -> LayoutSpec:
        if not isinstance(data, dict):
            raise ModelFormatError(f"feature layout must be a JSON object, got {type(data).__name__}")
        missing = {"window_s", "hop_s", "bands", "n_mels", "modalities"} - set(data)
        if missing:
            raise ModelFormatError(f"feature layout lacks {sorted(missing)}")
        window_s = _number(data["window_s"], "layout window_s")
        hop_s = _number(data["hop_s"], "layout hop_s")
        try:
            bands = tuple((str(name), _number(lo, "band edge"), _number(hi, "band edge"))
                          for name, lo, hi in data["bands"])
        except (TypeError, ValueError, ModelFormatError):
            raise ModelFormatError(
                f"layout bands must be [name, lo_hz, hi_hz] triples, got {data['bands']!r}") from None
        n_mels = data["n_mels"]
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 1:
            raise ModelFormatError(f"layout n_mels must be an integer >= 1, got {n_mels!r}")
        if not isinstance(data["modalities"], list) or not data["modalities"]:
            raise ModelFormatError("layout modalities must be a non-empty list")
        parts = []
        for i, m in enumerate(data["modalities"]):
            if not isinstance(m, dict) or set(m) != {"modality", "sfreq", "ch_names", "ch_types", "feature_names"}:
                raise ModelFormatError(f"layout modality {i} must have modality, sfreq, ch_names, ch_types and "
                                       f"feature_names, got {m!r}")
            if m["modality"] not in ("eeg", "audio", "bio"):
                raise ModelFormatError(f"layout modality {i} is {m['modality']!r}, not eeg, audio or bio")
            ch_names = _names(m["ch_names"], f"layout {m['modality']} ch_names")
            ch_types = _names(m["ch_types"], f"layout {m['modality']} ch_types")
            if len(ch_names) != len(ch_types) or not ch_names:
                raise ModelFormatError(f"layout {m['modality']}: {len(ch_names)} channel names but "
                                       f"{len(ch_types)} channel types")
            parts.append(ModalitySpec(m["modality"], _number(m["sfreq"], f"layout {m['modality']} sfreq"),
                                      ch_names, ch_types, _names(m["feature_names"],
                                                                 f"layout {m['modality']} feature_names")))
        return cls(window_s, hop_s, bands, n_mels, tuple(parts))

    # ---------------------------------------------------------------- comparison
    def mismatch(self, actual: LayoutSpec) -> str | None:
        """First difference between this (the model's) layout and ``actual`` (a recording's or
        a device's), as a sentence naming it; ``None`` when the layouts are interchangeable."""
        mine = tuple(m.modality for m in self.modalities)
        theirs = tuple(m.modality for m in actual.modalities)
        if mine != theirs:
            return f"the model needs modalities {mine} but the data has {theirs}"
        for name in ("window_s", "hop_s", "n_mels"):
            a, b = getattr(self, name), getattr(actual, name)
            if a != b:
                return f"the model was trained with {name} = {a} but the data's pipeline uses {name} = {b}"
        if tuple(self.bands) != tuple(actual.bands):
            return f"the model was trained with EEG bands {list(self.bands)} but the data uses {list(actual.bands)}"
        for a, b in zip(self.modalities, actual.modalities):
            m = a.modality
            if a.sfreq != b.sfreq:
                return f"{m}: the model expects {a.sfreq:g} Hz but the data is sampled at {b.sfreq:g} Hz"
            if len(a.ch_names) != len(b.ch_names):
                return (f"{m}: the model expects {len(a.ch_names)} channels ({', '.join(a.ch_names)}) but the data "
                        f"has {len(b.ch_names)} ({', '.join(b.ch_names)})")
            for i, (x, y) in enumerate(zip(a.ch_names, b.ch_names)):
                if x != y:
                    return f"{m}: channel {i} is {x!r} in the model but {y!r} in the data"
            for i, (x, y) in enumerate(zip(a.ch_types, b.ch_types)):
                if x != y:
                    return f"{m}: channel {a.ch_names[i]!r} has type {x!r} in the model but {y!r} in the data"
            if a.feature_names != b.feature_names:
                first = next((i for i, (x, y) in enumerate(zip(a.feature_names, b.feature_names)) if x != y),
                             min(len(a.feature_names), len(b.feature_names)))
                return (f"{m}: feature columns differ from column {first} on ({len(a.feature_names)} in the model, "
                        f"{len(b.feature_names)} in the data)")
        return None


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

        return json.dumps({
            "epsilon": finite(self.epsilon), "delta": self.delta, "accountant": self.accountant,
            "epsilons": {k: finite(v) for k, v in self.epsilons.items()}, "trust_mode": self.trust_mode,
            "noise_multiplier": self.noise_multiplier,
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PrivacySpec:
        try:
            data = json.loads(text)
            return cls(data["epsilon"], data["delta"], str(data["accountant"]), dict(data.get("epsilons", {})),
                       str(data.get("trust_mode", "")), data.get("noise_multiplier"))
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
    layout: LayoutSpec
    privacy: PrivacySpec
    format_version: int = FORMAT_VERSION
    standardization: str = "global"

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` key/value strings."""
        return {
            KEY_FORMAT: str(self.format_version), KEY_VERSION: self.biofed_version, KEY_FLEET: self.fleet,
            KEY_ROUND: str(self.round), KEY_TRAIN_ROUND: str(self.train_round),
            KEY_BASIS_VERSION: str(self.basis_version), KEY_INPUT: self.input_kind,
            KEY_CLASSES: json.dumps(list(self.classes)),
            KEY_MODEL: json.dumps({"kind": self.kind, "hidden": self.hidden, "n_features": self.n_features,
                                   "k": self.k, "dtype": self.dtype}, sort_keys=True),
            KEY_LAYOUT: self.layout.to_json(), KEY_PRIVACY: self.privacy.to_json(),
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
            classes = _names(json.loads(props[KEY_CLASSES]), "classes")
            model = json.loads(props[KEY_MODEL])
            kind, hidden, n_features, k, dtype = (model[x] for x in ("kind", "hidden", "n_features", "k", "dtype"))
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFormatError(f"{source}: malformed biofed metadata ({exc!r})") from None
        if version != FORMAT_VERSION:
            raise ModelFormatError(f"{source} has biofed model format {version}; this biofed reads format "
                                   f"{FORMAT_VERSION} (re-export it with this version's `biofed export`)")
        standardization = props.get(KEY_STANDARDIZATION, "global")
        if standardization not in STANDARDIZATIONS:
            raise ModelFormatError(f"{source}: unknown {KEY_STANDARDIZATION} {standardization!r}; expected one of "
                                   f"{STANDARDIZATIONS}")
        if props[KEY_INPUT] not in INPUT_KINDS or kind not in _MODEL_KINDS or dtype not in DTYPES:
            raise ModelFormatError(f"{source}: unknown input {props[KEY_INPUT]!r}, model kind {kind!r} or "
                                   f"dtype {dtype!r}")
        return cls(
            biofed_version=props[KEY_VERSION], fleet=props[KEY_FLEET], round=numbers[KEY_ROUND],
            train_round=numbers[KEY_TRAIN_ROUND], basis_version=numbers[KEY_BASIS_VERSION],
            input_kind=props[KEY_INPUT], classes=classes, kind=kind, hidden=int(hidden), n_features=int(n_features),
            k=int(k), dtype=dtype, layout=LayoutSpec.from_json(props[KEY_LAYOUT]),
            privacy=PrivacySpec.from_json(props[KEY_PRIVACY]), format_version=version,
            standardization=standardization,
        )

