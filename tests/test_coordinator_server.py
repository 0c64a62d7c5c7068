"""coordinator.server: the round loop against a real broker and simulated devices.

Simulated devices are real MQTT clients (biofed.mqtt.MqttClient) speaking the real
protocol: they publish a retained "online" status (last will "offline"), read the retained
task and basis, and answer with Sketch/Update messages computed on their own data with
the kernels (a load generator, not a mock). Rounds close as soon as every participant
replied, so the tests run in seconds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from click.testing import CliRunner
from dp_accounting.rdp import RdpAccountant

from biofed.apps.cli import cli
from biofed.config import CoordinatorConfig
from biofed.coordinator.server import Coordinator, CoordinatorError, RunState
from biofed.kernels.training import predict_proba, train
from biofed.mqtt import MqttClient, Will
from biofed.protocol import (
    Basis,
    Message,
    Sketch,
    Status,
    Task,
    Topics,
    Update,
    UpdateMetrics,
    decode_topic_message,
    encode_message,
    offline_status,
)
from brokers import amqtt_broker, mosquitto_broker  # noqa: F401  (pytest fixtures)

FLEET = "ward7"
TOPICS = Topics(FLEET)
D = 6
CLASSES = ("rest", "arithmetic")


# ----------------------------------------------------------------------------- simulated devices
def device_data(seed: int, rows: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes in D raw features with correlated, offset, scaled columns."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], rows // 2).astype(np.int64)
    X = rng.normal(size=(rows, D)) + np.outer(y, np.linspace(2.0, 0.5, D))
    X = X @ np.random.default_rng(99).normal(size=(D, D)) * 3.0 + 10.0
    return X, y


def _clip(vector: np.ndarray, norm: float) -> tuple[np.ndarray, bool]:
    n = float(np.linalg.norm(vector))
    return (vector * (norm / n), True) if n > norm else (vector, False)


class SimDevice:
    """One simulated device: a real MQTT client answering tasks in a thread."""

    def __init__(self, broker, device_id: str, seed: int, *, protocol: str = "3.1.1", fixed_delta=None) -> None:
        self.device_id = device_id
        self.X, self.y = device_data(seed)
        self.fixed_delta = fixed_delta
        self.alive = True
        self.basis: Basis | None = None
        self.answered: set[int] = set()
        self.sent: list[tuple[str, bytes]] = []
        self.client = MqttClient(
            broker.host,
            broker.port,
            device_id,
            protocol=protocol,
            keepalive=5,
            will=Will(TOPICS.status(device_id), offline_status(fleet=FLEET, device_id=device_id)),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=device_id)

    def start(self) -> SimDevice:
        self.client.connect()
        self.client.subscribe(TOPICS.task)
        self.client.subscribe(TOPICS.basis)
        self.publish(TOPICS.status(self.device_id), Status(round=0, state="online"), retain=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()

    def publish(self, topic: str, payload, *, retain: bool = False, **kwargs) -> bytes:
        data = encode_message(payload, fleet=FLEET, sender=self.device_id, **kwargs)
        self.client.publish(topic, data, retain=retain)
        self.sent.append((topic, data))
        return data

    def _loop(self) -> None:
        pending: Task | None = None
        while not self._stop.is_set():
            inbound = self.client.receive(0.02)
            if inbound is not None:
                message = decode_topic_message(TOPICS, inbound.topic, inbound.payload)
                if isinstance(message.payload, Basis):
                    self.basis = message.payload
                elif isinstance(message.payload, Task):
                    pending = message.payload
            if pending is not None and self.alive and self._ready(pending):
                task, pending = pending, None
                if self.device_id in task.participants and task.round not in self.answered:
                    self.answered.add(task.round)
                    self.answer(task)

    def _ready(self, task: Task) -> bool:
        return task.phase in ("moments", "covariance") or (
            self.basis is not None and self.basis.version == task.basis_version
        )

    def features(self) -> np.ndarray:
        b = self.basis
        if b.standardization == "device":  # mean 0, scale 1: the device z-scores with its own statistics
            return ((self.X - self.X.mean(0)) / self.X.std(0)) @ b.components.T
        return ((self.X - b.mean) / b.scale) @ b.components.T

    def answer(self, task: Task) -> None:
        if task.phase == "moments":
            stat = np.concatenate([self.X.mean(0), (self.X**2).mean(0)])
        elif task.phase == "covariance":
            if task.stats_mean is None:  # device standardization
                Z = (self.X - self.X.mean(0)) / self.X.std(0)
            else:
                Z = (self.X - task.stats_mean) / task.stats_scale
            stat = (Z.T @ Z / len(Z)).ravel()
        if task.phase in ("moments", "covariance"):
            stat, clipped = _clip(stat, task.clip_norm)
            self.publish(
                TOPICS.sketch(self.device_id),
                Sketch(
                    round=task.round,
                    basis_version=task.basis_version,
                    phase=task.phase,
                    statistic=stat,
                    clipped=clipped,
                    n_features=D,
                ),
            )
            return
        F = self.features()
        accuracy = float(
            np.mean([np.mean(predict_proba(task.model, F[self.y == c], 2).argmax(1) == c) for c in (0, 1)])
        )
        metrics = UpdateMetrics(
            loss=0.5,
            n_windows=len(F),
            rss_bytes=1,
            cpu_time_s=0.01,
            eval_balanced_accuracy=accuracy,
            eval_windows=len(F),
        )
        if task.phase == "evaluate":
            self.publish(
                TOPICS.update(self.device_id),
                Update(
                    round=task.round,
                    basis_version=task.basis_version,
                    delta=np.empty(0),
                    n_examples=0,
                    clipped=False,
                    metrics=metrics,
                ),
            )
            return
        if self.fixed_delta is not None:
            delta, loss = self.fixed_delta.copy(), 0.5
        else:
            new, loss = train(
                task.model,
                F,
                self.y,
                2,
                epochs=task.local_epochs,
                lr=task.lr,
                batch_size=task.batch_size,
                random_state=0,
            )
            delta = new - task.model
        norm = float(np.linalg.norm(delta))
        delta, clipped = _clip(delta, task.clip_norm)
        metrics = UpdateMetrics(
            loss=loss,
            n_windows=len(F),
            rss_bytes=1,
            cpu_time_s=0.01,
            eval_balanced_accuracy=accuracy,
            eval_windows=len(F),
        )
        self.publish(
            TOPICS.update(self.device_id),
            Update(
                round=task.round,
                basis_version=task.basis_version,
                delta=delta,
                n_examples=len(F),
                clipped=clipped,
                metrics=metrics,
                norm_bit=int(norm <= task.clip_norm) if task.adaptive_clipping else None,
            ),
        )


def make_config(server, tmp_path: Path, **overrides) -> CoordinatorConfig:
    data = {
        "fleet": FLEET,
        "broker": {"host": server.host, "port": server.port, "protocol": "3.1.1", "max_message_bytes": 64 * 1024},
        "rounds": 2,
        "min_devices": 2,
        "round_deadline_s": 3.0,
        "state_dir": str(tmp_path / "state"),
        "model": {"classes": list(CLASSES), "basis_k": 4, "standardization": "global"},
        "training": {"lr": 0.5, "local_epochs": 2},
        "dp": {"noise_multiplier": 0.0, "clip_norm": 1.0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return CoordinatorConfig.model_validate(data)


def coordinator(config: CoordinatorConfig, **kwargs) -> Coordinator:
    kwargs.setdefault("discovery_timeout_s", 20.0)
    kwargs.setdefault("accountants", ("rdp",))
    kwargs.setdefault("basis_clip_norm", 1e6)
    kwargs.setdefault("rng", np.random.default_rng(0))
    return Coordinator(config, **kwargs)


class Running:
    """A coordinator running in a thread."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.result: RunState | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.coord.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = exc

    def join(self, timeout: float = 60.0) -> RunState:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "coordinator did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def devices(amqtt_broker):
    started: list[SimDevice] = []

    def start(n: int, **kwargs) -> list[SimDevice]:
        new = [
            SimDevice(amqtt_broker, f"pi-{len(started) + i:02d}", seed=len(started) + i, **kwargs).start()
            for i in range(n)
        ]
        started.extend(new)
        return new

    yield start
    for device in started:
        device.close()


