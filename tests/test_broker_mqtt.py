"""Integration tests: biofed.mqtt clients through the embedded amqtt broker and Mosquitto."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from biofed.apps.broker import free_port, start_embedded_broker, start_mosquitto, write_mosquitto_config
from biofed.mqtt import ConnectError, MqttClient, MqttError, Will
from biofed.protocol import (
    Model,
    Status,
    Topics,
    Update,
    UpdateMetrics,
    decode_topic_message,
    encode_message,
    offline_status,
)
from brokers import amqtt_broker, mosquitto_broker, require_mosquitto  # noqa: F401  (fixtures)

TOPICS = Topics("testfleet")
BROKERS = [
    pytest.param(("amqtt_broker", "3.1.1"), id="amqtt-3.1.1"),
    pytest.param(("mosquitto_broker", "5"), id="mosquitto-5", marks=pytest.mark.mosquitto),
]


@pytest.fixture(params=BROKERS)
def broker(request):
    """(broker, protocol) for each broker under test."""
    name, protocol = request.param
    return request.getfixturevalue(name), protocol


@pytest.fixture
def clients():
    """Factory of connected MqttClients, all closed in teardown."""
    made = []

    def make(broker, protocol, client_id, **kwargs):
        client = MqttClient(broker.host, broker.port, client_id, protocol=protocol, **kwargs).connect()
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _drain(client, n, timeout_s=30.0):
    """Receive up to n messages, waiting at most timeout_s overall."""
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        message = client.receive(timeout_s=0.5)
        if message is not None:
            got.append(message)
    return got


def test_2000_qos1_messages_all_arrive(broker, clients):
    server, protocol = broker
    # delivery through the broker is under test, not the per-sender rate limit (tests/test_inbox.py)
    sub = clients(server, protocol, "coordinator", inbox_rate_per_s=None)
    assert sub.protocol_version == protocol
    sub.subscribe(TOPICS.all_devices("update"))
    pub = clients(server, protocol, "dev-1")
    infos = [pub.publish(TOPICS.update("dev-1"), b"%d" % i, wait=False) for i in range(2000)]
    for info in infos:
        info.wait_for_publish(30)
    got = _drain(sub, 2000)
    assert sorted(int(m.payload) for m in got) == list(range(2000))
    assert {m.topic for m in got} == {"biofed/testfleet/update/dev-1"}
    assert sub.receive(timeout_s=0.2) is None


def test_full_inbox_never_blocks_the_network_thread(broker, clients):
    """The deadlock of a full inbox: the consumer never reads, 2000 messages arrive for an
    inbox of 100. The network thread keeps acknowledging (the publisher is not throttled),
    the consumer's own publish is acknowledged at once, and the excess is shed, counted,
    oldest first."""
    server, protocol = broker
    sub = clients(server, protocol, "coordinator", inbox_size=100)
    sub.subscribe(TOPICS.all_devices("update"))
    pub = clients(server, protocol, "dev-1")
    infos = [pub.publish(TOPICS.update("dev-1"), b"%d" % i, wait=False) for i in range(2000)]
    for info in infos:
        info.wait_for_publish(30)
    deadline = time.monotonic() + 30
    while sub.shed < 1900 and time.monotonic() < deadline:
        time.sleep(0.05)
    sub.publish(TOPICS.model, b"model", timeout_s=10)  # the PUBACK is read although nobody drained the inbox
    assert sub.shed == 1900
    assert [int(m.payload) for m in _drain(sub, 100, timeout_s=5)] == list(range(1900, 2000))


def test_one_megabyte_update_passes(broker, clients):
    server, protocol = broker
    sub = clients(server, protocol, "coordinator")
    sub.subscribe(TOPICS.all_devices("update"))
    pub = clients(server, protocol, "dev-1")
    delta = np.random.default_rng(0).normal(size=125_000)
    metrics = UpdateMetrics(loss=0.3, n_windows=100, rss_bytes=50_000_000, cpu_time_s=1.5)
    data = encode_message(
        Update(round=1, basis_version=1, delta=delta, n_examples=100, clipped=True, metrics=metrics),
        fleet="testfleet",
        sender="dev-1",
    )
    assert len(data) > 1_000_000
    pub.publish(TOPICS.update("dev-1"), data)
    (received,) = _drain(sub, 1)
    message = decode_topic_message(TOPICS, received.topic, received.payload)
    np.testing.assert_array_equal(message.payload.delta, delta)


def test_retained_model_reaches_late_subscriber(broker, clients):
    server, protocol = broker
    coordinator = clients(server, protocol, "coordinator")
    model = Model(round=4, params=np.arange(10.0), basis_version=2, classes=("rest", "arithmetic"))
    coordinator.publish(TOPICS.model, encode_message(model, fleet="testfleet", sender="coordinator"), retain=True)
    late = clients(server, protocol, "dev-late")
    late.subscribe(TOPICS.model)
    (received,) = _drain(late, 1)
    assert received.retain
    message = decode_topic_message(TOPICS, received.topic, received.payload)
    assert message.round == 4
    np.testing.assert_array_equal(message.payload.params, np.arange(10.0))


def test_persistent_session_keeps_messages_while_offline(broker, clients):
    server, protocol = broker
    device = clients(server, protocol, "dev-sleepy")
    device.subscribe(TOPICS.task)
    device.close()
    coordinator = clients(server, protocol, "coordinator")
    for i in range(5):
        coordinator.publish(TOPICS.task, b"task-%d" % i)
    back = clients(server, protocol, "dev-sleepy")  # same client id, no new subscribe
    got = _drain(back, 5)
    assert [m.payload for m in got] == [b"task-%d" % i for i in range(5)]


_CRASHING_DEVICE = textwrap.dedent(
    """
    import os, sys
    from biofed.mqtt import MqttClient, Will
    from biofed.protocol import Status, encode_message, offline_status
    host, port, protocol = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    will = Will("biofed/testfleet/status/dev-crash", offline_status(fleet="testfleet", device_id="dev-crash", round=3))
    client = MqttClient(host, port, "dev-crash", protocol=protocol, will=will).connect()
    client.publish("biofed/testfleet/status/dev-crash",
                   encode_message(Status(round=3, state="online"), fleet="testfleet", sender="dev-crash"), retain=True)
    os._exit(0)  # vanish without DISCONNECT: the broker must publish the will
    """
)


def test_last_will_on_abrupt_disconnect(broker, clients):
    server, protocol = broker
    watcher = clients(server, protocol, "coordinator")
    watcher.subscribe(TOPICS.all_devices("status"))
    subprocess.run(
        [sys.executable, "-c", _CRASHING_DEVICE, server.host, str(server.port), protocol], check=True, timeout=60
    )
    states = [decode_topic_message(TOPICS, m.topic, m.payload).payload for m in _drain(watcher, 2)]
    assert [(s.state, s.round) for s in states] == [("online", 3), ("offline", 3)]
    assert all(isinstance(s, Status) for s in states)


def test_clean_close_sends_no_will(broker, clients):
    server, protocol = broker
    watcher = clients(server, protocol, "coordinator")
    watcher.subscribe(TOPICS.all_devices("status"))
    will = Will(TOPICS.status("dev-polite"), offline_status(fleet="testfleet", device_id="dev-polite"))
    clients(server, protocol, "dev-polite", will=will).close()
    watcher.publish(TOPICS.status("coordinator"), b"marker")
    (first,) = _drain(watcher, 1)
    assert first.payload == b"marker"


def test_auto_protocol_falls_back_to_311_on_amqtt(amqtt_broker, clients):
    client = clients(amqtt_broker, "auto", "dev-auto", v5_probe_timeout_s=0.5)
    assert client.protocol_version == "3.1.1"


@pytest.mark.mosquitto
def test_auto_protocol_picks_5_on_mosquitto(mosquitto_broker, clients):
    client = clients(mosquitto_broker, "auto", "dev-auto")
    assert client.protocol_version == "5"


@pytest.mark.mosquitto
def test_v5_message_expiry_drops_stale_queued_message(mosquitto_broker, clients):
    device = clients(mosquitto_broker, "5", "dev-away")
    device.subscribe(TOPICS.task)
    device.close()
    coordinator = clients(mosquitto_broker, "5", "coordinator")
    coordinator.publish(TOPICS.task, b"stale", expiry_s=1)
    coordinator.publish(TOPICS.task, b"fresh", expiry_s=3600)
    time.sleep(2.1)  # let the first message's expiry interval pass while the device is away
    back = clients(mosquitto_broker, "5", "dev-away")
    assert [m.payload for m in _drain(back, 2, timeout_s=2.0)] == [b"fresh"]


@pytest.mark.slow
def test_reconnects_and_resubscribes_after_broker_restart():
    first = start_embedded_broker()
    second = None
    device = MqttClient(
        first.host,
        first.port,
        "dev-1",
        protocol="3.1.1",
        reconnect_min_delay_s=0.1,
        reconnect_max_delay_s=0.5,
        random_state=0,
    )
    device.subscribe(TOPICS.task)  # before connect: made in on_connect
    try:
        device.connect()
        first.stop()  # the broker dies with the device's session
        deadline = time.monotonic() + 10
        while device.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not device.connected
        second = start_embedded_broker(port=first.port)
        assert device.wait_connected(30)
        with MqttClient(second.host, second.port, "coordinator", protocol="3.1.1") as coordinator:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the resubscription may trail the CONNACK
                coordinator.publish(TOPICS.task, b"after-restart")
                message = device.receive(timeout_s=0.2)
                if message is not None:
                    break
        assert message.payload == b"after-restart"
    finally:
        device.close()
        first.stop()
        if second is not None:
            second.stop()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock``, or fewer if it closes first."""
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            break
        data += more
    return data


