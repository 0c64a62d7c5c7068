"""transform, streaming moments, truncated SVD and Frequent Directions against naive_linalg.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive_linalg as naive
from biofed.kernels import (
    Moments,
    apply_transform,
    band_powers,
    fd_basis,
    fd_init,
    fd_merge,
    fd_update,
    moments_init,
    moments_merge,
    moments_scale,
    moments_update,
    project,
    sliding_windows,
    svd_compress,
    transform,
    transform_matrix,
    transform_plan,
    truncated_svd,
)
from biofed.kernels.svd import _auto_method


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


def low_rank_plus_noise(rng, n, d, *, rank=12, noise=0.05):
    """Decaying rank-``rank`` signal plus white noise and a slowly decaying background."""
    signal = (rng.standard_normal((n, rank)) * np.geomspace(10, 1, rank)) @ rng.standard_normal((rank, d))
    background = rng.standard_normal((n, d)) * np.exp(-np.arange(d) / 40.0)
    return signal / np.sqrt(d) + 0.3 * background + noise * rng.standard_normal((n, d))


# --------------------------------------------------------------------------------------------
# transform


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "with_mean, with_scale, with_bias",
    [(False, False, False), (True, True, True), (True, False, True), (False, True, False)],
)
def test_transform_matches_numpy(rng, activation, dtype, with_mean, with_scale, with_bias):
    x = (rng.standard_normal((70, 9)) * 3 + 5).astype(dtype)
    w = rng.standard_normal((9, 4)).astype(dtype)
    bias = rng.standard_normal(4) if with_bias else None
    mean = x.mean(axis=0) if with_mean else None
    scale = x.std(axis=0) if with_scale else None
    out = transform(x, w, bias, mean=mean, scale=scale, activation=activation)
    assert out.dtype == dtype and out.shape == (70, 4)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, naive.transform(x, w, bias, mean, scale, activation), rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [1, 7, 5000])
def test_transform_plan_equals_one_call(rng, n):
    x = rng.standard_normal((n, 12)) * 3 + 1
    w, bias = rng.standard_normal((12, 5)), rng.standard_normal(5)
    mean, scale = rng.standard_normal(12), rng.uniform(0.5, 2.0, 12)
    plan = transform_plan(w, bias, mean=mean, scale=scale, activation="tanh")
    for dtype in (np.float64, np.float32):
        out = apply_transform(x.astype(dtype), plan)
        assert out.dtype == dtype and out.shape == (n, 5)
        np.testing.assert_array_equal(
            out, transform(x.astype(dtype), w, bias, mean=mean, scale=scale, activation="tanh")
        )
    np.testing.assert_allclose(
        apply_transform(x, plan), naive.transform(x, w, bias, mean, scale, "tanh"), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(
        ValueError, match=r"features must have 12 columns to match the plan's weights \(d, m\) = \(12, 5\)"
    ):
        apply_transform(np.ones((2, 11)), plan)
    with pytest.raises(ValueError, match="features contains 1 NaN"):
        apply_transform(np.r_[np.ones(11), np.nan].reshape(1, 12), plan)
    with pytest.raises(TypeError, match="plan must be a TransformPlan"):
        apply_transform(x, (w, bias))
    # the kernel's own finiteness check, in a later row block and without standardization
    bad = np.ones((5000, 12), dtype=np.float32)
    bad[4321, 7] = np.inf
    for p in (plan, transform_plan(w)):
        with pytest.raises(
            ValueError, match=r"features contains 1 NaN or inf value\(s\), the first at index \(4321, 7\)"
        ):
            apply_transform(bad, p)
    with pytest.raises(ValueError, match="scale must be strictly positive"):
        transform_plan(w, scale=np.zeros(12))
    assert not plan.weights[0].flags.writeable


def test_transform_spans_several_row_blocks_and_large_logits(rng):
    x = rng.standard_normal((9000, 3)) * 400  # > one 4096-row block; sigmoid saturates both ways
    w = rng.standard_normal((3, 2))
    for activation in ("sigmoid", "relu"):
        out = transform(x, w, np.ones(2), mean=np.ones(3), scale=np.full(3, 2.0), activation=activation)
        np.testing.assert_allclose(
            out, naive.transform(x, w, np.ones(2), np.ones(3), np.full(3, 2.0), activation), rtol=1e-12, atol=1e-300
        )
        assert np.all(np.isfinite(out))


def test_transform_integer_and_non_contiguous_input(rng):
    x = rng.integers(-5, 5, size=(20, 24))
    w = rng.standard_normal((24, 3))[::2]  # non-contiguous weights
    out = transform(x[:, ::2], w, activation="tanh")  # non-contiguous integer features
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, np.tanh(x[:, ::2] @ w), rtol=1e-12)


def test_transform_matrix_is_plain_product(rng):
    x = rng.standard_normal((15, 7)).astype(np.float32)
    w = rng.standard_normal((7, 5)).astype(np.float32)
    out = transform_matrix(x, w)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"weights": np.ones((4, 2))},
            ValueError,
            r"weights must have shape \(d, m\) with d = features.shape\[1\] = 3",
        ),
        ({"bias": np.ones(3)}, ValueError, r"bias must have shape \(2,\)"),
        ({"mean": np.ones(2)}, ValueError, r"mean must have shape \(3,\)"),
        ({"scale": np.array([1.0, 0.0, 1.0])}, ValueError, r"scale must be strictly positive, got scale\[1\]"),
        ({"activation": "softplus"}, ValueError, "unknown activation 'softplus'"),
        ({"features": np.array([[1.0, np.nan, 0.0]])}, ValueError, "features contains 1 NaN or inf"),
        ({"features": np.ones(3)}, ValueError, "features must be 2-D"),
        ({"weights": np.ones((3, 2), dtype=complex)}, TypeError, "weights must be a real numeric array"),
    ],
)
def test_transform_bad_input(kwargs, error, match):
    args = {"features": np.ones((5, 3)), "weights": np.ones((3, 2))} | kwargs
    features, weights = args.pop("features"), args.pop("weights")
    with pytest.raises(error, match=match):
        transform(features, weights, **args)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 12),
    m=st.integers(1, 6),
    dtype=st.sampled_from([np.float32, np.float64]),
    activation=st.sampled_from(["identity", "relu", "tanh", "sigmoid"]),
    seed=st.integers(0, 2**16),
)
def test_transform_properties(n, d, m, dtype, activation, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, d)).astype(dtype)
    w = r.standard_normal((d, m)).astype(dtype)
    out = transform(
        x, w, r.standard_normal(m), mean=r.standard_normal(d), scale=r.uniform(0.5, 2, d), activation=activation
    )
    assert out.shape == (n, m) and out.dtype == dtype and np.all(np.isfinite(out))
    if activation in ("relu", "sigmoid"):
        assert out.min() >= 0
    if activation in ("tanh", "sigmoid"):
        assert out.max() <= 1


# --------------------------------------------------------------------------------------------
# moments


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_chunks_and_merge_equal_whole(rng, dtype):
    x = (rng.standard_normal((1000, 6)) * [1, 10, 1e-3, 5, 1, 2] + [0, 1e4, 3, -7, 0, 1]).astype(dtype)
    cuts = np.sort(rng.choice(np.arange(1, 1000), size=12, replace=False))
    chunks = np.split(x, cuts)
    sequential = moments_init(6)
    for chunk in chunks:
        sequential = moments_update(sequential, chunk)
    # Tree merge of per-chunk moments (as devices would do).
    parts = [moments_update(moments_init(6), chunk) for chunk in chunks]
    while len(parts) > 1:
        parts = [
            moments_merge(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)
        ]
    x64 = x.astype(np.float64)
    for m in (sequential, parts[0]):
        assert isinstance(m, Moments) and m.count == 1000
        np.testing.assert_allclose(m.mean, x64.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.m2 / m.count, x64.var(axis=0), rtol=1e-10)
        np.testing.assert_allclose(moments_scale(m), x64.std(axis=0), rtol=1e-10)


def test_moments_single_row_merge_with_empty_and_constant_column():
    m = moments_update(moments_init(3), [0.1, 2.0, 3.0])
    assert m.count == 1 and np.all(m.m2 == 0)
    merged = moments_merge(moments_init(3), m)
    np.testing.assert_array_equal(merged.mean, m.mean)
    const = moments_update(moments_init(2), np.tile([0.1, 5.0], (7, 1)))
    for _ in range(3):
        const = moments_merge(const, moments_update(moments_init(2), np.tile([0.1, 5.0], (3, 1))))
    np.testing.assert_array_equal(moments_scale(const), [1.0, 1.0])


def test_moments_inputs_are_not_modified(rng):
    m = moments_update(moments_init(2), rng.standard_normal((5, 2)))
    before = (m.mean.copy(), m.m2.copy())
    moments_update(m, rng.standard_normal((5, 2)))
    np.testing.assert_array_equal(m.mean, before[0])
    np.testing.assert_array_equal(m.m2, before[1])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: moments_init(0), ValueError, "d must be >= 1"),
        (lambda: moments_update(moments_init(3), np.ones((4, 2))), ValueError, "X must have 3 columns"),
        (lambda: moments_update(moments_init(2), [[1.0, np.nan]]), ValueError, "X contains 1 NaN or inf"),
        (
            lambda: moments_merge(moments_init(2), moments_init(3)),
            ValueError,
            "cannot merge moments over 2 and 3 features",
        ),
        (lambda: moments_scale(moments_init(2)), ValueError, r"moments hold no rows \(count == 0\)"),
        (
            lambda: moments_update((1.0, np.zeros(2)), np.ones((1, 2))),
            TypeError,
            r"m must be a Moments\(count, mean, m2\)",
        ),
        (
            lambda: moments_scale(Moments(-1.0, np.zeros(2), np.zeros(2))),
            ValueError,
            "m.count must be a finite number >= 0",
        ),
        (lambda: moments_scale(Moments(2.0, np.zeros(2), -np.ones(2))), ValueError, "m.m2 holds negative"),
    ],
)
def test_moments_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------------
# truncated SVD


def check_svd(x, k, u, s, vt, *, ratio=1.01):
    kk = min(k, *x.shape)
    assert u.shape == (x.shape[0], kk) and s.shape == (kk,) and vt.shape == (kk, x.shape[1])
    atol = 1e-4 if u.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(u.T.astype(float) @ u, np.eye(kk), atol=atol)
    np.testing.assert_allclose(vt.astype(float) @ vt.T, np.eye(kk), atol=atol)
    assert np.all(np.diff(s) <= 0)
    rows = np.arange(kk)
    assert np.all(vt[rows, np.argmax(np.abs(vt), axis=1)] > 0)  # sign convention
    optimal = naive.optimal_rank_k_error(x, kk)
    assert naive.reconstruction_error(x, u, s, vt) <= ratio * optimal + 1e-9 * np.linalg.norm(x)


@pytest.mark.parametrize("method", ["auto", "eigh", "randomized"])
@pytest.mark.parametrize("shape", [(600, 80), (60, 300), (900, 700)])
def test_truncated_svd_matches_numpy(rng, method, shape):
    x = low_rank_plus_noise(rng, *shape)
    u, s, vt = truncated_svd(x, 16, method=method, random_state=0)
    check_svd(x, 16, u, s, vt)
    s_ref = np.linalg.svd(x, compute_uv=False)[:16]
    randomized = method == "randomized" or (method == "auto" and _auto_method(*shape) == "randomized")
    # The 12 signal components are exact either way; randomized subspace iteration estimates the
    # flat noise floor behind them (components 13-16) to within a fraction of a percent.
    np.testing.assert_allclose(s[:12], s_ref[:12], rtol=1e-6 if randomized else 1e-9)
    np.testing.assert_allclose(s, s_ref, rtol=1e-2 if randomized else 1e-9)


def test_auto_method_rule():
    assert _auto_method(1024, 256) == "eigh"
    assert _auto_method(20000, 512) == "eigh"
    assert _auto_method(256, 1024) == "eigh"
    assert _auto_method(5000, 1024) == "eigh"
    assert _auto_method(2048, 1024) == "randomized"
    assert _auto_method(900, 700) == "randomized"
    assert _auto_method(100, 5000) == "eigh"


def test_truncated_svd_float32_and_determinism(rng):
    x = low_rank_plus_noise(rng, 300, 50).astype(np.float32)
    for method in ("eigh", "randomized"):
        u, s, vt = truncated_svd(x, 8, method=method, random_state=3)
        assert u.dtype == s.dtype == vt.dtype == np.float32
        check_svd(x, 8, u, s, vt)
        again = truncated_svd(x, 8, method=method, random_state=3)
        for a, b in zip((u, s, vt), again):
            np.testing.assert_array_equal(a, b)
    gen_a = truncated_svd(x, 8, method="randomized", random_state=np.random.default_rng(5))
    gen_b = truncated_svd(x, 8, method="randomized", random_state=np.random.default_rng(5))
    np.testing.assert_array_equal(gen_a[2], gen_b[2])


@pytest.mark.parametrize("method", ["eigh", "randomized"])
def test_truncated_svd_k_beyond_rank_and_shape(rng, method):
    x = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 25))  # rank 3
    u, s, vt = truncated_svd(x, 10, method=method, random_state=0)
    check_svd(x, 10, u, s, vt)
    np.testing.assert_allclose(s[3:], 0, atol=1e-10 * s[0])
    u, s, vt = truncated_svd(x, 100, method=method, random_state=0)  # k > min(N, d) = 25
    assert s.shape == (25,)
    np.testing.assert_allclose((u * s) @ vt, x, atol=1e-10 * np.abs(x).max())


def test_svd_compress_is_u_times_s(rng):
    x = low_rank_plus_noise(rng, 200, 30)
    u, s, vt = truncated_svd(x, 5, random_state=0)
    np.testing.assert_allclose(svd_compress(x, 5), u * s, rtol=1e-12)
    np.testing.assert_allclose(svd_compress(x, 5), x @ vt.T, rtol=1e-9, atol=1e-12)


def eeg_like(rng, n_channels, n_samples, fs):
    """Synthetic twin of a resting EEG crop: 1/f background, waxing alpha, line noise, offsets."""
    pink = np.cumsum(rng.standard_normal((n_channels, n_samples)), axis=1) * 0.05
    pink -= np.linspace(0, 1, n_samples) * pink[:, -1:]
    t = np.arange(n_samples) / fs
    alpha = rng.uniform(0.5, 2, (n_channels, 1)) * np.sin(2 * np.pi * 10.2 * t) * (1 + np.sin(2 * np.pi * 0.2 * t))
    return (pink + alpha + 0.3 * np.sin(2 * np.pi * 50 * t) + rng.standard_normal((n_channels, 1))) * 1e-5


@pytest.fixture(scope="module")
def eegmat_rest(shared_datasets):
    mne = pytest.importorskip("mne")
    raw = mne.io.read_raw_edf(shared_datasets / "eegmat" / "Subject02_1.edf", preload=False, verbose="error")
    picks = [name for name in raw.ch_names if name not in ("EEG A2-A1", "ECG ECG")]
    assert len(picks) == 19 and raw.info["sfreq"] == 500.0
    return raw.get_data(picks=picks, start=0, stop=30000)  # 60 s


def eeg_matrices(x, fs):
    """Two realistic SVD inputs: log band-power features of 1 s windows, and raw delay-embedded samples."""
    windows = sliding_windows(x, int(fs), int(fs) // 4)
    features = np.log10(band_powers(windows, fs).reshape(windows.shape[0], -1))
    embedded = sliding_windows(x[:, :5000], 600, 20).reshape(-1, 600)
    return features, embedded


@pytest.mark.parametrize("source", ["real", "synthetic"])
@pytest.mark.slow
def test_truncated_svd_on_eeg(request, source):
    if source == "real":
        x = request.getfixturevalue("eegmat_rest")
    else:
        x = eeg_like(np.random.default_rng(7), 19, 30000, 500.0)
    features, embedded = eeg_matrices(x, 500.0)
    assert features.shape == (237, 95) and embedded.shape == (19 * 221, 600)
    features = features - features.mean(axis=0)
    for matrix, k in ((features, 32), (embedded, 32)):
        for method in ("auto", "randomized"):
            u, s, vt = truncated_svd(matrix, k, method=method, random_state=0)
            check_svd(matrix, k, u, s, vt)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: truncated_svd(np.ones((5, 4)), 0), ValueError, "k must be >= 1"),
        (lambda: truncated_svd(np.ones((5, 4)), 2.5), TypeError, "k must be an integer"),
        (lambda: truncated_svd(np.ones(5)), ValueError, "X must be 2-D"),
        (lambda: truncated_svd(np.array([[1.0, np.inf]])), ValueError, "X contains 1 NaN or inf"),
        (lambda: truncated_svd(np.ones((5, 4)), method="lanczos"), ValueError, "unknown method 'lanczos'"),
        (lambda: truncated_svd(np.ones((5, 4)), n_power_iter=-1), ValueError, "n_power_iter must be >= 0"),
        (lambda: truncated_svd(np.ones((5, 4)), random_state="seed"), TypeError, "random_state must be None"),
        (lambda: truncated_svd(np.ones((5, 4)), random_state=-3), ValueError, "random_state must be >= 0"),
        (lambda: svd_compress(np.ones((5, 4)), k=0), ValueError, "k must be >= 1"),
    ],
)
def test_truncated_svd_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 30),
    d=st.integers(1, 30),
    k=st.integers(1, 40),
    dtype=st.sampled_from([np.float32, np.float64]),
    method=st.sampled_from(["eigh", "randomized"]),
    seed=st.integers(0, 2**16),
)
def test_truncated_svd_properties(n, d, k, dtype, method, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)
    u, s, vt = truncated_svd(x, k, method=method, random_state=seed)
    kk = min(k, n, d)
    assert u.shape == (n, kk) and s.shape == (kk,) and vt.shape == (kk, d)
    assert u.dtype == s.dtype == vt.dtype == dtype
    assert np.all(s >= 0)
    if kk == min(n, d):  # full rank kept: exact reconstruction
        tol = 1e-3 if dtype == np.float32 else 1e-9
        np.testing.assert_allclose((u * s) @ vt, x, atol=tol * max(1.0, np.abs(x).max()))


# --------------------------------------------------------------------------------------------
# Frequent Directions


@pytest.fixture
def stream(rng):
    return low_rank_plus_noise(rng, 3000, 40, rank=10, noise=0.2)


def test_fd_liberty_bound_chunks_and_merge(rng, stream):
    ell = 16
    chunked = fd_init(40, ell)
    for chunk in np.array_split(stream, 23):
        chunked = fd_update(chunked, chunk)
    half = stream.shape[0] // 2
    merged = fd_merge(fd_update(fd_init(40, ell), stream[:half]), fd_update(fd_init(40, ell), stream[half:]))
    for sketch in (chunked, merged):
        assert sketch.shape == (ell, 40)
        err, min_eig = naive.covariance_error(stream, sketch)
        assert min_eig >= -1e-9 * np.linalg.norm(stream) ** 2  # B^T B <= A^T A
        for k in range(ell):
            assert err <= naive.liberty_bound(stream, k, ell) * (1 + 1e-9)


def test_fd_exact_until_ell_rows_and_input_untouched(rng):
    x = rng.standard_normal((10, 6))
    empty = fd_init(6, 12)
    sketch = fd_update(empty, x)
    assert not empty.any()
    np.testing.assert_array_equal(sketch[:10], x)
    assert not sketch[10:].any()
    err, _ = naive.covariance_error(x, fd_update(fd_init(6, 4), x))  # d = 6 > ell: lossy
    assert err <= naive.liberty_bound(x, 0, 4) * (1 + 1e-9)


def test_fd_memory_is_bounded_and_float32_kept(rng):
    sketch = fd_init(20, 8, dtype=np.float32)
    for _ in range(50):
        sketch = fd_update(sketch, rng.standard_normal((200, 20)))
        assert sketch.shape == (8, 20) and sketch.dtype == np.float32
    assert np.count_nonzero(np.any(sketch != 0, axis=1)) <= 8


def test_fd_narrow_stream_is_exact(rng):
    x = rng.standard_normal((500, 5))  # d < ell: the sketch keeps the whole covariance
    sketch = fd_update(fd_init(5, 8), x)
    np.testing.assert_allclose(sketch.T @ sketch, x.T @ x, rtol=1e-10, atol=1e-9)


def test_fd_basis_orthonormal_and_close_to_true_subspace(rng, stream):
    sketch = fd_update(fd_init(40, 32), stream)
    basis = fd_basis(sketch, 5)
    assert basis.shape == (5, 40)
    np.testing.assert_allclose(basis @ basis.T, np.eye(5), atol=1e-12)
    _, _, vt = truncated_svd(stream, 5)
    cosines = np.linalg.svd(basis @ vt.T, compute_uv=False)  # principal angles
    assert cosines.min() > 0.99
    assert fd_basis(sketch, 100).shape == (32, 40)


def test_project_matches_naive(rng):
    x = rng.standard_normal((30, 8)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((8, 3)))[0].T
    mean, scale = rng.standard_normal(8), rng.uniform(0.5, 2, 8)
    out = project(x, basis, mean=mean, scale=scale)
    assert out.dtype == np.float32 and out.shape == (30, 3)
    np.testing.assert_allclose(out, naive.project(x, basis, mean, scale), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(project(x.astype(float), basis), naive.project(x, basis), rtol=1e-12)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fd_init(0), ValueError, "d must be >= 1"),
        (lambda: fd_init(5, ell=1), ValueError, "ell must be >= 2"),
        (lambda: fd_init(5, dtype=np.int64), TypeError, "dtype must be numpy.float32 or numpy.float64"),
        (lambda: fd_update(fd_init(5, 4), np.ones((3, 6))), ValueError, "X must have 5 columns"),
        (lambda: fd_update(fd_init(5, 4), np.full((3, 5), np.nan)), ValueError, "X contains 15 NaN"),
        (lambda: fd_update(np.ones((1, 5)), np.ones((3, 5))), ValueError, "sketch must have at least 2 rows"),
        (
            lambda: fd_merge(fd_init(5, 4), fd_init(5, 6)),
            ValueError,
            r"cannot merge sketches of shapes \(4, 5\) and \(6, 5\)",
        ),
        (lambda: fd_basis(fd_init(5, 4), k=0), ValueError, "k must be >= 1"),
        (
            lambda: project(np.ones((3, 5)), np.ones((2, 4))),
            ValueError,
            r"basis must have shape \(k, d\) with d = X.shape\[1\] = 5",
        ),
        (lambda: project(np.ones((3, 2)), np.eye(2), scale=[1.0, -1.0]), ValueError, "scale must be strictly positive"),
    ],
)
def test_fd_and_project_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
