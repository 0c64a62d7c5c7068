"""biofed provision: files, certificates, and a real Mosquitto run with the generated config
(TLS, passwords, per-device ACLs, revocation by password file, ACL and CRL)."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from biofed.apps import provision as provision_module
from biofed.apps.broker import fleet_queue_limits, free_port, start_mosquitto
from biofed.apps.cli import cli
from biofed.apps.provision import (
    ProvisionError,
    load_fleet,
    mosquitto_passwd_binary,
    provision_fleet,
    revoke_device,
    topic_kinds,
)
from biofed.config import (
    RECOMMENDED_PRIVACY,
    RECOMMENDED_ROUNDS,
    BrokerConfig,
    ConfigError,
    CoordinatorConfig,
    DeviceConfig,
    load_allowed_devices,
    load_config,
)
from biofed.mqtt import ConnectError, MqttClient, PublishError, TlsSettings
from biofed.protocol import KINDS, Status, Topics, encode_message
from biofed.signing import KeyRing, signing_from_config
from brokers import require_mosquitto

pytestmark = pytest.mark.mosquitto

FLEET = "ward7"
TOPICS = Topics(FLEET)
QUIET_S = 1.0  # how long "nothing arrives" is watched


def require_mosquitto_passwd() -> None:
    """Skip (or fail under BIOFED_REQUIRE_MOSQUITTO=1) when mosquitto_passwd is missing."""
    try:
        mosquitto_passwd_binary()
    except ProvisionError as exc:
        if os.environ.get("BIOFED_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(f"BIOFED_REQUIRE_MOSQUITTO=1 but {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    require_mosquitto_passwd()
    return provision_fleet(
        tmp_path_factory.mktemp("fleet") / "ward7",
        FLEET,
        3,
        port=free_port(),
        server_names=("broker.example.org", "10.1.2.3"),
        observer=True,
    )


@pytest.fixture(scope="module")
def broker(fleet):
    require_mosquitto()
    running = fleet.start_broker()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def connect(fleet):
    """connect(identity, **overrides) -> a connected MqttClient with that identity's config."""
    opened: list[MqttClient] = []

    def make(identity: str, client_id: str | None = None, **settings) -> MqttClient:
        config = fleet.broker_config(identity).model_copy(update=settings)
        client = MqttClient.from_config(config, client_id or identity, protocol="5", connect_timeout_s=5, clean=True)
        opened.append(client)
        return client.connect()

    yield make
    for client in opened:
        client.close()


def _topics_received(client: MqttClient, wait_s: float = QUIET_S) -> list[tuple[str, bytes]]:
    received = []
    message = client.receive(wait_s)
    while message is not None:
        received.append((message.topic, message.payload))
        message = client.receive(0.2)
    return received


# ----------------------------------------------------------------------------- files
def test_every_file_written_with_sane_permissions(fleet):
    layout = fleet.layout
    root = layout.root
    assert fleet.devices == ("device-001", "device-002", "device-003")
    secrets = [layout.ca_key, layout.server_key, layout.password_file, layout.acl_file]
    for identity in fleet.identities:
        secrets += [layout.client_key(identity), layout.mqtt_password(identity)]
        if identity != "observer":
            secrets.append(layout.signing_key(identity))
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700, path.parent
    public = [
        layout.ca_cert,
        layout.crl_file,
        layout.server_cert,
        layout.broker_config,
        layout.manifest,
        layout.allowed_devices,
        layout.coordinator_config,
    ]
    public += [layout.public_key(i) for i in ("coordinator", *fleet.devices)]
    public += [layout.device_config(d) for d in fleet.devices]
    for path in public:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    # nothing group/world-writable, no stray temporary files
    for path in root.rglob("*"):
        assert not stat.S_IMODE(path.stat().st_mode) & 0o022, path
        assert not path.name.endswith(".tmp"), path
    # the mosquitto password file holds hashes, never the passwords themselves
    hashed = layout.password_file.read_text()
    for identity in fleet.identities:
        password = layout.mqtt_password(identity).read_text().strip()
        assert len(password) >= 32 and password not in hashed
        assert f"{identity}:$7$" in hashed  # PBKDF2-SHA512


