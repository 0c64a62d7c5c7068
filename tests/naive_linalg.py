"""Slow, obvious NumPy references for the linear-algebra and training kernels."""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------------------------
# transform / project


def activation(z, name):
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0)
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))
    raise AssertionError(name)


def transform(x, w, bias=None, mean=None, scale=None, act="identity"):
    x = np.asarray(x, dtype=np.float64)
    if mean is not None:
        x = x - mean
    if scale is not None:
        x = x / scale
    z = x @ np.asarray(w, dtype=np.float64)
    if bias is not None:
        z = z + bias
    return activation(z, act)


def project(x, basis, mean=None, scale=None):
    x = np.asarray(x, dtype=np.float64)
    if mean is not None:
        x = x - mean
    if scale is not None:
        x = x / scale
    return x @ np.asarray(basis, dtype=np.float64).T


# ----------------------------------------------------------------------------------------------
# SVD / sketches


def optimal_rank_k_error(x, k):
    """Eckart-Young: Frobenius error of the best rank-k approximation, sqrt(sum of tail sigma^2)."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[k:] ** 2)))


def reconstruction_error(x, u, s, vt):
    x = np.asarray(x, dtype=np.float64)
    return float(np.linalg.norm(x - (u.astype(np.float64) * s.astype(np.float64)) @ vt.astype(np.float64)))


def covariance_error(a, b):
    """||A^T A - B^T B||_2 and the smallest eigenvalue of A^T A - B^T B."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff = a.T @ a - b.T @ b
    eig = np.linalg.eigvalsh(diff)
    return float(np.max(np.abs(eig))), float(eig[0])


def liberty_bound(a, k, ell):
    """||A - A_k||_F^2 / (ell - k) (Liberty 2013; Ghashami et al. 2016, Theorem 1.1)."""
    return optimal_rank_k_error(a, k) ** 2 / (ell - k)


# ----------------------------------------------------------------------------------------------
# training


def unpack(params, d, c, h):
    if h == 0:
        return params[: d * c].reshape(d, c), params[d * c :]
    w1 = params[: d * h].reshape(d, h)
    b1 = params[d * h : d * h + h]
    off = d * h + h
    w2 = params[off : off + h * c].reshape(h, c)
    b2 = params[off + h * c :]
    return w1, b1, w2, b2


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(params, x, c, h):
    parts = unpack(params, x.shape[1], c, h)
    if h == 0:
        w, b = parts
        return softmax(x @ w + b)
    w1, b1, w2, b2 = parts
    return softmax(np.maximum(x @ w1 + b1, 0) @ w2 + b2)


def example_loss_and_grad(params, xi, yi, c, h):
    """Cross-entropy of one example and its gradient, written out layer by layer."""
    d = xi.shape[0]
    onehot = np.zeros(c)
    onehot[yi] = 1.0
    if h == 0:
        w, b = unpack(params, d, c, h)
        p = softmax((xi @ w + b)[None, :])[0]
        dz = p - onehot
        return -np.log(p[yi]), np.concatenate([np.outer(xi, dz).ravel(), dz])
    w1, b1, w2, b2 = unpack(params, d, c, h)
    pre = xi @ w1 + b1
    hid = np.maximum(pre, 0)
    p = softmax((hid @ w2 + b2)[None, :])[0]
    dz = p - onehot
    dh = (w2 @ dz) * (pre > 0)
    grad = np.concatenate([np.outer(xi, dh).ravel(), dh, np.outer(hid, dz).ravel(), dz])
    return -np.log(p[yi]), grad


def weight_mask(d, c, h):
    if h == 0:
        return np.concatenate([np.ones(d * c), np.zeros(c)]).astype(bool)
    return np.concatenate([np.ones(d * h), np.zeros(h), np.ones(h * c), np.zeros(c)]).astype(bool)


def loss_and_grad(params, x, y, c, h, l2=0.0):
    losses, grads = zip(*(example_loss_and_grad(params, x[i], y[i], c, h) for i in range(x.shape[0])))
    mask = weight_mask(x.shape[1], c, h)
    loss = np.mean(losses) + 0.5 * l2 * np.sum(params[mask] ** 2)
    grad = np.mean(grads, axis=0) + l2 * params * mask
    return loss, grad


def clip(v, max_norm):
    norm = np.linalg.norm(v)
    return v * min(1.0, max_norm / norm) if norm > 0 else v


def clipped_grad_sum(params, x, y, c, h, max_norm):
    return sum(clip(example_loss_and_grad(params, x[i], y[i], c, h)[1], max_norm) for i in range(x.shape[0]))
