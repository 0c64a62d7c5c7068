"""biofed.datasets.partition: reproducible, complete and disjoint splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from biofed.datasets import Recording, Signal, dirichlet_label_partition, partition_by_subject


def _rec(source, subject):
    sig = Signal(np.zeros((1, 10)), 10.0, ("Cz",), ("eeg",), ("V",))
    return Recording(source, {"eeg": sig}, subject=subject)


def test_partition_by_subject_groups_in_first_appearance_order():
    recs = [_rec("a", "s2"), _rec("b", "s1"), _rec("c", "s2"), _rec("d", "s3")]
    groups = partition_by_subject(recs)
    assert list(groups) == ["s2", "s1", "s3"]
    assert [r.source for r in groups["s2"]] == ["a", "c"]
    assert sum(len(v) for v in groups.values()) == len(recs)


def test_partition_by_subject_rejects_missing_subject():
    rec = _rec("nobody.edf", None)
    with pytest.raises(ValueError, match="nobody.edf: recording has no subject"):
        partition_by_subject([_rec("a", "s1"), rec])
    assert partition_by_subject([dataclasses.replace(rec, subject="s9")])["s9"][0].source == "nobody.edf"
    with pytest.raises(TypeError, match="Recording objects"):
        partition_by_subject(["a.edf"])


def _labels(n=600, seed=0):
    return np.random.default_rng(seed).integers(0, 4, n)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_partition_is_complete_disjoint_and_reproducible(alpha):
    y = _labels()
    parts = dirichlet_label_partition(y, 7, alpha, random_state=42)
    assert len(parts) == 7
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(y)))  # every index exactly once
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    again = dirichlet_label_partition(y, 7, alpha, random_state=42)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_label_partition(y, 7, alpha, random_state=43)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_alpha_controls_label_skew():
    y = _labels(4000)

    def mean_entropy(alpha):
        out = []
        for p in dirichlet_label_partition(y, 10, alpha, random_state=1, min_size=1):
            freq = np.bincount(y[p], minlength=4) / len(p)
            freq = freq[freq > 0]
            out.append(-(freq * np.log(freq)).sum())
        return np.mean(out)

    assert mean_entropy(0.1) < 0.8 < np.log(4) - 0.05 < mean_entropy(1000.0)


def test_dirichlet_min_size_and_string_labels():
    y = np.array(["rest", "arithmetic"] * 30)
    parts = dirichlet_label_partition(y, 5, 0.3, random_state=0, min_size=4)
    assert min(len(p) for p in parts) >= 4
    assert sorted(np.concatenate(parts).tolist()) == list(range(60))
    assert len(dirichlet_label_partition(y, 1, 1.0, random_state=0)[0]) == 60


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((np.zeros((2, 2)), 2, 1.0), {}, "labels must be 1-D"),
        ((np.array([]), 2, 1.0), {}, "labels is empty"),
        ((np.zeros(5), 0, 1.0), {}, "n_devices must be an integer >= 1"),
        ((np.zeros(5), 2, 0.0), {}, "alpha must be finite and > 0"),
        ((np.zeros(5), 2, "x"), {}, "alpha must be a positive number"),
        ((np.zeros(5), 2, 1.0), {"min_size": -1}, "min_size must be an integer >= 0"),
        ((np.zeros(5), 2, 1.0), {"min_size": 3}, "needs 6 samples, got 5"),
        ((np.arange(6) % 2, 6, 0.01), {"min_size": 1}, "could not give every one of 6 devices"),
    ],
)
def test_dirichlet_rejects(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dirichlet_label_partition(*args, random_state=0, **kwargs)