def test_configs_load_and_point_at_the_identity_files(fleet):
    layout = fleet.layout
    device = load_config(layout.device_config("device-002"), DeviceConfig)
    assert (device.device_id, device.fleet) == ("device-002", FLEET)
    b = device.broker
    assert b.tls and b.protocol == "5" and (b.host, b.port) == (fleet.host, fleet.port)
    assert b.username == "device-002"
    assert b.cert_file == layout.client_cert("device-002") and b.key_file == layout.client_key("device-002")
    assert b.ca_file.read_bytes() == layout.ca_cert.read_bytes()
    assert b.read_password() == layout.mqtt_password("device-002").read_text().strip()
    cert = x509.load_pem_x509_certificate(b.cert_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-002"
    coordinator = load_config(layout.coordinator_config, CoordinatorConfig)
    assert coordinator.fleet == FLEET and coordinator.broker.username == "coordinator"
    assert load_allowed_devices(layout.allowed_devices) == frozenset(fleet.devices)
    assert coordinator.allowed_devices_file == layout.allowed_devices
    assert fleet.broker_config("observer").username == "observer"
    assert load_fleet(layout.root) == fleet


def test_signing_keys_pair_up_and_load_as_a_key_ring(fleet):
    layout = fleet.layout
    ring = KeyRing.from_dir(layout.keys_dir)
    assert ring.ids == frozenset({"coordinator", *fleet.devices})
    for identity in ("coordinator", *fleet.devices):
        private = serialization.load_pem_private_key(layout.signing_key(identity).read_bytes(), password=None)
        ring.verify(identity, b"payload", private.sign(b"payload"))
    assert not layout.signing_key("observer").exists()
    # the configs turn signing on; a device's own key folder trusts the coordinator (and itself) only
    coordinator_signer, coordinator_verifier = signing_from_config(
        load_config(layout.coordinator_config, CoordinatorConfig), "coordinator"
    )
    device = load_config(layout.device_config("device-003"), DeviceConfig)
    assert device.keys_dir == layout.identity_dir("device-003") / "keys"
    device_signer, device_verifier = signing_from_config(device, "device-003")
    assert KeyRing.from_dir(device.keys_dir).ids == frozenset({"coordinator", "device-003"})
    device_verifier.verify("coordinator", b"task", coordinator_signer.sign(b"task"))
    coordinator_verifier.verify("device-003", b"update", device_signer.sign(b"update"))
    assert fleet.signing_settings("device-003") == {
        "signing_key_file": str(device.signing_key_file),
        "keys_dir": str(device.keys_dir),
    }


def test_server_certificate_verifies_against_the_ca_with_the_right_san(fleet):
    layout = fleet.layout
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3")
    }
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for identity in fleet.identities:
        client = x509.load_pem_x509_certificate(layout.client_cert(identity).read_bytes())
        client.verify_directly_issued_by(ca)
        usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    crl = x509.load_pem_x509_crl(layout.crl_file.read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0


def test_acl_gives_devices_their_own_topics_only(fleet):
    acl = fleet.layout.acl_file.read_text()
    block = acl.split("user device-001\n")[1].split("\n\n")[0].splitlines()
    assert sorted(block) == sorted(
        [
            f"topic read {TOPICS.model}",
            f"topic read {TOPICS.task}",
            f"topic read {TOPICS.basis}",
            f"topic read {TOPICS.secagg_relay}",
            f"topic write {TOPICS.update('device-001')}",
            f"topic write {TOPICS.sketch('device-001')}",
            f"topic write {TOPICS.status('device-001')}",
            f"topic write {TOPICS.prediction('device-001')}",
            f"topic write {TOPICS.secagg('device-001')}",
        ]
    )
    coordinator = acl.split("user coordinator\n")[1].split("\n\n")[0].splitlines()
    assert f"topic read {TOPICS.all_devices('secagg')}" in coordinator
    assert f"topic readwrite {TOPICS.secagg_relay}" in coordinator
    broadcast, per_device = topic_kinds()
    assert set(broadcast) | set(per_device) == set(KINDS) and not set(broadcast) & set(per_device)
    conf = fleet.layout.broker_config.read_text()
    n_identities = len(fleet.identities)
    for line in (
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {fleet.layout.crl_file}",
        f"listener {fleet.port} 127.0.0.1",
        "max_queued_messages 100000",
        f"max_queued_bytes {512 * 1024 * 1024}",
        "max_inflight_messages 100",
        f"max_packet_size {16 * 1024 * 1024 + 64 * 1024}",
        f"max_connections {2 * n_identities}",
    ):
        assert line in conf.splitlines(), line
    assert "max_queued_bytes 0" not in conf


def test_queue_limits_grow_with_the_fleet():
    assert fleet_queue_limits(3) == (100_000, 512 * 1024 * 1024)
    assert fleet_queue_limits(5000) == (64 * 5000, 5000 * 1024 * 1024)  # 64 messages and 1 MiB per device
    with pytest.raises(ValueError, match="n_devices"):
        fleet_queue_limits(-1)


# ----------------------------------------------------------------------------- bad input
def test_provision_refuses_bad_input(tmp_path, monkeypatch):
    require_mosquitto_passwd()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("old")
    with pytest.raises(ProvisionError, match="not an empty directory"):
        provision_fleet(tmp_path / "used", FLEET, 1)
    with pytest.raises(ProvisionError, match="invalid fleet"):
        provision_fleet(tmp_path / "a", "ward 7", 1)
    with pytest.raises(ProvisionError, match="reserved"):
        provision_fleet(tmp_path / "b", FLEET, ["pi-1", "coordinator"])
    with pytest.raises(ProvisionError, match="duplicate device ids: \\['pi-1'\\]"):
        provision_fleet(tmp_path / "c", FLEET, ["pi-1", "pi-1"])
    with pytest.raises(ProvisionError, match="invalid device id 'bad/001'.*check the device prefix"):
        provision_fleet(tmp_path / "d", FLEET, 1, device_prefix="bad/")
    with pytest.raises(ProvisionError, match="number of devices must be >= 1"):
        provision_fleet(tmp_path / "e", FLEET, 0)
    with pytest.raises(ProvisionError, match="port must be in 1..65535"):
        provision_fleet(tmp_path / "f", FLEET, 1, port=70000)
    monkeypatch.setattr(provision_module.shutil, "which", lambda name: "/bin/false")  # hashing fails
    with pytest.raises(ProvisionError, match="failed with code 1"):
        provision_fleet(tmp_path / "half", FLEET, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProvisionError, match="failed with code 1"):
        provision_fleet(tmp_path / "empty", FLEET, 2)
    assert list((tmp_path / "empty").iterdir()) == []  # emptied again, kept
    (tmp_path / "empty").rmdir()
    monkeypatch.setattr(provision_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(provision_module, "_PASSWD_FALLBACKS", ())
    with pytest.raises(ProvisionError, match="mosquitto_passwd was not found.*apt-get install mosquitto"):
        provision_fleet(tmp_path / "g", FLEET, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # nothing half-written


def test_revoke_refuses_unknown_targets(tmp_path):
    require_mosquitto_passwd()
    with pytest.raises(ProvisionError, match="not a provisioned fleet directory"):
        revoke_device(tmp_path, "device-001")
    fleet = provision_fleet(tmp_path / "f", FLEET, 1)
    with pytest.raises(ProvisionError, match="'pi-9' is not a device of fleet 'ward7'"):
        revoke_device(fleet.layout.root, "pi-9")
    revoke_device(fleet.layout.root, "device-001")
    with pytest.raises(ProvisionError, match="already revoked"):
        revoke_device(fleet.layout.root, "device-001")
    with pytest.raises(ProvisionError, match="not an active identity"):
        load_fleet(fleet.layout.root).broker_settings("device-001")


def test_broker_config_tls_validation(tmp_path):
    with pytest.raises(ValueError, match="tls = true needs ca_file"):
        BrokerConfig(tls=True)
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        BrokerConfig(tls=True, ca_file="ca.pem", cert_file="c.pem")
    with pytest.raises(ValueError, match="only used with tls = true"):
        BrokerConfig(ca_file="ca.pem")
    with pytest.raises(ValueError, match="password or password_file, not both"):
        BrokerConfig(password="x", password_file="p")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        BrokerConfig(password_file=tmp_path / "empty").read_password()
    with pytest.raises(ConfigError, match="cannot read it"):
        BrokerConfig(password_file=tmp_path / "missing").read_password()
    with pytest.raises(ConnectError, match="TLS ca_file .* not found"):
        TlsSettings(tmp_path / "missing.pem").context()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConnectError, match="not a PEM CA certificate"):
        TlsSettings(tmp_path / "junk.pem").context()
    assert BrokerConfig() == BrokerConfig(tls=False, username=None, password=None)  # plain defaults unchanged


def test_start_mosquitto_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="either config_file or directory"):
        start_mosquitto(tmp_path, config_file=tmp_path / "mosquitto.conf")
    with pytest.raises(ValueError, match="needs a directory"):
        start_mosquitto()


# ----------------------------------------------------------------------------- live broker
def test_device_publishes_its_update_and_the_coordinator_receives_it(broker, connect):
    coordinator = connect("coordinator")
    coordinator.subscribe(TOPICS.all_devices("update"))
    device = connect("device-001")
    device.publish(TOPICS.update("device-001"), b"update-1")
    assert _topics_received(coordinator) == [(TOPICS.update("device-001"), b"update-1")]
    coordinator.publish(TOPICS.model, b"model-1", retain=True)
    device.subscribe(TOPICS.model)
    assert _topics_received(device) == [(TOPICS.model, b"model-1")]


def test_device_cannot_read_another_devices_updates(broker, connect):
    coordinator = connect("coordinator")
    coordinator.subscribe(TOPICS.all_devices("update"))
    snoop = connect("device-001")
    snoop.subscribe(TOPICS.update("device-002"))
    snoop.subscribe(TOPICS.all_devices("update"))
    snoop.subscribe(f"{TOPICS.base}/#")
    connect("device-002").publish(TOPICS.update("device-002"), b"private")
    assert _topics_received(coordinator) == [(TOPICS.update("device-002"), b"private")]
    # (the coordinator's wait covered the delivery time; biofed/ward7/# may bring the retained model)
    assert [topic for topic, _ in _topics_received(snoop, 0.2) if topic != TOPICS.model] == []


def test_device_cannot_post_as_another_device_nor_publish_the_model(broker, connect):
    coordinator = connect("coordinator")
    coordinator.subscribe(TOPICS.all_devices("update"))
    coordinator.subscribe(TOPICS.all_devices("sketch"))
    coordinator.subscribe(TOPICS.model)
    _topics_received(coordinator, 0.3)  # the retained model of an earlier test, if any
    device = connect("device-001")
    for topic in (TOPICS.update("device-002"), TOPICS.sketch("device-003")):
        with pytest.raises(PublishError, match="refused by the broker: Not authorized"):
            device.publish(topic, b"forged")
    with pytest.raises(PublishError, match="refused by the broker: Not authorized"):
        device.publish(TOPICS.model, b"evil model", retain=True)
    device.publish(TOPICS.update("device-001"), b"genuine")  # after the forgeries: in order over one connection
    assert _topics_received(coordinator) == [(TOPICS.update("device-001"), b"genuine")]
    late = connect("device-003")
    late.subscribe(TOPICS.model)
    assert all(payload != b"evil model" for _, payload in _topics_received(late, 0.5))


def test_observer_reads_but_cannot_write(broker, connect):
    observer = connect("observer")
    observer.subscribe(f"{TOPICS.base}/#")
    _topics_received(observer, 0.3)  # retained messages of earlier tests
    coordinator = connect("coordinator")
    coordinator.subscribe(TOPICS.all_devices("update"))
    connect("device-003").publish(TOPICS.update("device-003"), b"u3")
    with pytest.raises(PublishError, match="Not authorized"):
        observer.publish(TOPICS.update("device-003"), b"observer forgery")
    assert _topics_received(coordinator) == [(TOPICS.update("device-003"), b"u3")]
    assert (TOPICS.update("device-003"), b"u3") in _topics_received(observer, 0.3)


def test_a_device_cannot_take_over_another_devices_session(broker, connect):
    victim = connect("device-001")
    connect("device-002", client_id="device-001")  # the broker uses the user name as client id
    time.sleep(0.5)
    assert victim.connected


def _raw_connect(fleet, identity: str | None, *, cert: bool = True) -> str:
    """CONNECT with paho directly (no user name when identity is None); the CONNACK reason
    or the transport error as text."""
    layout = fleet.layout
    owner = identity or "device-003"
    tls = TlsSettings(
        layout.ca_cert, layout.client_cert(owner) if cert else None, layout.client_key(owner) if cert else None
    )
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{owner}", protocol=MQTTProtocolVersion.MQTTv5)
    client.tls_set_context(tls.context())
    if identity is not None:
        client.username_pw_set(identity, layout.mqtt_password(identity).read_text().strip())
    outcome: list[str] = []
    done = threading.Event()
    client.on_connect = lambda c, u, f, reason, p: (outcome.append(str(reason)), done.set())
    client.on_disconnect = lambda c, u, f, reason, p: (outcome.append(f"disconnected: {reason}"), done.set())
    try:
        client.connect(fleet.host, fleet.port, 30)
    except OSError as exc:
        return f"transport: {exc}"
    client.loop_start()
    try:
        done.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome[0] if outcome else "no answer"


def test_connections_without_certificate_are_refused(fleet, broker):
    assert _raw_connect(fleet, "device-003") == "Success"  # the control: same path, with credentials
    assert _raw_connect(fleet, "device-003", cert=False) != "Success"  # password, no certificate
    assert _raw_connect(fleet, None, cert=False) != "Success"  # nothing at all


def test_cross_bound_certificate_and_password_cannot_act_as_the_other_device(fleet, broker, connect):
    """device-001's certificate with device-002's user name and password: the broker takes the
    identity from the certificate, so the login is device-001's. Every attempt to act as
    device-002 is refused, and device-002's own session is not taken over."""
    victim = connect("device-002")
    victim.subscribe(TOPICS.task)
    layout = fleet.layout
    attacker = connect(
        "device-002", cert_file=layout.client_cert("device-001"), key_file=layout.client_key("device-001")
    )
    update = encode_message(Status(round=0, state="online"), fleet=FLEET, sender="device-002")
    with pytest.raises(PublishError, match="refused by the broker: Not authorized"):
        attacker.publish(TOPICS.status("device-002"), update, timeout_s=10)
    own = encode_message(Status(round=0, state="online"), fleet=FLEET, sender="device-001")
    attacker.publish(TOPICS.status("device-001"), own, timeout_s=10)  # the certificate's own identity
    time.sleep(0.5)
    # its session (client id = user name = device-002) was never taken over, not even for a moment
    assert victim.connected and victim.downtime_s() == 0.0


def test_another_fleets_credentials_are_refused(fleet, broker, tmp_path):
    """A client certificate (and password) from another fleet's CA, while trusting this broker."""
    other = provision_fleet(tmp_path / "other", FLEET, 1, port=broker.port)
    config = other.broker_config("device-001").model_copy(update={"ca_file": fleet.layout.ca_cert})
    client = MqttClient.from_config(config, "device-001", protocol="5", connect_timeout_s=5)
    with pytest.raises(ConnectError, match="did not accept the connection"):
        client.connect()


def test_plain_tcp_to_the_tls_port_fails(broker, connect):
    with pytest.raises(ConnectError, match="did not accept the connection"):
        connect("device-003", tls=False, ca_file=None, cert_file=None, key_file=None)


def test_tls_with_an_unknown_ca_fails(broker, connect, tmp_path):
    other = provision_fleet(tmp_path / "rogue", FLEET, 1, port=broker.port)
    with pytest.raises(ConnectError, match="TLS handshake .* failed.*CERTIFICATE_VERIFY_FAILED"):
        connect("device-003", ca_file=other.layout.ca_cert)


# ----------------------------------------------------------------------------- revoke
@pytest.mark.slow
def test_revoked_device_is_locked_out(tmp_path):
    require_mosquitto_passwd()
    require_mosquitto()
    fleet = provision_fleet(tmp_path / "fleet", FLEET, 3, port=free_port())
    layout = fleet.layout
    serial = x509.load_pem_x509_certificate(layout.client_cert("device-002").read_bytes()).serial_number
    broker = fleet.start_broker()
    clients: list[MqttClient] = []

    def connect(identity: str, config: BrokerConfig | None = None) -> MqttClient:
        client = MqttClient.from_config(
            config or fleet.broker_config(identity), identity, protocol="5", connect_timeout_s=5, clean=True
        )
        clients.append(client)
        return client.connect()

    try:
        connected = connect("device-002")
        revoked = revoke_device(layout.root, "device-002", broker_pid=broker.process.pid)
        # the SIGHUP reloads the ACL: whatever the still-open connection publishes is refused
        # (a certificate-authenticated session is not re-checked against the CRL until it reconnects)
        deadline = time.monotonic() + 5
        while True:
            try:
                connected.publish(TOPICS.update("device-002"), b"too late", timeout_s=5)
            except PublishError as exc:
                assert "Not authorized" in str(exc) or "not acknowledged" in str(exc)
                break
            assert time.monotonic() < deadline, "the revoked device may still publish"
            time.sleep(0.1)
        connected.close()
        with pytest.raises(ConnectError):
            connect("device-002", fleet.broker_config("device-002"))
        # the CRL refuses the revoked certificate, whatever user name and password come with it
        stolen = fleet.broker_config("device-001").model_copy(
            update={"cert_file": layout.client_cert("device-002"), "key_file": layout.client_key("device-002")}
        )
        with pytest.raises(ConnectError):
            connect("device-001", stolen)
        connect("device-001")  # the others are unaffected
        assert revoked.devices == ("device-001", "device-003") and revoked.revoked == ("device-002",)
        assert load_allowed_devices(layout.allowed_devices) == frozenset({"device-001", "device-003"})
        assert "device-002" not in layout.acl_file.read_text()
        assert "device-002:" not in layout.password_file.read_text()
        assert stat.S_IMODE(layout.password_file.stat().st_mode) == 0o600
        assert "device-002" not in KeyRing.from_dir(layout.keys_dir)
        ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
        crl = x509.load_pem_x509_crl(layout.crl_file.read_bytes())
        assert crl.is_signature_valid(ca.public_key())
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert json.loads(layout.manifest.read_text())["devices"]["device-002"]["revoked"]

        # and so it does after a restart
        for client in clients:
            client.close()
        broker.stop()
        broker = fleet.start_broker()
        with pytest.raises(ConnectError):
            connect("device-001", stolen)
        connect("device-001")
    finally:
        for client in clients:
            client.close()
        broker.stop()


# ----------------------------------------------------------------------------- CLI
def test_cli_provision_and_revoke(tmp_path):
    require_mosquitto_passwd()
    runner = CliRunner()
    out = tmp_path / "fleet"
    result = runner.invoke(
        cli,
        [
            "provision",
            "--fleet",
            "lab",
            "--devices",
            "2",
            "--out",
            str(out),
            "--host",
            "broker.lan",
            "--port",
            "9883",
            "--prefix",
            "pi-",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 devices provisioned" in result.output and "biofed broker --config" in result.output
    fleet = load_fleet(out)
    assert (fleet.fleet, fleet.host, fleet.port, fleet.devices) == ("lab", "broker.lan", 9883, ("pi-001", "pi-002"))
    conf = fleet.layout.broker_config.read_text().splitlines()
    assert "listener 9883" in conf  # a DNS host: listen on every interface
    server = x509.load_pem_x509_certificate(fleet.layout.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.lan" in san.get_values_for_type(x509.DNSName)

    result = runner.invoke(cli, ["provision", "revoke", "--dir", str(out), "pi-001"])
    assert result.exit_code == 0, result.output
    assert "revoked pi-001" in result.output and "kill -HUP" in result.output
    assert load_fleet(out).devices == ("pi-002",)

    result = runner.invoke(cli, ["provision", "revoke", "--dir", str(out), "pi-001"])
    assert result.exit_code != 0 and "already revoked" in result.output
    result = runner.invoke(cli, ["provision", "--fleet", "lab"])
    assert result.exit_code != 0 and "missing --devices, --out" in result.output
    result = runner.invoke(cli, ["provision", "--fleet", "lab", "--devices", "1", "--out", str(out)])
    assert result.exit_code != 0 and "not an empty directory" in result.output


@pytest.mark.slow
def test_biofed_broker_runs_a_provisioned_config(tmp_path):
    """``biofed broker --config`` runs a provisioned fleet's broker until Ctrl-C."""
    require_mosquitto_passwd()
    require_mosquitto()
    own = provision_fleet(tmp_path / "cli-fleet", FLEET, 1, port=free_port())
    # the provisioned biofed TOML, and the Mosquitto config itself as older versions took it
    for config, warning in ((own.layout.broker_service_config, False), (own.layout.broker_config, True)):
        process = subprocess.Popen(
            [sys.executable, "-m", "biofed", "broker", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first_line = process.stdout.readline()
            assert f"listening on 127.0.0.1:{own.port}" in first_line and "kill -HUP" in first_line
            client = MqttClient.from_config(own.broker_config("device-001"), "device-001", protocol="5")
            client.connect()
            client.close()
        finally:
            process.send_signal(signal.SIGTERM)
            output, errors = process.communicate(timeout=15)
        assert "stopping broker" in output and process.returncode == 0
        assert ("pass it as --mosquitto-conf" in errors) is warning


def test_provisioned_coordinator_config_is_private_by_default(tmp_path):
    require_mosquitto_passwd()
    fleet = provision_fleet(tmp_path / "fleet", FLEET, 4, port=free_port())
    config = load_config(fleet.layout.coordinator_config, CoordinatorConfig, environ={})
    assert {key: getattr(config.dp, key) for key in RECOMMENDED_PRIVACY} == RECOMMENDED_PRIVACY
    assert config.dp.epsilon_budget is not None and config.rounds == RECOMMENDED_ROUNDS
    assert config.min_devices == 3  # a majority of the 4 devices
    assert config.status_broker.username == "observer"  # biofed status reads with read-only credentials
    assert config.status_broker.password_file.resolve() == fleet.layout.mqtt_password("observer")
    from biofed.apps.config_cli import check

    assert "budget epsilon 10" in check(fleet.layout.coordinator_config, "coordinator")
