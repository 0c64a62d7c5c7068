"""The exported model in the federation: the coordinator learns the layout from statuses and ships
ONNX with every Model; the agent predicts with onnxruntime (refusing other layouts), live per window."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from biofed.apps.federation import write_synthetic_devices
from biofed.config import CoordinatorConfig, DeviceConfig
from biofed.coordinator.onnx_export import build_model
from biofed.coordinator.server import Coordinator
from biofed.coordinator.state import CoordinatorState
from biofed.edge.agent import EdgeAgent
from biofed.edge.inference import OnnxModel
from biofed.kernels import init_params, predict_proba, project, train
from biofed.model import FeatureLayout, ModelFile, PrivacySpec, fit_basis
from biofed.mqtt import MqttClient
from biofed.protocol import Model, Prediction, Status, Topics, decode_topic_message, encode_message
from brokers import amqtt_broker  # noqa: F401  (pytest fixture)

FLEET = "ward7"
DEVICE = "device00"
TOPICS = Topics(FLEET)
CLASSES = ("rest", "arithmetic")
SECONDS = 12.0


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> list[Path]:
    return write_synthetic_devices(tmp_path_factory.mktemp("recordings"), 1, duration_s=SECONDS, random_state=5)[DEVICE]


@pytest.fixture(scope="module")
def ingested(recordings, tmp_path_factory):
    """A store filled once; the device's layout and a model trained on its rows (basis k=8)."""
    path = tmp_path_factory.mktemp("template") / "features.sqlite"
    agent = EdgeAgent(DeviceConfig(device_id=DEVICE, fleet=FLEET, recordings=tuple(recordings), store_path=path))
    agent.ingest()
    X, labels, _ = agent.store.read()
    layout = FeatureLayout.from_json(agent.layout_json)
    agent.close()
    y = np.array([CLASSES.index(label) for label in labels])
    basis = fit_basis(X, 8)
    Z = project(X, basis.components, mean=basis.mean, scale=basis.scale)
    params, _ = train(init_params(8, 2, 4, random_state=0), Z, y, 2, 4, epochs=20, lr=0.1, random_state=0)
    model = ModelFile(params, CLASSES, 4, basis, 1, FLEET, 9, 3, layout, PrivacySpec(1.5, 1e-5, "rdp", {"rdp": 1.5}))
    return path, layout, model


def _agent(recordings, store, **config) -> EdgeAgent:
    return EdgeAgent(
        DeviceConfig(device_id=DEVICE, fleet=FLEET, recordings=tuple(recordings), store_path=store, **config),
        random_state=0,
    )


def _model_message(model: ModelFile, onnx_bytes: bytes) -> Model:
    return Model(
        round=model.round,
        params=model.params,
        basis_version=1,
        classes=CLASSES,
        hidden=model.hidden,
        onnx=np.frombuffer(onnx_bytes, dtype=np.uint8),
    )


def _send(agent, topic, payload):
    return agent.handle_message(topic, encode_message(payload, fleet=FLEET, sender="coordinator"))


def _numba(model: ModelFile, X) -> np.ndarray:
    basis = model.basis
    return predict_proba(
        model.params, project(X, basis.components, mean=basis.mean, scale=basis.scale), 2, model.hidden
    )


