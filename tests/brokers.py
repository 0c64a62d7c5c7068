"""Broker fixtures for integration tests (import them into a test module).

    from brokers import amqtt_broker, mosquitto_broker  # noqa: F401  (pytest fixtures)

``amqtt_broker`` runs the embedded amqtt broker (MQTT 3.1.1) and ``mosquitto_broker`` a
real Mosquitto (MQTT 5) on free loopback ports; both are stopped in teardown. Tests using
``mosquitto_broker`` should carry ``@pytest.mark.mosquitto``; they skip when the binary is
missing, unless ``BIOFED_REQUIRE_MOSQUITTO=1`` (CI), where a missing binary fails them.
``rabbitmq_cluster`` (module scope: a cluster takes about a minute to start) runs a
two-node RabbitMQ cluster on loopback; tests carry ``@pytest.mark.rabbitmq`` and skip the
same way unless ``BIOFED_REQUIRE_RABBITMQ=1``.
"""

from __future__ import annotations

import os

import pytest

from biofed.apps.broker import BrokerError, mosquitto_binary, start_embedded_broker, start_mosquitto


def _require(check, variable: str) -> None:
    try:
        check()
    except BrokerError as exc:
        if os.environ.get(variable) == "1":
            pytest.fail(f"{variable}=1 but {exc}")
        pytest.skip(str(exc))


def require_mosquitto() -> None:
    """Skip (or fail under ``BIOFED_REQUIRE_MOSQUITTO=1``) when mosquitto is not installed."""
    _require(mosquitto_binary, "BIOFED_REQUIRE_MOSQUITTO")


@pytest.fixture(scope="module")
def rabbitmq_cluster():
    """A two-node RabbitMQ cluster with MQTT on loopback, removed in teardown."""
    from biofed.apps.rabbitmq import rabbitmq_binary, start_rabbitmq_cluster

    _require(rabbitmq_binary, "BIOFED_REQUIRE_RABBITMQ")
    cluster = start_rabbitmq_cluster(2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def amqtt_broker():
    """A fresh embedded amqtt broker on a free loopback port."""
    broker = start_embedded_broker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_broker(tmp_path):
    """A fresh Mosquitto with biofed's config on a free loopback port."""
    require_mosquitto()
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()
