"""edge.agent: ingestion into the feature store and the task handlers, without a broker.

:meth:`EdgeAgent.handle_message` takes the raw MQTT topic and payload and returns what the
agent would publish, so every rule (deadline, participants, duplicates, basis version, bad
input) is checked on real encoded messages; the MQTT loop itself runs in
tests/test_e2e_federation.py.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from biofed.apps.federation import write_synthetic_devices
from biofed.config import DeviceConfig
from biofed.edge.agent import AgentState, EdgeAgent
from biofed.edge.split import balanced_accuracy, device_standardization, holdout_split
from biofed.kernels import clip_l2, init_params, n_params, predict_proba, project, train
from biofed.model import fit_basis
from biofed.mqtt import MqttClient
from biofed.protocol import (
    Basis,
    Model,
    Sketch,
    Status,
    Task,
    Topics,
    Update,
    decode_topic_message,
    encode_message,
)
from brokers import amqtt_broker  # noqa: F401  (pytest fixture)

FLEET = "ward7"
DEVICE = "device00"
TOPICS = Topics(FLEET)
CLASSES = ("rest", "arithmetic")
SECONDS = 12.0  # per class: 11 windows of 2 s every 1 s


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("recordings")
    return write_synthetic_devices(folder, 1, duration_s=SECONDS, random_state=3)[DEVICE]


@pytest.fixture(scope="module")
def ingested_store(recordings, tmp_path_factory) -> Path:
    """A feature store filled once by an agent; each test works on its own copy."""
    path = tmp_path_factory.mktemp("template") / "features.sqlite"
    agent = EdgeAgent(DeviceConfig(device_id=DEVICE, fleet=FLEET, recordings=tuple(recordings), store_path=path))
    assert agent.ingest() == 2 * (SECONDS - 1)
    agent.close()
    return path


def make_agent(recordings, store: Path, *, clock=time.time, **config) -> EdgeAgent:
    cfg = DeviceConfig(device_id=DEVICE, fleet=FLEET, recordings=tuple(recordings), store_path=store, **config)
    return EdgeAgent(cfg, random_state=0, clock=clock)


@pytest.fixture
def agent(recordings, ingested_store, tmp_path):
    store = tmp_path / "features.sqlite"
    shutil.copyfile(ingested_store, store)
    agent = make_agent(recordings, store)
    yield agent
    agent.close()


def send(agent: EdgeAgent, topic: str, payload, **kwargs):
    return agent.handle_message(topic, encode_message(payload, fleet=FLEET, sender="coordinator", **kwargs))


def task(phase: str = "train", **overrides) -> Task:
    fields = dict(
        round=7,
        model=np.empty(0),
        basis_version=0,
        classes=CLASSES,
        deadline=time.time() + 60,
        phase=phase,
        clip_norm=1e6,
    )
    fields.update(overrides)
    return Task(**fields)


def basis_of(agent: EdgeAgent, version: int = 1, k: int = 8) -> Basis:
    data = agent.local_data(CLASSES)
    components, mean, scale = fit_basis(data.X[data.train], k)
    return Basis(round=3, version=version, components=components, mean=mean, scale=scale)


def decode(out):
    return decode_topic_message(TOPICS, out.topic, out.payload)


# ----------------------------------------------------------------------------- ingestion
def test_ingest_stores_labelled_rows_on_a_device_clock(agent):
    X, labels, t = agent.store.read()
    n = int(SECONDS - 1)
    assert X.shape == (2 * n, 19 * 5 + 32 + 2 * 7)  # EEG bands + audio mels + ECG/PPG statistics
    assert list(labels) == ["rest"] * n + ["arithmetic"] * n
    assert np.all(np.diff(t) > 0)  # the second session starts after the first one
    assert t[n] - t[n - 1] == pytest.approx(2.0 + 1.0)  # next session starts window_s + hop_s later


def test_restart_skips_ingested_files_and_replays_an_interrupted_stream(recordings, ingested_store, tmp_path, caplog):
    store = tmp_path / "features.sqlite"
    shutil.copyfile(ingested_store, store)
    agent = make_agent(recordings, store)
    assert agent.ingest() == 0
    assert agent.n_rows == 2 * (SECONDS - 1)
    agent.close()
    # simulate a crash in the middle of the second stream: marked pending, half of its rows stored
    db = sqlite3.connect(store)
    stream = db.execute("SELECT stream FROM agent_ingested WHERE path = ?", (str(recordings[2]),)).fetchone()[0]
    db.execute("UPDATE agent_ingested SET done = 0 WHERE stream = ?", (stream,))
    db.execute("DELETE FROM windows WHERE id IN (SELECT id FROM windows WHERE source = ? LIMIT 5)", (stream,))
    db.commit()
    db.close()
    agent = make_agent(recordings, store)
    with caplog.at_level(logging.WARNING, logger="biofed.edge.ingestion"):
        assert agent.ingest() == SECONDS - 1
    assert "interrupted" in caplog.text
    _, labels, t = agent.store.read()
    assert list(labels).count("arithmetic") == SECONDS - 1  # no duplicates, nothing lost
    assert np.all(np.diff(t) > 0)
    agent.close()


def test_unreadable_recording_is_logged_and_skipped(recordings, tmp_path, caplog):
    bad = tmp_path / "broken_raw.fif"
    bad.write_bytes(b"not a fif file")
    agent = make_agent([bad, *recordings[:2]], tmp_path / "features.sqlite")
    with caplog.at_level(logging.ERROR, logger="biofed.edge.ingestion"):
        assert agent.ingest() == SECONDS - 1
    assert "cannot read recording" in caplog.text and "broken_raw.fif" in caplog.text
    agent.close()


# ----------------------------------------------------------------------------- basis phases
def test_moments_sketch_is_the_clipped_statistic_of_the_training_split(agent):
    out = send(agent, TOPICS.task, task("moments"))
    assert len(out) == 1 and out[0].topic == TOPICS.sketch(DEVICE)
    message = decode(out[0])
    sketch = message.payload
    assert isinstance(sketch, Sketch) and message.sender == DEVICE and sketch.round == 7
    X, labels, t = agent.store.read()
    train_mask, _ = holdout_split(labels, t)
    Xt = X[train_mask]
    expected = np.concatenate([Xt.mean(0), (Xt**2).mean(0)])
    np.testing.assert_allclose(sketch.statistic, expected, rtol=1e-12)
    assert sketch.n_features == X.shape[1] and not sketch.clipped


def test_covariance_sketch_standardizes_then_clips(agent):
    X, labels, t = agent.store.read()
    Xt = X[holdout_split(labels, t)[0]]
    mean, scale = Xt.mean(0) + 0.1, Xt.std(0) + 0.5
    out = send(agent, TOPICS.task, task("covariance", stats_mean=mean, stats_scale=scale, clip_norm=2.0))
    sketch = decode(out[0]).payload
    Z = (Xt - mean) / scale
    expected, norm = clip_l2((Z.T @ Z / len(Z)).ravel(), 2.0)
    assert norm > 2.0 and sketch.clipped
    np.testing.assert_allclose(sketch.statistic, expected, rtol=1e-10)
    assert np.linalg.norm(sketch.statistic) == pytest.approx(2.0)


def test_covariance_without_stats_uses_the_devices_own_standardization(agent):
    X, labels, t = agent.store.read()
    Xt = X[holdout_split(labels, t)[0]]
    out = send(agent, TOPICS.task, task("covariance", clip_norm=1e6))  # no stats_mean: device standardization
    sketch = decode(out[0]).payload
    mean, scale = device_standardization(Xt)
    Z = (Xt - mean) / scale
    np.testing.assert_allclose(sketch.statistic, (Z.T @ Z / len(Z)).ravel(), rtol=1e-10, atol=1e-12)
    # a correlation matrix (constant features have scale 1 and a zero row): bounded entries, unit diagonal
    R = sketch.statistic.reshape(X.shape[1], X.shape[1])
    assert np.abs(R).max() <= 1 + 1e-9
    assert set(np.round(np.diag(R), 9)) <= {0.0, 1.0}


def test_device_standardized_basis_trains_and_evaluates_on_own_statistics(agent):
    data = agent.local_data(CLASSES)
    mean, scale = data.standardization()  # the training rows' statistics, also applied to held-out rows
    components, _, _ = fit_basis((data.X[data.train] - mean) / scale, 8)
    d = components.shape[1]
    basis = Basis(
        round=3, version=1, components=components, mean=np.zeros(d), scale=np.ones(d), standardization="device"
    )
    send(agent, TOPICS.basis, basis)
    model = init_params(8, 2, random_state=1)
    update = decode(
        send(
            agent,
            TOPICS.task,
            task("train", basis_version=1, model=model, clip_norm=1e6, local_epochs=2, lr=0.1, batch_size=4),
        )[0]
    ).payload
    Z = ((data.X - mean) / scale) @ components.T
    expected_acc = balanced_accuracy(data.y[data.held_out], predict_proba(model, Z[data.held_out], 2).argmax(1))
    assert update.metrics.eval_balanced_accuracy == pytest.approx(expected_acc)
    trained, _ = train(
        model,
        Z[data.train],
        data.y[data.train],
        2,
        epochs=2,
        lr=0.1,
        batch_size=4,
        random_state=np.random.default_rng(0),
    )
    np.testing.assert_allclose(update.delta, trained - model, rtol=1e-9, atol=1e-12)


def test_local_trust_mode_adds_noise_of_the_right_scale(agent):
    out = send(
        agent,
        TOPICS.task,
        task(
            "covariance",
            stats_mean=np.zeros(141),
            stats_scale=np.ones(141),
            clip_norm=1.0,
            trust_mode="local",
            noise_multiplier=2.0,
        ),
    )
    sketch = decode(out[0]).payload
    # the clipped statistic has norm 1; 141**2 noise draws of std 2 dominate it
    assert np.std(sketch.statistic) == pytest.approx(2.0, rel=0.05)
    assert not sketch.clipped  # its norm was above 1, but that bit is data-dependent cleartext
    # the device's own gate charged the release, durably, before it was handed out
    assert [(g.kind, g.noise_multiplier, g.count) for g in agent.mechanism.ledger.groups] == [("basis", 2.0, 1)]
    row = (
        sqlite3.connect(agent.config.store_path)
        .execute("SELECT ledger FROM agent_privacy_ledger WHERE id = 1")
        .fetchone()
    )
    assert '"noise_multiplier": 2.0' in row[0]


def test_local_mode_update_carries_no_data_dependent_cleartext(agent):
    send(agent, TOPICS.basis, basis_of(agent))
    model = init_params(8, 2, random_state=1)
    out = send(
        agent,
        TOPICS.task,
        task(
            "train",
            basis_version=1,
            model=model,
            clip_norm=0.05,
            trust_mode="local",
            noise_multiplier=1.0,
            local_epochs=2,
            lr=0.1,
            batch_size=4,
        ),
    )
    update = decode(out[0]).payload
    assert update.n_examples == 0 and not update.clipped and update.norm_bit is None
    m = update.metrics
    assert (
        m.loss,
        m.n_windows,
        m.rss_bytes,
        m.cpu_time_s,
        m.bytes_sent,
        m.bytes_received,
        m.eval_balanced_accuracy,
        m.eval_windows,
    ) == (0.0, 0, 0, 0.0, 0, 0, None, 0)
    assert np.std(update.delta) == pytest.approx(0.05, rel=0.5)  # noise z C dominates the clipped delta
    evaluation = decode(
        send(agent, TOPICS.task, task("evaluate", round=8, basis_version=1, model=model, trust_mode="local"))[0]
    ).payload
    assert evaluation.metrics.eval_balanced_accuracy is None and evaluation.metrics.eval_windows == 0
    assert agent.privacy_report()["client_epsilon"] == pytest.approx(
        RdpAccountant().compose(dp_accounting.GaussianDpEvent(1.0)).get_epsilon(1e-5)
    )
    # a restarted agent keeps its ledger
    path = agent.config.store_path
    agent.close()
    again = make_agent([], path)
    try:
        assert len(again.mechanism.ledger) == 1
    finally:
        again.close()


@pytest.mark.slow
def test_record_level_dp_sgd_is_wired_and_accounted(recordings, ingested_store, tmp_path, caplog):
    store = tmp_path / "features.sqlite"
    shutil.copyfile(ingested_store, store)
    q, z = 0.25, 1.2
    agent = make_agent(
        recordings,
        store,
        dp={"record_noise_multiplier": z, "record_clip_norm": 0.5, "record_sampling_rate": q, "delta": 1e-4},
    )
    try:
        send(agent, TOPICS.basis, basis_of(agent))
        model = init_params(8, 2, random_state=1)
        with caplog.at_level(logging.INFO, logger="biofed.edge"):
            out = send(agent, TOPICS.task, task("train", basis_version=1, model=model, local_epochs=2, lr=0.1))
        update = decode(out[0]).payload
        assert update.delta.shape == model.shape and np.abs(update.delta).sum() > 0
        # ceil(local_epochs / q) = 8 Poisson-sampled steps, each charged to the record-level ledger
        groups = agent.record_mechanism.ledger.groups
        assert [(g.sampling_rate, g.noise_multiplier, g.count) for g in groups] == [(q, z, 8)]
        expected = (
            RdpAccountant()
            .compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), 8)
            .get_epsilon(1e-4)
        )
        report = agent.privacy_report()
        assert report["record_epsilon"] == pytest.approx(expected, rel=1e-12)
        assert report["client_epsilon"] == 0.0  # central mode: the device itself released nothing noised
        assert "record-level epsilon" in caplog.text and "client-level epsilon" in caplog.text
    finally:
        agent.close()


def test_covariance_with_wrong_feature_count_is_refused(agent, caplog):
    with caplog.at_level(logging.ERROR, logger="biofed.edge.agent"):
        out = send(agent, TOPICS.task, task("covariance", stats_mean=np.zeros(3), stats_scale=np.ones(3)))
    assert out == [] and "stats_mean of shape (3,)" in caplog.text


# ----------------------------------------------------------------------------- task rules
def test_task_past_its_deadline_is_skipped(recordings, ingested_store, tmp_path, caplog):
    store = tmp_path / "features.sqlite"
    shutil.copyfile(ingested_store, store)
    agent = make_agent(recordings, store, clock=lambda: 2_000_000_000.0)
    with caplog.at_level(logging.INFO, logger="biofed.edge.agent"):
        out = send(agent, TOPICS.task, task("moments", deadline=2_000_000_000.0 - 5))
    assert out == [] and "expired 5.0 s ago" in caplog.text
    assert send(agent, TOPICS.task, task("moments", round=8, deadline=2_000_000_000.0 + 5)) != []
    agent.close()


def test_task_for_other_devices_is_skipped(agent):
    assert send(agent, TOPICS.task, task("moments", participants=("device01", "device02"))) == []
    assert len(send(agent, TOPICS.task, task("moments", round=8, participants=("device01", DEVICE)))) == 1


def test_duplicates_are_answered_once(agent):
    data = encode_message(task("moments"), fleet=FLEET, sender="coordinator")
    assert len(agent.handle_message(TOPICS.task, data)) == 1
    assert agent.handle_message(TOPICS.task, data) == []  # QoS 1 redelivery: same message id
    assert send(agent, TOPICS.task, task("moments")) == []  # same round and phase, new id


@pytest.mark.parametrize(
    "topic, data, reason",
    [
        (TOPICS.task, b"\x00garbage", "MalformedMessage|malformed|msgpack"),
        (TOPICS.task, encode_message(Status(round=1, state="online"), fleet=FLEET, sender="coordinator"), "status"),
        (TOPICS.task, encode_message(task("moments"), fleet="otherfleet", sender="coordinator"), "fleet"),
        ("biofed/ward7/secret", b"", "not a biofed topic"),
        (TOPICS.basis, b"\x81\xa1v\x01", "."),
    ],
)
def test_bad_messages_are_logged_and_dropped(agent, topic, data, reason, caplog):
    with caplog.at_level(logging.WARNING, logger="biofed.edge.agent"):
        assert agent.handle_message(topic, data) == []
    assert agent.dropped_messages == 1
    assert "dropped a message" in caplog.text
    # the agent keeps working
    assert len(send(agent, TOPICS.task, task("moments"))) == 1


# ----------------------------------------------------------------------------- training
def test_train_evaluates_the_incoming_model_then_sends_a_clipped_delta(agent):
    basis = basis_of(agent)
    assert len(send(agent, TOPICS.basis, basis)) == 1  # a status with the new basis version
    model = init_params(8, 2, random_state=1)
    clip = 0.05
    out = send(
        agent,
        TOPICS.task,
        task(
            "train",
            basis_version=1,
            model=model,
            clip_norm=clip,
            local_epochs=3,
            lr=0.1,
            batch_size=4,
            adaptive_clipping=True,
        ),
    )
    assert len(out) == 1 and out[0].topic == TOPICS.update(DEVICE)
    update = decode(out[0]).payload
    assert isinstance(update, Update) and update.basis_version == 1
    data = agent.local_data(CLASSES)
    Z = project(data.X, basis.components, mean=basis.mean, scale=basis.scale)
    expected_acc = balanced_accuracy(data.y[data.held_out], predict_proba(model, Z[data.held_out], 2).argmax(1))
    assert update.metrics.eval_balanced_accuracy == pytest.approx(expected_acc)
    assert update.metrics.eval_windows == data.held_out.sum() == 2 * 3  # ceil(0.2 * 11) per class
    assert update.n_examples == update.metrics.n_windows == data.train.sum()
    assert np.linalg.norm(update.delta) == pytest.approx(clip) and update.clipped and update.norm_bit == 0
    # the same local training, reproduced with the same shuffles, gives the unclipped direction
    trained, loss = train(
        model,
        Z[data.train],
        data.y[data.train],
        2,
        epochs=3,
        lr=0.1,
        batch_size=4,
        random_state=np.random.default_rng(0),
    )
    expected_delta, _ = clip_l2(trained - model, clip)
    np.testing.assert_allclose(update.delta, expected_delta, rtol=1e-9)
    assert update.metrics.loss == pytest.approx(loss)
    assert update.metrics.rss_bytes > 10_000_000 and update.metrics.bytes_received > 0
    assert agent.state is AgentState.IDLE


def test_wrong_basis_version_is_refused(agent, caplog):
    send(agent, TOPICS.basis, basis_of(agent, version=2))
    model = init_params(8, 2, random_state=1)
    with caplog.at_level(logging.WARNING, logger="biofed.edge.agent"):
        out = send(agent, TOPICS.task, task("train", basis_version=1, model=model))
    assert out == []
    assert "basis version 1 but this device has version 2; refused" in caplog.text


def test_task_for_a_newer_basis_waits_for_it(agent):
    model = init_params(8, 2, random_state=1)
    assert send(agent, TOPICS.task, task("train", basis_version=1, model=model)) == []
    out = send(agent, TOPICS.basis, basis_of(agent, version=1))
    kinds = [decode(o).kind for o in out]
    assert kinds == ["status", "update"]  # the parked task runs as soon as its basis arrives


def test_basis_of_another_width_is_refused(agent, caplog):
    bad = Basis(round=1, version=1, components=np.eye(3), mean=np.zeros(3), scale=np.ones(3))
    with caplog.at_level(logging.ERROR, logger="biofed.edge.agent"):
        assert send(agent, TOPICS.basis, bad) == []
    assert agent.basis is None and "basis refused" in caplog.text


def test_model_of_the_wrong_size_is_refused(agent, caplog):
    send(agent, TOPICS.basis, basis_of(agent))
    with caplog.at_level(logging.ERROR, logger="biofed.edge.agent"):
        assert send(agent, TOPICS.task, task("train", basis_version=1, model=np.zeros(5))) == []
    assert f"expected {n_params(8, 2)}" in caplog.text


def test_evaluate_phase_replies_with_metrics_only(agent):
    send(agent, TOPICS.basis, basis_of(agent))
    model = init_params(8, 2, random_state=2)
    update = decode(send(agent, TOPICS.task, task("evaluate", basis_version=1, model=model))[0]).payload
    assert update.delta.size == 0 and update.n_examples == 0 and not update.clipped
    assert update.metrics.eval_windows == 6 and 0 <= update.metrics.eval_balanced_accuracy <= 1


def test_predictions_follow_each_model_when_enabled(recordings, ingested_store, tmp_path):
    store = tmp_path / "features.sqlite"
    shutil.copyfile(ingested_store, store)
    agent = make_agent(recordings, store, predict=True)
    send(agent, TOPICS.basis, basis_of(agent))
    params = init_params(8, 2, random_state=4)
    out = send(agent, TOPICS.model, Model(round=9, params=params, basis_version=1, classes=CLASSES))
    prediction = decode(out[0]).payload
    assert out[0].topic == TOPICS.prediction(DEVICE)
    assert prediction.proba.shape == (agent.n_rows, 2)
    np.testing.assert_allclose(prediction.proba.sum(1), 1.0)
    agent.close()


def test_predictions_of_a_device_standardized_model_use_the_training_statistics(recordings, ingested_store, tmp_path):
    store = tmp_path / "features.sqlite"
    shutil.copyfile(ingested_store, store)
    agent = make_agent(recordings, store, predict=True)
    data = agent.local_data(CLASSES)
    mean, scale = data.standardization()
    components, _, _ = fit_basis((data.X[data.train] - mean) / scale, 8)
    d = components.shape[1]
    send(
        agent,
        TOPICS.basis,
        Basis(round=3, version=1, components=components, mean=np.zeros(d), scale=np.ones(d), standardization="device"),
    )
    params = init_params(8, 2, random_state=4)
    out = send(agent, TOPICS.model, Model(round=9, params=params, basis_version=1, classes=CLASSES))
    X, _, _ = agent.store.read()
    expected = predict_proba(params, ((X - mean) / scale) @ components.T, 2)
    np.testing.assert_allclose(decode(out[0]).payload.proba, expected, rtol=1e-9)
    agent.close()


# ----------------------------------------------------------------------------- MQTT loop
def test_live_agent_serves_while_ingesting_and_goes_offline_on_stop(amqtt_broker, recordings, tmp_path):
    """replay_speed > 0: the agent connects at once, ingests in the background (the store
    grows), answers a task over MQTT and publishes a retained "offline" status when stopped."""
    broker = {"host": amqtt_broker.host, "port": amqtt_broker.port, "protocol": "3.1.1"}
    agent = make_agent(recordings, tmp_path / "features.sqlite", replay_speed=10.0, broker=broker)
    coordinator = MqttClient(amqtt_broker.host, amqtt_broker.port, "coordinator", protocol="3.1.1").connect()
    coordinator.subscribe(TOPICS.all_devices("status"))
    coordinator.subscribe(TOPICS.all_devices("sketch"))
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    try:
        statuses, sketches = [], []
        deadline = time.monotonic() + 60
        published = False
        while time.monotonic() < deadline and not sketches:
            inbound = coordinator.receive(timeout_s=0.2)
            if inbound is not None:
                message = decode_topic_message(TOPICS, inbound.topic, inbound.payload)
                (statuses if message.kind == "status" else sketches).append(message.payload)
            if not published and statuses and agent.n_rows == 2 * (SECONDS - 1):
                coordinator.publish(TOPICS.task, encode_message(task("moments"), fleet=FLEET, sender="coordinator"))
                published = True
        assert statuses[0].state == "online" and statuses[0].n_rows == 0  # no row count in a status (data-dependent)
        assert sketches and sketches[0].n_features == 141
    finally:
        stop.set()
        runner.join(timeout=30)
    assert agent.state is AgentState.STOPPED
    final = None
    while (inbound := coordinator.receive(timeout_s=1.0)) is not None:
        final = decode_topic_message(TOPICS, inbound.topic, inbound.payload).payload
    assert isinstance(final, Status) and final.state == "offline"
    coordinator.close()
    agent.close()


@pytest.mark.slow
def test_agent_says_online_again_after_the_broker_restarts(recordings, ingested_store, tmp_path):
    from biofed.apps.broker import start_embedded_broker

    store = tmp_path / "features.sqlite"
    shutil.copyfile(ingested_store, store)
    first = start_embedded_broker()
    second = None
    agent = make_agent(recordings, store, broker={"host": first.host, "port": first.port, "protocol": "3.1.1"})
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while agent.state is not AgentState.IDLE and time.monotonic() < deadline:
            time.sleep(0.05)
        first.stop()  # the broker dies with every retained status
        second = start_embedded_broker(port=first.port)
        with MqttClient(second.host, second.port, "coordinator", protocol="3.1.1") as coordinator:
            coordinator.subscribe(TOPICS.all_devices("status"))
            inbound = coordinator.receive(timeout_s=60)  # the retained status re-published on reconnect
            status = decode_topic_message(TOPICS, inbound.topic, inbound.payload).payload
        assert status.state == "online" and status.n_rows == 0
    finally:
        stop.set()
        runner.join(timeout=30)
        agent.close()
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.slow
def test_disconnected_agent_stops_at_once(recordings, ingested_store, tmp_path):
    """With its broker gone, a stopped agent exits without waiting for an acknowledgement that
    cannot come (the broker has its last will)."""
    from biofed.apps.broker import start_embedded_broker

    store = tmp_path / "features.sqlite"
    shutil.copyfile(ingested_store, store)
    server = start_embedded_broker()
    agent = make_agent(recordings, store, broker={"host": server.host, "port": server.port, "protocol": "3.1.1"})
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while agent.state is not AgentState.IDLE and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        while agent._client is not None and agent._client.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        stop.set()
        runner.join(timeout=60)
        took = time.monotonic() - started
    finally:
        stop.set()
        runner.join(timeout=60)
        agent.close()
        server.stop()
    assert agent.state is AgentState.STOPPED
    assert took < 15.0, f"a disconnected agent took {took:.1f} s to stop"