def test_agent_reports_layout_and_predicts_with_the_onnx_model(recordings, ingested, tmp_path, caplog):
    template, layout, model = ingested
    store = tmp_path / "features.sqlite"
    shutil.copyfile(template, store)
    agent = _agent(recordings, store, predict=True)
    try:
        status = decode_topic_message(TOPICS, *_outgoing(agent.status_message())).payload
        assert FeatureLayout.from_json(status.layout) == layout and layout.n_features == 141
        out = _send(agent, TOPICS.model, _model_message(model, build_model(model).SerializeToString()))
        prediction = decode_topic_message(TOPICS, *_outgoing(out[0])).payload
        assert out[0].topic == TOPICS.prediction(DEVICE) and isinstance(prediction, Prediction)
        X, _, t = agent.store.read(limit=64)
        np.testing.assert_allclose(prediction.proba, _numba(model, X), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(prediction.t, t)
        assert prediction.round == 9 and prediction.classes == CLASSES
        assert agent.predictor is not None and agent.predictor.metadata.round == 9

        # a model trained on another layout (same width) is refused, and predictions stop
        eeg = layout.modality("eeg")
        other = dataclasses.replace(
            layout, modalities=(dataclasses.replace(eeg, ch_names=("X1",) + eeg.ch_names[1:]), *layout.modalities[1:])
        )
        wrong = dataclasses.replace(model, round=10, layout=other)
        with caplog.at_level(logging.ERROR, logger="biofed.edge.agent"):
            assert _send(agent, TOPICS.model, _model_message(wrong, build_model(wrong).SerializeToString())) == []
        assert f"does not fit this device: eeg: channel 0 is 'X1' in the model but '{eeg.ch_names[0]}'" in caplog.text
        assert agent.predictor is None
        with caplog.at_level(logging.ERROR, logger="biofed.edge.agent"):
            assert _send(agent, TOPICS.model, _model_message(model, b"\x08\x01garbage")) == []
        assert "not a loadable ONNX model" in caplog.text
    finally:
        agent.close()


def _outgoing(out):
    return out.topic, out.payload


def test_live_agent_predicts_every_new_window(amqtt_broker, recordings, ingested, tmp_path):  # noqa: F811
    """A retained Model with ONNX waits on the broker; a live agent (replay x10) loads it and
    publishes predictions as windows are produced, equal to the Numba path."""
    _, _, model = ingested
    broker = {"host": amqtt_broker.host, "port": amqtt_broker.port, "protocol": "3.1.1"}
    with MqttClient(amqtt_broker.host, amqtt_broker.port, "coordinator", protocol="3.1.1") as coordinator:
        coordinator.publish(
            TOPICS.model,
            encode_message(
                _model_message(model, build_model(model).SerializeToString()), fleet=FLEET, sender="coordinator"
            ),
            qos=1,
            retain=True,
        )
        coordinator.subscribe(TOPICS.all_devices("prediction"))
        agent = _agent(recordings, tmp_path / "features.sqlite", predict=True, replay_speed=10.0, broker=broker)
        stop = threading.Event()
        runner = threading.Thread(target=agent.run, args=(stop,))
        runner.start()
        predictions = []
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and agent.n_rows < 2 * (SECONDS - 1):  # until ingestion is done
                inbound = coordinator.receive(timeout_s=0.2)
                if inbound is not None:
                    predictions.append(decode_topic_message(TOPICS, inbound.topic, inbound.payload).payload)
            while (inbound := coordinator.receive(timeout_s=1.0)) is not None:
                predictions.append(decode_topic_message(TOPICS, inbound.topic, inbound.payload).payload)
        finally:
            stop.set()
            runner.join(timeout=30)
        X, _, t = agent.store.read()
        agent.close()
    assert len(predictions) >= 10  # one message per produced window (or few), not one batch at the end
    by_time = {float(ti): row for p in predictions for ti, row in zip(p.t, p.proba)}
    assert len(by_time) >= 2 * (SECONDS - 1) - 4
    index = {float(ti): i for i, ti in enumerate(t)}
    assert set(by_time) <= set(index)
    rows = [index[ti] for ti in sorted(by_time)]
    np.testing.assert_allclose(
        np.array([by_time[ti] for ti in sorted(by_time)]), _numba(model, X[rows]), rtol=0, atol=1e-5
    )


def test_coordinator_exports_each_round_with_the_reported_layout(ingested, tmp_path, caplog):
    _, layout, model = ingested
    config = CoordinatorConfig(fleet=FLEET, rounds=2, state_dir=tmp_path / "state")
    coordinator = Coordinator(config)
    snap = coordinator.snapshot
    snap.params, snap.basis_components, snap.basis_mean, snap.basis_scale = (model.params, *model.basis)
    snap.n_features, snap.basis_version, snap.train_rounds_done = model.n_features, 1, 2
    coordinator.config = config.model_copy(update={"model": config.model.model_copy(update={"hidden": 4})})
    coordinator.ledger.record_round(7, 1.0, 1.0, kind="train")
    assert coordinator._export(7).size == 0  # no device reported a layout yet: npz only
    assert (tmp_path / "state" / "models" / "round_00007.npz").is_file()
    assert not (tmp_path / "state" / "model_latest.onnx").exists()

    other_width = dataclasses.replace(layout, modalities=layout.modalities[:1])
    for device, text in (
        ("d1", layout.to_json()),
        ("d2", layout.to_json()),
        ("d3", other_width.to_json()),
        ("d4", "{not json"),
    ):
        status = Status(round=0, state="online", layout=text)
        assert (
            coordinator.ingest.handle(TOPICS.status(device), encode_message(status, fleet=FLEET, sender=device))
            == "status"
        )
    with caplog.at_level(logging.WARNING, logger="biofed.coordinator.server"):
        onnx_bytes = coordinator._export(8)
    assert "device d4 reported an unreadable feature layout" in caplog.text
    exported = OnnxModel(onnx_bytes.tobytes())
    meta = exported.metadata
    assert (meta.fleet, meta.round, meta.train_round, meta.basis_version, meta.hidden) == (FLEET, 8, 2, 1, 4)
    assert meta.layout == layout
    assert meta.privacy.epsilon == pytest.approx(coordinator.ledger.epsilon())
    assert meta.privacy.accountant == "rdp" and meta.privacy.trust_mode == "central"
    assert (tmp_path / "state" / "model_latest.onnx").read_bytes() == onnx_bytes.tobytes()
    assert (tmp_path / "state" / "models" / "round_00008.onnx").is_file()

    coordinator._store = CoordinatorState(config.state_dir, FLEET)
    try:
        coordinator._write_final()
    finally:
        coordinator._store.close()
    final = ModelFile.load(tmp_path / "state" / "model_final.npz")
    assert final.layout == layout and final.fleet == FLEET
    assert OnnxModel(tmp_path / "state" / "model_final.onnx").layout == layout


def test_protocol_carries_onnx_bytes_and_layouts(ingested):
    from biofed.protocol import InvalidPayload

    _, layout, model = ingested
    data = build_model(model).SerializeToString()
    message = decode_topic_message(
        TOPICS, TOPICS.model, encode_message(_model_message(model, data), fleet=FLEET, sender="coordinator")
    )
    assert message.payload.onnx.tobytes() == data and OnnxModel(message.payload.onnx.tobytes()).layout == layout
    assert Model(round=1, params=model.params, basis_version=1, classes=CLASSES).onnx.size == 0  # optional
    with pytest.raises(InvalidPayload, match="Model.onnx must be a uint8 byte array, got float32"):
        Model(round=1, params=model.params, basis_version=1, classes=CLASSES, onnx=np.zeros(3, dtype=np.float32))
    with pytest.raises(InvalidPayload, match="Status.layout must be a JSON string, got dict"):
        Status(round=0, state="online", layout={"window_s": 2.0})
    status = decode_topic_message(
        TOPICS,
        TOPICS.status(DEVICE),
        encode_message(Status(round=0, state="online", layout=layout.to_json()), fleet=FLEET, sender=DEVICE),
    ).payload
    assert FeatureLayout.from_json(status.layout) == layout