def retained(broker, topic: str, protocol: str = "3.1.1") -> Message:
    """The retained message on ``topic`` (amqtt 0.12 may also replay retained messages of
    other topics to a fresh subscriber: skip those)."""
    with MqttClient(broker.host, broker.port, f"reader-{time.monotonic_ns()}", protocol=protocol, clean=True) as c:
        c.subscribe(topic)
        inbound = c.receive(10)
        while inbound is not None and inbound.topic != topic:
            inbound = c.receive(10)
    assert inbound is not None and inbound.retain
    return decode_topic_message(TOPICS, inbound.topic, inbound.payload)


# ----------------------------------------------------------------------------- end to end
def test_federation_end_to_end(amqtt_broker, devices, tmp_path):
    fleet = devices(3)
    printed = []
    coord = coordinator(make_config(amqtt_broker, tmp_path, rounds=3), on_round=printed.append)
    assert coord.run() is RunState.DONE

    history = coord.history()
    assert [r.phase for r in history] == ["moments", "covariance", "train", "train", "train", "evaluate"]
    assert [r.train_round for r in history if r.phase == "train"] == [1, 2, 3]
    assert all(r.n_devices == r.n_selected == 3 for r in history)
    assert [r.round for r in history] == sorted({r.round for r in history})
    assert printed == history
    train_rows = [r for r in history if r.phase == "train"]
    assert train_rows[0].balanced_accuracy == pytest.approx(0.5)  # zero-initialized model
    assert history[-1].balanced_accuracy > 0.9  # the trained model, evaluated on the devices
    assert history[-1].eval_windows == 3 * 120
    assert all(math.isinf(r.epsilon_rdp) for r in train_rows)  # z = 0: no privacy

    # the basis equals the pooled-data computation (equal counts, no clipping, no noise)
    pooled = np.vstack([d.X for d in fleet])
    final = np.load(tmp_path / "state" / "model_final.npz")
    np.testing.assert_allclose(final["basis_mean"], pooled.mean(0), rtol=1e-10)
    np.testing.assert_allclose(final["basis_scale"], pooled.std(0), rtol=1e-8)
    Z = (pooled - pooled.mean(0)) / pooled.std(0)
    _, _, Vt = np.linalg.svd(Z, full_matrices=False)
    np.testing.assert_allclose(np.abs(final["basis_components"] @ Vt[:4].T), np.eye(4), atol=1e-6)
    assert final["params"].shape == (4 * 2 + 2,)
    assert list(final["classes"]) == list(CLASSES) and int(final["basis_version"]) == 1
    assert str(final["accountant"]) == "rdp" and float(final["delta"]) == 1e-5

    # the released artefacts on the broker: retained basis and model, evaluate task
    model = retained(amqtt_broker, TOPICS.model).payload
    np.testing.assert_array_equal(model.params, final["params"])
    assert model.epsilon is None and model.n_devices == 3
    assert retained(amqtt_broker, TOPICS.basis).payload.version == 1
    task = retained(amqtt_broker, TOPICS.task).payload
    assert task.phase == "evaluate" and set(task.participants) == {d.device_id for d in fleet}
    rounds_json = (tmp_path / "state" / "rounds.json").read_text()
    assert '"epsilon_rdp": "inf"' in rounds_json

    # a finished federation is not re-run
    assert coordinator(make_config(amqtt_broker, tmp_path, rounds=3)).run() is RunState.DONE
    assert len(coord.history()) == len(history)


