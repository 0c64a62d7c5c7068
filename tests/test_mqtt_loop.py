"""NetworkLoop: one thread serving many MQTT clients, past select()'s 1024-descriptor limit."""

from __future__ import annotations

import os
import threading
import time

import pytest

from biofed.mqtt import MqttClient
from biofed.mqtt_loop import NetworkLoop
from brokers import mosquitto_broker  # noqa: F401  (pytest fixture)


@pytest.fixture
def network():
    loop = NetworkLoop()
    try:
        yield loop
    finally:
        loop.stop()


def _wait(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.mosquitto
def test_one_thread_serves_clients_whose_descriptors_exceed_fd_setsize(mosquitto_broker, network):
    broker = mosquitto_broker
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # push new sockets past 1024
    clients = []
    try:
        got: dict[str, list[bytes]] = {}
        lock = threading.Lock()

        def collector(name: str):
            def on_message(inbound) -> None:
                with lock:
                    got.setdefault(name, []).append(inbound.payload)

            return on_message

        threads_before = threading.active_count()
        for i in range(30):
            client = MqttClient(
                broker.host, broker.port, f"dev-{i}", protocol="5", network=network, on_message=collector(f"dev-{i}")
            )
            clients.append(client.connect())
            client.subscribe("fleet/task", qos=1)
        assert threading.active_count() == threads_before  # no thread per client
        assert clients[-1]._client.socket().fileno() > 1024
        publisher = clients[0]
        publisher.publish("fleet/task", b"round-1")
        assert _wait(lambda: sum(len(v) for v in got.values()) == 30)
        assert all(v == [b"round-1"] for v in got.values())
    finally:
        for client in clients:
            client.close()
        for fd in filler:
            os.close(fd)


@pytest.mark.mosquitto
def test_a_dropped_client_reconnects_and_gets_what_was_queued(mosquitto_broker, network):
    broker = mosquitto_broker
    received: list[bytes] = []
    client = MqttClient(
        broker.host,
        broker.port,
        "dev-drop",
        protocol="5",
        network=network,
        reconnect_min_delay_s=0.2,
        reconnect_max_delay_s=1.0,
        on_message=lambda inbound: received.append(inbound.payload),
    ).connect()
    other = MqttClient(broker.host, broker.port, "coordinator", protocol="5", network=network).connect()
    try:
        client.subscribe("fleet/model", qos=1)
        assert client.drop_connection()
        assert _wait(lambda: not client.connected, 5.0)
        other.publish("fleet/model", b"model-2")  # queued by the broker for the persistent session
        assert _wait(lambda: client.connected)
        assert _wait(lambda: received == [b"model-2"])
        client.publish("fleet/update", b"after the reconnect")  # publishing works again
    finally:
        client.close()
        other.close()
