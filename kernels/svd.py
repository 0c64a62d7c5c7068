"""Truncated SVD for feature compression and the Frequent Directions streaming sketch.

Truncated SVD: method per shape
-------------------------------
:func:`truncated_svd` picks one of two methods from the shape of ``X`` (N, d). With
``small = min(N, d)`` and ``large = max(N, d)``:

* ``"eigh"`` (Gram matrix) when ``small <= 512``, or ``small <= 1024`` and
  ``large >= 4 * small``. The Gram matrix of the short side (``X.T @ X``, or ``X @ X.T``
  when N < d) is one BLAS-3 product (``syrk``), its top k eigenvectors come from LAPACK
  ``syevr`` (``scipy.linalg.eigh(subset_by_index=...)``), and a Rayleigh-Ritz step (thin
  SVD of the N x k product ``X @ V``) returns exactly orthonormal ``U`` and singular values
  computed from ``X`` itself, not from squared eigenvalues. The subspace is exact up to
  rounding: the reconstruction error equals the Eckart-Young optimum.
* ``"randomized"`` otherwise: the range finder of Halko, Martinsson and Tropp [1]_
  (Algorithm 4.4, randomized subspace iteration) with ``k + n_oversamples`` Gaussian test
  vectors and ``n_power_iter`` power iterations, renormalized by LU each half step (as
  scikit-learn does; cheaper than QR), a final QR, then an exact SVD of the small projected
  matrix.

The timings behind the rule are in ``docs/kernel-design.md``; ``biofed bench --only svd``
measures :func:`truncated_svd` against scikit-learn's randomized SVD and TruncatedSVD.

The Gram product costs ``large * small**2`` flops against ``~4 (q + 1) * large * small * l``
for subspace iteration (``l = k + 10``), and LAPACK ``syevr`` adds ``~small**3``; BLAS-3 on a
square product runs several times faster per flop than the tall-skinny products of the
range finder, which is why ``eigh`` wins up to ``small = 512`` and, for ``small = 1024``,
only when the other side is long enough to amortize the eigen-solver.

Output signs are deterministic: each row of ``Vt`` is flipped so that its entry of
largest magnitude is positive (the row-based ``svd_flip`` convention of scikit-learn),
and the matching column of ``U`` with it.

Frequent Directions
-------------------
:func:`fd_update` keeps an ``(ell, d)`` sketch ``B`` of a stream of rows ``A`` such that
``0 <= A.T A - B.T B`` and ``||A.T A - B.T B||_2 <= ||A - A_k||_F**2 / (ell - k)`` for every
``k < ell`` [2]_, [3]_. It uses the fast variant of [3]_ (Algorithm 2) with a larger
buffer: rows fill an ``ell + b`` buffer, ``b = max(ell, min(4 d, 4096, rows of the call))``;
when it is full one SVD (taken through the smaller Gram matrix, ``(ell + b)`` or ``d`` square,
see ``_fd_shrink``) shrinks every squared singular value by the ``ell``-th one, which zeroes
at least ``b + 1`` rows. The guarantee holds for any ``b >= 1`` (each shrink by ``delta``
removes at least ``ell * delta`` of squared Frobenius norm). A shrink costs about
``(ell + b) d^2 + d^3`` flops against ``(2 ell)^2 d + (2 ell)^3`` for ``b = ell``, so per row it
is several times cheaper when ``d`` is not much larger than ``ell``: 5000 x 151 rows in chunks
of 256 with ``ell = 64`` take 78 shrinks of a 128-row buffer with ``b = ell`` but 20 shrinks
of a 320-row buffer (through the 151 x 151 Gram matrix) with this rule; ``biofed bench --only
fd_sketch`` compares it with an SVD of all rows. Memory is ``(ell + b) d`` during an update
and ``ell d`` between updates, whatever the stream length. Two sketches merge
(:func:`fd_merge`) with the same guarantee for the concatenated streams [3]_ (Sec. 3).

References
----------
.. [1] N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
   probabilistic algorithms for constructing approximate matrix decompositions",
   SIAM Review 53(2), 2011. arXiv:0909.4061.
.. [2] E. Liberty, "Simple and deterministic matrix sketching", KDD 2013. arXiv:1206.0594.
.. [3] M. Ghashami, E. Liberty, J. M. Phillips, D. P. Woodruff, "Frequent Directions:
   simple and deterministic matrix sketching", SIAM J. Computing 45(5), 2016. arXiv:1501.01711.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from numba import njit

from biofed.kernels._validation import check_float_array, check_positive_int
from biofed.kernels.random_state import check_random_state
from biofed.kernels.transform import transform

__all__ = [
    "SVD_METHODS",
    "truncated_svd",
    "svd_compress",
    "fd_init",
    "fd_update",
    "fd_merge",
    "fd_basis",
    "project",
]

SVD_METHODS: tuple[str, ...] = ("auto", "eigh", "randomized")
DEFAULT_POWER_ITER = 4
_FD_MAX_BLOCK_ROWS = 4096


def _auto_method(n: int, d: int) -> str:
    """The shape rule documented in the module docstring."""
    small, large = min(n, d), max(n, d)
    if small <= 512 or (small <= 1024 and large >= 4 * small):
        return "eigh"
    return "randomized"


def _svd_flip(u: np.ndarray, vt: np.ndarray) -> None:
    """Make the largest-magnitude entry of each row of ``vt`` positive, in place (with ``u``)."""
    rows = np.arange(vt.shape[0])
    signs = np.sign(vt[rows, np.argmax(np.abs(vt), axis=1)])
    signs[signs == 0] = 1
    vt *= signs[:, None]
    u *= signs[None, :]


def _eigh_svd(x: np.ndarray, k: int):
    """Gram + eigh + Rayleigh-Ritz for ``x`` (N, d) with N >= d; returns U, S, Vt (unflipped)."""
    d = x.shape[1]
    gram = x.T @ x
    _, v = scipy.linalg.eigh(
        gram.astype(np.float64, copy=False),
        subset_by_index=[d - k, d - 1],
        driver="evr",
        check_finite=False,
        overwrite_a=True,
    )
    v = np.ascontiguousarray(v[:, ::-1], dtype=x.dtype)
    u, s, w = np.linalg.svd(x @ v, full_matrices=False)
    return u, s, w @ v.T


def _randomized_svd(x: np.ndarray, k: int, n_oversamples: int, n_power_iter: int, rng: np.random.Generator):
    """Randomized subspace iteration (Halko et al. Alg. 4.4 + 5.1); returns U, S, Vt (unflipped)."""
    n, d = x.shape
    n_vectors = min(k + n_oversamples, n, d)
    q = x @ rng.standard_normal((d, n_vectors)).astype(x.dtype, copy=False)
    for _ in range(n_power_iter):
        # LU (permuted L) keeps the columns well scaled at a fraction of the cost of QR; the
        # final QR restores an orthonormal basis, as in scikit-learn's randomized_svd.
        q = scipy.linalg.lu(q, permute_l=True, check_finite=False)[0]
        z = scipy.linalg.lu(x.T @ q, permute_l=True, check_finite=False)[0]
        q = x @ z
    q, _ = np.linalg.qr(q)
    ub, s, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    return q @ ub[:, :k], s[:k], vt[:k]


def truncated_svd(
    X, k: int = 32, *, n_oversamples: int = 10, n_power_iter: int | None = None, random_state=None, method: str = "auto"
):
    """Top-k singular triplets of ``X``, exact (Gram + eigh) or randomized per shape.

    Parameters
    ----------
    X : array-like, shape (N, d)
        Data rows, finite. Not centred here: subtract the mean first for PCA.
    k : int, default 32
        Number of components wanted, >= 1. Values above ``min(N, d)`` are clipped; components
        beyond the rank of ``X`` come back with singular value ~0 and arbitrary (still
        orthonormal) vectors.
    n_oversamples : int, default 10
        Extra random test vectors of the randomized method (ignored by ``"eigh"``). More
        vectors make the range estimate more accurate at linear extra cost; 10 is the value
        recommended in [1]_ (Sec. 4.2).
    n_power_iter : int or None, default None
        Power (subspace) iterations of the randomized method; None means 4. Each iteration
        costs two passes over ``X`` and sharpens the spectrum decay; raise it for flat
        spectra (noise-dominated data), 0 gives the plain range finder.
    random_state : None, int or numpy.random.Generator
        Source of the Gaussian test matrix of the randomized method; the ``"eigh"`` method
        uses no randomness.
    method : {"auto", "eigh", "randomized"}, default "auto"
        ``"auto"`` applies the shape rule of the module docstring; the others force a method.

    Returns
    -------
    U : ndarray, shape (N, k')
        Orthonormal columns, ``k' = min(k, N, d)``.
    S : ndarray, shape (k',)
        Singular values in decreasing order.
    Vt : ndarray, shape (k', d)
        Orthonormal rows; the largest-magnitude entry of each row is positive.
        All three are float32 for float32 ``X``, float64 otherwise.

    Notes
    -----
    The ``"eigh"`` method forms the Gram matrix, which squares the condition number of the
    *eigenvalues*; the final Rayleigh-Ritz SVD of ``X @ V`` recomputes singular values from
    ``X``, so they are accurate to ``eps * sigma_1`` absolutely.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SVD_METHODS)}.")
    x = check_float_array(X, "X", ndim=2)
    k = check_positive_int(k, "k")
    n_oversamples = check_positive_int(n_oversamples, "n_oversamples", minimum=0)
    if n_power_iter is None:
        n_power_iter = DEFAULT_POWER_ITER
    n_power_iter = check_positive_int(n_power_iter, "n_power_iter", minimum=0)
    rng = check_random_state(random_state)
    n, d = x.shape
    k = min(k, n, d)
    if method == "auto":
        method = _auto_method(n, d)
    if method == "eigh":
        if n >= d:
            u, s, vt = _eigh_svd(x, k)
        else:  # X.T = U' S V'.T  =>  X = V' S U'.T
            ut, s, vtt = _eigh_svd(x.T, k)
            u, vt = np.ascontiguousarray(vtt.T), np.ascontiguousarray(ut.T)
    else:
        u, s, vt = _randomized_svd(x, k, n_oversamples, n_power_iter, rng)
    u = np.ascontiguousarray(u, dtype=x.dtype)
    vt = np.ascontiguousarray(vt, dtype=x.dtype)
    _svd_flip(u, vt)
    return u, np.ascontiguousarray(s, dtype=x.dtype), vt


def svd_compress(x, k: int = 32) -> np.ndarray:
    """Compress rows to their top-k principal coordinates ``U * S`` (facade).

    Parameters
    ----------
    x : array-like, shape (N, d)
    k : int, default 32

    Returns
    -------
    scores : ndarray, shape (N, k')
        ``U * S`` of :func:`truncated_svd` with ``random_state=0`` (deterministic);
        ``scores @ Vt`` is the best rank-k' approximation of ``x``.
    """
    u, s, _ = truncated_svd(x, k, random_state=0)
    return u * s


# ----------------------------------------------------------------------------------------------
# Frequent Directions


@njit(cache=True, nogil=True)
def _fd_shrink(buf, ell):
    """Shrink ``buf`` (rows, d) in place to at most ``ell - 1`` non-zero leading rows.

    Every squared singular value is reduced by the ``ell``-th largest one (0 when the buffer
    has rank < ell), [3]_ Algorithm 2. Only ``B.T B`` matters to the sketch, so the SVD is
    taken through a Gram matrix in float64, whichever side is smaller: with
    ``B B.T = U diag(lam) U.T`` (rows <= d) the shrunk rows are
    ``sqrt(1 - delta / lam_i) * (u_i.T B)``; with ``B.T B = V diag(lam) V.T`` (rows > d) they
    are ``sqrt(lam_i - delta) * v_i.T``; both equal ``sqrt(lam_i - delta) v_i.T``. Eigenvalues
    at rounding level (``<= size * eps * lam_max``) count as zero.

    Returns the number of non-zero rows kept.
    """
    rows, d = buf.shape
    b64 = buf.astype(np.float64)
    by_rows = rows <= d
    gram = np.dot(b64, b64.T) if by_rows else np.dot(b64.T, b64)
    size = gram.shape[0]
    lam, vec = np.linalg.eigh(gram)  # ascending
    lam_max = max(lam[size - 1], 0.0)
    floor = size * np.finfo(np.float64).eps * lam_max
    delta = max(lam[size - ell], 0.0) if size >= ell else 0.0
    threshold = max(delta, floor)
    kept = 0
    while kept < min(ell, size) and lam[size - 1 - kept] > threshold:
        kept += 1
    shrunk = np.empty((kept, d))
    if by_rows:
        top = np.empty((kept, rows))
        for i in range(kept):
            factor = np.sqrt(1.0 - delta / lam[size - 1 - i])
            for r in range(rows):
                top[i, r] = factor * vec[r, size - 1 - i]
        shrunk = np.dot(top, b64)
    else:
        for i in range(kept):
            factor = np.sqrt(lam[size - 1 - i] - delta)
            for j in range(d):
                shrunk[i, j] = factor * vec[j, size - 1 - i]
    buf[:, :] = 0.0
    for i in range(kept):
        for j in range(d):
            buf[i, j] = shrunk[i, j]
    return kept


@njit(cache=True, nogil=True)
def _fd_insert(buf, filled, rows, ell):
    """Append the non-zero rows of ``rows`` (N, d) to ``buf`` (ell + b, d) after ``filled`` rows.

    Shrinks whenever the buffer is full; returns the new number of filled rows. All-zero
    rows carry no information (they are the free slots of a sketch) and are skipped.
    """
    cap = buf.shape[0]
    d = buf.shape[1]
    for i in range(rows.shape[0]):
        nonzero = False
        for j in range(d):
            if rows[i, j] != 0.0:
                nonzero = True
                break
        if not nonzero:
            continue
        for j in range(d):
            buf[filled, j] = rows[i, j]
        filled += 1
        if filled == cap:
            filled = _fd_shrink(buf, ell)
    return filled


@njit(cache=True, nogil=True)
def _fd_combine(sketch, rows, out):
    """Worker of :func:`fd_update` / :func:`fd_merge`: sketch (ell, d) + rows (N, d) -> out (ell, d)."""
    ell, d = sketch.shape
    buf = np.zeros((ell + _fd_block_rows(ell, d, rows.shape[0]), d), dtype=sketch.dtype)
    filled = _fd_insert(buf, 0, sketch, ell)
    filled = _fd_insert(buf, filled, rows, ell)
    if filled > ell:
        filled = _fd_shrink(buf, ell)
    out[:, :] = buf[:ell]


@njit(cache=True, nogil=True)
def _fd_block_rows(ell, d, n_rows):
    """Rows added between two shrinks: ``max(ell, min(4 d, 4096, n_rows))`` (module docstring)."""
    return max(ell, min(4 * d, _FD_MAX_BLOCK_ROWS, n_rows))


def _check_sketch(sketch, name: str) -> np.ndarray:
    b = check_float_array(sketch, name, ndim=2)
    if b.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 rows (ell >= 2), got shape {b.shape}; create it with fd_init.")
    return b


def fd_init(d: int, ell: int = 64, dtype=np.float64) -> np.ndarray:
    """Return an empty Frequent Directions sketch.

    Parameters
    ----------
    d : int
        Number of columns of the stream, >= 1.
    ell : int, default 64
        Sketch rows, >= 2. The covariance error is at most ``||A - A_k||_F**2 / (ell - k)``
        for any ``k < ell``: ``ell = 2 k`` gives error ``<= ||A - A_k||_F**2 / k``.
    dtype : {numpy.float64, numpy.float32}

    Returns
    -------
    sketch : ndarray, shape (ell, d), zeros
    """
    d = check_positive_int(d, "d")
    ell = check_positive_int(ell, "ell", minimum=2)
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64, got {np.dtype(dtype)}.")
    return np.zeros((ell, d), dtype=dtype)


def fd_update(sketch, X) -> np.ndarray:
    """Fold rows into a Frequent Directions sketch.

    Parameters
    ----------
    sketch : array-like, shape (ell, d)
        Current sketch (not modified), e.g. from :func:`fd_init`.
    X : array-like, shape (N, d)
        New rows, finite; cast to the sketch dtype.

    Returns
    -------
    sketch : ndarray, shape (ell, d)
        Sketch of the old stream followed by ``X``; same dtype as the input sketch. Exact
        (the rows themselves) while at most ``ell`` non-zero rows have been seen.

    Notes
    -----
    A call that ends with more than ``ell`` rows in its buffer shrinks once more (one SVD of
    an ``(ell + b, d)`` buffer) to fit the fixed output shape, so feed rows in blocks: fed
    one row at a time, a full sketch costs one SVD every other row (Liberty's original
    rate) instead of one per ``ell`` rows.
    """
    b = _check_sketch(sketch, "sketch")
    x = check_float_array(X, "X", ndim=2)
    if x.shape[1] != b.shape[1]:
        raise ValueError(f"X must have {b.shape[1]} columns to match the sketch, got shape {x.shape}.")
    out = np.empty_like(b)
    _fd_combine(b, np.ascontiguousarray(x, dtype=b.dtype), out)
    return out


def fd_merge(a, b) -> np.ndarray:
    """Merge two sketches of disjoint streams (e.g. two devices).

    Parameters
    ----------
    a, b : array-like, shape (ell, d)
        Sketches with the same ``ell`` and ``d``.

    Returns
    -------
    sketch : ndarray, shape (ell, d)
        A sketch of the concatenated streams with the same error guarantee; float32 only
        when both inputs are float32.
    """
    a = _check_sketch(a, "a")
    b = _check_sketch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"cannot merge sketches of shapes {a.shape} and {b.shape}; both must be (ell, d).")
    dtype = np.float32 if a.dtype == b.dtype == np.float32 else np.float64
    a = a.astype(dtype, copy=False)
    out = np.empty_like(a)
    _fd_combine(a, b.astype(dtype, copy=False), out)
    return out