def test_device_standardization_federation(amqtt_broker, devices, tmp_path):
    fleet = devices(3)
    config = make_config(
        amqtt_broker, tmp_path, rounds=3, model={"standardization": "device"}, dp={"basis_clip_norm": 100.0}
    )
    coord = coordinator(config, basis_clip_norm=None)
    assert coord.settings.basis_clip_norm == 100.0  # from dp.basis_clip_norm
    assert coord.run() is RunState.DONE

    history = coord.history()
    assert [r.phase for r in history] == ["covariance", "train", "train", "train", "evaluate"]  # no moments phase
    assert history[-1].balanced_accuracy > 0.9
    # the basis: eigenvectors of the average of the devices' correlation matrices (each z-scored on its own)
    correlations = [np.corrcoef(d.X, rowvar=False) for d in fleet]
    _, eigenvectors = np.linalg.eigh(np.mean(correlations, axis=0))
    final = np.load(tmp_path / "state" / "model_final.npz")
    np.testing.assert_allclose(np.abs(final["basis_components"] @ eigenvectors[:, ::-1][:, :4]), np.eye(4), atol=1e-6)
    np.testing.assert_array_equal(final["basis_mean"], np.zeros(D))
    np.testing.assert_array_equal(final["basis_scale"], np.ones(D))
    assert str(final["standardization"]) == "device"
    basis = retained(amqtt_broker, TOPICS.basis).payload
    assert basis.standardization == "device" and basis.version == 1
    np.testing.assert_array_equal(basis.mean, np.zeros(D))
    np.testing.assert_array_equal(basis.scale, np.ones(D))


