"""On-device training of small classifiers on flat parameter vectors (SGD/Adam, FedProx, DP-SGD).

Models
------
``hidden == 0``: multinomial logistic regression, ``softmax(X @ W + b)``.
``hidden > 0``: one-hidden-layer MLP, ``softmax(relu(X @ W1 + b1) @ W2 + b2)``.

Parameter layout
----------------
All parameters live in one flat float64 vector so federated updates are plain arrays.
Blocks are concatenated in this order, each block flattened row-major (C order)::

    logistic regression:  W (d, c) | b (c,)                         P = d*c + c
    MLP:                  W1 (d, h) | b1 (h,) | W2 (h, c) | b2 (c,)   P = d*h + h + h*c + c

so ``W = params[:d*c].reshape(d, c)``, and for the MLP ``W1 = params[:d*h].reshape(d, h)``,
``b1 = params[d*h : d*h+h]``, ``W2 = params[d*h+h : d*h+h+h*c].reshape(h, c)``,
``b2 = params[-c:]``. The ONNX export reads this layout.

Objective
---------
``loss = mean_i CE(x_i, y_i) + (l2 / 2) * ||weights||^2 + (prox_mu / 2) * ||params - prox_center||^2``
where ``weights`` are the W blocks (biases are not penalized). :func:`loss_and_grad`
returns the first two terms; :func:`train` also adds the FedProx term [2]_.

DP-SGD
------
:func:`dp_sgd` runs ``steps`` steps of DP-SGD [1]_. Each step Poisson-samples the examples
(each independently with probability ``q``), computes every sampled example's gradient
exactly in a jitted loop, and hands the (B, P) gradients to the caller's ``release``
function, which clips each row to L2 norm ``C``, sums them and adds Gaussian noise: on a
device that is the record-level :class:`biofed.privacy_mechanism.PrivacyMechanism`, so no
privacy noise is drawn here. The noised sum is divided by the *expected* batch size
``q N`` (never the drawn one, which is private) and the data-independent L2 and prox
gradients are added after noising. Every step is then exactly the Poisson-subsampled
Gaussian mechanism ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` the accountant
composes ``steps`` times.

Training always computes in float64; ``X`` of any real dtype is converted.

References
----------
.. [1] M. Abadi et al., "Deep learning with differential privacy", CCS 2016. arXiv:1607.00133.
.. [2] T. Li et al., "Federated optimization in heterogeneous networks", MLSys 2020.
   arXiv:1812.06127.
.. [3] D. P. Kingma, J. Ba, "Adam: a method for stochastic optimization", ICLR 2015.
   arXiv:1412.6980.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numba import njit

from biofed.kernels._validation import (
    check_float_array,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)
from biofed.kernels.random_state import check_random_state

__all__ = [
    "OPTIMIZERS",
    "n_params",
    "init_params",
    "predict_proba",
    "loss_and_grad",
    "train",
    "dp_sgd",
    "clip_l2",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# jitted workers


@njit(cache=True, nogil=True)
def _softmax_rows(z):
    """Row-wise softmax of ``z`` (N, c) in place (max-shifted); returns log-sum-exp per row."""
    n, c = z.shape
    lse = np.empty(n)
    for i in range(n):
        zmax = z[i, 0]
        for k in range(1, c):
            zmax = max(zmax, z[i, k])
        total = 0.0
        for k in range(c):
            z[i, k] = np.exp(z[i, k] - zmax)
            total += z[i, k]
        for k in range(c):
            z[i, k] /= total
        lse[i] = zmax + np.log(total)
    return lse


@njit(cache=True, nogil=True)
def _forward(params, x, n_classes, hidden):
    """Class probabilities (N, c), hidden activations (N, h) (empty for logreg) and log-sum-exp (N,)."""
    n, d = x.shape
    c = n_classes
    if hidden == 0:
        w = params[: d * c].reshape((d, c))
        z = np.dot(x, w) + params[d * c : d * c + c]
        h_act = np.empty((n, 0))
    else:
        h = hidden
        w1 = params[: d * h].reshape((d, h))
        b1 = params[d * h : d * h + h]
        off = d * h + h
        w2 = params[off : off + h * c].reshape((h, c))
        b2 = params[off + h * c : off + h * c + c]
        h_act = np.dot(x, w1) + b1
        for i in range(n):
            for j in range(h):
                if h_act[i, j] < 0.0:
                    h_act[i, j] = 0.0
        z = np.dot(h_act, w2) + b2
    logits = z.copy()
    lse = _softmax_rows(z)  # z becomes the probabilities
    return z, h_act, lse, logits


@njit(cache=True, nogil=True)
def _loss_grad(params, x, y, n_classes, hidden, l2, weight_mask, grad):
    """Mean cross-entropy + (l2/2)||weights||^2 of the batch; gradient written into ``grad`` (P,)."""
    n, d = x.shape
    c = n_classes
    probs, h_act, lse, logits = _forward(params, x, n_classes, hidden)
    loss = 0.0
    for i in range(n):
        loss += lse[i] - logits[i, y[i]]
    loss /= n
    dz = probs / n
    for i in range(n):
        dz[i, y[i]] -= 1.0 / n
    if hidden == 0:
        grad[: d * c] = np.dot(x.T, dz).ravel()
        grad[d * c : d * c + c] = dz.sum(axis=0)
    else:
        h = hidden
        off = d * h + h
        w2 = params[off : off + h * c].reshape((h, c))
        grad[off : off + h * c] = np.dot(h_act.T, dz).ravel()
        grad[off + h * c : off + h * c + c] = dz.sum(axis=0)
        dh = np.dot(dz, w2.T)
        for i in range(n):
            for j in range(h):
                if h_act[i, j] <= 0.0:
                    dh[i, j] = 0.0
        grad[: d * h] = np.dot(x.T, dh).ravel()
        grad[d * h : off] = dh.sum(axis=0)
    if l2 > 0.0:
        penalty = 0.0
        for p in range(params.shape[0]):
            if weight_mask[p]:
                penalty += params[p] * params[p]
                grad[p] += l2 * params[p]
        loss += 0.5 * l2 * penalty
    return loss


@njit(cache=True, nogil=True)
def _per_example_grads(params, x, y, n_classes, hidden, out):
    """DP-SGD core: the cross-entropy gradient of every example, one row each.

    Parameters
    ----------
    params : ndarray, shape (P,)
    x : ndarray, shape (B, d), float64
    y : ndarray, shape (B,), int64
    n_classes, hidden : int
    out : ndarray, shape (B, P)
        Receives the gradients (overwritten).

    Returns
    -------
    loss_sum : float
        Sum of the per-example cross-entropies.
    """
    n, d = x.shape
    c = n_classes
    h = hidden
    z = np.empty(c)
    hid = np.empty(max(h, 1))
    dh = np.empty(max(h, 1))
    loss_sum = 0.0
    for i in range(n):
        # forward for one example
        if h == 0:
            for k in range(c):
                z[k] = params[d * c + k]
            for j in range(d):
                xij = x[i, j]
                for k in range(c):
                    z[k] += xij * params[j * c + k]
        else:
            off = d * h + h
            for j in range(h):
                hid[j] = params[d * h + j]
            for a in range(d):
                xia = x[i, a]
                for j in range(h):
                    hid[j] += xia * params[a * h + j]
            for j in range(h):
                if hid[j] < 0.0:
                    hid[j] = 0.0
            for k in range(c):
                z[k] = params[off + h * c + k]
            for j in range(h):
                hj = hid[j]
                for k in range(c):
                    z[k] += hj * params[off + j * c + k]
        zmax = z[0]
        for k in range(1, c):
            zmax = max(zmax, z[k])
        total = 0.0
        for k in range(c):
            total += np.exp(z[k] - zmax)
        lse = zmax + np.log(total)
        loss_sum += lse - z[y[i]]
        for k in range(c):
            z[k] = np.exp(z[k] - lse)  # z now holds dL/dz = p - onehot
        z[y[i]] -= 1.0
        g = out[i]
        # backward into g
        if h == 0:
            for j in range(d):
                xij = x[i, j]
                for k in range(c):
                    g[j * c + k] = xij * z[k]
            for k in range(c):
                g[d * c + k] = z[k]
        else:
            off = d * h + h
            for j in range(h):
                acc = 0.0
                for k in range(c):
                    g[off + j * c + k] = hid[j] * z[k]
                    acc += params[off + j * c + k] * z[k]
                dh[j] = acc if hid[j] > 0.0 else 0.0
            for k in range(c):
                g[off + h * c + k] = z[k]
            for a in range(d):
                xia = x[i, a]
                for j in range(h):
                    g[a * h + j] = xia * dh[j]
            for j in range(h):
                g[d * h + j] = dh[j]
    return loss_sum


@njit(cache=True, nogil=True)
def _apply_step(params, grad, l2, weight_mask, prox_mu, prox_center, use_adam, lr, m1, m2, step):
    """Add L2 and prox gradients, then one SGD or Adam update of ``params`` in place."""
    bc1 = 1.0 - ADAM_BETA1**step
    bc2 = 1.0 - ADAM_BETA2**step
    for p in range(params.shape[0]):
        g = grad[p]
        if l2 > 0.0 and weight_mask[p]:
            g += l2 * params[p]
        if prox_mu > 0.0:
            g += prox_mu * (params[p] - prox_center[p])
        if use_adam:
            m1[p] = ADAM_BETA1 * m1[p] + (1.0 - ADAM_BETA1) * g
            m2[p] = ADAM_BETA2 * m2[p] + (1.0 - ADAM_BETA2) * g * g
            params[p] -= lr * (m1[p] / bc1) / (np.sqrt(m2[p] / bc2) + ADAM_EPS)
        else:
            params[p] -= lr * g


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_model(d, n_classes, hidden) -> tuple[int, int, int]:
    d = check_positive_int(d, "d")
    n_classes = check_positive_int(n_classes, "n_classes", minimum=2)
    hidden = check_positive_int(hidden, "hidden", minimum=0)
    return d, n_classes, hidden


def _check_params(params, d: int, n_classes: int, hidden: int) -> np.ndarray:
    p = check_float_array(params, "params", ndim=1)
    expected = n_params(d, n_classes, hidden)
    if p.shape[0] != expected:
        raise ValueError(
            f"params has {p.shape[0]} entries but a model with d={d}, n_classes={n_classes}, "
            f"hidden={hidden} needs {expected}; create it with init_params(d, n_classes, hidden)."
        )
    return np.ascontiguousarray(p, dtype=np.float64)


def _check_x(X) -> np.ndarray:
    return np.ascontiguousarray(check_float_array(X, "X", ndim=2), dtype=np.float64)


def _check_labels(y, n_rows: int, n_classes: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"y must hold integer class labels in [0, n_classes), got dtype {arr.dtype}; "
            "map labels to integers first, e.g. np.unique(labels, return_inverse=True)[1]."
        )
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise ValueError(f"y must have shape ({n_rows},) to match X, got shape {arr.shape}.")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must lie in [0, {n_classes}) for n_classes={n_classes}, found label {bad}.")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _weight_mask(d: int, n_classes: int, hidden: int) -> np.ndarray:
    """True at the W entries of the layout (the L2-penalized ones), False at biases."""
    mask = np.zeros(n_params(d, n_classes, hidden), dtype=np.bool_)
    if hidden == 0:
        mask[: d * n_classes] = True
    else:
        mask[: d * hidden] = True
        off = d * hidden + hidden
        mask[off : off + hidden * n_classes] = True
    return mask


# ----------------------------------------------------------------------------------------------
# public API


def n_params(d: int, n_classes: int, hidden: int = 0) -> int:
    """Length of the flat parameter vector (layout in the module docstring).

    Parameters
    ----------
    d : int
        Input features, >= 1.
    n_classes : int
        Classes, >= 2.
    hidden : int, default 0
        Hidden units; 0 means logistic regression.

    Returns
    -------
    P : int
    """
    d, c, h = _check_model(d, n_classes, hidden)
    return d * c + c if h == 0 else d * h + h + h * c + c


def init_params(d: int, n_classes: int, hidden: int = 0, *, random_state=None) -> np.ndarray:
    """Initial parameters.

    Logistic regression starts at zero (the loss is convex; zero is the max-entropy
    model and needs no randomness). The MLP uses He-normal ``W1 ~ N(0, 2/d)``,
    ``W2 ~ N(0, 1/h)`` and zero biases.

    Parameters
    ----------
    d, n_classes, hidden : int
        Model shape, see :func:`n_params`.
    random_state : None, int or numpy.random.Generator

    Returns
    -------
    params : ndarray, shape (P,), float64
    """
    d, c, h = _check_model(d, n_classes, hidden)
    rng = check_random_state(random_state)
    params = np.zeros(n_params(d, c, h))
    if h > 0:
        params[: d * h] = rng.normal(0.0, math.sqrt(2.0 / d), d * h)
        off = d * h + h
        params[off : off + h * c] = rng.normal(0.0, math.sqrt(1.0 / h), h * c)
    return params


def predict_proba(params, X, n_classes: int, hidden: int = 0) -> np.ndarray:
    """Class probabilities.

    Parameters
    ----------
    params : array-like, shape (P,)
    X : array-like, shape (N, d)
    n_classes : int
    hidden : int, default 0

    Returns
    -------
    proba : ndarray, shape (N, n_classes), float64
        Rows sum to 1.
    """
    x = _check_x(X)
    d, c, h = _check_model(x.shape[1], n_classes, hidden)
    p = _check_params(params, d, c, h)
    probs, _, _, _ = _forward(p, x, c, h)
    return probs


def loss_and_grad(params, X, y, n_classes: int, hidden: int = 0, *, l2: float = 0.0) -> tuple[float, np.ndarray]:
    """Mean cross-entropy (+ L2 on the weights) and its gradient.

    Parameters
    ----------
    params : array-like, shape (P,)
    X : array-like, shape (N, d)
    y : array-like of int, shape (N,)
        Labels in ``[0, n_classes)``.
    n_classes : int
    hidden : int, default 0
    l2 : float, default 0.0
        Adds ``(l2 / 2) * ||weights||^2`` (biases excluded).

    Returns
    -------
    loss : float
    grad : ndarray, shape (P,), float64
    """
    x = _check_x(X)
    d, c, h = _check_model(x.shape[1], n_classes, hidden)
    p = _check_params(params, d, c, h)
    labels = _check_labels(y, x.shape[0], c)
    l2 = check_nonnegative_float(l2, "l2")
    grad = np.empty_like(p)
    loss = _loss_grad(p, x, labels, c, h, l2, _weight_mask(d, c, h), grad)
    return float(loss), grad


def clip_l2(vector, max_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``vector`` down to L2 norm ``max_norm`` if it is longer.

    Parameters
    ----------
    vector : array-like, shape (P,)
    max_norm : float
        > 0.

    Returns
    -------
    clipped : ndarray, shape (P,)
        ``vector * min(1, max_norm / ||vector||)``; float32 stays float32.
    norm : float
        The L2 norm before clipping.
    """
    v = check_float_array(vector, "vector", ndim=1)
    max_norm = check_positive_float(max_norm, "max_norm")
    norm = float(np.linalg.norm(v))
    if norm <= max_norm:
        return v.copy(), norm
    return (v * (max_norm / norm)).astype(v.dtype, copy=False), norm


