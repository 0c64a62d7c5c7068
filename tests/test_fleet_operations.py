"""A running fleet as an operator sees it: /metrics of coordinator and agent, `biofed status
--json`, the state_dir lock, and a clean SIGTERM. Every process is a real `biofed` command
over an embedded broker on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from biofed.apps.broker import free_port
from biofed.apps.demo import DemoSettings, write_configs
from biofed.apps.federation import write_synthetic_devices
from brokers import amqtt_broker  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.slow

STOP_BOUND_S = 25.0
"""A stopped process must not wait out a 30 s MQTT publish timeout (the old behaviour with the
broker gone). Not a speed target: the time to stop on an idle machine (about 2-3 s) is
measured outside the tests; a round being committed when SIGTERM arrives is finished first."""


def _biofed(*args: str, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIOFED_")}
    return subprocess.Popen(
        [sys.executable, "-m", "biofed", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def _scrape(port: int) -> dict[str, float]:
    """``{series with labels: value}`` of http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _stop(process: subprocess.Popen) -> tuple[float, str]:
    """SIGTERM ``process``; seconds until it exited, and its stderr."""
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    return time.monotonic() - start, stderr


def test_operator_view_of_a_running_fleet(amqtt_broker, tmp_path):
    devices = write_synthetic_devices(tmp_path / "data", 2, duration_s=12.0, random_state=3)
    # many rounds: the coordinator is still running while the test looks at it; a long deadline
    # leaves room for a first Numba compilation on a loaded machine
    settings = DemoSettings(
        out=tmp_path, rounds=5000, noise_multiplier=1.0, epsilon_budget=None, round_deadline_s=300.0
    )
    coordinator_toml, device_tomls = write_configs(settings, devices, amqtt_broker.host, amqtt_broker.port, "3.1.1")
    metrics_port, agent_port = free_port(), free_port()
    coordinator = _biofed(
        "coordinator",
        "--config",
        str(coordinator_toml),
        "--metrics-port",
        str(metrics_port),
        "--epsilon-budget",
        "1000",
    )
    agents = {}
    try:
        for i, (device, toml) in enumerate(sorted(device_tomls.items())):
            extra = ["--metrics-port", str(agent_port)] if i == 0 else []
            agents[device] = _biofed("edge", "--config", str(toml), *extra)

        # metrics of the running coordinator, over loopback
        def rounds_done():
            series = _scrape(metrics_port)
            done = sum(v for k, v in series.items() if k.startswith('biofed_coordinator_rounds_total{phase="train"'))
            return series if done >= 2 else None

        series = _wait_for(rounds_done, 900, "two training rounds in /metrics")
        assert series["biofed_coordinator_devices_online"] == 2
        assert series["biofed_coordinator_devices_known"] == 2
        assert series['biofed_coordinator_updates_accepted_total{kind="update"}'] >= 4
        assert series['biofed_coordinator_updates_accepted_total{kind="sketch"}'] == 2
        assert series["biofed_coordinator_epsilon_budget"] == 1000.0  # the command line overrides the file
        assert series["biofed_coordinator_received_bytes_total"] > 0
        assert series["biofed_coordinator_sent_bytes_total"] > 0
        assert series['biofed_coordinator_round_duration_seconds_count{phase="train"}'] >= 2
        assert (
            series['biofed_coordinator_state{state="training"}']
            + series['biofed_coordinator_state{state="evaluating"}']
            + series['biofed_coordinator_state{state="waiting"}']
            <= 1
        )
        assert series["process_resident_memory_bytes"] > 10e6
        assert 0 < series['biofed_coordinator_epsilon_spent{accountant="rdp"}'] < 1000

        agent_series = _scrape(agent_port)
        assert agent_series["biofed_agent_windows_ingested_total"] > 0
        assert agent_series["biofed_agent_last_task_round"] >= 2
        assert agent_series["biofed_agent_received_bytes_total"] > 0
        assert agent_series["process_resident_memory_bytes"] > 10e6

        # a second coordinator on the same state_dir: a clear error, nothing touched
        second = _biofed("coordinator", "--config", str(coordinator_toml))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1
        assert f"another coordinator (pid {coordinator.pid}) is running on {tmp_path / 'state'}" in err

        # the fleet view
        status = _biofed("status", "--config", str(coordinator_toml), "--json")
        out, err = status.communicate(timeout=120)
        assert status.returncode == 0, err
        view = json.loads(out)
        assert view["fleet"] == "demo" and view["online"] == 2 and view["offline"] == 0
        assert sorted(d["device"] for d in view["devices"]) == sorted(devices)
        # last seen: when the device last said it was online (no row count: that is data-dependent)
        assert all(d["online"] and 0 <= time.time() - d["last_seen"] < 900 for d in view["devices"])
        assert view["coordinator"]["running"] and view["coordinator"]["pid"] == coordinator.pid
        assert view["coordinator"]["phase"] == "train" and view["coordinator"]["train_rounds_done"] >= 2
        assert 0 < view["coordinator"]["epsilon"] < 1000 and view["coordinator"]["epsilon_budget"] == 1000
        assert view["coordinator"]["rounds"] == 5000
        assert view["model_version"] >= 2

        # clean shutdown: no wait for a publish timeout, no ERROR lines
        elapsed, err = _stop(coordinator)
        assert coordinator.returncode == 0, err
        assert elapsed < STOP_BOUND_S, f"coordinator took {elapsed:.1f} s to stop"
        assert "ERROR" not in err and "Client is not connected" not in err
        for device, agent in agents.items():
            elapsed, err = _stop(agent)
            assert agent.returncode == 0, err
            assert elapsed < STOP_BOUND_S, f"{device} took {elapsed:.1f} s to stop"
            assert "ERROR" not in err and "Client is not connected" not in err

        # after the fleet stopped: the devices' statuses say offline, the state stays readable
        status = _biofed("status", "--config", str(coordinator_toml), "--json")
        out, err = status.communicate(timeout=120)
        view = json.loads(out)
        assert view["online"] == 0 and view["offline"] == 2 and not view["coordinator"]["running"]
        text = _biofed("status", "--config", str(coordinator_toml))
        out, _ = text.communicate(timeout=120)
        assert re.search(r"devices: 0 online, 2 offline", out) and "coordinator not running" in out
    finally:
        for process in (coordinator, *agents.values()):
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_agent_without_a_usable_source_fails_fast(amqtt_broker, tmp_path):
    settings = DemoSettings(out=tmp_path, rounds=1)
    _, device_tomls = write_configs(
        settings, {"lonely": [tmp_path / "missing.fif"]}, amqtt_broker.host, amqtt_broker.port, "3.1.1"
    )
    start = time.monotonic()
    agent = _biofed("edge", "--config", str(device_tomls["lonely"]))
    _, err = agent.communicate(timeout=120)
    assert agent.returncode == 1
    assert f"lonely: no usable source: recordings not found: {tmp_path / 'missing.fif'}" in err
    assert "--wait-for-sources" in err
    assert time.monotonic() - start < 60

    waiting = _biofed("edge", "--config", str(device_tomls["lonely"]), "--wait-for-sources")
    try:
        deadline = time.monotonic() + 120
        while "no usable source yet" not in waiting.stderr.readline() and time.monotonic() < deadline:
            pass
        time.sleep(6)  # past one SOURCE_POLL_S look
        assert waiting.poll() is None  # still waiting for its data
        elapsed, _ = _stop(waiting)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0 and elapsed < STOP_BOUND_S


