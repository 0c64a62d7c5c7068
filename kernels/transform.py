"""Fused feature transform: standardize, project, add bias, activate.

``transform`` computes ``act(((features - mean) / scale) @ weights + bias)`` in one
jitted pass per block of rows: the standardized block is written into a small scratch
buffer, multiplied with BLAS (``np.dot`` on C-contiguous 2-D arrays inside ``@njit``
calls the same ``gemm`` NumPy uses), and the bias and activation are applied to the
output block while it is still in cache. NumPy's plain expression allocates four
full-size temporaries instead (``X - mean``, ``/ scale``, ``@``, ``+ bias``).

Row blocks of ``_BLOCK_ROWS`` rows bound the scratch memory (no full-size temporary). The
standardization multiplies by per-column reciprocals: one division per column instead of per
element, within 1 ulp of dividing.

BLAS route. The product is always BLAS ``gemm`` (``np.dot`` inside ``@njit``). A second
route that leaves Numba for large batches (NumPy ufuncs and ``np.dot(..., out=...)`` on
NumPy's own BLAS) never beat the fused kernel by more than run-to-run noise and lost
elsewhere; a fused loop without gemm for single rows (each standardized feature scaled into
the output row) lost to the gemm call from one row up. So there is no dispatch: one fused
kernel with gemm at every size. The comparisons are in ``docs/kernel-design.md``.

Per-call overhead. For one window the kernel's arithmetic (151 x 32) is cheaper than
validating its five arguments, so a device validates them once: :func:`transform_plan`
returns a :class:`TransformPlan` and :func:`apply_transform` checks only the features. Their
finiteness is checked inside the kernel's pass over them (a separate ``np.add.reduce`` over
one feature row costs as much as the product); a non-finite feature then raises the usual
error.
``biofed bench --only transform,project`` compares both with NumPy at 1 to 20000 rows.

The result dtype follows ``features``: float32 features give float32 output (weights,
bias, mean and scale are cast to float32); every other dtype computes in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from biofed.kernels._validation import check_float_array

__all__ = ["ACTIVATIONS", "TransformPlan", "apply_transform", "transform", "transform_matrix", "transform_plan"]

ACTIVATIONS: tuple[str, ...] = ("identity", "relu", "tanh", "sigmoid")
_BLOCK_ROWS = 4096


@njit(cache=True, nogil=True, inline="always")
def _activate(v, activation):
    """Activation ``activation`` (index into :data:`ACTIVATIONS`) of one value."""
    if activation == 1:
        return max(v, 0.0)
    if activation == 2:
        return np.tanh(v)
    if activation == 3:
        # Two branches keep exp() from overflowing for large |v|.
        if v >= 0:
            return 1.0 / (1.0 + np.exp(-v))
        e = np.exp(v)
        return e / (1.0 + e)
    return v


@njit(cache=True, nogil=True)
def _transform(features, weights, bias, mean, inv_scale, standardize, activation, out):
    """Jitted worker of :func:`transform`; writes into ``out`` and returns whether every feature is finite.

    Parameters
    ----------
    features : ndarray, shape (N, d), C-contiguous
    weights : ndarray, shape (d, m), C-contiguous, same dtype as ``features``
    bias : ndarray, shape (m,)
        Zeros when the caller passed no bias.
    mean, inv_scale : ndarray, shape (d,)
        Zeros / ones when absent; only read when ``standardize`` is True.
    standardize : bool
        Whether to apply ``(x - mean) * inv_scale`` before the product.
    activation : int
        Index into :data:`ACTIVATIONS`.
    out : ndarray, shape (N, m), C-contiguous

    Returns
    -------
    finite : bool
        False when some feature is NaN or inf (``out`` is then meaningless): the finiteness
        check rides on the pass that reads every feature anyway.
    """
    n, d = features.shape
    m = out.shape[1]
    finite = True
    block = min(n, _BLOCK_ROWS)
    scratch = np.empty((block if standardize else 0, d), dtype=features.dtype)
    for start in range(0, n, block):
        stop = min(n, start + block)
        if standardize:
            for i in range(start, stop):
                for j in range(d):
                    x = features[i, j]
                    finite &= x - x == 0.0
                    scratch[i - start, j] = (x - mean[j]) * inv_scale[j]
            np.dot(scratch[: stop - start], weights, out[start:stop])
        else:
            for i in range(start, stop):
                for j in range(d):
                    x = features[i, j]
                    finite &= x - x == 0.0
            np.dot(features[start:stop], weights, out[start:stop])
        for i in range(start, stop):
            for j in range(m):
                out[i, j] = _activate(out[i, j] + bias[j], activation)
    return finite


def _check_vector(x, name: str, length: int, dtype, what: str) -> np.ndarray:
    arr = check_float_array(x, name, ndim=1)
    if arr.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) to match {what}, got shape {arr.shape}.")
    return np.ascontiguousarray(arr, dtype=dtype)


class TransformPlan(NamedTuple):
    """Validated parameters of :func:`transform`, prepared once and applied to many feature blocks.

    Build it with :func:`transform_plan`; :func:`apply_transform` then validates only the
    features. Every array is C-contiguous and held in both float64 and float32 (index by
    ``dtype == float32``), so applying never converts.

    Attributes
    ----------
    weights : tuple of ndarray, shape (d, m)
    bias : tuple of ndarray, shape (m,)
        Zeros when no bias was given.
    mean, scale : tuple of ndarray, shape (d,)
        Zeros / ones when not given.
    kernel_args : tuple of tuple
        Per dtype (index ``dtype == float32``), what the jitted kernel takes after the
        features: ``(weights, bias, mean, 1 / scale, standardize, activation index)``. The
        standardization multiplies by ``1 / scale`` (one division per column, within 1 ulp of
        dividing).
    standardize : bool
        Whether a mean or a scale was given.
    activation : str
        One of :data:`ACTIVATIONS`.
    """

    weights: tuple[np.ndarray, np.ndarray]
    bias: tuple[np.ndarray, np.ndarray]
    mean: tuple[np.ndarray, np.ndarray]
    scale: tuple[np.ndarray, np.ndarray]
    standardize: bool
    activation: str
    kernel_args: tuple[tuple, tuple]


def _both_dtypes(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pair = (np.ascontiguousarray(arr, dtype=np.float64), np.ascontiguousarray(arr, dtype=np.float32))
    for a in pair:
        a.flags.writeable = False
    return pair


def transform_plan(weights, bias=None, *, mean=None, scale=None, activation: str = "identity") -> TransformPlan:
    """Validate the parameters of :func:`transform` once (see there for their meaning).

    Returns
    -------
    plan : TransformPlan
        ``apply_transform(features, plan)`` equals ``transform(features, weights, bias,
        mean=mean, scale=scale, activation=activation)``.

    Raises
    ------
    ValueError
        On NaN/inf, mismatched shapes, non-positive ``scale`` or an unknown activation.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}.")
    w = check_float_array(weights, "weights", ndim=2)
    d, m = w.shape
    b = np.zeros(m) if bias is None else _check_vector(bias, "bias", m, np.float64, f"weights.shape[1] = {m}")
    mu = np.zeros(d) if mean is None else _check_vector(mean, "mean", d, np.float64, f"weights.shape[0] = {d}")
    if scale is None:
        sc = np.ones(d)
    else:
        sc = _check_vector(scale, "scale", d, np.float64, f"weights.shape[0] = {d}")
        if not sc.min() > 0:
            bad = int(np.flatnonzero(~(sc > 0))[0])
            raise ValueError(
                f"scale must be strictly positive, got scale[{bad}] = {sc[bad]}; "
                "replace zero deviations by 1 (moments_scale does this)."
            )
    standardize = mean is not None or scale is not None
    w2, b2, mu2, sc2, inv2 = (_both_dtypes(a) for a in (w, b, mu, sc, 1.0 / sc))
    index = ACTIVATIONS.index(activation)
    kernel_args = tuple((w2[i], b2[i], mu2[i], inv2[i], standardize, index) for i in (0, 1))
    return TransformPlan(w2, b2, mu2, sc2, standardize, activation, kernel_args)


