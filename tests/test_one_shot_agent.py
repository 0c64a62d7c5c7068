"""The device agent's part of the one-shot algorithm, without a broker: it answers the
statistics task through its release gate, fine-tunes every global model on its own windows
(the personal model stays on the device) and, when configured, predicts with it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from biofed.apps.federation import write_synthetic_devices
from biofed.config import DeviceConfig
from biofed.edge.agent import EdgeAgent
from biofed.edge.pipeline import FeatureRow
from biofed.edge.tasks import project_rows
from biofed.kernels import init_params, predict_proba
from biofed.model import fit_basis
from biofed.protocol import Basis, Model, Task, Topics, decode_topic_message, encode_message
from biofed.protocol.statistics import unpack_statistics

DEVICE, FLEET = "pi-01", "ward7"
TOPICS = Topics(FLEET)
CLASSES = ("rest", "arithmetic")
K = 6


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[list[Path], Path]:
    folder = tmp_path_factory.mktemp("one-shot-agent")
    recordings = write_synthetic_devices(folder / "data", 1, duration_s=12.0, random_state=3)["device00"]
    store = folder / "features.sqlite"
    agent = EdgeAgent(DeviceConfig(device_id=DEVICE, fleet=FLEET, recordings=tuple(recordings), store_path=store))
    agent.ingest()
    agent.close()
    return recordings, store


@pytest.fixture
def make_agent(ingested, tmp_path):
    recordings, template = ingested
    agents = []

    def make(**config) -> EdgeAgent:
        store = tmp_path / f"features{len(agents)}.sqlite"
        shutil.copyfile(template, store)
        cfg = DeviceConfig(device_id=DEVICE, fleet=FLEET, recordings=tuple(recordings), store_path=store, **config)
        agent = EdgeAgent(cfg, random_state=0)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


def send(agent: EdgeAgent, topic: str, payload):
    return [
        decode_topic_message(TOPICS, out.topic, out.payload)
        for out in agent.handle_message(topic, encode_message(payload, fleet=FLEET, sender="coordinator"))
    ]


def device_basis(agent: EdgeAgent) -> Basis:
    data = agent.local_data(CLASSES)
    mean, scale = data.standardization()
    components = fit_basis((data.X[data.train] - mean) / scale, K).components
    d = components.shape[1]
    return Basis(
        round=1, version=1, components=components, mean=np.zeros(d), scale=np.ones(d), standardization="device"
    )


def statistics_task(trust_mode: str = "central", z: float = 0.0) -> Task:
    return Task(
        round=2,
        model=np.empty(0),
        basis_version=1,
        classes=CLASSES,
        deadline=time.time() + 60,
        phase="statistics",
        clip_norm=1.0,
        trust_mode=trust_mode,
        noise_multiplier=z,
        means_clip=1.0,
    )


def test_agent_answers_the_statistics_task_with_its_clipped_class_means(make_agent):
    agent = make_agent()
    basis = device_basis(agent)
    send(agent, TOPICS.basis, basis)
    (reply,) = send(agent, TOPICS.task, statistics_task())
    assert reply.kind == "sketch" and reply.sender == DEVICE and reply.payload.phase == "statistics"
    data = agent.local_data(CLASSES)
    Z = project_rows(data.X[data.train], basis, data)
    y = data.y[data.train]
    means = np.stack([Z[y == c].mean(axis=0) for c in (0, 1)])
    means *= min(1.0, 1.0 / np.linalg.norm(means))
    np.testing.assert_allclose(unpack_statistics(reply.payload.statistic, 2, K, 1.0, None)[0], means, atol=1e-12)
    assert send(agent, TOPICS.task, statistics_task()) == []  # answered once
    assert len(agent.mechanism.ledger) == 0  # central mode: the coordinator charges


def test_local_statistics_are_charged_to_the_devices_own_durable_ledger(make_agent):
    agent = make_agent()
    send(agent, TOPICS.basis, device_basis(agent))
    (reply,) = send(agent, TOPICS.task, statistics_task("local", z=0.9))
    assert reply.payload.clipped is False
    assert [(g.kind, g.noise_multiplier, g.count) for g in agent.mechanism.ledger.groups] == [("statistics", 0.9, 1)]
    restarted = EdgeAgent(agent.config)  # the charge survived in the store
    assert restarted.mechanism.ledger.count("statistics") == 1
    restarted.close()


def test_statistics_task_before_the_basis_waits_for_it(make_agent):
    agent = make_agent()
    assert send(agent, TOPICS.task, statistics_task()) == []
    (status, reply) = send(agent, TOPICS.basis, device_basis(agent))
    assert reply.payload.phase == "statistics"


def test_every_global_model_is_personalized_and_reported_only_in_central_mode(make_agent):
    agent = make_agent()
    basis = device_basis(agent)
    send(agent, TOPICS.basis, basis)
    params = init_params(K, 2, random_state=1)
    send(agent, TOPICS.model, Model(round=3, params=params, basis_version=1, classes=CLASSES))
    personal = agent.personal
    assert personal is not None and not np.allclose(personal.params, params)
    np.testing.assert_array_equal(personal.source, params)
    evaluate = dict(round=4, model=params, basis_version=1, classes=CLASSES, deadline=time.time() + 60)
    (central,) = send(agent, TOPICS.task, Task(phase="evaluate", **evaluate))
    assert central.payload.metrics.personal_balanced_accuracy == pytest.approx(personal.held_out.accuracy)
    assert agent.personal is personal  # the same global model is fine-tuned once
    (local,) = send(agent, TOPICS.task, Task(phase="evaluate", trust_mode="local", **{**evaluate, "round": 5}))
    assert local.payload.metrics.personal_balanced_accuracy is None


def test_personalization_can_be_turned_off(make_agent):
    agent = make_agent(personalization={"enabled": False})
    send(agent, TOPICS.basis, device_basis(agent))
    params = init_params(K, 2, random_state=1)
    send(agent, TOPICS.model, Model(round=3, params=params, basis_version=1, classes=CLASSES))
    evaluate = Task(
        round=4, model=params, basis_version=1, classes=CLASSES, deadline=time.time() + 60, phase="evaluate"
    )
    (reply,) = send(agent, TOPICS.task, evaluate)
    assert agent.personal is None and reply.payload.metrics.personal_balanced_accuracy is None


def test_predictions_with_the_personal_model_cover_stored_and_new_windows(make_agent):
    agent = make_agent(predict=True, personalization={"predict_with_personal": True})
    basis = device_basis(agent)
    send(agent, TOPICS.basis, basis)
    params = init_params(K, 2, random_state=1)
    (prediction,) = send(agent, TOPICS.model, Model(round=3, params=params, basis_version=1, classes=CLASSES))
    data = agent.local_data(CLASSES)
    X, _, _ = agent.store.read(limit=64)
    expected = predict_proba(agent.personal.params, project_rows(X, basis, data), 2)
    np.testing.assert_allclose(prediction.payload.proba, expected, rtol=1e-9)
    live = agent.predictions.predict_rows([FeatureRow(t=1.0, label=None, vector=X[0])], 100.0)
    np.testing.assert_allclose(live.proba, expected[:1], rtol=1e-9)
    assert live.round == 3 and live.t.tolist() == [101.0]
