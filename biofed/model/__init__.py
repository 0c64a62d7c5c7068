"""The model package: what a biofed model is, shared by the coordinator and the devices.

- :mod:`biofed.model.layout`: :class:`FeatureLayout`, the channels and feature columns of a raw row;
- :mod:`biofed.model.basis`: :class:`Basis`, the standardization and projection onto k inputs;
- :mod:`biofed.model.file`: :class:`ModelFile`, one global model as a pickle-free ``.npz``;
- :mod:`biofed.model.format`: the ONNX graph contract and its metadata (:class:`ModelMetadata`).
"""

from biofed.model._json import MAX_LAYOUT_JSON_CHARS, ModelFormatError
from biofed.model.basis import Basis, BasisError, fit_basis
from biofed.model.file import ModelFile, ModelFileError, save_arrays
from biofed.model.format import (
    DTYPES,
    FORMAT_VERSION,
    HR_INPUT,
    INPUT_FEATURES,
    INPUT_KINDS,
    INPUT_WINDOW,
    METADATA_KEYS,
    OUTPUT_PROBA,
    STANDARDIZATIONS,
    ModelMetadata,
    PrivacySpec,
)
from biofed.model.layout import BIO_STATISTICS, HR_FEATURES, HR_TYPES, FeatureLayout, LayoutError, ModalityLayout

__all__ = [
    "BIO_STATISTICS",
    "DTYPES",
    "FORMAT_VERSION",
    "HR_FEATURES",
    "HR_INPUT",
    "HR_TYPES",
    "INPUT_FEATURES",
    "INPUT_KINDS",
    "INPUT_WINDOW",
    "MAX_LAYOUT_JSON_CHARS",
    "METADATA_KEYS",
    "OUTPUT_PROBA",
    "STANDARDIZATIONS",
    "Basis",
    "BasisError",
    "FeatureLayout",
    "LayoutError",
    "ModalityLayout",
    "ModelFile",
    "ModelFileError",
    "ModelFormatError",
    "ModelMetadata",
    "PrivacySpec",
    "fit_basis",
    "save_arrays",
]