def fd_basis(sketch, k: int = 32) -> np.ndarray:
    """Top right singular vectors of a sketch: the shared projection basis.

    Parameters
    ----------
    sketch : array-like, shape (ell, d)
    k : int, default 32
        Wanted basis size, >= 1; clipped to ``min(ell, d)``.

    Returns
    -------
    basis : ndarray, shape (k', d)
        Orthonormal rows ordered by decreasing singular value, sign-fixed as in
        :func:`truncated_svd`; same dtype as the sketch.
    """
    b = _check_sketch(sketch, "sketch")
    k = check_positive_int(k, "k")
    k = min(k, b.shape[0], b.shape[1])
    u, _, vt = np.linalg.svd(b, full_matrices=False)
    u, vt = np.ascontiguousarray(u[:, :k]), np.ascontiguousarray(vt[:k])
    _svd_flip(u, vt)
    return vt


def project(X, basis, *, mean=None, scale=None) -> np.ndarray:
    """Project standardized rows onto a basis: ``((X - mean) / scale) @ basis.T``.

    Parameters
    ----------
    X : array-like, shape (N, d)
    basis : array-like, shape (k, d)
        E.g. from :func:`fd_basis` or the ``Vt`` of :func:`truncated_svd`.
    mean : array-like, shape (d,), optional
    scale : array-like, shape (d,), optional
        Strictly positive.

    Returns
    -------
    scores : ndarray, shape (N, k)
        float32 when ``X`` is float32, float64 otherwise.
    """
    v = check_float_array(basis, "basis", ndim=2)
    x = check_float_array(X, "X", ndim=2)
    if v.shape[1] != x.shape[1]:
        raise ValueError(f"basis must have shape (k, d) with d = X.shape[1] = {x.shape[1]}, got shape {v.shape}.")
    return transform(x, np.ascontiguousarray(v.T), mean=mean, scale=scale)
