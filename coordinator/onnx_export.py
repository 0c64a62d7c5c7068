"""ONNX export of the federated model: the inference path as one portable graph.

The coordinator turns its model file (``model_final.npz`` or a per-round file, see
:class:`ModelFile`) into an ONNX model (opset 17, built with :mod:`onnx.helper`) that a device
runs with onnxruntime (:mod:`biofed.edge.inference`). Graph contract and metadata keys:
:mod:`biofed.model_format`.

``features`` graph (the default; what devices receive with every global model)::

    features (N, F) -> Sub(mean) -> Div(scale) -> MatMul(components.T)     standardize + project, (N, k)
      -> MatMul(W) -> Add(b)                                               logistic regression
         | MatMul(W1) -> Add(b1) -> Relu -> MatMul(W2) -> Add(b2)          one-hidden-layer MLP
      -> Softmax -> proba (N, c)

The weights are sliced from the flat parameter vector exactly as
:mod:`biofed.kernels.training` lays it out (``W (d, c) | b (c,)``, or
``W1 (d, h) | b1 (h,) | W2 (h, c) | b2 (c,)``, row-major).

``window`` graph: the same head behind the feature extraction, so one file maps raw windows
to probabilities. Per modality, in layout order:

- **EEG band powers** (``eeg`` (N, C, W)): a ``Gather`` cuts every window into the Welch
  segments (``nperseg`` samples, hop ``nperseg - nperseg // 2``); one ``MatMul`` with a real
  DFT matrix ``(nperseg, 2 n_bins)`` [cos | -sin] restricted to the bins any band uses, with
  the per-segment mean removal and the Hann taper folded in (``(I - 11^T / n) diag(w) E``,
  both are linear); ``Mul`` squares, ``ReduceSum`` sums the segments, one ``MatMul`` with the
  band weights (0/1 masks times the Welch density scale, duplicated for the real and imaginary
  halves) gives band powers; ``log10(p + tiny)``. Same segments, taper, scaling and bin rule as
  :func:`biofed.kernels.band_powers` (its private planning helpers are reused, so the two
  cannot drift).
- **audio log-mel energies** (``audio``): identical, with the triangular mel filterbank of
  :func:`biofed.kernels.log_band_energies` and ``ln(e + 1e-10)``.
- **bio window statistics** (``bio``): ``ReduceMean`` (mean), ``sqrt(ReduceMean(d^2))`` (std,
  ddof 0), ``MatMul`` of the centred window with the least-squares time weights (slope per
  second), ``ReduceMin``/``ReduceMax``; heart rate and RMSSD come from peak detection, which
  ONNX cannot express, so they enter as the input ``bio_hr`` (N, n_hr_channels, 2) computed on
  the device with :func:`biofed.kernels.heart_rate_features`; a ``Gather`` interleaves them
  with the statistics in layout column order.

Measured (2026-11-23, 2-core Xeon, one thread everywhere, onnxruntime 1.32, ``biofed bench
--only onnx_inference`` and a per-modality script; ms per window, batch 1 / batch 64):

=================================  ==============  ==============  ==============
stage (benchmarks stream profile)  ONNX f32        ONNX f64        Numba kernels
=================================  ==============  ==============  ==============
EEG 19 ch x 1000 (500 Hz) bands    0.10 / 0.085    0.14 / 0.13     0.11 / 0.054
audio 1 ch x 32000 (16 kHz) mels   0.68 / 0.67     1.25 / 1.42     0.31 / 0.20
bio 4 ch x 500 statistics          0.013 / 0.002   0.015 / 0.004   0.008 / 0.004
whole window graph (HR excluded)   0.90 / 0.86     1.47 / 1.53     0.55 / 0.30
features graph (k=32 logreg)       0.010 / 0.0004  0.011 / 0.0005  0.030 / 0.0008
=================================  ==============  ==============  ==============

With the ``DFT`` operator instead of the dense matrix (frames detrended and tapered in the
graph, ``DFT(onesided=1)``, bins sliced) the spectral step was slower: EEG 0.37 ms and
audio 1.3 ms per window (f32, batch 1), so the dense DFT restricted to the used bins stays.
The features graph beats the Numba path 2-3x (one fused session call against two
validated kernel calls); the window graph costs 1.6x (f32) to 2.7x (f64) the Numba kernels,
almost all in the audio DFT (255 of 257 bins needed, where an FFT wins, see
:mod:`biofed.kernels.spectral`). Both stay far below the 1 s hop. Accuracy: float64 graphs
match the Numba path to ~1e-14; float32 to ~5e-6 in the probabilities and ~1e-6 relative in
the band powers.

Per-round export
----------------
:func:`export_round` writes ``state_dir/models/round_NNNNN.npz`` + ``.onnx`` and refreshes
``state_dir/model_latest.npz`` / ``model_latest.onnx`` (atomic replaces), so the newest
global model is always one file away.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from biofed import __version__
from biofed.coordinator.state import write_final_model
from biofed.kernels.spectral import _hann, band_power_plan, log_band_energy_plan
from biofed.kernels.training import n_params
from biofed.model_format import (
    HR_INPUT,
    INPUT_FEATURES,
    INPUT_KINDS,
    INPUT_WINDOW,
    OUTPUT_PROBA,
    LayoutSpec,
    ModalitySpec,
    ModelFormatError,
    ModelMetadata,
    PrivacySpec,
)

__all__ = [
    "OPSET", "ExportError", "ModelFile", "build_feature_extractor", "build_model", "export_onnx", "export_round",
    "write_bytes",
]

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8
"""IR version paired with opset 17 (read by every onnxruntime >= 1.13)."""
_LN_FLOOR = 1e-10  # log_band_energies: ln(energy + 1e-10)
_NP_DTYPES = {"float32": np.float32, "float64": np.float64}
_ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}


class ExportError(ValueError):
    """The model file cannot be exported (missing, not a biofed model, inconsistent); the
    message names the file and what is wrong."""


# ----------------------------------------------------------------------------- model file
@dataclass(frozen=True, eq=False)
class ModelFile:
    """A coordinator model file: classifier, basis, provenance and privacy of one global model.

    Stored as ``.npz`` without pickles (:func:`biofed.coordinator.state.write_final_model`).
    Keys: ``params`` (P,), ``classes`` (c,) str, ``hidden``, ``basis_components`` (k, F), ``basis_mean`` (F,),
    ``basis_scale`` (F,), ``basis_version``, ``fleet``, ``round``, ``train_rounds``,
    ``layout`` (JSON, :class:`biofed.model_format.LayoutSpec`; absent in files of coordinators
    whose devices did not report one), ``epsilon``, ``epsilon_<accountant>``, ``delta``,
    ``accountant``, ``trust_mode``, ``noise_multiplier``, ``standardization`` ("global", or
    "device": rows must be z-scored with the device's own training statistics before the
    model, whose ``mean``/``scale`` are then 0/1; absent in older files: "global"); other keys
    (``stop_reason``) are kept by the coordinator and ignored here.
    """

    params: np.ndarray
    classes: tuple[str, ...]
    hidden: int
    components: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    basis_version: int
    fleet: str
    round: int
    train_round: int
    layout: LayoutSpec | None
    privacy: PrivacySpec
    standardization: str = "global"

    def __post_init__(self) -> None:
        k, d = self.components.shape
        c = len(self.classes)
        if self.standardization not in ("global", "device"):
            raise ExportError(f'standardization must be "global" or "device", got {self.standardization!r}')
        if c < 2:
            raise ExportError(f"a model needs at least 2 classes, got {self.classes}")
        if self.mean.shape != (d,) or self.scale.shape != (d,) or np.any(self.scale <= 0):
            raise ExportError(f"basis mean/scale must have shape ({d},) with scale > 0, got {self.mean.shape} / "
                              f"{self.scale.shape}")
        expected = n_params(k, c, self.hidden)
        if self.params.shape != (expected,):
            raise ExportError(f"params has shape {self.params.shape}, expected ({expected},) for k={k}, {c} classes, "
                              f"hidden={self.hidden} (layout of biofed.kernels.training)")
        if self.layout is not None and self.layout.n_features != d:
            raise ExportError(f"the feature layout names {self.layout.n_features} features but the basis has {d}")

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def load(cls, path: str | Path) -> ModelFile:
        """Read a model file; :class:`ExportError` names the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{path}: no such model file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            # numpy's own text about a pickle ("load it unsafely with allow_pickle") is advice
            # biofed must never pass on: model files hold plain arrays only
            try:
                with path.open("rb") as handle:
                    numpy_file = handle.read(6) == b"\x93NUMPY" or zipfile.is_zipfile(path)
            except OSError:
                numpy_file = True  # unreadable: numpy's own message says why
            if not numpy_file:
                reason = "not a NumPy .npz archive"
            elif "pickle" in str(exc):
                reason = "it holds pickled Python objects, which biofed never loads"
            else:
                reason = str(exc)
            raise ExportError(f"{path}: not a biofed model file (.npz written by the coordinator): {reason}") from None
        if not isinstance(arrays, dict) or not arrays:
            raise ExportError(f"{path}: not a biofed model file (.npz written by the coordinator)")
        required = ("params", "classes", "hidden", "basis_components", "basis_mean", "basis_scale")
        missing = [key for key in required if key not in arrays]
        if missing:
            raise ExportError(f"{path}: not a biofed model file: lacks {missing} (keys found: {sorted(arrays)})")

        def scalar(key, default, kind):
            return kind(arrays[key][()]) if key in arrays else default

        epsilons = {key[len("epsilon_"):]: _finite_or_none(float(arrays[key][()]))
                    for key in arrays if key.startswith("epsilon_")}
        privacy = PrivacySpec(
            epsilon=_finite_or_none(scalar("epsilon", math.inf, float)),
            delta=_finite_or_none(scalar("delta", None, float)), accountant=scalar("accountant", "", str),
            epsilons=epsilons, trust_mode=scalar("trust_mode", "", str),
            noise_multiplier=_finite_or_none(scalar("noise_multiplier", None, float)),
        )
        try:
            layout = LayoutSpec.from_json(scalar("layout", "", str)) if scalar("layout", "", str) else None
        except ModelFormatError as exc:
            raise ExportError(f"{path}: {exc}") from None
        try:
            return cls(
                params=np.asarray(arrays["params"], dtype=np.float64),
                classes=tuple(str(c) for c in np.atleast_1d(arrays["classes"])),
                hidden=scalar("hidden", 0, int),
                components=np.asarray(arrays["basis_components"], dtype=np.float64),
                mean=np.asarray(arrays["basis_mean"], dtype=np.float64),
                scale=np.asarray(arrays["basis_scale"], dtype=np.float64),
                basis_version=scalar("basis_version", 0, int), fleet=scalar("fleet", "", str),
                round=scalar("round", 0, int), train_round=scalar("train_rounds", 0, int),
                layout=layout, privacy=privacy, standardization=scalar("standardization", "global", str),
            )
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ExportError(f"{path}: malformed biofed model file: {exc}") from None

    def to_arrays(self) -> dict[str, object]:
        """The ``.npz`` content (see the class docstring)."""
        p = self.privacy
        out: dict[str, object] = {
            "params": self.params, "classes": np.array(self.classes, dtype=str), "hidden": self.hidden,
            "basis_components": self.components, "basis_mean": self.mean, "basis_scale": self.scale,
            "basis_version": self.basis_version, "fleet": self.fleet, "round": self.round,
            "train_rounds": self.train_round,
            "epsilon": math.inf if p.epsilon is None else p.epsilon,
            **{f"epsilon_{name}": math.inf if v is None else v for name, v in p.epsilons.items()},
            "delta": math.nan if p.delta is None else p.delta, "accountant": p.accountant,
            "trust_mode": p.trust_mode,
            "noise_multiplier": math.nan if p.noise_multiplier is None else p.noise_multiplier,
            "standardization": self.standardization,
        }
        if self.layout is not None:
            out["layout"] = self.layout.to_json()
        return out


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# ----------------------------------------------------------------------------- graph pieces
class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.np_dtype = _NP_DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, array, dtype=None) -> str:
        name = self.name(stem)
        array = np.asarray(array, dtype=self.np_dtype if dtype is None else dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, output: str | None = None,
           **attrs) -> str:
        out = output or self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out