def _apply_transform(x: np.ndarray, plan: TransformPlan) -> np.ndarray:
    """:func:`apply_transform` for a C-contiguous float32/float64 ``x`` of matching width.

    The kernel reports non-finite features; :func:`check_float_array` then names them.
    """
    args = plan.kernel_args[x.dtype.char == "f"]
    out = np.empty((x.shape[0], args[0].shape[1]), x.dtype)
    if not _transform(x, *args, out):
        check_float_array(x, "features", ndim=2)
    return out


def apply_transform(features, plan: TransformPlan) -> np.ndarray:
    """Apply a :class:`TransformPlan` to feature rows (validates only ``features``).

    Parameters
    ----------
    features : array-like, shape (N, d)
        Finite feature rows; float32 computes in float32, every other dtype in float64.
    plan : TransformPlan

    Returns
    -------
    out : ndarray, shape (N, m)

    Raises
    ------
    TypeError, ValueError
        On a bad plan, non-numeric, non-2-D, empty or non-finite features, or a width other
        than the plan's ``d``.
    """
    if not isinstance(plan, TransformPlan):
        raise TypeError(f"plan must be a TransformPlan (from transform_plan), got {type(plan).__name__}.")
    x = features
    if not (
        type(x) is np.ndarray
        and x.ndim == 2
        and x.size
        and x.dtype.char in "fd"  # float32, float64
        and x.flags.c_contiguous
    ):  # the common case (a C-contiguous float block) skips to the kernel, which checks finiteness
        x = check_float_array(x, "features", ndim=2)
    d = plan.weights[0].shape[0]
    if x.shape[1] != d:
        raise ValueError(
            f"features must have {d} columns to match the plan's weights (d, m) = "
            f"{plan.weights[0].shape}, got shape {x.shape}."
        )
    return _apply_transform(x, plan)


