"""NetworkLoop: one thread serving many MQTT clients, past select()'s 1024-descriptor limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from biofed.mqtt import MqttClient
from biofed.mqtt_loop import NetworkLoop, ensure_open_files
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


# ----------------------------------------------------------------------------- open-file limit
def _in_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child Python (its limits changes stay there)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_ensure_open_files_raises_the_soft_limit_and_children_inherit_it():
    result = _in_fresh_process(
        """
        import resource, subprocess
        from biofed.mqtt_loop import ensure_open_files
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert ensure_open_files(200) == 256  # enough already: unchanged
        assert ensure_open_files(512) == 512
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (512, hard)
        print(subprocess.run(["sh", "-c", "ulimit -n"], capture_output=True, text=True).stdout.strip())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "512"  # what a broker started from here may open


def test_ensure_open_files_beyond_the_kernel_maximum_says_why_and_what_to_do():
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    result = _in_fresh_process(
        f"""
        import resource
        from biofed.mqtt_loop import FileLimitError, ensure_open_files
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            ensure_open_files({nr_open + 1}, "a simulation of many devices")
        except FileLimitError as exc:
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == before
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert f"a simulation of many devices needs {nr_open + 1} open files" in message
    assert f"the kernel allows at most fs.nr_open = {nr_open} per process" in message and "ulimit -Hn" in message


@pytest.mark.parametrize("needed", [0, -5, 1.5, True, "100"])
def test_ensure_open_files_rejects_a_count_that_is_not_a_positive_integer(needed):
    with pytest.raises(ValueError, match="needed must be an integer >= 1"):
        ensure_open_files(needed)


def _has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    effective = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective, 16) >> 24 & 1)


def test_ensure_open_files_raises_the_hard_limit_only_with_cap_sys_resource():
    result = _in_fresh_process(
        """
        import resource
        from biofed.mqtt_loop import FileLimitError, ensure_open_files
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 300))  # lowering needs no privilege
        try:
            print(ensure_open_files(4096), resource.getrlimit(resource.RLIMIT_NOFILE))
        except FileLimitError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    if _has_cap_sys_resource():
        assert result.stdout.strip() == "4096 (4096, 4096)"
    else:
        assert "needs 4096 open files, but its limit is 256 (hard limit 300)" in result.stdout
        assert "needs CAP_SYS_RESOURCE, which this process lacks" in result.stdout
