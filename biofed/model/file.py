"""The model file: one global model as a pickle-free ``.npz``, written by the coordinator.

The coordinator writes ``state_dir/model_final.npz``, and per round ``models/round_NNNNN.npz``
and ``model_latest.npz`` (:func:`biofed.coordinator.onnx_export.export_round`); ``biofed
export`` turns one into an ONNX model, and the demo reads its basis and classifier back.
:class:`ModelFile` is the one reader and writer of that format.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biofed.kernels import n_params
from biofed.model._json import ModelFormatError
from biofed.model.basis import Basis
from biofed.model.format import STANDARDIZATIONS, PrivacySpec
from biofed.model.layout import FeatureLayout

__all__ = ["ModelFile", "ModelFileError", "save_arrays"]


class ModelFileError(ModelFormatError):
    """A model file is missing, not a biofed model file, or inconsistent; the message names the
    file and what is wrong."""


def save_arrays(path: str | Path, arrays: Mapping[str, object]) -> Path:
    """Write ``arrays`` as an ``.npz`` atomically (temporary file + replace; no pickled objects:
    strings become unicode arrays)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)
    return path


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True, eq=False)
class ModelFile:
    """A coordinator model file: classifier, basis, provenance and privacy of one global model.

    Keys of the ``.npz``: ``params`` (P,), ``classes`` (c,) str, ``hidden``, ``basis_components`` (k, F),
    ``basis_mean`` (F,), ``basis_scale`` (F,), ``basis_version``, ``fleet``, ``round``, ``train_rounds``,
    ``layout`` (JSON, :class:`biofed.model.FeatureLayout`; absent in files of coordinators
    whose devices did not report one), ``epsilon``, ``epsilon_<accountant>``, ``delta``,
    ``accountant``, ``trust_mode``, ``noise_multiplier``, ``standardization`` ("global", or
    "device": rows must be z-scored with the device's own training statistics before the
    model, whose basis ``mean``/``scale`` are then 0/1; absent in older files: "global") and, in the
    final model only, ``stop_reason`` (why the coordinator stopped).

    ``params`` is the flat parameter vector of :mod:`biofed.kernels.training` for ``k`` inputs,
    ``len(classes)`` outputs and ``hidden`` hidden units (0: logistic regression). ``basis`` may be
    given as any ``(components, mean, scale)`` triple; it is stored as a checked :class:`Basis`.
    """

    params: np.ndarray
    classes: tuple[str, ...]
    hidden: int
    basis: Basis
    basis_version: int
    fleet: str
    round: int
    train_round: int
    layout: FeatureLayout | None
    privacy: PrivacySpec
    standardization: str = "global"
    stop_reason: str = ""

    def __post_init__(self) -> None:
        try:
            basis = Basis.checked(self.basis)
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
        object.__setattr__(self, "basis", basis)
        k, d = basis.components.shape
        c = len(self.classes)
        if self.standardization not in STANDARDIZATIONS:
            raise ModelFileError(f"standardization must be one of {STANDARDIZATIONS}, got {self.standardization!r}")
        if c < 2:
            raise ModelFileError(f"a model needs at least 2 classes, got {self.classes}")
        expected = n_params(k, c, self.hidden)
        if self.params.shape != (expected,):
            raise ModelFileError(
                f"params has shape {self.params.shape}, expected ({expected},) for k={k}, {c} "
                f"classes, hidden={self.hidden} (layout of biofed.kernels.training)"
            )
        if self.layout is not None and self.layout.n_features != d:
            raise ModelFileError(f"the feature layout names {self.layout.n_features} features but the basis has {d}")

    @property
    def k(self) -> int:
        return self.basis.k

    @property
    def n_features(self) -> int:
        return self.basis.n_features

    @classmethod
    def load(cls, path: str | Path) -> ModelFile:
        """Read a model file; :class:`ModelFileError` names the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such model file")
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
            raise ModelFileError(
                f"{path}: not a biofed model file (.npz written by the coordinator): {reason}"
            ) from None
        if not isinstance(arrays, dict) or not arrays:
            raise ModelFileError(f"{path}: not a biofed model file (.npz written by the coordinator)")
        required = ("params", "classes", "hidden", "basis_components", "basis_mean", "basis_scale")
        missing = [key for key in required if key not in arrays]
        if missing:
            raise ModelFileError(f"{path}: not a biofed model file: lacks {missing} (keys found: {sorted(arrays)})")

        def scalar(key, default, kind):
            return kind(arrays[key][()]) if key in arrays else default

        epsilons = {
            key[len("epsilon_") :]: _finite_or_none(float(arrays[key][()]))
            for key in arrays
            if key.startswith("epsilon_")
        }
        privacy = PrivacySpec(
            epsilon=_finite_or_none(scalar("epsilon", math.inf, float)),
            delta=_finite_or_none(scalar("delta", None, float)),
            accountant=scalar("accountant", "", str),
            epsilons=epsilons,
            trust_mode=scalar("trust_mode", "", str),
            noise_multiplier=_finite_or_none(scalar("noise_multiplier", None, float)),
        )
        try:
            layout = FeatureLayout.from_json(scalar("layout", "", str)) if scalar("layout", "", str) else None
        except ModelFormatError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        try:
            return cls(
                params=np.asarray(arrays["params"], dtype=np.float64),
                classes=tuple(str(c) for c in np.atleast_1d(arrays["classes"])),
                hidden=scalar("hidden", 0, int),
                basis=Basis(arrays["basis_components"], arrays["basis_mean"], arrays["basis_scale"]),
                basis_version=scalar("basis_version", 0, int),
                fleet=scalar("fleet", "", str),
                round=scalar("round", 0, int),
                train_round=scalar("train_rounds", 0, int),
                layout=layout,
                privacy=privacy,
                standardization=scalar("standardization", "global", str),
                stop_reason=scalar("stop_reason", "", str),
            )
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: malformed biofed model file: {exc}") from None

    def to_arrays(self) -> dict[str, object]:
        """The ``.npz`` content (see the class docstring)."""
        p = self.privacy
        out: dict[str, object] = {
            "params": self.params,
            "classes": np.array(self.classes, dtype=str),
            "hidden": self.hidden,
            "basis_components": self.basis.components,
            "basis_mean": self.basis.mean,
            "basis_scale": self.basis.scale,
            "basis_version": self.basis_version,
            "fleet": self.fleet,
            "round": self.round,
            "train_rounds": self.train_round,
            "epsilon": math.inf if p.epsilon is None else p.epsilon,
            **{f"epsilon_{name}": math.inf if v is None else v for name, v in p.epsilons.items()},
            "delta": math.nan if p.delta is None else p.delta,
            "accountant": p.accountant,
            "trust_mode": p.trust_mode,
            "noise_multiplier": math.nan if p.noise_multiplier is None else p.noise_multiplier,
            "standardization": self.standardization,
        }
        if self.layout is not None:
            out["layout"] = self.layout.to_json()
        if self.stop_reason:
            out["stop_reason"] = self.stop_reason
        return out

    def save(self, path: str | Path) -> Path:
        """Write the model file to ``path`` atomically."""
        return save_arrays(path, self.to_arrays())
