"""ONNX export of the federated model: the inference path as one portable graph.

The coordinator turns its model file (``model_final.npz`` or a per-round file, see
:class:`biofed.model.ModelFile`) into an ONNX model (opset 17, built with :mod:`onnx.helper`) that
a device runs with onnxruntime (:mod:`biofed.edge.inference`). Graph contract and metadata keys:
:mod:`biofed.model.format`; feature columns: :class:`biofed.model.FeatureLayout`.

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
  halves) gives band powers; ``log10(p + tiny)``. Same segments, taper, scaling, bin rule and
  log floor as :func:`biofed.kernels.band_powers`: the graph is built from the kernels' own
  :class:`biofed.kernels.SpectralPlan`, so the two cannot drift.
- **audio log-mel energies** (``audio``): identical, with the triangular mel filterbank of
  :func:`biofed.kernels.log_band_energies` and ``ln(e + 1e-10)``.
- **bio window statistics** (``bio``): ``ReduceMean`` (mean), ``sqrt(ReduceMean(d^2))`` (std,
  ddof 0), ``MatMul`` of the centred window with the least-squares time weights (slope per
  second), ``ReduceMin``/``ReduceMax``; heart rate and RMSSD come from peak detection, which
  ONNX cannot express, so they enter as the input ``bio_hr`` (N, n_hr_channels, 2) computed on
  the device with :func:`biofed.kernels.heart_rate_features`; a ``Gather`` interleaves them
  with the statistics in layout column order (:meth:`biofed.model.ModalityLayout.bio_columns`).

Why a dense DFT restricted to the used bins rather than the ``DFT`` operator, and how the
graphs compare with the Numba kernels in speed and accuracy: ``docs/onnx-export.md``.

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
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from biofed import __version__
from biofed.model import (
    DTYPES,
    HR_FEATURES,
    HR_INPUT,
    INPUT_FEATURES,
    INPUT_KINDS,
    INPUT_WINDOW,
    OUTPUT_PROBA,
    FeatureLayout,
    LayoutError,
    ModalityLayout,
    ModelFile,
    ModelMetadata,
)

__all__ = [
    "OPSET",
    "ExportError",
    "build_feature_extractor",
    "build_model",
    "export_onnx",
    "export_round",
    "write_bytes",
]

logger = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8
"""IR version paired with opset 17 (read by every onnxruntime >= 1.13)."""
_ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}


class ExportError(ValueError):
    """The model cannot be exported as this graph (no layout, an unknown input kind or dtype, a layout
    the window graph cannot express); the message says what is wrong."""


# ----------------------------------------------------------------------------- graph pieces
class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.np_dtype = np.dtype(dtype).type
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

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, output: str | None = None, **attrs) -> str:
        out = output or self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out


def _head(g: _Graph, features: str, model: ModelFile) -> str:
    """Standardize, project, classify, softmax; returns the ``proba`` output name."""
    basis = model.basis
    k, c, h = basis.k, len(model.classes), model.hidden
    z = g.op("Sub", [features, g.const("basis_mean", basis.mean)], "centred")
    z = g.op("Div", [z, g.const("basis_scale", basis.scale)], "standardized")
    z = g.op("MatMul", [z, g.const("basis_components_T", np.ascontiguousarray(basis.components.T))], "projected")
    p = model.params
    if h == 0:
        w, b = p[: k * c].reshape(k, c), p[k * c :]
        logits = g.op("Add", [g.op("MatMul", [z, g.const("W", w)]), g.const("b", b)], "logits")
    else:
        off = k * h + h
        w1, b1 = p[: k * h].reshape(k, h), p[k * h : off]
        w2, b2 = p[off : off + h * c].reshape(h, c), p[off + h * c :]
        hidden = g.op("Relu", [g.op("Add", [g.op("MatMul", [z, g.const("W1", w1)]), g.const("b1", b1)])], "hidden")
        logits = g.op("Add", [g.op("MatMul", [hidden, g.const("W2", w2)]), g.const("b2", b2)], "logits")
    return g.op("Softmax", [logits], output=OUTPUT_PROBA, axis=-1)


def _spectral(g: _Graph, x: str, layout: FeatureLayout, part: ModalityLayout) -> str:
    """Welch band powers / mel energies of ``x`` (N, C, W), flattened to (N, C * n_bands)."""
    try:
        plan = layout.spectral_plan(part)
    except LayoutError as exc:
        raise ExportError(f"{exc} The layout cannot have been produced by the pipeline.") from None
    nperseg, kmin, weights = plan.nperseg, plan.kmin, plan.weights
    n_bins = weights.shape[0]
    index = np.arange(plan.n_seg)[:, None] * plan.step + np.arange(nperseg)[None, :]
    frames = g.op(
        "Gather", [x, g.const(f"{part.modality}_segments", index, np.int64)], f"{part.modality}_frames", axis=2
    )
    j = np.arange(nperseg)[:, None]
    k = np.arange(kmin, kmin + n_bins)[None, :]
    angle = 2.0 * np.pi * ((j * k) % nperseg) / nperseg
    dft = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1)  # (nperseg, 2 n_bins)
    taper = plan.taper[:, None]
    basis = taper * dft - (taper * dft).sum(axis=0, keepdims=True) / nperseg  # detrend + taper folded in
    spectrum = g.op("MatMul", [frames, g.const(f"{part.modality}_dft", basis)], f"{part.modality}_spectrum")
    power = g.op("Mul", [spectrum, spectrum], f"{part.modality}_power")
    power = g.op("ReduceSum", [power, g.const("axis_segments", [2], np.int64)], f"{part.modality}_welch", keepdims=0)
    bands = g.op(
        "MatMul",
        [power, g.const(f"{part.modality}_bands", np.vstack([weights, weights]))],
        f"{part.modality}_bandpower",
    )
    logged = g.op("Log", [g.op("Add", [bands, g.const("floor", plan.log_floor(g.np_dtype))])])
    if plan.log == "log10":
        logged = g.op("Mul", [logged, g.const("inv_ln_base", 1.0 / math.log(10.0))])
    return g.op("Flatten", [logged], f"{part.modality}_features", axis=1)


def _bio(g: _Graph, x: str, layout: FeatureLayout, part: ModalityLayout, hr: str | None) -> str:
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
    statistics, heart_rate = part.bio_columns()
    if not heart_rate:
        return stats
    # column j of the layout <- column order[j] of [statistics | heart-rate input]
    order = np.empty(len(statistics) + len(heart_rate), dtype=np.int64)
    order[list(statistics)] = np.arange(len(statistics))
    order[list(heart_rate)] = len(statistics) + np.arange(len(heart_rate))
    both = g.op("Concat", [stats, g.op("Flatten", [hr], axis=1)], axis=1)
    return g.op("Gather", [both, g.const("bio_columns", order, np.int64)], "bio_features", axis=1)


def _window_features(g: _Graph, layout: FeatureLayout) -> tuple[list[onnx.ValueInfoProto], str]:
    """Graph inputs of the raw windows (+ ``bio_hr``) and the name of the raw feature rows (N, F)."""
    elem = _ONNX_DTYPES[g.dtype]
    inputs, parts = [], []
    for part in layout.modalities:
        shape = ["N", part.n_channels, layout.window_samples(part)]
        inputs.append(helper.make_tensor_value_info(part.modality, elem, shape))
        if part.modality == "bio":
            hr = None
            if part.hr_channels:
                inputs.append(
                    helper.make_tensor_value_info(HR_INPUT, elem, ["N", len(part.hr_channels), len(HR_FEATURES)])
                )
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
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
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
            'which biofed predict calibrates per recording, or train with [model] standardization = "global" '
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
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="biofed",
        producer_version=__version__,
        ir_version=IR_VERSION,
        doc_string=f"biofed classifier ({input_kind} input) of fleet {model.fleet}",
    )
    metadata = ModelMetadata(
        biofed_version=__version__,
        fleet=model.fleet,
        round=model.round,
        train_round=model.train_round,
        basis_version=model.basis_version,
        input_kind=input_kind,
        classes=model.classes,
        kind="logreg" if model.hidden == 0 else "mlp",
        hidden=model.hidden,
        n_features=model.n_features,
        k=model.k,
        dtype=dtype,
        layout=layout,
        privacy=model.privacy,
        standardization=model.standardization,
    )
    helper.set_model_props(onnx_model, metadata.to_props())
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def build_feature_extractor(layout: FeatureLayout, *, dtype: str = "float64") -> onnx.ModelProto:
    """Only the feature step of the ``window`` graph: raw windows (+ ``bio_hr``) in, raw feature
    rows ``features`` (N, F) out, in the layout's column order. For checking the ONNX feature
    extraction against the kernels and for timing it; not a biofed model (no metadata).
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    g = _Graph(dtype)
    inputs, features = _window_features(g, layout)
    g.op("Identity", [features], output=INPUT_FEATURES)
    output = helper.make_tensor_value_info(INPUT_FEATURES, _ONNX_DTYPES[dtype], ["N", layout.n_features])
    graph = helper.make_graph(g.nodes, "biofed_feature_extractor", inputs, [output], initializer=g.initializers)
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="biofed",
        producer_version=__version__,
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def export_onnx(
    model: ModelFile, path: str | Path, *, input_kind: str = INPUT_FEATURES, dtype: str = "float32"
) -> Path:
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
    npz = model.save(models / f"{stem}.npz")
    model.save(state_dir / "model_latest.npz")
    if model.layout is None:
        logger.warning("round %d: no device reported its feature layout; ONNX export skipped", model.round)
        (state_dir / "model_latest.onnx").unlink(missing_ok=True)  # never older than model_latest.npz
        return npz, None
    data = build_model(model).SerializeToString()
    path = write_bytes(models / f"{stem}.onnx", data)
    write_bytes(state_dir / "model_latest.onnx", data)
    return npz, path