def transform(features, weights, bias=None, *, mean=None, scale=None, activation: str = "identity") -> np.ndarray:
    """Standardize, project, add bias and apply an activation in one fused kernel.

    Computes ``act(((features - mean) / scale) @ weights + bias)``. To apply the same
    parameters to many blocks (a device's windows), validate them once with
    :func:`transform_plan` and call :func:`apply_transform`.

    Parameters
    ----------
    features : array-like, shape (N, d)
        Feature rows, finite.
    weights : array-like, shape (d, m)
        Projection matrix.
    bias : array-like, shape (m,), optional
        Added after the product; no bias when None.
    mean : array-like, shape (d,), optional
        Subtracted from every row first; no centring when None.
    scale : array-like, shape (d,), optional
        Strictly positive divisors applied after centring (use
        :func:`biofed.kernels.moments_scale`, which replaces zero deviations by 1);
        no scaling when None.
    activation : {"identity", "relu", "tanh", "sigmoid"}
        Element-wise function applied last. The sigmoid is evaluated in the
        overflow-free form.

    Returns
    -------
    out : ndarray, shape (N, m)
        float32 when ``features`` is float32, float64 otherwise.

    Raises
    ------
    ValueError
        On NaN/inf, mismatched shapes, non-positive ``scale`` or an unknown activation.
    """
    x = check_float_array(features, "features", ndim=2)
    w = check_float_array(weights, "weights", ndim=2)
    if w.shape[0] != x.shape[1]:
        raise ValueError(
            f"weights must have shape (d, m) with d = features.shape[1] = {x.shape[1]}, got shape {w.shape}."
        )
    return _apply_transform(x, transform_plan(w, bias, mean=mean, scale=scale, activation=activation))


def transform_matrix(data, weights) -> np.ndarray:
    """Return ``data @ weights`` (facade kept for seed-code compatibility).

    Parameters
    ----------
    data : array-like, shape (N, d)
    weights : array-like, shape (d, m)

    Returns
    -------
    out : ndarray, shape (N, m)
        float32 when ``data`` is float32, float64 otherwise.
    """
    return transform(data, weights)
