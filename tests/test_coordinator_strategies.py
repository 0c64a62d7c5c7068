"""Aggregation strategies against hand-written NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from biofed.config import STRATEGY_NAMES
from biofed.coordinator.strategies import (
    STRATEGIES,
    AggregationError,
    ClientUpdate,
    CoordinateMedian,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    TrimmedMean,
    make_strategy,
)

P = 6


def _updates(deltas, counts=None):
    counts = counts if counts is not None else [1] * len(deltas)
    return [ClientUpdate(np.asarray(d, dtype=float), int(n), f"dev{i}") for i, (d, n) in enumerate(zip(deltas, counts))]


@pytest.fixture
def round_data():
    rng = np.random.default_rng(7)
    params = rng.normal(size=P)
    deltas = rng.normal(size=(5, P))
    counts = np.array([10, 30, 5, 55, 0])
    return params, deltas, counts


# ---------------------------------------------------------------------------- plain strategies


def test_fedavg_example_weighted(round_data):
    params, deltas, counts = round_data
    new, metrics = FedAvg().aggregate(1, params, _updates(deltas, counts))
    expected_delta = sum(n * d for n, d in zip(counts, deltas)) / counts.sum()
    np.testing.assert_allclose(new, params + expected_delta, rtol=1e-12)
    assert metrics["n_updates"] == 5
    assert metrics["aggregate_norm"] == pytest.approx(np.linalg.norm(expected_delta))


def test_fedavg_uniform(round_data):
    params, deltas, counts = round_data
    new, _ = FedAvg(weighting="uniform").aggregate(1, params, _updates(deltas, counts))
    np.testing.assert_allclose(new, params + deltas.sum(axis=0) / len(deltas), rtol=1e-12)


def test_fedavg_all_empty_updates_error(round_data):
    params, deltas, _ = round_data
    with pytest.raises(AggregationError, match="n_examples=0, so example weighting is undefined"):
        FedAvg().aggregate(1, params, _updates(deltas, [0] * len(deltas)))


def test_fedavgm_two_rounds(round_data):
    params, deltas, counts = round_data
    strategy = FedAvgM(server_learning_rate=0.5, momentum=0.8, weighting="uniform")
    second = deltas[::-1] * 2.0
    p1, _ = strategy.aggregate(1, params, _updates(deltas))
    p2, _ = strategy.aggregate(2, p1, _updates(second))
    v1 = deltas.mean(axis=0)
    v2 = 0.8 * v1 + second.mean(axis=0)
    np.testing.assert_allclose(p1, params + 0.5 * v1, rtol=1e-12)
    np.testing.assert_allclose(p2, params + 0.5 * v1 + 0.5 * v2, rtol=1e-12)
    np.testing.assert_allclose(strategy.state_dict()["momentum"], v2, rtol=1e-12)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_adaptive_server_optimizers_step_formulas(cls, round_data):
    params, deltas, counts = round_data
    eta, b1, b2, tau = 0.05, 0.85, 0.95, 1e-2
    strategy = cls(eta=eta, beta1=b1, beta2=b2, tau=tau)
    rounds = [deltas, deltas * -0.5 + 0.1, deltas**2]
    m = np.zeros(P)
    v = np.full(P, tau**2)
    expected = params.copy()
    current = params
    for r, ds in enumerate(rounds):
        current, _ = strategy.aggregate(r, current, _updates(ds, counts))
        d = (counts[:, None] * ds).sum(axis=0) / counts.sum()
        m = b1 * m + (1 - b1) * d
        if cls is FedAdam:
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        expected = expected + eta * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(current, expected, rtol=1e-12)
    state = strategy.state_dict()
    np.testing.assert_allclose(state["m"], m, rtol=1e-12)
    np.testing.assert_allclose(state["v"], v, rtol=1e-12)


def test_fedyogi_differs_from_fedadam(round_data):
    params, deltas, counts = round_data
    adam, yogi = FedAdam(), FedYogi()
    for r in range(3):
        pa, _ = adam.aggregate(r, params, _updates(deltas * (r + 1), counts))
        py, _ = yogi.aggregate(r, params, _updates(deltas * (r + 1), counts))
    assert not np.allclose(pa, py)


def test_fedprox_is_fedavg_on_server_and_sends_mu(round_data):
    params, deltas, counts = round_data
    prox = FedProx(proximal_mu=0.3)
    assert prox.client_config() == {"prox_mu": 0.3}
    assert FedAvg().client_config() == {}
    np.testing.assert_array_equal(
        prox.aggregate(1, params, _updates(deltas, counts))[0],
        FedAvg().aggregate(1, params, _updates(deltas, counts))[0],
    )


def test_trimmed_mean_reference_and_robust_to_one_huge_update(round_data):
    params, deltas, _ = round_data
    attacked = np.vstack([deltas, np.full(P, 1e9)])  # n = 6
    strategy = TrimmedMean(beta=0.2)  # floor(0.2 * 6) = 1 per side
    new, _ = strategy.aggregate(1, params, _updates(attacked))
    reference = np.array([np.sort(attacked[:, j])[1:5].mean() for j in range(P)])
    np.testing.assert_allclose(new, params + reference, rtol=1e-12)
    assert np.all(new - params <= deltas.max(axis=0) + 1e-12)
    assert np.all(new - params >= deltas.min(axis=0) - 1e-12)
    # beta = 0 is the plain mean
    np.testing.assert_allclose(TrimmedMean(0.0).aggregate(1, params, _updates(deltas))[0], params + deltas.mean(axis=0))


def test_coordinate_median_reference_and_robust_to_one_huge_update(round_data):
    params, deltas, _ = round_data
    attacked = np.vstack([deltas, np.full(P, -1e12)])
    new, _ = CoordinateMedian().aggregate(1, params, _updates(attacked))
    reference = np.array([np.sort(attacked[:, j])[2:4].mean() for j in range(P)])  # n = 6: mean of middle two
    np.testing.assert_allclose(new, params + reference, rtol=1e-12)
    assert np.abs(new - params).max() < np.abs(deltas).max() + 1e-12
    odd, _ = CoordinateMedian().aggregate(1, params, _updates(deltas))
    np.testing.assert_allclose(odd, params + np.sort(deltas, axis=0)[2])


def test_robust_rules_unweighted(round_data):
    params, deltas, counts = round_data
    for strategy in (TrimmedMean(0.2), CoordinateMedian()):
        a, _ = strategy.aggregate(1, params, _updates(deltas, counts))
        b, _ = strategy.aggregate(1, params, _updates(deltas, [1] * 5))
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_state_dict_round_trip_resumes_identically(name, round_data):
    params, deltas, counts = round_data
    a = make_strategy(name)
    p1, _ = a.aggregate(1, params, _updates(deltas, counts))
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) and v.shape == (P,) for v in state.values())
    b = make_strategy(name)
    b.load_state_dict(state)
    state["m" if name != "fedavgm" else "momentum"][:] = 123.0  # a copy: mutating it changes nothing
    pa, _ = a.aggregate(2, p1, _updates(deltas * 0.5, counts))
    pb, _ = b.aggregate(2, p1, _updates(deltas * 0.5, counts))
    np.testing.assert_array_equal(pa, pb)
    b.load_state_dict({})  # reset
    assert b.state_dict() == {}


@pytest.mark.parametrize(
    ("strategy", "state", "match"),
    [
        (FedAdam(), {"m": np.zeros(3)}, r"state must have keys \['m', 'v'\]"),
        (FedAdam(), {"m": np.zeros(3), "v": np.zeros(4)}, "1-D of one shape"),
        (FedAvgM(), {"momentum": np.array([np.nan])}, "NaN or inf"),
        (FedAvg(), {"momentum": np.zeros(3)}, "keeps no server state"),
    ],
)
def test_load_state_dict_bad_input(strategy, state, match):
    with pytest.raises(ValueError, match=match):
        strategy.load_state_dict(state)


def test_state_of_other_model_size_is_refused(round_data):
    params, deltas, counts = round_data
    strategy = FedAvgM()
    strategy.load_state_dict({"momentum": np.zeros(P + 1)})
    with pytest.raises(AggregationError, match="server state has 7 parameters but the model has 6"):
        strategy.aggregate(1, params, _updates(deltas, counts))


# ---------------------------------------------------------------------------- factory and validation


def test_make_strategy():
    assert set(STRATEGIES) == set(STRATEGY_NAMES)  # the config's vocabulary, one strategy each
    s = make_strategy("FedAdam", eta=0.2, weighting="uniform")
    assert isinstance(s, FedAdam) and s.eta == 0.2 and s.weighting == "uniform"
    assert isinstance(make_strategy("trimmed-mean", beta=0.25), TrimmedMean)
    assert "FedProx(proximal_mu=0.5, weighting='examples')" == repr(make_strategy("fedprox", proximal_mu=0.5))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedsgd", {}, "unknown strategy 'fedsgd'; choose one of coordinate_median, fedadam, fedavg"),
        ("fedavg", {"prox_mu": 0.1}, "does not take parameter.*prox_mu.*accepts weighting"),
        ("coordinate_median", {"beta": 0.1}, "accepts no parameters"),
        ("fedavg", {"weighting": "devices"}, "weighting must be 'examples' or 'uniform'"),
        ("fedavgm", {"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\)"),
        ("fedadam", {"tau": 0.0}, r"tau must be a finite number in \(0, inf\)"),
        ("trimmed_mean", {"beta": 0.5}, r"beta must be a finite number in \[0, 0.5\)"),
        ("fedprox", {"proximal_mu": -1}, "proximal_mu must be a finite number"),
    ],
)
def test_make_strategy_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        make_strategy(name, **params)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda u: [], "no updates to aggregate"),
        (lambda u: u[:2] + [ClientUpdate(np.zeros(P + 1), 1, "bad")], r"device 'bad' has dtype float64 shape \(7,\)"),
        (lambda u: u[:2] + [ClientUpdate(np.full(P, np.inf), 1, "bad")], "device 'bad' contains NaN or inf"),
        (lambda u: u[:2] + [ClientUpdate(np.zeros(P), -3, "bad")], "device 'bad' has n_examples=-3"),
        (lambda u: u + [u[0]], "device 'dev0' reported twice"),
        (lambda u: u[:1] + [(np.zeros(P), 1, "tuple")], r"updates\[1\] must be a ClientUpdate"),
    ],
)
def test_aggregate_fails_closed_on_bad_updates(mutate, match, round_data):
    params, deltas, counts = round_data
    adam = FedAdam()
    for strategy in (FedAvg(), adam):
        with pytest.raises(AggregationError, match=match):
            strategy.aggregate(1, params, mutate(_updates(deltas, counts)))
    assert adam.state_dict() == {}  # a refused round leaves the optimizer state untouched


def test_aggregate_bad_global_params(round_data):
    _, deltas, counts = round_data
    with pytest.raises(AggregationError, match="global_params must be a non-empty 1-D real vector"):
        FedAvg().aggregate(1, np.zeros((2, 3)), _updates(deltas, counts))
    with pytest.raises(AggregationError, match="global_params contain NaN or inf"):
        FedAvg().aggregate(1, np.full(P, np.nan), _updates(deltas, counts))
