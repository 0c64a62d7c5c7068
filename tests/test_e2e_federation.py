"""End to end: coordinator and edge agents as separate processes over a real MQTT broker.

Synthetic devices (short recordings, so every run takes seconds) are written to FIF + WAV
files that the agents replay into their feature stores, exactly as ``biofed demo`` does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from biofed.apps.demo import FLEET, DemoError, DemoSettings, run_demo, write_configs
from biofed.apps.federation import Listener, spawn, terminate, write_synthetic_devices
from biofed.config import CoordinatorConfig, load_config
from biofed.coordinator.server import Coordinator, RunState
from biofed.mqtt import MqttClient
from biofed.protocol import Topics, decode_topic_message
from brokers import amqtt_broker, require_mosquitto  # noqa: F401  (pytest fixtures)

TOPICS = Topics(FLEET)


def _check_report(out: Path, rounds: int) -> None:
    table = json.loads((out / "rounds.json").read_text())
    assert [row["round"] for row in table] == list(range(0, rounds + 1))  # row 0: the initial model
    csv_bytes = (out / "rounds.csv").read_bytes()
    assert b"\r" not in csv_bytes and csv_bytes.decode().startswith("round,task_round,devices,loss")
    assert (out / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "rounds.svg").read_bytes()[:2000]
    with np.load(out / "model_final.npz") as model:
        assert model["params"].shape == (33 * 2,)  # logistic regression on the k=32 basis, 2 classes


def _converges_like_centralized(out: Path, mosquitto: bool) -> None:
    # non-private, so federated and centralized training can be compared; 60 s per class gives each
    # device 12 held-out windows per class (one window then moves the mean by less than a point)
    settings = DemoSettings(
        out=out,
        devices=5,
        rounds=10,
        synthetic_seconds=60.0,
        timeout_s=240.0,
        mosquitto=mosquitto,
        noise_multiplier=0.0,
    )
    summary = run_demo(settings)
    _check_report(out, 10)
    federated, centralized = summary["federated"], summary["centralized"]
    assert len(federated["per_device"]) == 5
    assert abs(federated["mean"] - centralized["mean"]) <= 0.02
    assert federated["mean"] > 0.75  # well above chance (0.5), not trivially 1.0: both actually learned
    with np.load(out / "model_final.npz") as model:  # the default: device standardization, no moments phase
        assert str(model["standardization"]) == "device"
        assert not model["basis_mean"].any() and (model["basis_scale"] == 1).all()
    # the devices' own evaluation of the final model agrees with the demo's recomputation
    assert federated["reported_by_devices"] == pytest.approx(federated["mean"])
    assert summary["epsilon"] is None  # no noise: epsilon is infinite
    onnx = summary["onnx"]  # the exported model, run with onnxruntime on the held-out windows
    assert onnx["file"] == "model_final.onnx" and (out / "model_final.onnx").is_file()
    assert onnx["held_out_windows"] > 0 and onnx["max_abs_diff_vs_numba"] <= 1e-5
    rows = summary["rounds"]
    assert all(row["devices"] == 5 for row in rows)
    assert rows[-1]["accuracy_mean"] == pytest.approx(federated["mean"])
    assert rows[-1]["accuracy_min"] == pytest.approx(federated["min"])


@pytest.mark.slow
def test_federation_converges_like_centralized_training(tmp_path):
    _converges_like_centralized(tmp_path / "report", mosquitto=False)


@pytest.mark.mosquitto
@pytest.mark.slow
def test_federation_over_mosquitto(tmp_path):
    require_mosquitto()
    _converges_like_centralized(tmp_path / "report", mosquitto=True)


@pytest.mark.slow
def test_central_dp_reports_the_epsilon_of_dp_accounting(tmp_path):
    out = tmp_path / "report"
    rounds, z, z_basis, delta = 3, 1.0, 5.0, 1e-5
    summary = run_demo(
        DemoSettings(
            out=out,
            devices=3,
            rounds=rounds,
            synthetic_seconds=12.0,
            timeout_s=240.0,
            noise_multiplier=z,
            basis_noise_multiplier=z_basis,
            delta=delta,
            epsilon_budget=None,
        )
    )
    # one basis round with z_b (device standardization: no moments phase) and `rounds` training
    # rounds with z, every device asked (q = 1)
    accountant = RdpAccountant().compose(dp_accounting.GaussianDpEvent(z_basis))
    expected = accountant.compose(dp_accounting.GaussianDpEvent(z), rounds).get_epsilon(delta)
    assert np.isfinite(summary["epsilon"])
    assert summary["epsilon"] == pytest.approx(expected, rel=1e-9)
    epsilons = [row["epsilon"] for row in summary["rounds"]]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == rounds + 1  # row 0: the basis round alone
    basis_only = RdpAccountant().compose(dp_accounting.GaussianDpEvent(z_basis)).get_epsilon(delta)
    assert epsilons[0] == pytest.approx(basis_only, rel=1e-9)
    assert all(row["epsilon_pld"] is not None for row in summary["rounds"])
    _check_report(out, rounds)


def _retained_statuses(host: str, port: int, devices) -> dict[str, str]:
    client = MqttClient(host, port, "status-reader", protocol="3.1.1", clean=True).connect()
    try:
        client.subscribe(TOPICS.all_devices("status"))
        states: dict[str, str] = {}
        deadline = time.monotonic() + 10
        while set(states) != set(devices) and time.monotonic() < deadline:
            inbound = client.receive(timeout_s=0.5)
            if inbound is not None:
                message = decode_topic_message(TOPICS, inbound.topic, inbound.payload)
                if message.kind == "status":  # amqtt also hands a fresh subscriber other retained topics
                    states[message.sender] = message.payload.state
        return states
    finally:
        client.close()


def test_agent_killed_mid_round_leaves_the_round_to_the_others(amqtt_broker, tmp_path):
    out = tmp_path / "run"
    devices = write_synthetic_devices(out / "data", 4, duration_s=12.0, random_state=5)
    settings = DemoSettings(out=out, rounds=4, min_devices=3, round_deadline_s=20.0, agent_keepalive_s=5)
    coordinator_toml, device_tomls = write_configs(settings, devices, amqtt_broker.host, amqtt_broker.port, "3.1.1")
    config = load_config(coordinator_toml, CoordinatorConfig)
    victim = "device00"
    killed = threading.Event()
    agents = {}

    def kill_on_first_training_task(inbound) -> None:
        message = decode_topic_message(TOPICS, inbound.topic, inbound.payload)
        # amqtt also hands a fresh subscriber other retained topics
        if not killed.is_set() and message.kind == "task" and message.payload.phase == "train":
            os.kill(agents[victim].process.pid, signal.SIGKILL)  # no DISCONNECT: the broker sends its will
            killed.set()

    watcher = Listener(
        MqttClient(amqtt_broker.host, amqtt_broker.port, "task-watcher", protocol="3.1.1", clean=True),
        [TOPICS.task],
        kill_on_first_training_task,
        name="task-watcher",
    ).start()

    coordinator = Coordinator(config, discovery_timeout_s=120.0, accountants=("rdp",))
    try:
        for device, toml in device_tomls.items():
            agents[device] = spawn(device, ["edge", "--config", str(toml)], out / f"{device}.log")
        # all four online before the first round (with min_devices=3 the first rounds could otherwise
        # start without a slow starter, and the killed device would leave too few replies)
        deadline = time.monotonic() + 120
        while _retained_statuses(amqtt_broker.host, amqtt_broker.port, devices) != dict.fromkeys(devices, "online"):
            assert time.monotonic() < deadline, "the agents did not come online"
            time.sleep(0.2)
        assert coordinator.run() is RunState.DONE
        assert killed.is_set()
        train = [r for r in coordinator.history() if r.phase == "train"]
        assert len(train) == 4
        short = [r for r in train if r.n_devices < r.n_selected]
        assert short and short[0].n_selected == 4 and short[0].n_devices == 3
        assert train[-1].n_selected == train[-1].n_devices == 3  # the killed device's will took it offline
        # the others shut down cleanly on SIGTERM and say so
        for device, child in agents.items():
            if device != victim:
                child.process.send_signal(signal.SIGTERM)
                assert child.process.wait(timeout=30) == 0
        assert _retained_statuses(amqtt_broker.host, amqtt_broker.port, devices) == dict.fromkeys(devices, "offline")
    finally:
        killed.set()
        watcher.stop()
        coordinator.stop()
        terminate(list(agents.values()))


@pytest.mark.slow
def test_demo_command_writes_table_plot_and_model(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "biofed",
            "demo",
            "--out",
            str(out),
            "--devices",
            "3",
            "--seconds",
            "10",
            "--rounds",
            "2",
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round  devices     loss  bal.acc mean     min   epsilon" in result.stdout
    assert "train 2" in result.stdout  # the coordinator's per-round progress lines
    # the live line of training round 2 reports the model after round 1, as the table's row 1 does
    live = re.search(r"train 2 .*balanced acc of model 1 (\d\.\d{3})", result.stdout)
    row = re.search(r"^\s+1\s+3\s+\S+\s+(\d\.\d{3})", result.stdout, re.M)
    assert live and row and live.group(1) == row.group(1), result.stdout
    assert "centralized baseline:" in result.stdout
    _check_report(out, 2)
    assert {p.name for p in (out / "logs").iterdir()} == {
        "warmup.log",
        "coordinator.log",
        "device00.log",
        "device01.log",
        "device02.log",
    }


@pytest.mark.slow
def test_demo_without_eegmat_subjects_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "biofed", "demo", "--data", str(tmp_path), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "no eegmat subjects (SubjectNN_1.edf + SubjectNN_2.edf) found" in result.stderr


@pytest.mark.slow
def test_demo_timeout_kills_the_children_and_shows_their_logs(tmp_path):
    with pytest.raises(DemoError, match=r"did not finish within 1 s \(--timeout\)") as info:
        run_demo(DemoSettings(out=tmp_path / "report", devices=2, rounds=2, synthetic_seconds=8.0, timeout_s=1.0))
    assert "--- coordinator (exit code" in str(info.value)
    time.sleep(0.5)
    for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines():
        assert str(tmp_path) not in line  # no coordinator or agent of this run survived