def test_basis_round_uses_its_own_noise_multiplier(amqtt_broker, devices, tmp_path):
    fleet = devices(3)
    z, z_basis, delta = 1.0, 4.0, 1e-5
    config = make_config(
        amqtt_broker,
        tmp_path,
        rounds=2,
        model={"standardization": "device"},
        dp={"noise_multiplier": z, "basis_noise_multiplier": z_basis, "basis_clip_norm": 50.0},
    )
    tasks = []
    coord = coordinator(
        config, basis_clip_norm=None, on_round=lambda r: tasks.append(retained(amqtt_broker, TOPICS.task).payload)
    )
    assert coord.run() is RunState.DONE
    history = coord.history()
    assert [(r.phase, r.noise_multiplier) for r in history[:3]] == [("covariance", z_basis), ("train", z), ("train", z)]
    # what the devices were told: the basis task carries z_b and C_b (devices noise with it in local mode)
    assert (tasks[0].phase, tasks[0].noise_multiplier, tasks[0].clip_norm) == ("covariance", z_basis, 50.0)
    assert tasks[0].stats_mean is None and tasks[0].stats_scale is None
    assert (tasks[1].phase, tasks[1].noise_multiplier, tasks[1].clip_norm) == ("train", z, 1.0)
    # epsilon composes one Gaussian(z_b) basis event with the training rounds' Gaussian(z)
    expected = (
        RdpAccountant()
        .compose(dp_accounting.GaussianDpEvent(z_basis))
        .compose(dp_accounting.GaussianDpEvent(z), 2)
        .get_epsilon(delta)
    )
    assert history[-2].epsilon_rdp == pytest.approx(expected, rel=1e-9)
    assert coord.epsilons()["rdp"] == pytest.approx(expected, rel=1e-9)
    kinds = [(g.kind, g.noise_multiplier, g.count) for g in coord.ledger.groups]
    assert kinds == [("basis", z_basis, 1), ("train", z, 2)]
    assert history[-1].balanced_accuracy > 0.5 and len(fleet) == history[-1].n_devices


def test_round_closes_with_the_devices_that_reported(amqtt_broker, devices, tmp_path, caplog):
    fleet = devices(3)
    config = make_config(amqtt_broker, tmp_path, rounds=2, round_deadline_s=1.5)

    def kill_after_first_training_round(record):
        if record.train_round == 1:
            fleet[2].alive = False

    coord = coordinator(config, on_round=kill_after_first_training_round)
    with caplog.at_level(logging.INFO, logger="biofed.coordinator"):
        assert coord.run() is RunState.DONE
    train_rows = [r for r in coord.history() if r.phase == "train"]
    # pi-02 died after the first training round: the second closes at the deadline with 2 of 3
    assert [(r.n_selected, r.n_devices) for r in train_rows] == [(3, 3), (3, 2)]
    assert "no reply from pi-02" in caplog.text