def _mqtt_packets(sock: socket.socket):
    """Whole MQTT control packets (fixed header included) read from ``sock`` until it closes."""
    while head := _read_exactly(sock, 1):
        length, scale = 0, 1
        while True:  # the remaining length: 7 bits per byte, least significant first
            byte = _read_exactly(sock, 1)
            if not byte:
                return
            head += byte
            length += (byte[0] & 0x7F) * scale
            scale *= 128
            if not byte[0] & 0x80:
                break
        yield head + _read_exactly(sock, length)


class _SubackLoser:
    """A loopback TCP relay to ``broker`` that does not pass on the broker's SUBACKs on its first
    connection: the client's SUBSCRIBE reaches the broker, its acknowledgement never comes back.
    With ``close``, the relay closes that connection at the first SUBACK instead (a connection
    lost while the client waits); otherwise the connection stays up. Later connections are
    relayed whole."""

    SUBACK = 9  # MQTT control packet type

    def __init__(self, broker, *, close: bool) -> None:
        self.broker = (broker.host, broker.port)
        self.close_at_suback = close
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lost = threading.Event()  # set at the first SUBACK it did not pass on
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.broker)
            self.sockets += [client, server]
            threading.Thread(target=self._to_broker, args=(client, server), daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client, first), daemon=True).start()
            first = False

    @staticmethod
    def _to_broker(client: socket.socket, server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                server.sendall(data)

    def _to_client(self, server: socket.socket, client: socket.socket, lose_subacks: bool) -> None:
        with contextlib.suppress(OSError):
            for packet in _mqtt_packets(server):
                if lose_subacks and packet[0] >> 4 == self.SUBACK:
                    self.lost.set()
                    if self.close_at_suback:
                        break
                    continue
                client.sendall(packet)
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in (self.listener, *self.sockets):
            sock.close()


def test_subscribe_ends_its_wait_when_the_connection_is_lost_before_the_suback(broker):
    """The SUBACK of a lost connection never comes: subscribe returns at the loss instead of
    failing after its timeout, and the reconnect renews the subscription."""
    server, protocol = broker
    relay = _SubackLoser(server, close=True)
    device = MqttClient(
        "127.0.0.1", relay.port, "dev-cut", protocol=protocol, reconnect_min_delay_s=0.5, reconnect_max_delay_s=1.0
    ).connect()
    try:
        device.subscribe(TOPICS.task, timeout_s=20.0)  # no MqttError: the wait ended at the loss
        assert relay.lost.is_set()
        assert device.wait_connected(30)
        with MqttClient(server.host, server.port, "coordinator", protocol=protocol) as coordinator:
            deadline = time.monotonic() + 10
            message = None
            while message is None and time.monotonic() < deadline:  # the renewal may trail the CONNACK
                coordinator.publish(TOPICS.task, b"after-cut")
                message = device.receive(timeout_s=0.2)
        assert message is not None and message.payload == b"after-cut"
    finally:
        device.close()
        relay.close()


def test_no_suback_on_a_connection_that_stays_up_is_an_error(amqtt_broker):
    relay = _SubackLoser(amqtt_broker, close=False)
    device = MqttClient("127.0.0.1", relay.port, "dev-unacked", protocol="3.1.1").connect()
    try:
        with pytest.raises(MqttError, match=r"no SUBACK for 'biofed/testfleet/task' within 1 s"):
            device.subscribe(TOPICS.task, timeout_s=1.0)
        assert relay.lost.is_set() and device.connected
    finally:
        device.close()
        relay.close()


@pytest.mark.mosquitto
@pytest.mark.parametrize("max_queued", [None, 100], ids=["biofed-config", "low-limit"])
@pytest.mark.slow
def test_mosquitto_queue_limit_for_offline_device(tmp_path, clients, max_queued):
    """biofed's config keeps 2000 QoS 1 messages for an offline device; a low
    max_queued_messages (Mosquitto's default is 1000) silently drops the excess."""
    require_mosquitto()
    extra = {} if max_queued is None else {"max_queued_messages": max_queued}
    with start_mosquitto(tmp_path / "m", **extra) as server:
        device = clients(server, "5", "dev-offline")
        device.subscribe(TOPICS.task)
        device.close()
        coordinator = clients(server, "5", "coordinator")
        infos = [coordinator.publish(TOPICS.task, b"%d" % i, wait=False) for i in range(2000)]
        for info in infos:
            info.wait_for_publish(30)
        back = clients(server, "5", "dev-offline", inbox_rate_per_s=None)  # the broker's queue is under test
        got = [int(m.payload) for m in _drain(back, 2000, timeout_s=30 if max_queued is None else 2)]
    if max_queued is None:
        assert got == list(range(2000))
    else:
        assert len(got) == max_queued and got == sorted(got)


def test_connect_to_closed_port_is_a_clear_error():
    port = free_port()
    with pytest.raises(ConnectError, match=f"cannot reach MQTT broker 127.0.0.1:{port}"):
        MqttClient("127.0.0.1", port, "dev-1", protocol="3.1.1").connect()


def test_client_rejects_bad_arguments():
    with pytest.raises(ValueError, match="protocol must be one of"):
        MqttClient("127.0.0.1", 1883, "dev-1", protocol="4")
    with pytest.raises(ValueError, match="client_id"):
        MqttClient("127.0.0.1", 1883, "")
    with pytest.raises(ValueError, match="reconnect_min_delay_s"):
        MqttClient("127.0.0.1", 1883, "dev-1", reconnect_min_delay_s=5, reconnect_max_delay_s=1)


def test_mosquitto_config_raises_queue_limits(tmp_path):
    conf = write_mosquitto_config(tmp_path / "m", 18830)
    lines = conf.read_text().splitlines()
    assert "listener 18830 127.0.0.1" in lines
    assert "max_queued_messages 100000" in lines
    assert "allow_anonymous true" in lines
    assert f"persistence_location {tmp_path / 'm'}/" in lines
    with pytest.raises(ValueError, match="max_queued_messages must be a positive integer"):
        write_mosquitto_config(tmp_path, 18830, max_queued_messages=0)


@contextlib.contextmanager
def _broker_cli(*args: str):
    """``biofed broker ARGS`` as a child: yields it and its first stdout line (printed once it
    listens); kills it at the end unless the test stopped it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "biofed", "broker", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process, process.stdout.readline()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _stop(process: subprocess.Popen, sig: int) -> str:
    """Send ``sig`` and return the rest of the child's stdout once it exits."""
    process.send_signal(sig)
    return process.communicate(timeout=30)[0]


@pytest.mark.slow
def test_broker_cli_serves_until_interrupted():
    port = free_port()
    with _broker_cli("--port", str(port)) as (process, banner):
        client = MqttClient("127.0.0.1", port, "dev-cli", protocol="3.1.1").connect()
        client.publish(TOPICS.status("dev-cli"), b"x")
        client.close()
        out = _stop(process, signal.SIGINT)
    assert process.returncode == 0, out
    assert f"listening on 127.0.0.1:{port}" in banner
    assert "stopping broker" in out


@pytest.mark.mosquitto
@pytest.mark.slow
def test_broker_cli_runs_mosquitto(tmp_path):
    require_mosquitto()
    port = free_port()
    with _broker_cli("--mosquitto", "--port", str(port), "--dir", str(tmp_path / "m")) as (process, banner):
        client = MqttClient("127.0.0.1", port, "dev-cli", protocol="5").connect()
        client.close()
        out = _stop(process, signal.SIGINT)
    assert process.returncode == 0, out
    assert f"mosquitto listening on 127.0.0.1:{port}" in banner
    assert "stopping broker" in out
    assert (tmp_path / "m" / "mosquitto.conf").is_file()
    assert os.path.exists(tmp_path / "m" / "mosquitto.log")


@pytest.mark.mosquitto
@pytest.mark.slow
def test_broker_cli_with_config_stops_mosquitto_on_sigterm(tmp_path):
    """SIGTERM (systemd, docker stop) stops the Mosquitto child too, never leaving it orphaned on its port."""
    require_mosquitto()
    port = free_port()
    conf = write_mosquitto_config(tmp_path / "m", port)
    with _broker_cli("--config", str(conf)) as (process, banner):  # "mosquitto (pid N) listening on ..."
        mosquitto_pid = int(banner.split("(pid ")[1].split(")")[0])
        os.kill(mosquitto_pid, 0)  # running
        out = _stop(process, signal.SIGTERM)
    assert process.returncode == 0, out
    assert "stopping broker" in out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(mosquitto_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"mosquitto (pid {mosquitto_pid}) outlived its biofed broker process")
    with pytest.raises(ConnectError):
        MqttClient("127.0.0.1", port, "dev-after", protocol="5", connect_timeout_s=2).connect()


def test_paho_not_connected_noise_is_debug_not_error(caplog):
    import logging

    from biofed.mqtt import _paho_logger

    with caplog.at_level(logging.INFO):
        _paho_logger.error("Client is not connected. Socket: None). Last known Connection State: %s", "CONNECTING")
        _paho_logger.error("failed to receive on socket: %s", "boom")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("ERROR", "failed to receive on socket: boom")]
