"""edge.split: the held-out rule shared by the agent and the demo's centralized baseline."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score

from biofed.edge.split import balanced_accuracy, device_standardization, holdout_split


def test_last_fifth_of_each_label_in_time_order_is_held_out():
    labels = np.array(["a"] * 10 + ["b"] * 5)
    t = np.concatenate([np.arange(10.0), np.arange(20.0, 25.0)])
    train, held_out = holdout_split(labels, t)
    assert held_out.nonzero()[0].tolist() == [8, 9, 14]
    assert np.array_equal(train, ~held_out)


def test_time_order_not_input_order_decides():
    labels = np.array(["a"] * 5)
    t = np.array([4.0, 0.0, 3.0, 1.0, 2.0])
    _, held_out = holdout_split(labels, t, fraction=0.4)
    assert held_out.nonzero()[0].tolist() == [0, 2]  # t = 4 and t = 3


def test_held_out_block_is_contiguous_per_label_even_when_labels_interleave():
    labels = np.array(list("ababababab"))
    t = np.arange(10.0)
    _, held_out = holdout_split(labels, t, fraction=0.4)
    assert held_out.nonzero()[0].tolist() == [6, 7, 8, 9]


def test_single_window_label_is_kept_for_training_and_zero_fraction_holds_out_nothing():
    train, held_out = holdout_split(["a", "b", "b"], [0.0, 1.0, 2.0])
    assert held_out.tolist() == [False, False, True]
    assert not holdout_split(["a", "a"], [0.0, 1.0], fraction=0.0)[1].any()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["rest", "arithmetic", ""]), min_size=1, max_size=60), st.floats(0.0, 0.95))
def test_split_properties(labels, fraction):
    labels = np.array(labels)
    t = np.random.default_rng(len(labels)).permutation(len(labels)).astype(float)
    train, held_out = holdout_split(labels, t, fraction)
    assert not (train & held_out).any() and (train | held_out).all()
    for label in np.unique(labels):
        idx = labels == label
        n = int(idx.sum())
        expected = int(np.ceil(fraction * n)) if n > 1 else 0
        assert held_out[idx].sum() == expected
        if expected and train[idx].any():
            assert t[idx & held_out].min() > t[idx & train].max()


@pytest.mark.parametrize(
    "labels, t, fraction, match",
    [
        (["a", "b"], [0.0], 0.2, "equal length"),
        (["a", "b"], [0.0, np.nan], 0.2, "NaN/inf"),
        (["a"], [0.0], 1.0, r"fraction must be a number in \[0, 1\)"),
        (["a"], [0.0], -0.1, "fraction"),
        (["a"], [0.0], True, "fraction"),
    ],
)
def test_bad_input(labels, t, fraction, match):
    with pytest.raises(ValueError, match=match):
        holdout_split(labels, t, fraction)


def test_balanced_accuracy_matches_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 3, 200))
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == 0.5
    with pytest.raises(ValueError, match="at least one window"):
        balanced_accuracy([], [])
    with pytest.raises(ValueError, match="equal length"):
        balanced_accuracy([0, 1], [0])


def test_device_standardization_is_the_training_rows_z_score():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 4)) * [1.0, 1e3, 1e-6, 5.0] + [0.0, 70.0, -11.0, 1e4]
    X[:, 3] = 1e4  # a feature constant on this device
    mean, scale = device_standardization(X)
    np.testing.assert_allclose(mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(scale[:3], X[:, :3].std(0), rtol=1e-12)
    assert scale[3] == 1.0  # centred, not divided by ~0
    Z = (X - mean) / scale
    np.testing.assert_allclose(Z[:, :3].mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(Z[:, :3].std(0), 1.0, rtol=1e-9)
    assert not Z[:, 3].any()


def test_device_standardization_of_masked_rows_is_that_of_the_rows_themselves():
    """Over several blocks of rows, the statistics of ``X[rows]`` without copying them."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(5000, 3)) * [1.0, 1e3, 1e-6] + [0.0, 70.0, -11.0]
    rows = rng.random(5000) < 0.7
    X[~rows] = 1e9  # the rows left out must not count
    mean, scale = device_standardization(X, rows)
    np.testing.assert_allclose(mean, X[rows].mean(0), rtol=1e-12)
    np.testing.assert_allclose(scale, X[rows].std(0), rtol=1e-12)
    X[~rows] = np.nan  # nor be checked
    np.testing.assert_array_equal(device_standardization(X, rows)[0], mean)
    with pytest.raises(ValueError, match="non-empty"):
        device_standardization(X, np.zeros(5000, dtype=bool))
    with pytest.raises(ValueError, match="rows must be a boolean mask"):
        device_standardization(X, np.ones(4999, dtype=bool))
    with pytest.raises(ValueError, match="rows must be a boolean mask"):
        device_standardization(X, np.ones(5000))


@pytest.mark.parametrize(
    "X,match",
    [
        (np.empty((0, 3)), "non-empty"),
        (np.ones(3), "non-empty"),
        (np.array([[1.0, np.nan]]), "NaN/inf"),
    ],
)
def test_device_standardization_bad_input(X, match):
    with pytest.raises(ValueError, match=match):
        device_standardization(X)