def test_short_round_is_retried_then_aborted(amqtt_broker, devices, tmp_path, caplog):
    fleet = devices(2)
    config = make_config(amqtt_broker, tmp_path, rounds=1, round_deadline_s=0.5)
    fleet[1].alive = False  # never answers: every moments round has 1 < min_devices replies
    coord = coordinator(config, max_retries=1)
    with caplog.at_level(logging.WARNING, logger="biofed.coordinator"):
        assert coord.run() is RunState.ABORTED
    assert coord.history() == []
    assert "nothing published (what reached the coordinator is accounted); retrying (attempt 2 of 2)" in caplog.text
    assert "gave up after 2 attempts" in caplog.text
    assert len(coord.ledger) == 0  # central mode: the trusted coordinator released nothing


# ----------------------------------------------------------------------------- hostile input
def test_duplicates_and_hostile_messages_are_dropped(amqtt_broker, devices, tmp_path, caplog):
    delta = np.linspace(-0.1, 0.1, 10)
    fleet = devices(3, fixed_delta=delta)
    config = make_config(amqtt_broker, tmp_path, rounds=1, round_deadline_s=2.0)
    attacker, silent = fleet[0], fleet[2]
    marks = {}

    def on_round(record):
        if record.phase != "covariance":
            return
        silent.alive = False  # keeps the training round open until its deadline
        # before the training round: garbage, oversized, other fleet, a stranger
        c = attacker.client
        c.publish(TOPICS.update(attacker.device_id), b"\x93garbage")
        c.publish(TOPICS.update(attacker.device_id), b"\x00" * (100 * 1024))
        other = encode_message(Status(round=0, state="online"), fleet="other", sender=attacker.device_id)
        c.publish(TOPICS.status(attacker.device_id), other)
        c.publish(
            TOPICS.update("stranger"),
            encode_message(
                Update(
                    round=record.round + 1,
                    basis_version=1,
                    delta=delta,
                    n_examples=1,
                    clipped=False,
                    metrics=UpdateMetrics(loss=0, n_windows=1, rss_bytes=1, cpu_time_s=0),
                ),
                fleet=FLEET,
                sender="stranger",
            ),
        )
        marks["sent"] = len(attacker.sent)

    coord = coordinator(config, on_round=on_round)
    runner = Running(coord)
    # QoS 1 redelivery: pi-00's training update arrives twice more, same message id, round still open
    wait_until(lambda: "sent" in marks and len(attacker.sent) > marks["sent"])
    topic, data = attacker.sent[-1]
    attacker.client.publish(topic, data)
    attacker.client.publish(topic, data)
    with caplog.at_level(logging.WARNING, logger="biofed.coordinator"):
        assert runner.join() is RunState.DONE
    train = [r for r in coord.history() if r.phase == "train"]
    assert [(r.n_selected, r.n_devices) for r in train] == [(3, 2)]
    dropped = coord.ingest.dropped
    assert dropped["MalformedMessage"] == 1 and dropped["MessageTooLarge"] == 1 and dropped["WrongFleet"] == 1
    assert dropped["unknown device"] == 1
    assert dropped["duplicate"] == 2  # the copies count once
    assert "dropped message on biofed/ward7/update/pi-00: MessageTooLarge" in caplog.text
    assert "was already accepted" in caplog.text
    # with z = 0 the model moved by exactly the uniform mean of the two (equal) updates, once
    np.testing.assert_allclose(np.load(tmp_path / "state" / "model_final.npz")["params"], delta, atol=1e-12)


def test_coordinator_refuses_a_missing_or_invalid_allow_list(tmp_path):
    config = CoordinatorConfig(
        fleet=FLEET, rounds=1, state_dir=tmp_path / "state", allowed_devices_file=tmp_path / "allowed_devices.json"
    )
    with pytest.raises(CoordinatorError, match="allow list not found"):
        Coordinator(config)
    (tmp_path / "allowed_devices.json").write_text('{"fleet": "ward7", "devices": ["ok", "bad id!"]}')
    with pytest.raises(CoordinatorError, match="invalid device ids"):
        Coordinator(config)


