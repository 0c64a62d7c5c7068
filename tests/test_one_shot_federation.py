"""The one-shot algorithm end to end: real edge agents and the coordinator over the embedded
broker (and Mosquitto), in every trust mode: basis, ONE release of the class statistics,
a ridge LDA published as the global model, on-device personalization, evaluation."""

from __future__ import annotations

import time

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from biofed.apps.federation import AgentThreads, broker_settings, received, write_synthetic_devices
from biofed.apps.simulate import check_federation
from biofed.config import CoordinatorConfig, DeviceConfig
from biofed.coordinator.server import Coordinator, RunState
from biofed.edge.agent import AgentState, EdgeAgent
from biofed.edge.store import FeatureStore
from biofed.edge.tasks import labelled_split
from biofed.mqtt import MqttClient
from biofed.protocol import Model, Sketch, Topics, Update
from brokers import amqtt_broker, mosquitto_broker  # noqa: F401  (pytest fixtures)

FLEET = "demo"  # check_federation reads the demo fleet's state
TOPICS = Topics(FLEET)
N_DEVICES = 3
Z_BASIS, Z_STATISTICS = 10.0, 0.8


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recordings")
    return write_synthetic_devices(folder, N_DEVICES + 1, duration_s=15.0, random_state=3)


def _config(broker, tmp_path, trust_mode: str, **overrides) -> CoordinatorConfig:
    values = dict(
        fleet=FLEET,
        broker=broker,
        rounds=0,
        min_devices=N_DEVICES,
        round_deadline_s=30.0,
        state_dir=tmp_path / "state",
        model={"basis_k": 8},
        training={"algorithm": "one_shot", "one_shot": {"ridge": 1.0, "means_clip": 1.0}},
        dp={
            "trust_mode": trust_mode,
            "noise_multiplier": 1.0,
            "statistics_noise_multiplier": Z_STATISTICS,
            "basis_noise_multiplier": Z_BASIS,
            "basis_clip_norm": 1.0,
            "epsilon_budget": 8.0,
        },
    )
    values.update(overrides)
    return CoordinatorConfig(**values)


def _agents(broker, recordings, tmp_path, devices) -> list[EdgeAgent]:
    return [
        EdgeAgent(
            DeviceConfig(
                device_id=device,
                fleet=FLEET,
                broker=broker,
                recordings=tuple(recordings[device]),
                store_path=tmp_path / f"{device}.sqlite",
            ),
            random_state=i,
        )
        for i, device in enumerate(devices)
    ]


def _run(broker_fixture, recordings, tmp_path, trust_mode: str, protocol: str = "3.1.1", **overrides):
    broker = broker_settings(broker_fixture, protocol)
    devices = sorted(recordings)[:N_DEVICES]
    config = _config(broker, tmp_path, trust_mode, **overrides)
    agents = _agents(broker, recordings, tmp_path, devices)
    observer = MqttClient(broker_fixture.host, broker_fixture.port, "observer", protocol=protocol).connect()
    for kind in ("update", "sketch"):
        observer.subscribe(TOPICS.all_devices(kind))
    observer.subscribe(TOPICS.model)
    with AgentThreads(agents):
        coordinator = Coordinator(config, discovery_timeout_s=60.0, rng=np.random.default_rng(0))
        assert coordinator.run() is RunState.DONE
    seen = received(observer, TOPICS)
    observer.close()
    return coordinator, agents, devices, seen


def _check_one_shot_run(coordinator, agents, devices, seen, tmp_path, trust_mode: str) -> None:
    history = coordinator.history()
    assert [r.phase for r in history] == ["covariance", "statistics", "evaluate"]
    assert all(r.n_devices == N_DEVICES for r in history)
    statistics_round = history[1].round
    # the ledger: one basis release (z_b) and ONE statistics release (z_s), nothing else
    groups = coordinator.ledger.groups
    assert [(g.kind, g.noise_multiplier, g.count) for g in groups] == [
        ("basis", Z_BASIS, 1),
        ("statistics", Z_STATISTICS, 1),
    ]
    assert coordinator.ledger.last_round("statistics") == statistics_round
    expected = (
        RdpAccountant()
        .compose(dp_accounting.GaussianDpEvent(Z_BASIS))
        .compose(dp_accounting.GaussianDpEvent(Z_STATISTICS))
        .get_epsilon(1e-5)
    )
    assert coordinator.ledger.epsilon("rdp") == pytest.approx(expected, rel=1e-9) and expected <= 8.0
    assert history[1].epsilon_rdp == pytest.approx(expected, rel=1e-9)
    assert check_federation(tmp_path / "state") == []
    # the sketches of the statistics round: packed, within the bound of 1 in central mode
    sketches = [m.payload for m in seen if isinstance(m.payload, Sketch) and m.payload.phase == "statistics"]
    assert sorted(m.sender for m in seen if isinstance(m.payload, Sketch) and m.payload.phase == "statistics") == (
        devices
    )
    assert all(s.n_features == 8 and s.n_classes == 2 and s.statistic.shape == (16,) for s in sketches)
    if trust_mode == "central":
        assert all(np.linalg.norm(s.statistic) <= 1 + 1e-9 for s in sketches)
    # the one-shot model went out as the global model; the final model file holds it
    models = [m.payload for m in seen if isinstance(m.payload, Model)]
    assert [m.round for m in models] == [statistics_round] and models[0].epsilon == pytest.approx(expected)
    with np.load(tmp_path / "state" / "model_final.npz") as final:
        np.testing.assert_array_equal(final["params"], models[0].params)
        assert final["params"].shape == (9 * 2,)
    # every device personalized the global model and kept it
    for agent in agents:
        assert agent.personal is not None
        np.testing.assert_array_equal(agent.personal.source, models[0].params)
        assert agent.personal.held_out.accuracy is not None
    evaluation = [m.payload for m in seen if isinstance(m.payload, Update) and m.round == history[2].round]
    assert len(evaluation) == N_DEVICES
    if trust_mode == "central":
        assert all(u.metrics.eval_balanced_accuracy is not None for u in evaluation)
        reported = sorted(u.metrics.personal_balanced_accuracy for u in evaluation)
        assert reported == pytest.approx(sorted(a.personal.held_out.accuracy for a in agents))
    else:  # nothing data-dependent leaves a device: no metrics at all, personal or global
        assert all(
            u.metrics.eval_balanced_accuracy is None and u.metrics.personal_balanced_accuracy is None
            for u in evaluation
        )
        for agent in agents:  # each device charged its own basis and statistics releases
            kinds = [(g.kind, g.count) for g in agent.mechanism.ledger.groups]
            assert kinds == [("basis", 1), ("statistics", 1)]