def train(
    params,
    X,
    y,
    n_classes: int,
    hidden: int = 0,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    optimizer: str = "sgd",
    l2: float = 0.0,
    prox_mu: float = 0.0,
    prox_center=None,
    random_state=None,
) -> tuple[np.ndarray, float]:
    """Minibatch training from ``params`` (not modified); optional FedProx (DP-SGD: :func:`dp_sgd`).

    Parameters
    ----------
    params : array-like, shape (P,)
        Starting point, e.g. the global model of the round.
    X : array-like, shape (N, d)
    y : array-like of int, shape (N,)
        Labels in ``[0, n_classes)``.
    n_classes : int
    hidden : int, default 0
    epochs : int, default 1
        Passes over the data, each with a fresh shuffle.
    batch_size : int, default 32
        Minibatch size; the last batch of an epoch may be smaller.
    lr : float, default 0.05
        Step size, > 0.
    optimizer : {"sgd", "adam"}
        Plain SGD, or Adam [3]_ with beta1 = 0.9, beta2 = 0.999, eps = 1e-8 (state is
        local to this call).
    l2 : float, default 0.0
        Weight decay coefficient of ``(l2 / 2) ||weights||^2``.
    prox_mu : float, default 0.0
        FedProx coefficient of ``(prox_mu / 2) ||params - prox_center||^2``.
    prox_center : array-like, shape (P,), optional
        Required when ``prox_mu > 0`` (normally the global model).
    random_state : None, int or numpy.random.Generator
        Drives the shuffles; a fixed seed reproduces the run exactly.

    Returns
    -------
    params : ndarray, shape (P,), float64
        Trained parameters.
    mean_loss : float
        Mean cross-entropy (no penalty terms) over the examples of the last epoch, each
        batch evaluated just before its update.
    """
    x, labels, p, d, c, h, center, lr, l2, prox_mu = _check_training(
        params, X, y, n_classes, hidden, optimizer, lr, l2, prox_mu, prox_center
    )
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    rng = check_random_state(random_state)

    n = x.shape[0]
    mask = _weight_mask(d, c, h)
    grad = np.empty_like(p)
    m1 = np.zeros_like(p)
    m2 = np.zeros_like(p)
    use_adam = optimizer == "adam"
    step = 0
    epoch_loss = 0.0
    for _ in range(epochs):
        order = rng.permutation(n)
        epoch_loss = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch_loss = _loss_grad(p, x[idx], labels[idx], c, h, 0.0, mask, grad)
            epoch_loss += batch_loss * idx.shape[0]
            step += 1
            _apply_step(p, grad, l2, mask, prox_mu, center, use_adam, lr, m1, m2, step)
        _check_finite(p, lr)
    return p, float(epoch_loss / n)