def _head(g: _Graph, features: str, model: ModelFile) -> str:
    """Standardize, project, classify, softmax; returns the ``proba`` output name."""
    k, d = model.components.shape
    c, h = len(model.classes), model.hidden
    z = g.op("Sub", [features, g.const("basis_mean", model.mean)], "centred")
    z = g.op("Div", [z, g.const("basis_scale", model.scale)], "standardized")
    z = g.op("MatMul", [z, g.const("basis_components_T", np.ascontiguousarray(model.components.T))], "projected")
    p = model.params
    if h == 0:
        w, b = p[: k * c].reshape(k, c), p[k * c:]
        logits = g.op("Add", [g.op("MatMul", [z, g.const("W", w)]), g.const("b", b)], "logits")
    else:
        off = k * h + h
        w1, b1 = p[: k * h].reshape(k, h), p[k * h: off]
        w2, b2 = p[off: off + h * c].reshape(h, c), p[off + h * c:]
        hidden = g.op("Relu", [g.op("Add", [g.op("MatMul", [z, g.const("W1", w1)]), g.const("b1", b1)])], "hidden")
        logits = g.op("Add", [g.op("MatMul", [hidden, g.const("W2", w2)]), g.const("b2", b2)], "logits")
    return g.op("Softmax", [logits], output=OUTPUT_PROBA, axis=-1)


