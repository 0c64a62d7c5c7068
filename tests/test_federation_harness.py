"""biofed.apps.federation: the local-federation harness the demo and the federation tests share."""

from __future__ import annotations

import threading
import time

import pytest

from biofed.apps.broker import free_port
from biofed.apps.federation import (
    AgentThreads,
    Listener,
    broker_settings,
    received,
    spawn,
    start_broker,
    tails,
    terminate,
    write_synthetic_devices,
)
from biofed.config import DeviceConfig
from biofed.datasets import read_recording
from biofed.datasets.replay import group_streams, label_segments
from biofed.edge.agent import AgentState, EdgeAgent
from biofed.mqtt import MqttClient
from biofed.protocol import Status, Topics, encode_message
from brokers import amqtt_broker  # noqa: F401  (pytest fixture)

FLEET = "harness"
TOPICS = Topics(FLEET)


def test_synthetic_devices_are_fif_and_wav_pairs_that_form_one_stream_each(tmp_path):
    files = write_synthetic_devices(tmp_path, 2, duration_s=3.0, random_state=1)
    assert sorted(files) == ["device00", "device01"]
    for paths in files.values():
        assert [p.suffix for p in paths] == [".fif", ".wav"] * (len(paths) // 2) and all(p.is_file() for p in paths)
        recordings = [(path, read_recording(path)) for path in paths]
        streams = list(group_streams(recordings))
        assert [[p for p, _ in stream] for stream in streams] == [paths[i : i + 2] for i in range(0, len(paths), 2)]
        fif = recordings[0][1]
        assert fif.subject is not None and label_segments(fif) == [(0.0, paths[0].name.split("_")[2])]
        assert set(fif.modalities) == {"eeg", "bio"} and recordings[1][1].modalities == ("audio",)
    again = write_synthetic_devices(tmp_path / "again", 2, duration_s=3.0, random_state=1)
    assert (
        read_recording(again["device01"][0]).signals["eeg"].data
        == read_recording(files["device01"][0]).signals["eeg"].data
    ).all()


def _states(observer, devices, wanted: str, timeout_s: float = 60.0) -> dict[str, str]:
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(states.get(d) != wanted for d in devices):
        for message in received(observer, TOPICS, timeout_s=0.2):
            if message.kind == "status":
                states[message.sender] = message.payload.state
    return states


def test_agent_threads_run_real_agents_and_close_them(amqtt_broker, tmp_path):
    devices = ("pi-01", "pi-02")
    agents = [
        EdgeAgent(
            DeviceConfig(
                device_id=d,
                fleet=FLEET,
                broker=broker_settings(amqtt_broker, "3.1.1"),
                store_path=tmp_path / f"{d}.sqlite",
                warmup=False,
            )
        )
        for d in devices
    ]
    observer = MqttClient(amqtt_broker.host, amqtt_broker.port, "observer", protocol="3.1.1", clean=True).connect()
    try:
        observer.subscribe(TOPICS.all_devices("status"))
        with AgentThreads(agents) as fleet:
            assert fleet.agents == agents
            assert _states(observer, devices, "online") == dict.fromkeys(devices, "online")
        assert all(agent.state is AgentState.STOPPED for agent in agents)
        assert _states(observer, devices, "offline") == dict.fromkeys(devices, "offline")
    finally:
        observer.close()


def test_start_broker_defaults_to_the_embedded_broker(tmp_path):
    broker, protocol, fleet = start_broker(tmp_path, FLEET, ["pi-01"])
    try:
        assert (protocol, fleet) == ("3.1.1", None) and broker.host == "127.0.0.1"
        assert broker_settings(broker, protocol, keepalive=5) == {
            "host": broker.host,
            "port": broker.port,
            "protocol": "3.1.1",
            "keepalive": 5,
        }
        client = MqttClient(**broker_settings(broker, protocol), client_id="probe").connect()
        client.close()
    finally:
        broker.stop()


def test_spawned_children_log_and_are_terminated(tmp_path):
    done = spawn("version", ["--version"], tmp_path / "logs" / "version.log")
    assert done.process.wait(timeout=60) == 0
    assert "biofed" in done.tail()
    assert tails([done]).startswith(f"--- version (exit code 0), {done.log}:")
    port = free_port()
    serving = spawn("broker", ["broker", "--port", str(port)], tmp_path / "logs" / "broker.log")
    assert serving.process.poll() is None
    assert "exit code running" in tails([serving])
    terminate([serving, done], timeout_s=30.0)
    assert serving.process.poll() is not None
    missing = spawn("gone", ["--version"], tmp_path / "gone.log")
    missing.process.wait(timeout=60)
    missing.log.unlink()
    assert missing.tail() == "(no log)"


@pytest.mark.parametrize("devices", [0, 1])
def test_received_returns_nothing_once_the_topic_is_quiet(amqtt_broker, devices):
    client = MqttClient(amqtt_broker.host, amqtt_broker.port, "quiet", protocol="3.1.1", clean=True).connect()
    sender = MqttClient(amqtt_broker.host, amqtt_broker.port, "sender", protocol="3.1.1", clean=True).connect()
    try:
        client.subscribe(TOPICS.all_devices("status"))
        for i in range(devices):
            sender.publish(
                TOPICS.status(f"pi-{i}"), encode_message(Status(round=0, state="online"), fleet=FLEET, sender=f"pi-{i}")
            )
        messages = received(client, TOPICS, timeout_s=1.0)
        assert [(m.kind, m.sender, m.payload.state) for m in messages] == [
            ("status", f"pi-{i}", "online") for i in range(devices)
        ]
        assert received(client, TOPICS, timeout_s=0.2) == []
    finally:
        client.close()
        sender.close()


def test_listener_hands_every_message_to_its_callback_in_order(amqtt_broker):
    seen, done = [], threading.Event()

    def handle(inbound):
        seen.append(inbound.payload)
        if len(seen) == 20:
            done.set()

    client = MqttClient(amqtt_broker.host, amqtt_broker.port, "listener", protocol="3.1.1", clean=True)
    listener = Listener(client, [TOPICS.all_devices("update")], handle, name="test-listener").start()
    sender = MqttClient(amqtt_broker.host, amqtt_broker.port, "sender", protocol="3.1.1", clean=True).connect()
    try:
        for i in range(20):
            sender.publish(TOPICS.update("pi-01"), b"%d" % i)
        assert done.wait(30)
        assert seen == [b"%d" % i for i in range(20)]
    finally:
        sender.close()
        listener.stop()
    assert not listener._thread.is_alive()
    never_started = Listener(MqttClient(amqtt_broker.host, amqtt_broker.port, "idle", protocol="3.1.1"), [], handle)
    never_started.stop()  # stopping before start only closes the client
