"""coordinator.phases: every round phase as a function of (state, replies), without a broker,
a process or a clock. Releases run through a real in-memory privacy mechanism."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from biofed.config import CoordinatorConfig
from biofed.coordinator.basis import basis_from_covariance, standardization_from_moments
from biofed.coordinator.central_dp import DPAggregator
from biofed.coordinator.clipping import AdaptiveClipping
from biofed.coordinator.phases import (
    PhaseSettings,
    basis_phase,
    charge_before_task,
    compose_rounds,
    evaluate_phase,
    make_task,
    round_record,
    select_participants,
    standardization,
    train_phase,
    unmask_charge,
)
from biofed.coordinator.state import Snapshot
from biofed.coordinator.strategies import AggregationError, CoordinateMedian, FedAvg, FedAvgM
from biofed.kernels.training import init_params
from biofed.privacy_ledger import PrivacyLedger, distributed_noise_multiplier
from biofed.privacy_mechanism import Charge, PrivacyMechanism, grid_sensitivity
from biofed.protocol import Basis, Model, Sketch, Update, UpdateMetrics

CLASSES = ("rest", "task")
D = 3  # raw features
K = 2  # basis components
P = init_params(K, len(CLASSES), 0).size


def _settings(trust_mode="central", **overrides) -> PhaseSettings:
    values = dict(
        trust_mode=trust_mode,
        noise_multiplier=1.2,
        basis_noise_multiplier=0.7,
        basis_clip_norm=50.0,
        secagg_threshold=3,
        basis_k=K,
        classes=CLASSES,
        hidden=0,
        sampling_rate="all",
        client_config={"local_epochs": 2, "lr": 0.5},
    )
    values.update(overrides)
    return PhaseSettings(**values)


def _gate() -> PrivacyMechanism:
    return PrivacyMechanism(PrivacyLedger(1e-5))


def _charges(gate: PrivacyMechanism) -> list[tuple[str, float, int]]:
    return [(g.kind, g.noise_multiplier, g.count) for g in gate.ledger.groups]


def _sketch(phase: str, statistic) -> Sketch:
    return Sketch(
        round=1, basis_version=0, phase=phase, statistic=np.asarray(statistic, dtype=float), clipped=False, n_features=D
    )


def _update(delta, loss=0.5, accuracy=None, norm_bit=None, eval_windows=0) -> Update:
    delta = np.asarray(delta, dtype=float)
    metrics = UpdateMetrics(
        loss=loss, n_windows=4, rss_bytes=1, cpu_time_s=0.0, eval_balanced_accuracy=accuracy, eval_windows=eval_windows
    )
    return Update(
        round=7,
        basis_version=1,
        delta=delta,
        n_examples=4 if delta.size else 0,
        clipped=False,
        metrics=metrics,
        norm_bit=norm_bit,
    )


def _trained_state(**overrides) -> Snapshot:
    values = dict(
        next_round=8,
        phase="train",
        basis_version=1,
        n_features=D,
        clip_norm=1.0,
        params=np.linspace(-0.1, 0.1, P),
        basis_components=np.eye(K, D),
        basis_mean=np.zeros(D),
        basis_scale=np.ones(D),
    )
    values.update(overrides)
    return Snapshot(**values)


# ----------------------------------------------------------------------------- before the replies
def test_select_participants_takes_every_device_unless_training_is_sampled():
    online = {"pi-02", "pi-00", "pi-01"}
    rng = np.random.default_rng(0)
    assert select_participants(online, "covariance", 0.5, rng) == ["pi-00", "pi-01", "pi-02"]
    assert select_participants(online, "train", "all", rng) == ["pi-00", "pi-01", "pi-02"]
    draws = np.random.default_rng(5).random(3)
    expected = [d for d, u in zip(["pi-00", "pi-01", "pi-02"], draws, strict=True) if u < 0.5]
    assert select_participants(online, "train", 0.5, np.random.default_rng(5)) == expected
    assert select_participants(online, "train", 1.0, rng) == ["pi-00", "pi-01", "pi-02"]


def test_make_task_of_each_phase():
    settings = _settings("distributed", adaptive_clipping=True)
    fresh = Snapshot(next_round=1)
    task = make_task(settings, fresh, 1, "moments", ["pi-00", "pi-01"], 1000.0)
    assert task.model.size == 0 and task.clip_norm == 50.0 and task.noise_multiplier == 0.7
    assert task.participants == ("pi-00", "pi-01") and task.deadline == 1000.0 and task.secagg_threshold == 0
    after_moments = Snapshot(
        next_round=2, phase="covariance", n_features=D, stats_mean=np.ones(D), stats_scale=np.full(D, 2.0)
    )
    cov = make_task(settings, after_moments, 2, "covariance", ["pi-00"], 1000.0)
    np.testing.assert_array_equal(cov.stats_scale, np.full(D, 2.0))
    state = _trained_state(clip_norm=0.8)
    train = make_task(settings, state, 8, "train", ["pi-00", "pi-01", "pi-02"], 1000.0)
    np.testing.assert_array_equal(train.model, state.params)
    assert (train.clip_norm, train.noise_multiplier, train.secagg_threshold) == (0.8, 1.2, 3)
    assert train.adaptive_clipping and train.local_epochs == 2 and train.lr == 0.5
    assert make_task(settings, state, 9, "evaluate", ["pi-00"], 1000.0).secagg_threshold == 0
    assert make_task(_settings("central"), state, 8, "train", ["pi-00"], 1000.0).secagg_threshold == 0


def test_settings_from_config_resolve_the_task_fields():
    config = CoordinatorConfig.model_validate(
        {
            "fleet": "lab",
            "rounds": 3,
            "state_dir": "state",
            "model": {"classes": list(CLASSES), "basis_k": K},
            "training": {"lr": 0.25},
            "dp": {"noise_multiplier": 1.1, "clip_norm": 1.0, "trust_mode": "local"},
        }
    )
    settings = PhaseSettings.from_config(
        config, basis_clip_norm=9.0, basis_noise_multiplier=0.5, secagg_threshold=2, strategy_config={"prox_mu": 0.3}
    )
    assert (settings.trust_mode, settings.noise_multiplier, settings.basis_clip_norm) == ("local", 1.1, 9.0)
    assert settings.client_config["lr"] == 0.25 and settings.client_config["prox_mu"] == 0.3
    assert not settings.adaptive_clipping and settings.classes == CLASSES
    assert [settings.noise_multiplier_of(p) for p in ("moments", "covariance", "train", "evaluate")] == [
        0.5,
        0.5,
        1.1,
        None,
    ]


def _config(**overrides) -> CoordinatorConfig:
    data = {
        "fleet": "lab",
        "rounds": 3,
        "state_dir": "state",
        "min_devices": 2,
        "model": {"classes": list(CLASSES), "basis_k": K},
        "dp": {"noise_multiplier": 1.0, "clip_norm": 1.0},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return CoordinatorConfig.model_validate(data)


def test_compose_rounds_builds_central_dp_once_for_the_fedavg_family():
    central = compose_rounds(_config(strategy={"name": "fedavgm"}, dp={"adaptive_clipping": {"bit_noise_std": 5.0}}))
    assert central.central_dp is not None and central.central_dp.strategy is central.strategy
    assert central.central_dp.adaptive_clipping is not None and central.settings.adaptive_clipping
    assert central.strategy.weighting == "uniform"  # the DP default
    assert compose_rounds(_config(dp={"trust_mode": "local"})).central_dp is None
    robust = compose_rounds(_config(strategy={"name": "coordinate_median"}, dp={"noise_multiplier": 0.0}))
    assert robust.central_dp is None and isinstance(robust.strategy, CoordinateMedian)
    assert compose_rounds(_config(dp={"basis_clip_norm": 7.0})).settings.basis_clip_norm == 7.0
    assert compose_rounds(_config(), basis_clip_norm=3.0).settings.basis_clip_norm == 3.0
    assert compose_rounds(_config()).settings.basis_noise_multiplier == 1.0  # z_b defaults to z


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dp": {"trust_mode": "local", "adaptive_clipping": {}}}, "adaptive_clipping needs trust_mode"),
        ({"strategy": {"name": "trimmed_mean"}}, "cannot be combined with central DP"),
        ({"strategy": {"name": "fedavg", "params": {"weighting": "examples"}}}, 'weighting = "uniform"'),
        (
            {"strategy": {"name": "fedavg", "params": {"weighting": "examples"}}, "dp": {"noise_multiplier": 0.0}},
            r"\[strategy\] fedavg: DPAggregator needs the inner strategy built with weighting='uniform'",
        ),
        ({"dp": {"trust_mode": "distributed"}, "strategy": {"name": "coordinate_median"}}, "secure aggregation"),
        ({"dp": {"trust_mode": "distributed", "secagg_threshold": 1}}, "below min_devices"),
        ({"dp": {"adaptive_clipping": {"bit_noise_std": 0.1}}}, r"\[dp.adaptive_clipping\] count_noise_std"),
    ],
)
def test_compose_rounds_refuses_settings_that_break_the_guarantee(overrides, match):
    with pytest.raises(ValueError, match=match):
        compose_rounds(_config(**overrides))


@pytest.mark.parametrize(
    ("mode", "phase", "expected"),
    [
        ("central", "moments", None),
        ("central", "train", None),
        ("central", "evaluate", None),
        ("local", "moments", Charge(4, "basis", 1.0, 0.7)),
        ("local", "covariance", Charge(4, "basis", 1.0, 0.7)),
        ("local", "train", Charge(4, "train", 1.0, 1.2)),
        ("local", "evaluate", None),
        ("distributed", "covariance", Charge(4, "basis", 1.0, 0.7)),
        ("distributed", "train", None),
        ("distributed", "evaluate", None),
    ],
)
def test_charge_before_task_covers_what_the_coordinator_sees(mode, phase, expected):
    assert charge_before_task(_settings(mode), 4, phase) == expected


def test_unmask_charge_states_the_survivors_noise_against_the_grid():
    settings = _settings("distributed")
    charge = unmask_charge(settings, 9, 2.0, 100, 1e-4, 4)
    z = distributed_noise_multiplier(1.2, 3, 4) * 2.0 / grid_sensitivity(2.0, 100, 1e-4)
    assert charge == Charge(9, "train", 1.0, pytest.approx(z))
    assert unmask_charge(settings, 9, 2.0, 100, 1e-4, 3).noise_multiplier < charge.noise_multiplier


# ----------------------------------------------------------------------------- basis phases
def _moments(rows):
    rows = np.asarray(rows, dtype=float)
    return np.concatenate([rows.mean(axis=0), (rows**2).mean(axis=0)])


def test_central_moments_phase_releases_through_the_mechanism_and_fixes_the_standardization():
    rng = np.random.default_rng(1)
    statistics = [_moments(rng.normal(2.0, 3.0, size=(50, D))) for _ in range(3)]
    state = Snapshot(next_round=2)
    before = copy.deepcopy(state)
    pending = basis_phase(
        _settings(basis_noise_multiplier=0.0),
        state,
        1,
        "moments",
        [_sketch("moments", s) for s in statistics],
        np.random.default_rng(0),
    )
    assert pending.release.charge == Charge(1, "basis", 1.0, 0.0)
    [query] = pending.release.queries
    assert query.clip_norm == 50.0 and query.noise_std == 0.0
    gate = _gate()
    outcome = pending.close(pending.release.run(gate))
    assert _charges(gate) == [("basis", 0.0, 1)]
    mean, scale = standardization_from_moments(np.mean(statistics, axis=0))
    np.testing.assert_allclose(outcome.state.stats_mean, mean)
    np.testing.assert_allclose(outcome.state.stats_scale, scale)
    assert outcome.state.phase == "covariance" and outcome.state.n_features == D
    assert outcome.event == Charge(1, "basis", 1.0, 0.0) and outcome.payload is None
    assert state.phase == before.phase and state.stats_mean is None  # the input state is untouched


def test_central_basis_noise_is_z_b_times_c_b():
    statistics = np.ones((4, 2 * D))
    pending = basis_phase(
        _settings(), Snapshot(), 1, "moments", [_sketch("moments", s) for s in statistics], np.random.default_rng(0)
    )
    assert pending.release.queries[0].noise_std == pytest.approx(0.7 * 50.0)
    gate = _gate()
    pending.close(pending.release.run(gate))
    assert _charges(gate) == [("basis", 0.7, 1)]


def test_local_covariance_phase_makes_the_basis_and_starts_the_model():
    rng = np.random.default_rng(2)
    rows = [rng.normal(size=(40, D)) * [3.0, 1.0, 0.1] for _ in range(3)]
    statistics = [(r.T @ r / len(r)).ravel() for r in rows]
    state = Snapshot(next_round=3, phase="covariance", strategy_state={"momentum": np.ones(P)})
    pending = basis_phase(
        _settings("local"),
        state,
        2,
        "covariance",
        [_sketch("covariance", s) for s in statistics],
        np.random.default_rng(4),
    )
    assert pending.release is None  # the devices noised: post-processing only (charged before the task)
    outcome = pending.close(())
    components, _ = basis_from_covariance(np.mean(statistics, axis=0), K)
    new = outcome.state
    np.testing.assert_allclose(new.basis_components, components)
    assert new.basis_version == 1 and new.phase == "train" and new.strategy_state == {}
    assert new.n_features == D and standardization(new) == "device"
    np.testing.assert_array_equal(new.basis_mean, np.zeros(D))
    np.testing.assert_array_equal(new.basis_scale, np.ones(D))
    np.testing.assert_array_equal(new.params, init_params(K, len(CLASSES), 0, random_state=np.random.default_rng(4)))
    assert isinstance(outcome.payload, Basis) and outcome.payload.version == 1 and outcome.payload.round == 2
    assert outcome.payload.standardization == "device" and outcome.event is None


def test_covariance_phase_after_moments_keeps_the_fleet_standardization():
    state = Snapshot(
        next_round=3, phase="covariance", n_features=D, stats_mean=np.full(D, 5.0), stats_scale=np.full(D, 2.0)
    )
    statistics = [np.eye(D).ravel(), np.eye(D).ravel()]
    outcome = basis_phase(
        _settings("local"),
        state,
        2,
        "covariance",
        [_sketch("covariance", s) for s in statistics],
        np.random.default_rng(0),
    ).close(())
    np.testing.assert_array_equal(outcome.state.basis_mean, np.full(D, 5.0))
    assert outcome.payload.standardization == "global" and outcome.state.n_features == D


def test_basis_statistics_above_c_b_are_clipped_before_the_release(caplog):
    big = np.full(2 * D, 100.0)  # norm 245 > C_b = 50: a device that did not clip
    small = np.full(2 * D, 1.0)
    pending = basis_phase(
        _settings(basis_noise_multiplier=0.0),
        Snapshot(),
        1,
        "moments",
        [_sketch("moments", big), _sketch("moments", small)],
        np.random.default_rng(0),
    )
    assert "1 statistics exceeded the clip norm 50" in caplog.text
    outcome = pending.close(pending.release.run(_gate()))
    mean, _ = standardization_from_moments((big * 50.0 / np.linalg.norm(big) + small) / 2)
    np.testing.assert_allclose(outcome.state.stats_mean, mean)


# ----------------------------------------------------------------------------- training rounds
def test_central_training_round_releases_the_clipped_mean_once():
    deltas = {"pi-00": np.full(P, 0.01), "pi-01": np.full(P, -0.03), "pi-02": np.full(P, 10.0)}
    state = _trained_state(clip_norm=1.0)
    strategy = FedAvg("uniform")
    pending = train_phase(
        _settings(noise_multiplier=0.0),
        state,
        7,
        {d: _update(v) for d, v in deltas.items()},
        strategy=strategy,
        central_dp=DPAggregator(strategy, 0.0),
    )
    assert pending.release.charge == Charge(7, "train", 1.0, 0.0)
    gate = _gate()
    outcome = pending.close(pending.release.run(gate))
    clipped = [v * min(1.0, 1.0 / np.linalg.norm(v)) for _, v in sorted(deltas.items())]
    np.testing.assert_allclose(outcome.state.params, state.params + np.mean(clipped, axis=0))
    assert outcome.state.train_rounds_done == 1 and outcome.state.clip_norm == 1.0
    assert _charges(gate) == [("train", 0.0, 1)] and outcome.event == Charge(7, "train", 1.0, 0.0)
    assert isinstance(outcome.payload, Model) and outcome.payload.n_devices == 3 and outcome.payload.round == 7
    np.testing.assert_array_equal(outcome.payload.params, outcome.state.params)
    assert outcome.payload.epsilon is None and outcome.payload.onnx.size == 0  # the loop adds them after the commit
    assert state.train_rounds_done == 0  # the input state is untouched


def test_adaptive_clipping_moves_the_clip_in_the_new_state():
    strategy = FedAvg("uniform")
    dp = DPAggregator(strategy, 1.0, adaptive_clipping=AdaptiveClipping(0.5, count_noise_std=20.0))
    updates = {f"pi-{i:02d}": _update(np.full(P, 5.0), norm_bit=0) for i in range(4)}  # all clipped: C grows
    state = _trained_state(clip_norm=0.5)
    pending = train_phase(_settings(noise_multiplier=1.0), state, 7, updates, strategy=strategy, central_dp=dp)
    assert len(pending.release.queries) == 2
    outcome = pending.close(pending.release.run(_gate()))
    assert outcome.state.clip_norm != 0.5
    with pytest.raises(ValueError, match="central_dp must be the DP composition around strategy"):
        train_phase(_settings(noise_multiplier=1.0), state, 7, updates, strategy=FedAvg("uniform"), central_dp=dp)
    with pytest.raises(AggregationError, match="norm bit"):
        train_phase(
            _settings(noise_multiplier=1.0), state, 7, {"pi-00": _update(np.ones(P))}, strategy=strategy, central_dp=dp
        )


def test_central_robust_strategy_is_charged_as_a_non_private_release():
    deltas = [np.full(P, 0.1), np.full(P, 0.2), np.full(P, 9.0)]
    state = _trained_state()
    pending = train_phase(
        _settings(noise_multiplier=0.0),
        state,
        7,
        {f"pi-{i:02d}": _update(d) for i, d in enumerate(deltas)},
        strategy=CoordinateMedian(),
    )
    assert pending.release.charge == Charge(7, "train", 1.0, 0.0) and pending.release.queries == ()
    gate = _gate()
    outcome = pending.close(pending.release.run(gate))
    np.testing.assert_allclose(outcome.state.params, state.params + 0.2)
    assert _charges(gate) == [("train", 0.0, 1)]


def test_local_training_carries_the_server_optimizer_in_the_state():
    strategy = FedAvgM(server_learning_rate=1.0, momentum=0.5, weighting="uniform")
    delta = np.full(P, 0.01)
    updates = {"pi-00": _update(delta), "pi-01": _update(delta)}
    state = _trained_state()
    first = train_phase(_settings("local"), state, 7, updates, strategy=strategy)
    assert first.release is None
    one = first.close(())
    assert set(one.state.strategy_state) == {"momentum"}
    two = train_phase(_settings("local"), one.state, 8, updates, strategy=strategy).close(())
    np.testing.assert_allclose(two.state.params, state.params + delta * (1 + 1.5))
    # the outcome depends on the arguments alone: closing round 8 again gives the same model
    again = train_phase(_settings("local"), one.state, 8, updates, strategy=strategy).close(())
    np.testing.assert_array_equal(again.state.params, two.state.params)


def test_distributed_training_steps_with_the_unmasked_mean():
    state = _trained_state()
    updates = {"pi-00": _update([]), "pi-01": _update([])}  # metrics only: the deltas were secure-aggregated
    mean = np.full(P, 0.05)
    pending = train_phase(_settings("distributed"), state, 7, updates, strategy=FedAvg("uniform"), secure_mean=mean)
    assert pending.release is None  # charged before the unmask request (unmask_charge)
    outcome = pending.close(())
    np.testing.assert_allclose(outcome.state.params, state.params + mean)
    assert outcome.payload.n_devices == 2 and outcome.event is None


def test_evaluate_phase_ends_the_run():
    state = _trained_state(train_rounds_done=2)
    outcome = evaluate_phase(state)
    assert outcome.state.phase == "done" and state.phase == "train"
    assert outcome.event is None and outcome.payload is None


def test_round_record_summarizes_the_replies():
    state = _trained_state(train_rounds_done=2)
    replies = [
        _update(np.zeros(P), loss=0.2, accuracy=0.5, eval_windows=10),
        _update(np.zeros(P), loss=0.4, accuracy=None, eval_windows=6),
    ]
    record = round_record(
        _settings(),
        state,
        7,
        "train",
        replies,
        n_selected=3,
        attempts=2,
        epsilons={"rdp": 1.5},
        sampling_rate=1.0,
        clip_norm=0.9,
        finished=123.0,
    )
    assert (record.round, record.train_round, record.n_selected, record.n_devices) == (7, 2, 3, 2)
    assert record.mean_loss == pytest.approx(0.3) and record.balanced_accuracy == 0.5 and record.eval_windows == 16
    assert (record.epsilon_rdp, record.epsilon_pld, record.noise_multiplier) == (1.5, None, 1.2)
    assert (record.clip_norm, record.attempts, record.finished) == (0.9, 2, 123.0)
    basis = round_record(
        _settings(),
        state,
        2,
        "covariance",
        [_sketch("covariance", np.eye(D).ravel())],
        n_selected=1,
        attempts=1,
        epsilons={},
        sampling_rate=1.0,
        clip_norm=50.0,
        finished=0.0,
    )
    assert basis.mean_loss is None and basis.train_round is None and basis.noise_multiplier == 0.7
    evaluation = round_record(
        _settings(),
        state,
        9,
        "evaluate",
        replies,
        n_selected=2,
        attempts=1,
        epsilons={},
        sampling_rate=None,
        clip_norm=None,
        finished=0.0,
    )
    assert evaluation.mean_loss is None and evaluation.noise_multiplier is None and evaluation.balanced_accuracy == 0.5