def _spectral_plan(layout: LayoutSpec, part: ModalitySpec):
    """``(nperseg, n_seg, kmin, weights (n_bins, n_bands), log_base, floor)`` of the kernels' own plan."""
    window = layout.window_samples(part)
    try:
        if part.modality == "eeg":
            plan = band_power_plan(part.sfreq, window, layout.bands, log=True)
        else:
            plan = log_band_energy_plan(part.sfreq, window, n_bands=layout.n_mels)
    except ValueError as exc:
        raise ExportError(f"{part.modality}: {exc} The layout cannot have been produced by the pipeline.") from None
    # floor None: the smallest normal of the graph dtype (band_powers log=True)
    base, floor = (10.0, None) if plan.log == "log10" else (math.e, _LN_FLOOR)
    return plan.nperseg, plan.n_seg, plan.kmin, plan.weights, base, floor


def _spectral(g: _Graph, x: str, layout: LayoutSpec, part: ModalitySpec) -> str:
    """Welch band powers / mel energies of ``x`` (N, C, W), flattened to (N, C * n_bands)."""
    nperseg, n_seg, kmin, weights, base, floor = _spectral_plan(layout, part)
    step = nperseg - nperseg // 2
    n_bins = weights.shape[0]
    index = np.arange(n_seg)[:, None] * step + np.arange(nperseg)[None, :]
    frames = g.op("Gather", [x, g.const(f"{part.modality}_segments", index, np.int64)], f"{part.modality}_frames",
                  axis=2)
    j = np.arange(nperseg)[:, None]
    k = np.arange(kmin, kmin + n_bins)[None, :]
    angle = 2.0 * np.pi * ((j * k) % nperseg) / nperseg
    dft = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)  # (nperseg, 2 n_bins)
    taper = _hann(nperseg)[:, None]
    basis = taper * dft - (taper * dft).sum(axis=0, keepdims=True) / nperseg  # detrend + taper folded in
    spectrum = g.op("MatMul", [frames, g.const(f"{part.modality}_dft", basis)], f"{part.modality}_spectrum")
    power = g.op("Mul", [spectrum, spectrum], f"{part.modality}_power")
    power = g.op("ReduceSum", [power, g.const("axis_segments", [2], np.int64)], f"{part.modality}_welch", keepdims=0)
    bands = g.op("MatMul", [power, g.const(f"{part.modality}_bands", np.vstack([weights, weights]))],
                 f"{part.modality}_bandpower")
    tiny = float(np.finfo(g.np_dtype).tiny) if floor is None else floor
    logged = g.op("Log", [g.op("Add", [bands, g.const("floor", tiny)])])
    if base != math.e:
        logged = g.op("Mul", [logged, g.const("inv_ln_base", 1.0 / math.log(base))])
    return g.op("Flatten", [logged], f"{part.modality}_features", axis=1)