def test_status_without_a_broker(tmp_path):
    toml = tmp_path / "coordinator.toml"
    toml.write_text(
        f'fleet = "ward7"\nrounds = 3\nstate_dir = "state"\n[broker]\nport = {free_port()}\n'
        "[dp]\nepsilon_budget = 4.0\n"
    )
    unreachable = _biofed("status", "--config", str(toml))
    _, err = unreachable.communicate(timeout=120)
    assert unreachable.returncode == 1 and "cannot reach MQTT broker" in err and "--no-broker" in err
    alone = _biofed("status", "--config", str(toml), "--no-broker", "--json")
    out, err = alone.communicate(timeout=120)
    assert alone.returncode == 0, err
    view = json.loads(out)
    assert view["coordinator"]["phase"] is None and view["coordinator"]["epsilon_budget"] == 4.0
    assert not (tmp_path / "state").exists()  # status never creates state


def test_status_watch_prints_one_json_document_per_interval(tmp_path):
    toml = tmp_path / "coordinator.toml"
    toml.write_text('fleet = "ward7"\nrounds = 3\nstate_dir = "state"\n')
    watch = _biofed("status", "--config", str(toml), "--no-broker", "--json", "--watch", "--interval", "0.5")
    try:
        lines = []
        deadline = time.monotonic() + 60
        while len(lines) < 3 and time.monotonic() < deadline:
            lines.append(watch.stdout.readline())
        watch.send_signal(signal.SIGINT)
        watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
    views = [json.loads(line) for line in lines]
    assert len(views) == 3 and all(v["fleet"] == "ward7" and v["devices"] == [] for v in views)
    assert views[0]["time"] < views[1]["time"] < views[2]["time"]
    assert watch.returncode == 0


def test_agent_stops_within_seconds_with_the_broker_down(tmp_path):
    from biofed.apps.broker import start_embedded_broker

    broker = start_embedded_broker()
    try:
        devices = write_synthetic_devices(tmp_path / "data", 1, duration_s=12.0, random_state=4)
        _, device_tomls = write_configs(
            DemoSettings(out=tmp_path, rounds=2), devices, broker.host, broker.port, "3.1.1"
        )
        agent = _biofed("edge", "--config", str(next(iter(device_tomls.values()))))
        deadline = time.monotonic() + 300
        seen = ""
        while "online with" not in seen and time.monotonic() < deadline and agent.poll() is None:
            seen = agent.stderr.readline()
    finally:
        broker.stop()
    try:
        time.sleep(3)  # the agent notices and keeps trying to reconnect
        elapsed, err = _stop(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, err
    assert elapsed < STOP_BOUND_S, f"the agent took {elapsed:.1f} s to stop with the broker down"
    assert "ERROR" not in err and "Client is not connected" not in err
