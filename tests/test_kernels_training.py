"""Training kernels (logistic regression / MLP, SGD/Adam, FedProx, DP-SGD) against naive_linalg.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive_linalg as naive
from biofed.kernels import check_random_state, clip_l2, init_params, loss_and_grad, n_params, predict_proba, train
from biofed.kernels.training import _per_example_grads, dp_sgd
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import Charge, ClippedSum, PrivacyMechanism


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)


def blobs(rng, n=300, d=6, c=3, spread=0.4):
    """Linearly separable Gaussian blobs: class k centred at 3 * e_k."""
    y = rng.integers(0, c, n).astype(np.int64)
    centers = 3.0 * np.eye(c, d)
    return centers[y] + spread * rng.standard_normal((n, d)), y


MODELS = [0, 5]  # logistic regression, MLP with 5 hidden units


def random_params(rng, d, c, h):
    return 0.5 * rng.standard_normal(n_params(d, c, h))


def test_n_params_layout():
    assert n_params(4, 3) == 4 * 3 + 3
    assert n_params(4, 3, hidden=5) == 4 * 5 + 5 + 5 * 3 + 3
    assert init_params(4, 3).shape == (15,) and not init_params(4, 3).any()


def test_init_params_mlp_is_seeded_and_biases_zero():
    a = init_params(10, 3, 8, random_state=1)
    np.testing.assert_array_equal(a, init_params(10, 3, 8, random_state=1))
    assert not np.array_equal(a, init_params(10, 3, 8, random_state=2))
    w1, b1, w2, b2 = naive.unpack(a, 10, 3, 8)
    assert not b1.any() and not b2.any()
    assert 0.2 < w1.std() < 0.7  # He: sqrt(2/10) = 0.45


@pytest.mark.parametrize("hidden", MODELS)
def test_predict_proba_matches_numpy(rng, hidden):
    x = rng.standard_normal((25, 4)).astype(np.float32)
    p = random_params(rng, 4, 3, hidden)
    proba = predict_proba(p, x, 3, hidden)
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba, naive.predict_proba(p, x.astype(float), 3, hidden), rtol=1e-12)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("hidden", MODELS)
@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_loss_and_grad_matches_numpy_and_finite_differences(rng, hidden, l2):
    x = rng.standard_normal((40, 4))
    y = rng.integers(0, 3, 40)
    p = random_params(rng, 4, 3, hidden)
    loss, grad = loss_and_grad(p, x, y, 3, hidden, l2=l2)
    ref_loss, ref_grad = naive.loss_and_grad(p, x, y, 3, hidden, l2)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    fd = np.empty_like(p)
    for i in range(p.size):
        e = np.zeros_like(p)
        e[i] = eps
        fd[i] = (loss_and_grad(p + e, x, y, 3, hidden, l2=l2)[0] - loss_and_grad(p - e, x, y, 3, hidden, l2=l2)[0]) / (
            2 * eps
        )
    np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_loss_is_stable_for_huge_logits(rng):
    x = rng.standard_normal((10, 3)) * 1e4
    y = rng.integers(0, 2, 10)
    loss, grad = loss_and_grad(rng.standard_normal(n_params(3, 2)), x, y, 2)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("hidden", MODELS)
@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.2), ("adam", 0.02)])
def test_train_reduces_loss_and_separates_blobs(rng, hidden, optimizer, lr):
    x, y = blobs(rng)
    p0 = init_params(6, 3, hidden, random_state=0)
    p0_before = p0.copy()
    start = loss_and_grad(p0, x, y, 3, hidden)[0]
    p, mean_loss = train(p0, x, y, 3, hidden, epochs=15, batch_size=16, lr=lr, optimizer=optimizer, random_state=0)
    assert loss_and_grad(p, x, y, 3, hidden)[0] < 0.2 * start
    assert mean_loss < 0.5 * start
    assert (predict_proba(p, x, 3, hidden).argmax(axis=1) == y).mean() >= 0.97
    np.testing.assert_array_equal(p0, p0_before)  # input untouched, new array returned


def test_train_one_full_batch_step_is_gradient_descent(rng):
    x, y = blobs(rng, n=50)
    p0 = random_params(rng, 6, 3, 0)
    p, mean_loss = train(p0, x, y, 3, epochs=1, batch_size=50, lr=0.1, l2=0.2, random_state=0)
    loss, grad = naive.loss_and_grad(p0, x, y, 3, 0, 0.2)
    np.testing.assert_allclose(p, p0 - 0.1 * grad, rtol=1e-12, atol=1e-14)
    assert mean_loss == pytest.approx(naive.loss_and_grad(p0, x, y, 3, 0)[0], rel=1e-12)


@pytest.mark.parametrize("kwargs", [{}, {"optimizer": "adam", "lr": 0.01}])
def test_train_is_deterministic_given_the_seed(rng, kwargs):
    x, y = blobs(rng, n=120)
    p0 = init_params(6, 3, 4, random_state=0)
    a = train(p0, x, y, 3, 4, epochs=3, random_state=7, **kwargs)
    b = train(p0, x, y, 3, 4, epochs=3, random_state=7, **kwargs)
    c = train(p0, x, y, 3, 4, epochs=3, random_state=np.random.default_rng(7), **kwargs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])
    assert a[1] == b[1]
    assert not np.array_equal(a[0], train(p0, x, y, 3, 4, epochs=3, random_state=8, **kwargs)[0])


def _record_gate(clip, z):
    """A record-level release for dp_sgd: the privacy mechanism with an in-memory ledger."""
    gate = PrivacyMechanism(PrivacyLedger(1e-5))
    counter = iter(range(10**9))

    def release(grads):
        return gate.release(Charge(next(counter), "train", 1.0, z), ClippedSum(grads, clip, z * clip))[0]

    return gate, release


@pytest.mark.parametrize("hidden", MODELS)
def test_dp_sgd_with_full_batches_huge_clip_and_no_noise_equals_gradient_descent(rng, hidden):
    x, y = blobs(rng, n=100)
    p0 = init_params(6, 3, hidden, random_state=0)
    plain = train(p0, x, y, 3, hidden, epochs=3, batch_size=100, lr=0.1, l2=0.01, random_state=3)
    gate, release = _record_gate(1e9, 0.0)
    dp = dp_sgd(p0, x, y, 3, hidden, steps=3, sampling_rate=1.0, release=release, lr=0.1, l2=0.01, random_state=3)
    np.testing.assert_allclose(dp[0], plain[0], rtol=1e-9, atol=1e-12)
    assert len(gate.ledger) == 3  # one release (and one charge) per step


@pytest.mark.parametrize("hidden", MODELS)
@pytest.mark.parametrize("clip", [1e-3, 0.5, 1e6])
def test_per_example_gradients_and_their_clipped_sum(rng, hidden, clip):
    x = rng.standard_normal((12, 4)) * 3
    y = rng.integers(0, 3, 12).astype(np.int64)
    p = random_params(rng, 4, 3, hidden)
    grads = np.empty((12, p.size))
    loss_sum = _per_example_grads(p, x, y, 3, hidden, grads)
    for i in range(12):
        np.testing.assert_allclose(
            grads[i], naive.loss_and_grad(p, x[i : i + 1], y[i : i + 1], 3, hidden)[1], rtol=1e-10, atol=1e-14
        )
    assert loss_sum == pytest.approx(12 * naive.loss_and_grad(p, x, y, 3, hidden)[0], rel=1e-12)
    total, _ = ClippedSum(grads, clip, 0.0).clipped_total()
    np.testing.assert_allclose(total, naive.clipped_grad_sum(p, x, y, 3, hidden, clip), rtol=1e-10, atol=1e-14)
    assert np.linalg.norm(total) <= 12 * clip * (1 + 1e-12)


def test_dp_sgd_noise_has_the_configured_scale(rng):
    # Zero data gradient is impossible, so compare two runs that differ only in the noise.
    # The noise is OS-seeded, so the model is large enough (643 parameters) that the sample
    # std lies within 15 % of z C with overwhelming probability (15 % is over 5 standard errors).
    x, y = blobs(rng, n=64)
    p0 = init_params(6, 3, 64, random_state=0)
    assert p0.size == 643
    quiet = dp_sgd(p0, x, y, 3, 64, steps=1, sampling_rate=1.0, release=_record_gate(0.5, 0.0)[1], lr=1.0)[0]
    noisy = dp_sgd(p0, x, y, 3, 64, steps=1, sampling_rate=1.0, release=_record_gate(0.5, 2.0)[1], lr=1.0)[0]
    noise = (quiet - noisy) * 64  # lr * noise / expected batch
    assert noise.std() == pytest.approx(2.0 * 0.5, rel=0.15)


def test_dp_sgd_poisson_samples_and_divides_by_the_expected_batch(rng):
    x, y = blobs(rng, n=200)
    p0 = init_params(6, 3)
    sizes = []

    def release(grads):
        sizes.append(grads.shape[0])
        return np.ones(grads.shape[1])  # a constant "noised sum": the step is lr * 1 / (q N)

    params, _ = dp_sgd(p0, x, y, 3, steps=400, sampling_rate=0.1, release=release, lr=1.0, random_state=0)
    assert np.mean(sizes) == pytest.approx(20, rel=0.05) and len(set(sizes)) > 5  # Binomial(200, 0.1) batches
    np.testing.assert_allclose(params, p0 - 400 / 20.0)


def test_prox_term_pulls_toward_center(rng):
    x, y = blobs(rng)
    center = init_params(6, 3, 4, random_state=0)
    free = train(center, x, y, 3, 4, epochs=5, lr=0.1, random_state=0)[0]
    prox = train(center, x, y, 3, 4, epochs=5, lr=0.1, prox_mu=1.0, prox_center=center, random_state=0)[0]
    assert np.linalg.norm(prox - center) < 0.7 * np.linalg.norm(free - center)
    # With data-free gradients the prox term alone contracts toward the center geometrically.
    start = center + 1.0
    moved = train(
        start, x[:1], y[:1], 3, 4, epochs=1, batch_size=1, lr=0.5, prox_mu=1.0, prox_center=center, random_state=0
    )[0]
    assert np.linalg.norm(moved - center) < 0.7 * np.linalg.norm(start - center)


def test_l2_shrinks_weights_but_not_biases(rng):
    x, y = blobs(rng)
    p0 = init_params(6, 3)
    plain = train(p0, x, y, 3, epochs=5, lr=0.1, random_state=0)[0]
    decayed = train(p0, x, y, 3, epochs=5, lr=0.1, l2=1.0, random_state=0)[0]
    assert np.linalg.norm(decayed[:18]) < 0.5 * np.linalg.norm(plain[:18])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_l2(rng, dtype):
    v = rng.standard_normal(50).astype(dtype)
    norm = float(np.linalg.norm(v.astype(float)))
    clipped, reported = clip_l2(v, norm / 2)
    assert clipped.dtype == dtype and reported == pytest.approx(norm, rel=1e-6)
    assert np.linalg.norm(clipped) == pytest.approx(norm / 2, rel=1e-6)
    np.testing.assert_allclose(clipped, naive.clip(v.astype(float), norm / 2), rtol=1e-6)
    same, _ = clip_l2(v, norm * 2)
    np.testing.assert_array_equal(same, v)
    assert same is not v
    zero, zero_norm = clip_l2(np.zeros(3), 1.0)
    assert zero_norm == 0 and not zero.any()


X_OK = np.zeros((4, 3))
Y_OK = np.array([0, 1, 2, 1])
P_OK = np.zeros(12)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: loss_and_grad(P_OK, np.full((4, 3), np.nan), Y_OK, 3), ValueError, "X contains 12 NaN or inf"),
        (lambda: loss_and_grad(P_OK, np.zeros(3), Y_OK, 3), ValueError, "X must be 2-D"),
        (
            lambda: loss_and_grad(np.zeros(11), X_OK, Y_OK, 3),
            ValueError,
            "params has 11 entries but a model with d=3, n_classes=3, hidden=0 needs 12",
        ),
        (
            lambda: loss_and_grad(P_OK, X_OK, np.array([0, 1, 3, 1]), 3),
            ValueError,
            r"labels must lie in \[0, 3\) for n_classes=3, found label 3",
        ),
        (lambda: loss_and_grad(P_OK, X_OK, np.array([0, -1, 2, 1]), 3), ValueError, "found label -1"),
        (lambda: loss_and_grad(P_OK, X_OK, Y_OK.astype(float), 3), TypeError, "y must hold integer class labels"),
        (lambda: loss_and_grad(P_OK, X_OK, Y_OK[:3], 3), ValueError, r"y must have shape \(4,\) to match X"),
        (lambda: loss_and_grad(P_OK, X_OK, Y_OK, 1), ValueError, "n_classes must be >= 2"),
        (lambda: loss_and_grad(P_OK, X_OK, Y_OK, 3, l2=-1), ValueError, "l2 must be a finite number >= 0"),
        (lambda: predict_proba(P_OK, X_OK, 3, hidden=-1), ValueError, "hidden must be >= 0"),
        (lambda: train(P_OK, X_OK, Y_OK, 3, lr=-0.1), ValueError, "lr must be a finite number > 0"),
        (lambda: train(P_OK, X_OK, Y_OK, 3, optimizer="rmsprop"), ValueError, "unknown optimizer 'rmsprop'"),
        (lambda: train(P_OK, X_OK, Y_OK, 3, epochs=0), ValueError, "epochs must be >= 1"),
        (lambda: train(P_OK, X_OK, Y_OK, 3, batch_size=0), ValueError, "batch_size must be >= 1"),
        (lambda: train(P_OK, X_OK, Y_OK, 3, prox_mu=0.1), ValueError, "prox_mu > 0 needs prox_center"),
        (lambda: train(P_OK, X_OK, Y_OK, 3, prox_mu=0.1, prox_center=np.zeros(5)), ValueError, "params has 5 entries"),
        (
            lambda: dp_sgd(P_OK, X_OK, Y_OK, 3, steps=0, sampling_rate=0.5, release=np.sum),
            ValueError,
            "steps must be >= 1",
        ),
        (
            lambda: dp_sgd(P_OK, X_OK, Y_OK, 3, steps=1, sampling_rate=0.0, release=np.sum),
            ValueError,
            r"sampling_rate must be in \(0, 1\]",
        ),
        (
            lambda: dp_sgd(P_OK, X_OK, Y_OK, 3, steps=1, sampling_rate=0.5, release=None),
            TypeError,
            "release must be a callable",
        ),
        (
            lambda: dp_sgd(P_OK, X_OK, Y_OK, 3, steps=1, sampling_rate=1.0, release=lambda g: np.zeros(2)),
            ValueError,
            "release returned shape",
        ),
        (lambda: train(P_OK, X_OK, Y_OK, 3, random_state=1.5), TypeError, "random_state must be None"),
        (lambda: train(P_OK, (X_OK + 1) * 1e300, Y_OK, 3, lr=1e300), FloatingPointError, "training diverged"),
        (lambda: clip_l2(np.ones(3), 0.0), ValueError, "max_norm must be a finite number > 0"),
        (lambda: clip_l2(np.ones((2, 2)), 1.0), ValueError, "vector must be 1-D"),
        (lambda: init_params(0, 3), ValueError, "d must be >= 1"),
    ],
)
def test_training_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 20),
    d=st.integers(1, 6),
    c=st.integers(2, 4),
    hidden=st.sampled_from([0, 1, 3]),
    dtype=st.sampled_from([np.float32, np.float64, np.int32]),
    seed=st.integers(0, 2**16),
)
def test_training_shapes_and_dtypes(n, d, c, hidden, dtype, seed):
    r = np.random.default_rng(seed)
    x = (r.standard_normal((n, d)) * 3).astype(dtype)
    y = r.integers(0, c, n).astype(r.choice([np.int64, np.int32, np.uint8]))
    p = init_params(d, c, hidden, random_state=seed)
    proba = predict_proba(p, x, c, hidden)
    assert proba.shape == (n, c) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    loss, grad = loss_and_grad(p, x, y, c, hidden)
    assert grad.shape == (n_params(d, c, hidden),) and np.isfinite(loss) and loss >= 0
    trained, mean_loss = dp_sgd(
        p, x, y, c, hidden, steps=3, sampling_rate=1.0, release=_record_gate(1.0, 0.5)[1], random_state=seed
    )
    assert trained.shape == p.shape and trained.dtype == np.float64 and np.isfinite(mean_loss)


def test_check_random_state_is_the_one_generator_source():
    assert check_random_state().integers(2**62) != check_random_state().integers(2**62)  # OS-seeded
    gen = np.random.default_rng(3)
    assert check_random_state(gen) is gen
    assert check_random_state(5).integers(2**62) == check_random_state(np.int64(5)).integers(2**62)
    seq = np.random.SeedSequence(9)
    assert check_random_state(seq).integers(2**62) == np.random.default_rng(np.random.SeedSequence(9)).integers(2**62)
    for bad in (True, 1.5, "seed", [1, 2]):
        with pytest.raises(TypeError, match="random_state must be None"):
            check_random_state(bad)
    with pytest.raises(ValueError, match="random_state must be >= 0"):
        check_random_state(-1)
