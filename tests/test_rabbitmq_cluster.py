"""The clustered broker: a two-node RabbitMQ cluster with MQTT on loopback, started and
stopped here, and a federation spread over both nodes."""

from __future__ import annotations

import os
import threading

import psutil
import pytest

from biofed.broker import BrokerError
from biofed.demo import DemoSettings
from biofed.mqtt import ConnectError, MqttClient
from biofed.rabbitmq import RetainedMirror, rabbitmq_binary, start_rabbitmq_cluster
from biofed.simulate import FleetOptions, run_simulation

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


@pytest.fixture(scope="module")
def cluster():
    try:
        rabbitmq_binary()
    except BrokerError as exc:
        if os.environ.get("BIOFED_REQUIRE_RABBITMQ") == "1":
            pytest.fail(f"BIOFED_REQUIRE_RABBITMQ=1 but {exc}")
        pytest.skip(str(exc))
    running = start_rabbitmq_cluster(2)
    try:
        yield running
    finally:
        running.stop()
    assert not running.directory.exists()


def test_every_listener_of_the_cluster_is_on_loopback(cluster):
    listening = []
    for pid in cluster.pids():
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append(conn.laddr.ip)
    # per node: AMQP, MQTT, management, distribution; and epmd
    assert len(listening) >= 4 * len(cluster.nodes) + 1
    assert set(listening) <= {"127.0.0.1", "::1"}
    assert {node.name.split("@")[1] for node in cluster.nodes} == {"localhost"}


def test_cluster_speaks_mqtt_311_only(cluster):
    node = cluster.nodes[1]
    with pytest.raises(ConnectError):
        MqttClient(node.host, node.port, "v5-probe", protocol="5", clean=True, connect_timeout_s=5.0,
                   **_login(cluster)).connect()
    with MqttClient(node.host, node.port, "auto-probe", protocol="auto", clean=True, **_login(cluster)) as client:
        assert client.protocol_version == "3.1.1"


def _login(cluster) -> dict:
    return {"username": cluster.username, "password": cluster.password}


def _retained_seen(cluster, node, topic: str, wait_s: float = 3.0) -> bytes | None:
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(inbound) -> None:
        if inbound.retain:
            got.append(inbound.payload)
            arrived.set()

    with MqttClient(node.host, node.port, "late-subscriber", protocol="3.1.1", clean=True,
                    on_message=on_message, **_login(cluster)) as client:
        client.subscribe(topic, qos=1)
        arrived.wait(wait_s)
    return got[-1] if got else None


def test_retained_messages_reach_only_subscriptions_without_wildcards(cluster):
    node = cluster.nodes[0]
    with MqttClient(node.host, node.port, "publisher", protocol="3.1.1", clean=True, **_login(cluster)) as publisher:
        publisher.publish("biofed/probe/status/d1", b"online", retain=True)
    assert _retained_seen(cluster, node, "biofed/probe/status/d1") == b"online"
    assert _retained_seen(cluster, node, "biofed/probe/status/+", wait_s=2.0) is None


def test_retained_messages_are_node_local_and_the_mirror_copies_them(cluster):
    first, second = cluster.nodes
    with MqttClient(first.host, first.port, "publisher", protocol="3.1.1", clean=True, **_login(cluster)) as publisher:
        publisher.publish("biofed/probe/task", b"task-1", retain=True)
        assert _retained_seen(cluster, first, "biofed/probe/task") == b"task-1"
        assert _retained_seen(cluster, second, "biofed/probe/task", wait_s=2.0) is None  # node-local
        mirror = RetainedMirror(cluster.nodes, ["biofed/probe/task"], **_login(cluster)).start()
        try:  # the mirror copies the retained task-1 it finds on subscribing, then the new task-2
            publisher.publish("biofed/probe/task", b"task-2", retain=True)
            pause = threading.Event()
            for _ in range(100):
                if mirror.mirrored >= 2:
                    break
                pause.wait(0.1)
        finally:
            mirror.stop()
        assert mirror.mirrored == 2
    assert _retained_seen(cluster, second, "biofed/probe/task") == b"task-2"


def test_a_federation_spread_over_both_nodes(cluster, tmp_path):
    settings = DemoSettings(out=tmp_path / "sim", devices=20, rounds=2, round_deadline_s=30.0,
                            synthetic_seconds=20.0, timeout_s=600.0)
    summary = run_simulation(settings, FleetOptions(workers=2, windows_per_device=8, cluster=cluster))
    assert summary["problems"] == []
    assert summary["broker"] == "rabbitmq cluster (2 nodes)"
    assert sorted(summary["devices_per_broker"].values()) == [10, 10]
    assert summary["balanced_accuracy"] is not None
