"""Central DP composed around a strategy: the release it states, and the post-processing of
what the privacy mechanism released."""

from __future__ import annotations

import math

import numpy as np
import pytest

from biofed.coordinator.central_dp import DPAggregator, Release
from biofed.coordinator.clipping import AdaptiveClipping
from biofed.coordinator.strategies import (
    AggregationError,
    ClientUpdate,
    CoordinateMedian,
    FedAvg,
    FedAvgM,
    TrimmedMean,
)
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import Charge, PrivacyMechanism

P = 6


def _updates(deltas):
    return [ClientUpdate(np.asarray(d, dtype=float), 1, f"dev{i}") for i, d in enumerate(deltas)]


def _gate():
    return PrivacyMechanism(PrivacyLedger(1e-5))


def _aggregate(dp, round_, params, deltas, clip, gate, norm_bits=None):
    """What the coordinator does with a round: release, run through the gate, finish."""
    valid, release = dp.release(round_, params, _updates(deltas), clip, norm_bits=norm_bits)
    return dp.finish(round_, valid, release.run(gate), len(deltas), clip)


def test_dp_aggregator_noise_std_matches_zc_over_n():
    z, c, n, dim = 1.3, 0.8, 5, 40_000
    rng = np.random.default_rng(11)
    deltas = rng.normal(size=(n, dim)) * 0.001  # well inside the clip norm: nothing is clipped
    dp = DPAggregator(FedAvg("uniform"), noise_multiplier=z)
    _, release = dp.release(3, np.zeros(dim), _updates(deltas), c)
    assert release.charge == Charge(3, "train", 1.0, z)
    [query] = release.queries
    assert query.clip_norm == c and query.noise_std == pytest.approx(z * c)
    gate = _gate()
    new, next_clip = _aggregate(dp, 3, np.zeros(dim), deltas, c, gate)
    noise = new - deltas.mean(axis=0)
    # 40 000 independent draws: the sample std is within 2 % of z C / n with overwhelming probability.
    assert noise.std() == pytest.approx(z * c / n, rel=0.02)
    assert abs(noise.mean()) < 5 * z * c / n / math.sqrt(dim)
    assert next_clip == c  # fixed clipping
    assert [(g.kind, g.noise_multiplier, g.count) for g in gate.ledger.groups] == [("train", z, 1)]


def test_dp_aggregator_clipping_bounds_each_contribution():
    rng = np.random.default_rng(5)
    c = 1.0
    honest = rng.normal(size=(4, P)) * 0.01
    huge = np.full(P, 1e6)
    dp = DPAggregator(FedAvg("uniform"), noise_multiplier=0.0)
    gate = _gate()
    new, _ = _aggregate(dp, 1, np.zeros(P), np.vstack([honest, huge]), c, gate)
    expected = (honest.sum(axis=0) + huge / np.linalg.norm(huge) * c) / 5
    np.testing.assert_allclose(new, expected, rtol=1e-12)
    # Replacing one device's update moves the (noise-free) mean by at most 2 C / n.
    other, _ = _aggregate(dp, 2, np.zeros(P), np.vstack([honest, -huge]), c, gate)
    assert np.linalg.norm(new - other) <= 2 * c / 5 + 1e-12


def test_dp_aggregator_posts_noised_mean_to_inner_optimizer():
    rng = np.random.default_rng(2)
    deltas = rng.normal(size=(4, P)) * 0.01
    inner = FedAvgM(server_learning_rate=1.0, momentum=0.5, weighting="uniform")
    dp = DPAggregator(inner, noise_multiplier=0.0)
    gate = _gate()
    p1, _ = _aggregate(dp, 1, np.zeros(P), deltas, 10.0, gate)
    p2, _ = _aggregate(dp, 2, p1, deltas, 10.0, gate)
    np.testing.assert_allclose(p2, deltas.mean(axis=0) * (1 + 1.5), rtol=1e-12)
    assert set(inner.state_dict()) == {"momentum"}


def test_dp_aggregator_adaptive_clipping():
    z, sigma_b = 1.0, 2.0
    dp = DPAggregator(
        FedAvg("uniform"),
        noise_multiplier=z,
        adaptive_clipping=AdaptiveClipping(0.5, learning_rate=0.2, count_noise_std=sigma_b),
    )
    z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert dp.update_noise_multiplier == pytest.approx(z_delta)
    rng = np.random.default_rng(3)
    deltas = rng.normal(size=(20, P)) * 10  # every norm > 1: all clipped, the clip must grow
    bits = np.zeros(20, dtype=int)
    _, release = dp.release(1, np.zeros(P), _updates(deltas), 1.0, norm_bits=bits)
    updates_query, count_query = release.queries
    assert updates_query.noise_std == pytest.approx(z_delta * 1.0)
    assert count_query.noise_std == sigma_b and count_query.clip_norm == 0.5
    assert release.charge.noise_multiplier == z  # what the ledger records
    gate = _gate()
    _, next_clip = _aggregate(dp, 1, np.zeros(P), deltas, 1.0, gate, norm_bits=bits)
    assert next_clip > 1.0
    # update sum and clipped count are one mechanism of multiplier z, charged once
    assert [(g.kind, g.noise_multiplier, g.count) for g in gate.ledger.groups] == [("train", z, 1)]
    with pytest.raises(AggregationError, match="one norm bit per update"):
        dp.release(2, np.zeros(P), _updates(deltas), 1.0)
    with pytest.raises(AggregationError, match=r"one norm bit per update \(20\), got shape \(3,\)"):
        dp.release(2, np.zeros(P), _updates(deltas), 1.0, norm_bits=[1, 0, 1])


def test_release_without_queries_only_charges():
    gate = _gate()
    assert Release(Charge(4, "train", 1.0, 0.0)).run(gate) == ()
    assert [(g.kind, g.noise_multiplier, g.count) for g in gate.ledger.groups] == [("train", 0.0, 1)]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda u: [], "no updates to aggregate"),
        (lambda u: u[:2] + [ClientUpdate(np.zeros(P + 1), 1, "bad")], r"device 'bad' has dtype float64 shape \(7,\)"),
        (lambda u: u[:2] + [ClientUpdate(np.full(P, np.inf), 1, "bad")], "device 'bad' contains NaN or inf"),
        (lambda u: u + [u[0]], "device 'dev0' reported twice"),
    ],
)
def test_a_bad_update_releases_nothing(mutate, match):
    dp = DPAggregator(FedAvg("uniform"), noise_multiplier=1.0)
    with pytest.raises(AggregationError, match=match):
        dp.release(1, np.zeros(P), mutate(_updates(np.ones((3, P)))), 1.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: DPAggregator(TrimmedMean(0.1), 1.0), "needs a mean-based strategy"),
        (lambda: DPAggregator(CoordinateMedian(), 1.0), "needs a mean-based strategy"),
        (lambda: DPAggregator(FedAvg(), 1.0), "weighting='uniform'"),
        (lambda: DPAggregator(FedAvg("uniform"), -1.0), "noise_multiplier must be a finite number"),
        (
            lambda: DPAggregator(FedAvg("uniform"), 1.0).release(1, np.zeros(P), _updates(np.ones((2, P))), 0.0),
            "clip_norm must be a finite number > 0",
        ),
        (
            lambda: DPAggregator(FedAvg("uniform"), 1.0, adaptive_clipping=AdaptiveClipping(0.5, count_noise_std=0.4)),
            "count_noise_std=0.4 is too small",
        ),
    ],
)
def test_dp_aggregator_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