def _bio(g: _Graph, x: str, layout: LayoutSpec, part: ModalitySpec, hr: str | None) -> str:
    """Window statistics of ``x`` (N, C, W) interleaved with the heart-rate input, (N, F_bio)."""
    n = layout.window_samples(part)
    mean = g.op("ReduceMean", [x], "bio_mean", axes=[2], keepdims=1)
    centred = g.op("Sub", [x, mean], "bio_centred")
    std = g.op("Sqrt", [g.op("ReduceMean", [g.op("Mul", [centred, centred])], axes=[2], keepdims=1)], "bio_std")
    t = np.arange(n) - (n - 1) / 2.0
    t_ss = n * (n * n - 1.0) / 12.0
    slope_weights = (t / t_ss * part.sfreq if t_ss > 0 else np.zeros(n))[:, None]
    slope = g.op("MatMul", [centred, g.const("bio_slope_weights", slope_weights)], "bio_slope")
    lo = g.op("ReduceMin", [x], "bio_min", axes=[2], keepdims=1)
    hi = g.op("ReduceMax", [x], "bio_max", axes=[2], keepdims=1)
    stats = g.op("Flatten", [g.op("Concat", [mean, std, slope, lo, hi], "bio_stats", axis=2)], axis=1)
    hr_channels = part.hr_channels
    if not hr_channels:
        return stats
    n_ch = len(part.ch_names)
    order = []
    hr_pos = {c: i for i, c in enumerate(hr_channels)}
    for c in range(n_ch):
        order.extend(range(5 * c, 5 * c + 5))
        if c in hr_pos:
            order.extend(5 * n_ch + 2 * hr_pos[c] + r for r in range(2))
    both = g.op("Concat", [stats, g.op("Flatten", [hr], axis=1)], axis=1)
    return g.op("Gather", [both, g.const("bio_columns", order, np.int64)], "bio_features", axis=1)