# ----------------------------------------------------------------------------- restart and privacy
def _independent_epsilon(history, z: float, delta: float) -> float:
    accountant = RdpAccountant()
    for r in history:
        if r.phase in ("moments", "covariance", "train"):
            event = dp_accounting.GaussianDpEvent(z)
            if r.sampling_rate < 1:
                event = dp_accounting.PoissonSampledDpEvent(r.sampling_rate, event)
            accountant.compose(event)
    return accountant.get_epsilon(delta)


def test_restart_resumes_with_the_same_ledger(amqtt_broker, devices, tmp_path, caplog):
    fleet = devices(3)
    config = make_config(
        amqtt_broker, tmp_path, rounds=3, sampling_rate=1.0, dp={"noise_multiplier": 2.0, "clip_norm": 5.0}
    )
    first = coordinator(config)
    first.on_round = lambda r: first.stop() if r.phase == "train" else None
    assert first.run() is RunState.STOPPED
    before = first.history()
    assert [r.phase for r in before] == ["moments", "covariance", "train"]
    groups_before = first.ledger.groups
    old_update = next(data for topic, data in fleet[0].sent if "/update/" in topic)

    second = coordinator(config, rng=np.random.default_rng(1))
    second.on_round = lambda r: (
        fleet[0].client.publish(TOPICS.update("pi-00"), old_update) if r.train_round == 2 else None
    )
    with caplog.at_level(logging.WARNING, logger="biofed.coordinator"):
        assert second.run() is RunState.DONE
    after = second.history()
    assert after[:3] == before
    assert [r.train_round for r in after if r.phase == "train"] == [1, 2, 3]
    assert after[3].round > before[-1].round
    assert [(g.kind, g.count) for g in groups_before] == [("basis", 2), ("train", 1)]
    assert [(g.kind, g.count, g.first_round) for g in second.ledger.groups] == [
        ("basis", 2, groups_before[0].first_round),
        ("train", 3, groups_before[1].first_round),
    ]
    assert second.ingest.dropped["duplicate"] >= 1  # the replayed update of round 1 was not re-accepted
    assert "was already accepted" in caplog.text
    assert all(r.n_devices == 3 for r in after)
    # epsilon in the state equals dp_accounting on the parameters used, computed here
    expected = _independent_epsilon(after, 2.0, config.dp.delta)
    assert after[-2].epsilon_rdp == pytest.approx(expected, rel=1e-12)
    final = np.load(tmp_path / "state" / "model_final.npz")
    assert float(final["epsilon"]) == pytest.approx(expected, rel=1e-12)


def test_stop_mid_round_commits_nothing(amqtt_broker, devices, tmp_path):
    fleet = devices(2)
    config = make_config(amqtt_broker, tmp_path, rounds=1, round_deadline_s=30.0)
    first = coordinator(config)
    first.on_round = lambda r: setattr(fleet[1], "alive", r.phase != "covariance")  # silent in training
    runner = Running(first)
    wait_until(lambda: first.state is RunState.TRAINING)
    first.stop()  # from another thread, while the training round is open
    assert runner.join() is RunState.STOPPED
    assert [r.phase for r in first.history()] == ["moments", "covariance"]
    abandoned = first.snapshot.next_round - 1

    fleet[1].alive = True
    second = coordinator(config)
    assert second.run() is RunState.DONE
    train = [r for r in second.history() if r.phase == "train"]
    assert len(train) == 1 and train[0].round > abandoned  # the abandoned round number is not reused
    assert [(g.kind, g.count) for g in second.ledger.groups] == [("basis", 2), ("train", 1)]


