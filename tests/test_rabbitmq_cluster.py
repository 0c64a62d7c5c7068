"""The clustered broker: a two-node RabbitMQ cluster with MQTT on loopback, started and
stopped by the ``rabbitmq_cluster`` fixture, and a federation spread over both nodes."""

from __future__ import annotations

import itertools
import threading

import psutil
import pytest

from biofed.apps.demo import DemoSettings
from biofed.apps.rabbitmq import RetainedMirror
from biofed.apps.simulate import FleetOptions, run_simulation
from biofed.mqtt import ConnectError, MqttClient
from brokers import rabbitmq_cluster  # noqa: F401  (pytest fixture)

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


def _client(cluster, node, client_id: str, **kwargs) -> MqttClient:
    options = {"protocol": "3.1.1", "clean": True, "username": cluster.username, "password": cluster.password, **kwargs}
    return MqttClient(node.host, node.port, client_id, **options)


def test_every_listener_of_the_cluster_is_on_loopback(rabbitmq_cluster):
    listening = []
    for pid in rabbitmq_cluster.pids():
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append(conn.laddr.ip)
    # per node: AMQP, MQTT, management, distribution; and epmd
    assert len(listening) >= 4 * len(rabbitmq_cluster.nodes) + 1
    assert set(listening) <= {"127.0.0.1", "::1"}
    assert {node.name.split("@")[1] for node in rabbitmq_cluster.nodes} == {"localhost"}


def test_cluster_speaks_mqtt_311_only(rabbitmq_cluster):
    node = rabbitmq_cluster.nodes[1]
    with pytest.raises(ConnectError):
        _client(rabbitmq_cluster, node, "v5-probe", protocol="5", connect_timeout_s=5.0).connect()
    with _client(rabbitmq_cluster, node, "auto-probe", protocol="auto") as client:
        assert client.protocol_version == "3.1.1"


# RabbitMQ registers MQTT client ids cluster-wide; reusing an id right after its disconnect
# races that registry, and the broker may then close the new connection before its CONNACK.
_subscriber_ids = itertools.count()


def _retained_seen(cluster, node, topic: str, wait_s: float = 3.0) -> bytes | None:
    got: list[bytes] = []
    arrived = threading.Event()

    def on_message(inbound) -> None:
        if inbound.retain:
            got.append(inbound.payload)
            arrived.set()

    with _client(cluster, node, f"late-subscriber-{next(_subscriber_ids)}", on_message=on_message) as client:
        client.subscribe(topic, qos=1)
        arrived.wait(wait_s)
    return got[-1] if got else None


def test_retained_messages_reach_only_subscriptions_without_wildcards(rabbitmq_cluster):
    node = rabbitmq_cluster.nodes[0]
    with _client(rabbitmq_cluster, node, "retained-publisher") as publisher:
        publisher.publish("biofed/probe/status/d1", b"online", retain=True)
    assert _retained_seen(rabbitmq_cluster, node, "biofed/probe/status/d1") == b"online"
    assert _retained_seen(rabbitmq_cluster, node, "biofed/probe/status/+", wait_s=2.0) is None


def test_retained_messages_are_node_local_and_the_mirror_copies_them(rabbitmq_cluster):
    first, second = rabbitmq_cluster.nodes
    with _client(rabbitmq_cluster, first, "mirrored-publisher") as publisher:
        publisher.publish("biofed/probe/task", b"task-1", retain=True)
        assert _retained_seen(rabbitmq_cluster, first, "biofed/probe/task") == b"task-1"
        assert _retained_seen(rabbitmq_cluster, second, "biofed/probe/task", wait_s=2.0) is None  # node-local
        mirror = RetainedMirror(
            rabbitmq_cluster.nodes,
            ["biofed/probe/task"],
            username=rabbitmq_cluster.username,
            password=rabbitmq_cluster.password,
        ).start()
        try:  # the mirror copies the retained task-1 it finds on subscribing, then the new task-2
            publisher.publish("biofed/probe/task", b"task-2", retain=True)
            pause = threading.Event()
            for _ in range(100):
                if mirror.mirrored >= 2:
                    break
                pause.wait(0.1)
        finally:
            mirror.stop()
        assert mirror.mirrored == 2  # its own copies coming back are not mirrored again
    assert _retained_seen(rabbitmq_cluster, second, "biofed/probe/task") == b"task-2"


def test_a_federation_spread_over_both_nodes(rabbitmq_cluster, tmp_path):
    settings = DemoSettings(
        out=tmp_path / "sim", devices=20, rounds=2, round_deadline_s=30.0, synthetic_seconds=20.0, timeout_s=600.0
    )
    summary = run_simulation(settings, FleetOptions(workers=2, windows_per_device=8, cluster=rabbitmq_cluster))
    assert summary["problems"] == []
    assert summary["broker"] == "rabbitmq cluster (2 nodes)"
    assert sorted(summary["devices_per_broker"].values()) == [10, 10]
    assert summary["balanced_accuracy"] is not None