@pytest.mark.slow
@pytest.mark.parametrize("trust_mode", ["central", "local", "distributed"])
def test_one_shot_federation_in_every_trust_mode(amqtt_broker, recordings, tmp_path, trust_mode):
    coordinator, agents, devices, seen = _run(amqtt_broker, recordings, tmp_path, trust_mode)
    _check_one_shot_run(coordinator, agents, devices, seen, tmp_path, trust_mode)


@pytest.mark.mosquitto
@pytest.mark.slow
def test_one_shot_federation_over_mosquitto(mosquitto_broker, recordings, tmp_path):
    coordinator, agents, devices, seen = _run(mosquitto_broker, recordings, tmp_path, "central", protocol="5")
    _check_one_shot_run(coordinator, agents, devices, seen, tmp_path, "central")


@pytest.mark.slow
def test_non_private_one_shot_model_is_the_lda_of_the_devices_rows(amqtt_broker, recordings, tmp_path):
    dp = {"trust_mode": "central", "noise_multiplier": 0.0}
    coordinator, agents, _, seen = _run(amqtt_broker, recordings, tmp_path, "central", dp=dp)
    model = next(m.payload for m in seen if isinstance(m.payload, Model))
    # plain NumPy on what the devices hold: class means of the projected, device-standardized
    # training rows, each device's (2, k) block clipped to norm 1, averaged; W = M^T / ridge
    blocks = []
    for agent in agents:
        with FeatureStore(agent.config.store_path) as store:  # the agent closed its own
            data = labelled_split(*store.read(), ("rest", "arithmetic"))
        mean, scale = data.standardization()
        Z = ((data.X[data.train] - mean) / scale) @ agent.basis.components.T
        y = data.y[data.train]
        M = np.stack([Z[y == c].mean(axis=0) for c in (0, 1)])
        blocks.append(M * min(1.0, 1.0 / np.linalg.norm(M)))
    M = np.mean(blocks, axis=0)
    expected = np.concatenate([(M.T / 1.0).ravel(), -0.5 * (M * M).sum(axis=1) / 1.0])
    np.testing.assert_allclose(model.params, expected, atol=1e-10)
    evaluation = [m.payload for m in seen if isinstance(m.payload, Update) and m.round > model.round]
    assert np.mean([u.metrics.eval_balanced_accuracy for u in evaluation]) > 0.75  # the classes separate
    assert all(u.metrics.personal_balanced_accuracy is not None for u in evaluation)
    assert coordinator.ledger.count("statistics") == 1 and coordinator.ledger.epsilon("rdp") == float("inf")


@pytest.mark.slow
def test_a_device_missing_a_class_is_left_out_of_the_statistics(amqtt_broker, recordings, tmp_path):
    broker = broker_settings(amqtt_broker, "3.1.1")
    devices = sorted(recordings)
    one_class = devices[-1]
    recordings = {**recordings, one_class: recordings[one_class][:2]}  # its first recording only: one class
    config = _config(broker, tmp_path, "central", min_devices=N_DEVICES, round_deadline_s=15.0)
    agents = _agents(broker, recordings, tmp_path, devices)
    with AgentThreads(agents):
        # every device online before the first round (min_devices needs only three): all four are selected
        deadline = time.monotonic() + 60.0
        while any(agent.state is not AgentState.IDLE for agent in agents):
            assert time.monotonic() < deadline, [agent.state for agent in agents]
            time.sleep(0.05)
        coordinator = Coordinator(config, discovery_timeout_s=60.0, rng=np.random.default_rng(0))
        assert coordinator.run() is RunState.DONE
    history = coordinator.history()
    statistics = next(r for r in history if r.phase == "statistics")
    assert (statistics.n_selected, statistics.n_devices) == (N_DEVICES + 1, N_DEVICES)
    assert coordinator.ledger.count("statistics") == 1
