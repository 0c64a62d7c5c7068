"""Distributed trust mode end to end: real edge agents and the coordinator over amqtt, every
message signed, model updates aggregated with secure aggregation (never sent in clear)."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from biofed.apps.federation import AgentThreads, broker_settings, received, write_synthetic_devices
from biofed.config import CoordinatorConfig, DeviceConfig
from biofed.coordinator.server import Coordinator, RunState
from biofed.edge.agent import EdgeAgent
from biofed.mqtt import MqttClient
from biofed.protocol import Topics, Update, encode_message
from biofed.signing import Signer
from brokers import amqtt_broker  # noqa: F401  (pytest fixture)

FLEET = "ward7"
TOPICS = Topics(FLEET)
N_DEVICES = 4
SECONDS = 12.0


def _write_keys(root: Path, ids) -> None:
    """The provisioning layout: DIR/keys/{id}.pub.pem and DIR/<id>/signing.key.pem."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    (root / "keys").mkdir(parents=True)
    for identity in ids:
        key = Ed25519PrivateKey.generate()
        (root / identity).mkdir()
        (root / identity / "signing.key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (root / "keys" / f"{identity}.pub.pem").write_bytes(Signer(key, identity).public_pem())


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recordings")
    return write_synthetic_devices(folder, N_DEVICES, duration_s=SECONDS, random_state=5)


def test_distributed_federation_with_signed_messages(amqtt_broker, recordings, tmp_path):
    devices = sorted(recordings)
    _write_keys(tmp_path / "pki", [*devices, "coordinator"])
    broker = broker_settings(amqtt_broker, "3.1.1")
    z, n_min = 0.2, N_DEVICES  # the threshold may not be below min_devices
    config = CoordinatorConfig(
        fleet=FLEET,
        broker=broker,
        rounds=2,
        min_devices=N_DEVICES,
        round_deadline_s=20.0,
        state_dir=tmp_path / "state",
        model={"basis_k": 8},
        training={"lr": 0.5, "local_epochs": 2},
        dp={
            "trust_mode": "distributed",
            "noise_multiplier": z,
            "clip_norm": 1.0,
            "secagg_threshold": n_min,
            "secagg_step_timeout_s": 10.0,
        },
        signing_key_file=tmp_path / "pki/coordinator/signing.key.pem",
        keys_dir=tmp_path / "pki/keys",
    )
    agents = [
        EdgeAgent(
            DeviceConfig(
                device_id=d,
                fleet=FLEET,
                broker=broker,
                recordings=tuple(recordings[d]),
                store_path=tmp_path / f"{d}.sqlite",
                signing_key_file=tmp_path / f"pki/{d}/signing.key.pem",
                keys_dir=tmp_path / "pki/keys",
            ),
            random_state=i,
        )
        for i, d in enumerate(devices)
    ]
    observer = MqttClient(amqtt_broker.host, amqtt_broker.port, "observer", protocol="3.1.1").connect()
    observer.subscribe(TOPICS.all_devices("update"))
    with AgentThreads(agents):
        coordinator = Coordinator(
            config, discovery_timeout_s=60.0, accountants=("rdp",), basis_clip_norm=1e4, rng=np.random.default_rng(0)
        )
        assert coordinator.run() is RunState.DONE

    history = coordinator.history()
    basis_phases = [r.phase for r in history if r.phase in ("moments", "covariance")]
    assert basis_phases and [r.phase for r in history] == [*basis_phases, "train", "train", "evaluate"]
    assert all(r.n_devices == N_DEVICES for r in history)
    # an unsigned update (a downgrade attempt) is refused by the coordinator's inbound path
    forged = Update(
        round=0,
        basis_version=0,
        delta=np.zeros(3),
        n_examples=1,
        clipped=False,
        metrics={"loss": 0.0, "n_windows": 1, "rss_bytes": 1, "cpu_time_s": 0.0},
    )
    assert (
        coordinator.ingest.handle(TOPICS.update(devices[0]), encode_message(forged, fleet=FLEET, sender=devices[0]))
        == "dropped"
    )
    assert coordinator.ingest.dropped["UnsignedMessage"] == 1

    # the ledger: basis phases with the devices' full local noise z, training rounds with
    # the noise actually in the securely aggregated sum, z * sqrt(survivors / n_min)
    n_basis = len(basis_phases)
    z_eff = z * math.sqrt(N_DEVICES / n_min)
    groups = coordinator.ledger.groups
    assert [(g.kind, g.sampling_rate, g.count) for g in groups] == [("basis", 1.0, n_basis), ("train", 1.0, 2)]
    # the training shares are discrete Gaussians on the fixed-point grid: z against the grid sensitivity
    assert [g.noise_multiplier for g in groups] == pytest.approx([z, z_eff], rel=1e-5)
    assert groups[1].noise_multiplier < z_eff
    expected = (
        RdpAccountant()
        .compose(dp_accounting.GaussianDpEvent(z), n_basis)
        .compose(dp_accounting.GaussianDpEvent(groups[1].noise_multiplier), 2)
        .get_epsilon(1e-5)
    )
    assert coordinator.ledger.epsilon("rdp") == pytest.approx(expected, rel=1e-9)

    # the updates seen on the broker never carried a delta in distributed rounds
    train_rounds = {r.round for r in history if r.phase == "train"}
    seen = [m.payload for m in received(observer, TOPICS) if m.sender in devices and m.round in train_rounds]
    observer.close()
    assert len(seen) == 2 * N_DEVICES and all(u.delta.size == 0 and u.n_examples == 0 for u in seen)
    final = np.load(tmp_path / "state" / "model_final.npz")
    assert np.abs(final["params"]).sum() > 0  # the model moved
    # no held-out accuracy reaches the coordinator in distributed mode (data-dependent cleartext)
    assert history[-1].balanced_accuracy is None
    # each device's own ledger charged its noised sketches and its noise shares
    assert all(a.mechanism.ledger.count("basis") == n_basis and a.mechanism.ledger.count("train") == 2 for a in agents)


def test_ingest_routes_secagg_messages_only_to_a_secure_round():
    """No open secure round: secagg uploads are dropped; in one, a metrics update carrying a delta is refused."""
    from biofed.coordinator.ingest import Ingest, OpenRound
    from biofed.coordinator.secure_aggregation import SecureAggregationRound
    from biofed.protocol import Status
    from biofed.secure_aggregation import SecAggUpload

    ingest = Ingest(TOPICS, max_bytes=1 << 20)
    ingest.handle(TOPICS.status("pi-01"), encode_message(Status(round=0, state="online"), fleet=FLEET, sender="pi-01"))
    advertise = SecAggUpload(5, "advertise", public_keys=np.arange(64, dtype=np.uint8))
    assert ingest.handle(TOPICS.secagg("pi-01"), encode_message(advertise, fleet=FLEET, sender="pi-01")) == "dropped"
    assert ingest.dropped["no secure aggregation"] == 1
    deadline = 2e9
    ingest.open = OpenRound(
        round=5, phase="train", participants=frozenset({"pi-01"}), deadline=deadline, basis_version=1, n_params=66
    )
    ingest.open.secure = SecureAggregationRound(
        fleet=FLEET,
        round=5,
        participants=["pi-01"],
        vector_size=66,
        threshold=1,
        advertise_deadline=deadline,
        step_timeout_s=5.0,
    )
    update = Update(
        round=5,
        basis_version=1,
        delta=np.zeros(66),
        n_examples=10,
        clipped=False,
        metrics={"loss": 0.1, "n_windows": 10, "rss_bytes": 1, "cpu_time_s": 0.0},
    )
    assert ingest.handle(TOPICS.update("pi-01"), encode_message(update, fleet=FLEET, sender="pi-01")) == "dropped"
    assert ingest.dropped["bad payload"] == 1
    assert ingest.handle(TOPICS.secagg("pi-01"), encode_message(advertise, fleet=FLEET, sender="pi-01")) == "secagg"
    assert ingest.open.secure.expected == {"pi-01"}
    assert ingest.handle(TOPICS.secagg("pi-01"), encode_message(advertise, fleet=FLEET, sender="pi-01")) == "dropped"
    assert ingest.dropped["secagg"] == 1  # a second advertise of the same device