def test_budget_stops_training(amqtt_broker, devices, tmp_path):
    devices(2)
    z, delta = 3.0, 1e-5
    eps = {
        t: _independent_epsilon([type("R", (), {"phase": "train", "sampling_rate": 1.0})] * (2 + t), z, delta)
        for t in (2, 3)
    }
    budget = (eps[2] + eps[3]) / 2  # room for the two basis phases and exactly 2 training rounds
    config = make_config(
        amqtt_broker, tmp_path, rounds=10, dp={"noise_multiplier": z, "clip_norm": 5.0, "epsilon_budget": budget}
    )
    coord = coordinator(config, accountants=("rdp", "pld"))
    assert coord.run() is RunState.DONE
    history = coord.history()
    assert [r.phase for r in history] == ["moments", "covariance", "train", "train", "evaluate"]
    assert history[-2].epsilon_rdp == pytest.approx(eps[2]) and history[-2].epsilon_rdp <= budget
    assert 0 < history[-2].epsilon_pld <= history[-2].epsilon_rdp
    final = np.load(tmp_path / "state" / "model_final.npz")
    assert "privacy budget" in str(final["stop_reason"])
    assert int(final["train_rounds"]) == 2
    model = retained(amqtt_broker, TOPICS.model).payload
    assert model.epsilon == pytest.approx(eps[2])


def test_adaptive_clipping_follows_the_norm_bits(amqtt_broker, devices, tmp_path):
    delta = np.full(10, 1.0)  # norm 3.16 > C: clipped on the devices, norm_bit 0
    devices(3, fixed_delta=delta)
    config = make_config(
        amqtt_broker,
        tmp_path,
        rounds=2,
        dp={
            "noise_multiplier": 0.0,
            "clip_norm": 1.0,  # z = 0: noiseless bits, exact clip
            "adaptive_clipping": {"target_quantile": 0.5, "learning_rate": 0.2, "bit_noise_std": 0.0},
        },
    )
    coord = coordinator(config)
    assert coord.run() is RunState.DONE
    train = [r for r in coord.history() if r.phase == "train"]
    # every bit is 0 (all clipped): C grows by exp(0.2 * 0.5) per round
    assert [r.clip_norm for r in train] == pytest.approx([1.0, math.exp(0.1)])
    assert coord.snapshot.clip_norm == pytest.approx(math.exp(0.2))
    task = retained(amqtt_broker, TOPICS.task).payload
    assert task.clip_norm == pytest.approx(math.exp(0.2)) and task.adaptive_clipping


def test_public_cohort_is_charged_with_q_1(amqtt_broker, devices, tmp_path):
    """Poisson-sampled cohorts are published (Task.participants), so no amplification by
    sampling is claimed: every round is charged with q = 1."""
    devices(4)
    config = make_config(
        amqtt_broker,
        tmp_path,
        rounds=4,
        min_devices=1,
        sampling_rate=0.5,
        round_deadline_s=2.0,
        dp={"noise_multiplier": 1.5, "clip_norm": 1.0},
    )
    coord = coordinator(config, rng=np.random.default_rng(3), max_retries=10)
    assert coord.run() is RunState.DONE
    history = coord.history()
    train = [r for r in history if r.phase == "train"]
    assert len(train) == 4
    assert all(1 <= r.n_devices == r.n_selected <= 4 for r in train)
    assert any(r.n_selected < 4 for r in train)  # the sample was drawn, and published in the task
    assert {r.sampling_rate for r in history if r.phase != "evaluate"} == {1.0}
    assert {(g.kind, g.sampling_rate) for g in coord.ledger.groups} == {("basis", 1.0), ("train", 1.0)}
    assert coord.ledger.count("train") == 4
    assert train[-1].epsilon_rdp == pytest.approx(_independent_epsilon(history, 1.5, 1e-5), rel=1e-12)


def test_local_trust_mode_adds_no_central_noise(amqtt_broker, devices, tmp_path):
    delta = np.linspace(0.0, 0.2, 10)
    devices(2, fixed_delta=delta)
    config = make_config(
        amqtt_broker,
        tmp_path,
        rounds=1,
        sampling_rate=0.5,
        dp={"trust_mode": "local", "noise_multiplier": 1.0, "clip_norm": 1.0},
    )
    coord = coordinator(config, max_retries=20)
    assert coord.run() is RunState.DONE
    # the simulated devices skip their local noise: the model is exactly their mean update
    np.testing.assert_allclose(np.load(tmp_path / "state" / "model_final.npz")["params"], delta, atol=1e-12)
    train = [r for r in coord.history() if r.phase == "train"]
    assert [r.sampling_rate for r in train] == [1.0]  # the coordinator knows who was sampled
    assert retained(amqtt_broker, TOPICS.task).payload.trust_mode == "local"