def _window_features(g: _Graph, layout: LayoutSpec) -> tuple[list[onnx.ValueInfoProto], str]:
    """Graph inputs of the raw windows (+ ``bio_hr``) and the name of the raw feature rows (N, F)."""
    elem = _ONNX_DTYPES[g.dtype]
    inputs, parts = [], []
    for part in layout.modalities:
        shape = ["N", len(part.ch_names), layout.window_samples(part)]
        inputs.append(helper.make_tensor_value_info(part.modality, elem, shape))
        if part.modality == "bio":
            hr = None
            if part.hr_channels:
                inputs.append(helper.make_tensor_value_info(HR_INPUT, elem, ["N", len(part.hr_channels), 2]))
                hr = HR_INPUT
            parts.append(_bio(g, part.modality, layout, part, hr))
        else:
            parts.append(_spectral(g, part.modality, layout, part))
    return inputs, parts[0] if len(parts) == 1 else g.op("Concat", parts, "raw_features", axis=1)


# ----------------------------------------------------------------------------- public API
def build_model(model: ModelFile, *, input_kind: str = INPUT_FEATURES, dtype: str = "float32") -> onnx.ModelProto:
    """The ONNX model of ``model`` (see the module docstring), checked by :func:`onnx.checker.check_model`.

    Parameters
    ----------
    model : ModelFile
        Needs a feature layout (``model.layout``) for the metadata.
    input_kind : {"features", "window"}
        Raw feature rows in, or raw windows (+ ``bio_hr``) in.
    dtype : {"float32", "float64"}
        Element type of inputs, weights and output. float32 halves memory and is faster on
        ARM; float64 matches the Numba path to ~1e-12.

    Raises
    ------
    ExportError
        No layout, an unknown input kind or dtype, or a layout the window graph cannot express.
    """
    if input_kind not in INPUT_KINDS:
        raise ExportError(f"input kind must be one of {INPUT_KINDS}, got {input_kind!r}")
    if dtype not in _NP_DTYPES:
        raise ExportError(f"dtype must be one of {tuple(_NP_DTYPES)}, got {dtype!r}")
    layout = model.layout
    if layout is None:
        raise ExportError(
            "the model file has no feature layout (channel names, rates, window/hop, bands): its coordinator never "
            "received one from a device status; run the federation with this biofed version's agents"
        )
    if input_kind == INPUT_WINDOW and model.standardization == "device":
        raise ExportError(
            "a window graph needs one fixed standardization, but this model was trained on device-standardized "
            "rows (each device z-scores with its own statistics); export the features graph (--input features), "
            "which biofed predict calibrates per recording, or train with [model] standardization = \"global\" "
            "(biofed demo --standardization global)"
        )
    g = _Graph(dtype)
    elem = _ONNX_DTYPES[dtype]
    if input_kind == INPUT_FEATURES:
        inputs = [helper.make_tensor_value_info(INPUT_FEATURES, elem, ["N", model.n_features])]
        features = INPUT_FEATURES
    else:
        inputs, features = _window_features(g, layout)
    _head(g, features, model)
    output = helper.make_tensor_value_info(OUTPUT_PROBA, elem, ["N", len(model.classes)])
    graph = helper.make_graph(g.nodes, f"biofed_{input_kind}", inputs, [output], initializer=g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="biofed",
                                   producer_version=__version__, ir_version=IR_VERSION,
                                   doc_string=f"biofed classifier ({input_kind} input) of fleet {model.fleet}")
    metadata = ModelMetadata(
        biofed_version=__version__, fleet=model.fleet, round=model.round, train_round=model.train_round,
        basis_version=model.basis_version, input_kind=input_kind, classes=model.classes,
        kind="logreg" if model.hidden == 0 else "mlp", hidden=model.hidden, n_features=model.n_features,
        k=model.k, dtype=dtype, layout=layout, privacy=model.privacy, standardization=model.standardization,
    )
    helper.set_model_props(onnx_model, metadata.to_props())
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def build_feature_extractor(layout: LayoutSpec, *, dtype: str = "float64") -> onnx.ModelProto:
    """Only the feature step of the ``window`` graph: raw windows (+ ``bio_hr``) in, raw feature
    rows ``features`` (N, F) out, in the layout's column order. For checking the ONNX feature
    extraction against the kernels and for timing it; not a biofed model (no metadata).
    """
    if dtype not in _NP_DTYPES:
        raise ExportError(f"dtype must be one of {tuple(_NP_DTYPES)}, got {dtype!r}")
    g = _Graph(dtype)
    inputs, features = _window_features(g, layout)
    g.op("Identity", [features], output=INPUT_FEATURES)
    output = helper.make_tensor_value_info(INPUT_FEATURES, _ONNX_DTYPES[dtype], ["N", layout.n_features])
    graph = helper.make_graph(g.nodes, "biofed_feature_extractor", inputs, [output], initializer=g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="biofed",
                                   producer_version=__version__, ir_version=IR_VERSION)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def export_onnx(model: ModelFile, path: str | Path, *, input_kind: str = INPUT_FEATURES,
                dtype: str = "float32") -> Path:
    """Build the ONNX model of ``model`` and write it to ``path`` atomically."""
    return write_bytes(Path(path), build_model(model, input_kind=input_kind, dtype=dtype).SerializeToString())


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + replace), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def export_round(state_dir: str | Path, model: ModelFile) -> tuple[Path, Path | None]:
    """Write the model of one round into ``state_dir`` (per round and latest, see the module docstring).

    Returns ``(npz_path, onnx_path)``; ``onnx_path`` is None (logged, and a previous
    ``model_latest.onnx`` removed) when the model has no feature layout, since an ONNX model
    without one cannot be checked by a device.
    """
    state_dir = Path(state_dir)
    models = state_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    stem = f"round_{model.round:05d}"
    npz = write_final_model(models / f"{stem}.npz", model.to_arrays())
    write_final_model(state_dir / "model_latest.npz", model.to_arrays())
    if model.layout is None:
        logger.warning("round %d: no device reported its feature layout; ONNX export skipped", model.round)
        (state_dir / "model_latest.onnx").unlink(missing_ok=True)  # never older than model_latest.npz
        return npz, None
    data = build_model(model).SerializeToString()
    path = write_bytes(models / f"{stem}.onnx", data)
    write_bytes(state_dir / "model_latest.onnx", data)
    return npz, path