def dp_sgd(
    params,
    X,
    y,
    n_classes: int,
    hidden: int = 0,
    *,
    steps: int,
    sampling_rate: float,
    release: Callable[[np.ndarray], np.ndarray],
    lr: float = 0.05,
    optimizer: str = "sgd",
    l2: float = 0.0,
    prox_mu: float = 0.0,
    prox_center=None,
    random_state=None,
) -> tuple[np.ndarray, float]:
    """Record-level DP-SGD from ``params`` (not modified): Poisson-sampled steps, noise by ``release``.

    Parameters
    ----------
    params, X, y, n_classes, hidden, lr, optimizer, l2, prox_mu, prox_center
        As in :func:`train`.
    steps : int
        Number of DP-SGD steps (>= 1); each is one ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.
    sampling_rate : float
        q in (0, 1]: probability that each example is in a step's batch.
    release : callable
        ``release(grads)`` with ``grads`` of shape (B, P) (B may be 0) returns the (P,) sum
        of the rows clipped to the clip norm plus Gaussian noise of std ``z C``. Called
        once per step.
    random_state : None, int or numpy.random.Generator
        Drives the Poisson sampling (None: OS entropy; the sample must stay secret for the
        amplification by sampling to hold).

    Returns
    -------
    params : ndarray, shape (P,), float64
    mean_loss : float
        Mean cross-entropy of the sampled examples over all steps (before each update);
        nan when no example was ever sampled.
    """
    x, labels, p, d, c, h, center, lr, l2, prox_mu = _check_training(
        params, X, y, n_classes, hidden, optimizer, lr, l2, prox_mu, prox_center
    )
    steps = check_positive_int(steps, "steps")
    q = float(sampling_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(
            f"sampling_rate must be in (0, 1] (the Poisson rate of each example per step), got {sampling_rate!r}."
        )
    if not callable(release):
        raise TypeError(
            f"release must be a callable (grads (B, P) -> noised clipped sum (P,)), got {type(release).__name__}."
        )
    rng = check_random_state(random_state)
    n = x.shape[0]
    expected_batch = q * n
    mask = _weight_mask(d, c, h)
    m1 = np.zeros_like(p)
    m2 = np.zeros_like(p)
    use_adam = optimizer == "adam"
    loss_sum, sampled = 0.0, 0
    for step in range(1, steps + 1):
        idx = np.flatnonzero(rng.random(n) < q)
        grads = np.empty((idx.shape[0], p.shape[0]))
        if idx.shape[0]:
            loss_sum += _per_example_grads(p, x[idx], labels[idx], c, h, grads)
            sampled += idx.shape[0]
        noised = np.asarray(release(grads), dtype=np.float64)
        if noised.shape != p.shape:
            raise ValueError(f"release returned shape {noised.shape}, expected {p.shape}.")
        grad = noised / expected_batch
        _apply_step(p, grad, l2, mask, prox_mu, center, use_adam, lr, m1, m2, step)
    _check_finite(p, lr)
    return p, float(loss_sum / sampled) if sampled else math.nan


def _check_training(params, X, y, n_classes, hidden, optimizer, lr, l2, prox_mu, prox_center):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
    x = _check_x(X)
    d, c, h = _check_model(x.shape[1], n_classes, hidden)
    p = _check_params(params, d, c, h).copy()
    labels = _check_labels(y, x.shape[0], c)
    lr = check_positive_float(lr, "lr")
    l2 = check_nonnegative_float(l2, "l2")
    prox_mu = check_nonnegative_float(prox_mu, "prox_mu")
    if prox_mu > 0:
        if prox_center is None:
            raise ValueError("prox_mu > 0 needs prox_center (the global model the FedProx term pulls toward).")
        center = _check_params(prox_center, d, c, h)
    else:
        center = np.zeros(0)
    return x, labels, p, d, c, h, center, lr, l2, prox_mu


def _check_finite(p: np.ndarray, lr: float) -> None:
    if not np.all(np.isfinite(p)):
        raise FloatingPointError(
            f"training diverged (non-finite parameters after epoch with lr={lr}); lower lr or standardize X."
        )
