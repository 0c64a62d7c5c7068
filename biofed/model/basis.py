"""The basis: the standardization and projection that map a raw feature row to the model's k inputs.

``z = ((x - mean) / scale) @ components.T``: a device projects its rows onto the basis the
fleet agreed on (:class:`biofed.protocol.Basis` carries it over MQTT), the coordinator keeps it
in its state and its model files (:class:`biofed.model.ModelFile`), and the ONNX graph starts
with it. :class:`Basis` is its one in-memory type; :func:`fit_basis` fits one from a device's
own rows. Scales follow the one floor rule, :func:`biofed.kernels.standard_scale`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from biofed.kernels import moments_init, moments_scale, moments_update, truncated_svd

__all__ = ["Basis", "BasisError", "fit_basis"]


class BasisError(ValueError):
    """A basis of the wrong shape, with non-finite entries or a scale that is not > 0."""


class Basis(NamedTuple):
    """A standardized PCA basis: ``project(X, components, mean=mean, scale=scale)``.

    Attributes
    ----------
    components : ndarray, shape (k, F)
        Orthonormal rows.
    mean, scale : ndarray, shape (F,)
        Standardization applied before projecting (``scale > 0``).
    """

    components: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @property
    def k(self) -> int:
        """Rows of ``components``: the width of a projected row."""
        return int(self.components.shape[0])

    @property
    def n_features(self) -> int:
        """F, the width of the raw rows it projects."""
        return int(self.components.shape[1])

    @classmethod
    def checked(cls, basis, n_features: int | None = None) -> Basis:
        """``basis`` (any ``(components, mean, scale)`` triple) as a validated, C-contiguous float64 :class:`Basis`.

        Raises
        ------
        BasisError
            Not a triple, components not (k >= 1, F) (F = ``n_features`` when given), mean or
            scale not (F,), a non-finite entry, or a scale that is not > 0.
        """
        if not isinstance(basis, tuple) or len(basis) != 3:
            raise BasisError(f"basis must be a (components, mean, scale) tuple, got {type(basis).__name__}.")
        components, mean, scale = (np.asarray(a, dtype=np.float64) for a in basis)
        if (
            components.ndim != 2
            or components.shape[0] < 1
            or components.shape[1] < 1
            or (n_features is not None and components.shape[1] != n_features)
        ):
            wanted = "F" if n_features is None else n_features
            raise BasisError(f"basis components must have shape (k, {wanted}) for this layout, got {components.shape}.")
        d = components.shape[1]
        if mean.shape != (d,) or scale.shape != (d,):
            raise BasisError(f"basis mean and scale must have shape ({d},), got {mean.shape} and {scale.shape}.")
        if not (np.isfinite(components).all() and np.isfinite(mean).all() and np.isfinite(scale).all()) or np.any(
            scale <= 0
        ):
            raise BasisError("basis must be finite with scale > 0 everywhere.")
        return cls(np.ascontiguousarray(components), np.ascontiguousarray(mean), np.ascontiguousarray(scale))


def fit_basis(X, k: int = 32, *, random_state=0) -> Basis:
    """Exact standardized PCA basis of feature rows ``X`` (N, F) by :func:`biofed.kernels.truncated_svd`.

    Returns ``Basis(components (k', F), mean (F,), scale (F,))`` with ``k' = min(k, N, F)``.

    Examples
    --------
    >>> basis = fit_basis([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]], k=1)
    >>> basis.mean.tolist(), basis.scale.tolist(), basis.k
    ([2.0, 1.0], [1.632993161855452, 1.0], 1)
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise BasisError(f"a basis needs a (N >= 2, F) matrix of feature rows, got shape {X.shape}.")
    moments = moments_update(moments_init(X.shape[1]), X)
    scale = moments_scale(moments)
    _, _, vt = truncated_svd((X - moments.mean) / scale, k, random_state=random_state)
    return Basis(np.ascontiguousarray(vt, dtype=np.float64), moments.mean, scale)