# ----------------------------------------------------------------------------- settings and CLI
@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"dp": {"trust_mode": "distributed"}, "strategy": {"name": "trimmed_mean"}}, "secure aggregation"),
        ({"dp": {"trust_mode": "local", "adaptive_clipping": {}}}, "adaptive_clipping needs trust_mode"),
        ({"dp": {"noise_multiplier": 1.0}, "strategy": {"name": "trimmed_mean"}}, "cannot be combined with central DP"),
        (
            {"dp": {"noise_multiplier": 1.0}, "strategy": {"name": "fedavg", "params": {"weighting": "examples"}}},
            'weighting = "uniform"',
        ),
        ({"strategy": {"name": "fedadam", "params": {"lr": 1}}}, "does not take parameter"),
        ({"dp": {"noise_multiplier": 1.0, "adaptive_clipping": {"bit_noise_std": 0.1}}}, "count_noise_std"),
    ],
)
def test_refused_settings(tmp_path, overrides, match):
    broker = type("B", (), {"host": "127.0.0.1", "port": 1})
    with pytest.raises(CoordinatorError, match=match):
        Coordinator(make_config(broker, tmp_path, **overrides))


def test_discovery_timeout_aborts(amqtt_broker, tmp_path, caplog):
    coord = coordinator(make_config(amqtt_broker, tmp_path), discovery_timeout_s=0.3)
    with caplog.at_level(logging.ERROR, logger="biofed.coordinator"):
        assert coord.run() is RunState.ABORTED
    assert "only 0 of the 2 devices needed (min_devices) came online within 0.3 s" in caplog.text


def test_cli(amqtt_broker, devices, tmp_path):
    devices(2)
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'fleet = "{FLEET}"\nrounds = 1\nmin_devices = 2\nround_deadline_s = 3.0\nstate_dir = "state"\n'
        f'[broker]\nhost = "{amqtt_broker.host}"\nport = {amqtt_broker.port}\nprotocol = "3.1.1"\n'
        '[model]\nbasis_k = 4\n[dp]\nnoise_multiplier = 1.0\nclip_norm = 1.0\naccountant = "rdp"\n'
    )
    result = CliRunner().invoke(
        cli, ["coordinator", "--config", str(config), "--basis-clip-norm", "1e6", "--discovery-timeout", "20"]
    )
    assert result.exit_code == 0, result.output
    assert "train 1" in result.output and "balanced acc" in result.output and "epsilon" in result.output
    assert "done: final model in" in result.output
    assert (tmp_path / "state" / "model_final.npz").is_file()

    bad = tmp_path / "bad.toml"
    bad.write_text(f'fleet = "{FLEET}"\nrounds = 0\nstate_dir = "s"\n')
    result = CliRunner().invoke(cli, ["coordinator", "--config", str(bad)])
    assert result.exit_code != 0 and "rounds" in result.output


# ----------------------------------------------------------------------------- mosquitto
@pytest.mark.mosquitto
def test_federation_over_mosquitto(mosquitto_broker, tmp_path):
    fleet = [SimDevice(mosquitto_broker, f"pi-{i:02d}", seed=i, protocol="5").start() for i in range(2)]
    try:
        config = make_config(
            mosquitto_broker,
            tmp_path,
            rounds=2,
            broker={"host": mosquitto_broker.host, "port": mosquitto_broker.port, "protocol": "5"},
            dp={"noise_multiplier": 1.0, "clip_norm": 1.0},
        )
        coord = coordinator(config)
        assert coord.run() is RunState.DONE
        history = coord.history()
        assert [r.phase for r in history] == ["moments", "covariance", "train", "train", "evaluate"]
        assert all(r.n_devices == 2 for r in history)
        assert history[-2].epsilon_rdp == pytest.approx(_independent_epsilon(history, 1.0, 1e-5))
        assert retained(mosquitto_broker, TOPICS.model, protocol="5").payload.n_devices == 2
    finally:
        for device in fleet:
            device.close()
