"""A provisioned fleet end to end: the coordinator and edge agents run from the configs
``biofed provision`` wrote, over Mosquitto with TLS, client certificates, passwords,
per-device ACLs and signed envelopes. The distributed trust mode sends the
secure-aggregation steps too (``secagg/{id}``, ``secagg_relay``), so every topic the
protocol uses passes the broker's ACL."""

from __future__ import annotations

import numpy as np
import pytest

from biofed.apps.broker import free_port
from biofed.apps.demo import DemoSettings, run_demo
from biofed.apps.federation import AgentThreads, received, write_synthetic_devices
from biofed.apps.provision import ProvisionError, mosquitto_passwd_binary, provision_fleet
from biofed.config import CoordinatorConfig, DeviceConfig, load_config
from biofed.coordinator.server import Coordinator, RunState
from biofed.edge.agent import EdgeAgent
from biofed.mqtt import MqttClient
from biofed.protocol import Topics
from biofed.signing import KeyRing
from brokers import require_mosquitto

pytestmark = pytest.mark.mosquitto

FLEET = "ward7"
TOPICS = Topics(FLEET)
N_DEVICES = 3


def _require_tools() -> None:
    try:
        mosquitto_passwd_binary()
    except ProvisionError as exc:
        pytest.skip(str(exc))  # require_mosquitto() below fails under BIOFED_REQUIRE_MOSQUITTO=1
    require_mosquitto()


@pytest.mark.slow
def test_provisioned_fleet_runs_a_distributed_federation(tmp_path):
    _require_tools()
    recordings = write_synthetic_devices(tmp_path / "data", N_DEVICES, duration_s=12.0, random_state=5)
    devices = sorted(recordings)
    fleet = provision_fleet(tmp_path / "fleet", FLEET, devices, port=free_port(), observer=True)
    layout = fleet.layout
    base = load_config(layout.coordinator_config, CoordinatorConfig)
    config = CoordinatorConfig.model_validate(
        {
            **base.model_dump(),
            "rounds": 2,
            "min_devices": N_DEVICES,
            "round_deadline_s": 20.0,
            "state_dir": tmp_path / "state",
            "model": {"basis_k": 8},
            "training": {"lr": 0.5, "local_epochs": 2},
            "dp": {
                "trust_mode": "distributed",
                "noise_multiplier": 0.2,
                "clip_norm": 1.0,
                "secagg_step_timeout_s": 10.0,
            },
        }
    )
    assert config.broker.tls and config.keys_dir.resolve() == layout.keys_dir
    agents = []
    for i, device in enumerate(devices):
        own = load_config(layout.device_config(device), DeviceConfig)
        assert own.broker.tls and own.signing_key_file is not None
        agents.append(
            EdgeAgent(
                DeviceConfig.model_validate(
                    {
                        **own.model_dump(),
                        "recordings": recordings[device],
                        "store_path": tmp_path / f"{device}.sqlite",
                    }
                ),
                random_state=i,
            )
        )

    broker = fleet.start_broker()
    observer = MqttClient.from_config(fleet.broker_config("observer"), "observer", protocol="5", clean=True)
    coordinator = Coordinator(
        config, discovery_timeout_s=60.0, accountants=("rdp",), basis_clip_norm=1e4, rng=np.random.default_rng(0)
    )
    try:
        observer.connect()
        observer.subscribe(f"{TOPICS.base}/#")
        with AgentThreads(agents):
            assert coordinator.run() is RunState.DONE
    finally:
        coordinator.stop()
        broker.stop()

    history = coordinator.history()
    assert [r.phase for r in history if r.phase in ("train", "evaluate")] == ["train", "train", "evaluate"]
    assert all(r.n_devices == N_DEVICES for r in history)
    assert history[-1].balanced_accuracy is None  # no accuracy leaves a device in distributed mode
    # the read-only observer saw the whole protocol, every message signed and verified
    ring = KeyRing.from_dir(layout.keys_dir)
    kinds: dict[str, set[str]] = {}
    for message in received(observer, TOPICS, verifier=ring):
        assert message.verified
        kinds.setdefault(message.kind, set()).add(message.sender)
    observer.close()
    assert kinds["secagg"] == set(devices) and kinds["update"] == set(devices)
    assert kinds["secagg_relay"] == kinds["task"] == kinds["model"] == {"coordinator"}


@pytest.mark.slow
def test_demo_secure_runs_over_the_provisioned_broker(tmp_path):
    _require_tools()
    out = tmp_path / "report"
    summary = run_demo(DemoSettings(out=out, devices=3, rounds=2, synthetic_seconds=10.0, timeout_s=240.0, secure=True))
    assert summary["settings"]["secure"] is True and len(summary["rounds"]) == 3  # row 0 and 2 rounds
    device = load_config(out / "devices" / "device00" / "device.toml", DeviceConfig)
    assert device.broker.tls and device.broker.username == "device00"
    assert device.signing_key_file == out / "fleet" / "devices" / "device00" / "signing.key.pem"
    coordinator = load_config(out / "coordinator.toml", CoordinatorConfig)
    assert coordinator.broker.tls and coordinator.broker.username == "coordinator"
    assert coordinator.allowed_devices_file == out / "fleet" / "coordinator" / "allowed_devices.json"
    log = (out / "fleet" / "broker" / "data" / "mosquitto.log").read_text()
    for identity in ("coordinator", "device00", "device01", "device02", "observer"):
        assert f"u'{identity}'" in log  # every process logged in with its own credentials
