"""Provisioning of a secured biofed fleet: a CA, TLS certificates, MQTT passwords,
per-device ACLs on Mosquitto, Ed25519 signing keys and ready-to-run configs.

``biofed provision --fleet ward7 --devices 20 --out DIR [--host 192.168.1.10] [--port 8883]``
creates everything under ``DIR`` with the ``cryptography`` package (no openssl CLI) and
Mosquitto's own ``mosquitto_passwd``; ``biofed provision revoke --dir DIR DEVICE`` takes a
device out of the fleet. :func:`provision_fleet`, :func:`load_fleet`, :func:`revoke_device`
and :func:`reload_broker` are the same from Python.

Fleet directory
---------------
::

    DIR/fleet.json                         manifest: fleet, broker address, identities, serials, revocations
    DIR/ca/ca.pem                          CA certificate (ECDSA P-256, self-signed)          0644
    DIR/ca/ca.key.pem                      CA private key: needed only to revoke or re-issue  0600
    DIR/broker/mosquitto.conf              TLS listener, password file, ACL, CRL, limits
    DIR/broker/broker.toml                 biofed broker config running that mosquitto.conf
    DIR/broker/{ca,server,crl}.pem         what the broker reads (server cert SAN: the host,
    DIR/broker/server.key.pem              localhost, 127.0.0.1, ::1)                         0600
    DIR/broker/passwd                      mosquitto password file (PBKDF2-SHA512 hashes)     0600
    DIR/broker/acl                         per-identity topic ACL                             0600
    DIR/broker/data/                       persistence database and mosquitto.log
    DIR/keys/{id}.pub.pem                  Ed25519 public keys: every device and coordinator
    DIR/keys/revoked.txt                   revoked device ids (read by biofed.signing.KeyRing)
    DIR/coordinator/coordinator.toml       CoordinatorConfig: [broker] TLS settings, signing_key_file,
                                           keys_dir = "../keys", allowed_devices_file, [dp] with the
                                           recommended privacy settings and budget, [status_broker]
                                           (the observer's credentials, for biofed status)
    DIR/coordinator/allowed_devices.json   {"fleet": ..., "devices": [ids]}, revoked ones removed
    DIR/coordinator/{ca,client}.pem, client.key.pem, mqtt.password, signing.key.pem
    DIR/devices/{id}/device.toml           DeviceConfig (add the recordings): [broker] TLS settings,
                                           signing_key_file, keys_dir = "keys"
    DIR/devices/{id}/keys/                 coordinator.pub.pem and {id}.pub.pem (devices trust the
                                           coordinator's signature only)
    DIR/devices/{id}/{ca,client}.pem, client.key.pem, mqtt.password, signing.key.pem
    DIR/observer/...                       read-only credentials (biofed status, dashboards, the demo);
                                           --no-observer leaves them out

Private keys and passwords are mode 0600 in 0700 directories; each ``devices/{id}``
folder is self-contained (relative paths in ``device.toml``): copy it to the device.
The CA key signs the revocation list; keep ``DIR/ca`` off the broker host in production.
Paths inside ``broker/mosquitto.conf`` are absolute: provision where the broker runs, or
edit them after moving ``broker/``.

Security model
--------------
- Transport: one TLS listener (TLS 1.2 or newer, ECDSA P-256 certificates). Clients
  verify the broker against ``ca.pem`` and its host name; the broker requires a client
  certificate signed by the fleet CA and not on the revocation list
  (``require_certificate true``, ``crlfile``).
- Authentication is the client certificate, bound to the MQTT user: with
  ``use_identity_as_username`` the broker takes the user name from the certificate's
  common name (the identity) and ignores the user name and password the client sends, so
  a device's certificate logs in as that device and nothing else, whatever password it
  presents. ``use_username_as_clientid`` then ties each session to that name, so no
  identity can take over another's session by reusing its client id. One connection per
  identity at a time. Mosquitto does not check the password on such a listener; the
  generated passwords (``mqtt.password``, the ``password_file``) serve brokers that
  authenticate by password, and an empty password file refuses password-only logins.
- Limits (:func:`biofed.apps.broker.fleet_queue_limits`, per client): ``max_queued_messages``
  and ``max_queued_bytes`` sized to the fleet (the arithmetic is in :mod:`biofed.apps.broker`),
  ``max_packet_size`` just above the protocol's message limit, ``max_inflight_messages``,
  and ``max_connections`` on the listener (two per identity, for reconnect overlaps).
- Authorization (``acl_file``, topics of :class:`biofed.protocol.Topics`, derived from
  :data:`biofed.protocol.KINDS` by :func:`topic_kinds`): a device writes only its own
  per-device topics (``update|sketch|status|prediction|secagg/{its id}``) and reads the
  broadcast ones (``model``, ``task``, ``basis``, ``secagg_relay``); only the coordinator
  reads the per-device topics (``+``) and writes the broadcast ones; the optional observer
  reads ``biofed/{fleet}/#`` and writes nothing.
  Mosquitto 2.0 grants every subscription and checks read access for each message it
  would deliver, so a device subscribed to another device's topic (or to ``#``) receives
  nothing it may not read. It drops an unauthorized publish; an MQTT 5 publisher gets
  PUBACK reason "Not authorized" (:meth:`biofed.mqtt.MqttClient.publish` raises
  :class:`~biofed.mqtt.PublishError`), an MQTT 3.1.1 one is not told.
- Message signing (:mod:`biofed.signing`) is independent of the broker: the Ed25519
  keys here let receivers verify the sender of every envelope.

Revocation
----------
``revoke`` deletes the device from the password file (``mosquitto_passwd -D``) and the
ACL, adds its certificate serial to the CRL, drops it from ``allowed_devices.json`` and
appends it to ``keys/revoked.txt``. The device's folder is left for the record. A running
coordinator re-reads ``allowed_devices.json`` when it changes and drops the device's
messages from then on; its key ring reads ``revoked.txt`` at start.
Mosquitto re-reads the password file, ACL and CRL on SIGHUP (``revoke --pid PID``,
:func:`reload_broker`) or at a restart.
At the reload Mosquitto 2.0 applies the new ACL to connected clients, so whatever an open
connection of the revoked device publishes is refused from then on (its certificate is
checked against the CRL at the next TLS handshake), and every reconnect fails in the TLS
handshake (certificate on the CRL) and would fail the ACL too.

Provisioning hashes every password in one ``mosquitto_passwd -U`` call, so even a fleet of
thousands of devices is provisioned quickly; ``docs/measurements.md`` has the timings.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from biofed.apps.broker import LOOPBACK, MosquittoBroker, fleet_queue_limits, mosquitto_common_lines, start_mosquitto
from biofed.cli_options import examples
from biofed.config import (
    RECOMMENDED_PRIVACY,
    RECOMMENDED_ROUNDS,
    BrokerConfig,
    BrokerServiceConfig,
    CoordinatorConfig,
    DeviceConfig,
    load_config,
    toml_document,
)
from biofed.protocol import KINDS, InvalidTopic, Topics, validate_id

logger = logging.getLogger(__name__)

COORDINATOR_ID = "coordinator"
OBSERVER_ID = "observer"
RESERVED_IDS = (COORDINATOR_ID, OBSERVER_ID)
"""Identity names that cannot be device ids."""
DEFAULT_TLS_PORT = 8883
DEFAULT_DEVICE_PREFIX = "device-"
DEFAULT_CERT_DAYS = 825
"""Validity of the server and client certificates (the CA and CRL run for 10 years)."""
CA_DAYS = 3650
MANIFEST_VERSION = 1
_SECRET = 0o600
_PUBLIC = 0o644
_PRIVATE_DIR = 0o700


class ProvisionError(RuntimeError):
    """Provisioning or revocation failed; the message says what to fix."""


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class FleetLayout:
    """Paths of a provisioned fleet directory (see the module docstring)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "fleet.json"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key.pem"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def broker_config(self) -> Path:
        return self.broker_dir / "mosquitto.conf"

    @property
    def broker_service_config(self) -> Path:
        """``broker/broker.toml``: ``biofed broker --config`` runs :attr:`broker_config` with it."""
        return self.broker_dir / "broker.toml"

    @property
    def password_file(self) -> Path:
        return self.broker_dir / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def crl_file(self) -> Path:
        return self.broker_dir / "crl.pem"

    @property
    def server_cert(self) -> Path:
        return self.broker_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.broker_dir / "server.key.pem"

    @property
    def broker_data(self) -> Path:
        return self.broker_dir / "data"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def revoked_keys(self) -> Path:
        return self.keys_dir / "revoked.txt"

    @property
    def coordinator_config(self) -> Path:
        return self.identity_dir(COORDINATOR_ID) / "coordinator.toml"

    @property
    def allowed_devices(self) -> Path:
        return self.identity_dir(COORDINATOR_ID) / "allowed_devices.json"

    def identity_dir(self, identity: str) -> Path:
        """``coordinator/``, ``observer/`` or ``devices/{id}/``."""
        if identity in RESERVED_IDS:
            return self.root / identity
        return self.root / "devices" / identity

    def device_config(self, device_id: str) -> Path:
        return self.identity_dir(device_id) / "device.toml"

    def signing_key(self, identity: str) -> Path:
        """Private Ed25519 key of a device or the coordinator (PKCS#8 PEM, 0600)."""
        return self.identity_dir(identity) / "signing.key.pem"

    def public_key(self, identity: str) -> Path:
        """``keys/{identity}.pub.pem``."""
        return self.keys_dir / f"{identity}.pub.pem"

    def identity_keys_dir(self, identity: str) -> Path:
        """The ``keys_dir`` an identity verifies with: the fleet's ``keys/`` for the
        coordinator; a device's own ``devices/{id}/keys/`` holding ``coordinator.pub.pem``
        and its own public key (devices accept messages from the coordinator only)."""
        if identity == COORDINATOR_ID:
            return self.keys_dir
        return self.identity_dir(identity) / "keys"

    def client_cert(self, identity: str) -> Path:
        return self.identity_dir(identity) / "client.pem"

    def client_key(self, identity: str) -> Path:
        return self.identity_dir(identity) / "client.key.pem"

    def client_ca(self, identity: str) -> Path:
        return self.identity_dir(identity) / "ca.pem"

    def mqtt_password(self, identity: str) -> Path:
        return self.identity_dir(identity) / "mqtt.password"


@dataclass(frozen=True)
class ProvisionedFleet:
    """A provisioned fleet as recorded in ``fleet.json`` (:func:`load_fleet`)."""

    layout: FleetLayout
    fleet: str
    host: str
    port: int
    devices: tuple[str, ...]
    """Active (not revoked) device ids."""
    revoked: tuple[str, ...]
    observer: bool

    @property
    def identities(self) -> tuple[str, ...]:
        """Every identity that can log in: coordinator, active devices, observer if any."""
        return (COORDINATOR_ID, *self.devices, *((OBSERVER_ID,) if self.observer else ()))

    def broker_settings(self, identity: str) -> dict[str, object]:
        """The ``[broker]`` table of ``identity`` (a device id, ``"coordinator"`` or
        ``"observer"``) with absolute paths: merge it into a config you write yourself,
        or pass it to :class:`biofed.config.BrokerConfig`."""
        if identity not in self.identities:
            raise ProvisionError(
                f"{identity!r} is not an active identity of fleet {self.fleet!r} in {self.layout.root} "
                f"(revoked: {list(self.revoked)}; the observer exists only with --observer)"
            )
        return _broker_table(self, identity, relative_to=None)

    def signing_settings(self, identity: str) -> dict[str, object]:
        """``signing_key_file`` and ``keys_dir`` (absolute) of a device or the coordinator:
        the top-level keys of its config that turn on signed envelopes (:mod:`biofed.signing`)."""
        if identity not in self.identities or identity == OBSERVER_ID:
            raise ProvisionError(
                f"{identity!r} has no signing key in fleet {self.fleet!r} (devices and coordinator do)"
            )
        return _signing_table(self, identity, relative_to=None)

    def broker_config(self, identity: str) -> BrokerConfig:
        """:class:`biofed.config.BrokerConfig` of ``identity`` (see :meth:`broker_settings`)."""
        return BrokerConfig(**self.broker_settings(identity))

    def start_broker(self, *, timeout_s: float = 10.0) -> MosquittoBroker:
        """Run Mosquitto with ``broker/mosquitto.conf`` (stop it with ``.stop()``)."""
        return start_mosquitto(config_file=self.layout.broker_config, timeout_s=timeout_s)


def _broker_table(fleet: ProvisionedFleet, identity: str, *, relative_to: Path | None) -> dict[str, object]:
    layout = fleet.layout

    def path(p: Path) -> str:
        return str(p.relative_to(relative_to)) if relative_to is not None else str(p)

    return {
        "host": fleet.host,
        "port": fleet.port,
        "protocol": "5",
        "tls": True,
        "ca_file": path(layout.client_ca(identity)),
        "cert_file": path(layout.client_cert(identity)),
        "key_file": path(layout.client_key(identity)),
        "username": identity,
        "password_file": path(layout.mqtt_password(identity)),
    }


def _signing_table(fleet: ProvisionedFleet, identity: str, *, relative_to: Path | None) -> dict[str, object]:
    layout = fleet.layout
    paths = {"signing_key_file": layout.signing_key(identity), "keys_dir": layout.identity_keys_dir(identity)}
    if relative_to is None:
        return {key: str(path) for key, path in paths.items()}
    return {key: os.path.relpath(path, relative_to) for key, path in paths.items()}


# ----------------------------------------------------------------------------- files
def _write(path: Path, data: bytes | str, mode: int) -> None:
    """Write atomically (temp file + rename) with exactly ``mode`` from the first byte."""
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _mkdir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)


def _key_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ----------------------------------------------------------------------------- X.509
def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _make_ca(fleet: str, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "biofed"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"biofed fleet {fleet} CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    days: int,
    now: datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate: server (``server_names`` become the SAN) or client (none)."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "biofed"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san_entries(server_names)), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # ordered, no duplicates
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _write_crl(layout: FleetLayout, revoked: dict[int, datetime], number: int) -> None:
    """Sign and write the CRL of the fleet CA listing ``revoked`` (serial -> time)."""
    try:
        ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise ProvisionError(
            f"cannot load the fleet CA from {layout.ca_cert.parent} to sign the revocation list: "
            f"{exc} (revocation needs ca/ca.pem and ca/ca.key.pem)"
        ) from None
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - timedelta(minutes=5))
        # OpenSSL refuses every client once the CRL is past next_update: run it to the CA's end.
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(layout.crl_file, crl.public_bytes(serialization.Encoding.PEM), _PUBLIC)


# ----------------------------------------------------------------------------- mosquitto files
_PASSWD_FALLBACKS = (Path("/usr/bin/mosquitto_passwd"), Path("/usr/local/bin/mosquitto_passwd"))


def mosquitto_passwd_binary() -> str:
    """Path of ``mosquitto_passwd``; :class:`ProvisionError` if it is not installed."""
    found = shutil.which("mosquitto_passwd") or next((str(p) for p in _PASSWD_FALLBACKS if p.is_file()), None)
    if found is None:
        raise ProvisionError(
            "mosquitto_passwd was not found on PATH or in /usr/bin; it hashes the fleet's MQTT passwords. "
            "Install Mosquitto (Debian/Ubuntu/Raspberry Pi OS: sudo apt-get install mosquitto)"
        )
    return found


def _run_passwd(*args: str) -> None:
    command = [mosquitto_passwd_binary(), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise ProvisionError(f"{' '.join(command[:2])} ... failed with code {result.returncode}: {detail}")


def _write_password_file(layout: FleetLayout, passwords: dict[str, str]) -> None:
    """Plain ``user:password`` lines (0600), hashed in place by one ``mosquitto_passwd -U``."""
    _write(layout.password_file, "".join(f"{user}:{password}\n" for user, password in passwords.items()), _SECRET)
    try:
        _run_passwd("-U", str(layout.password_file))
    except BaseException:
        layout.password_file.unlink(missing_ok=True)  # never leave plain passwords behind
        raise
    layout.password_file.chmod(_SECRET)


def topic_kinds() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(broadcast kinds, per-device kinds)`` of :data:`biofed.protocol.KINDS`: the ACL
    follows the protocol (e.g. ``secagg_relay`` and ``secagg/{id}``) without a copy of it."""
    topics = Topics("x")
    broadcast, per_device = [], []
    for kind in KINDS:
        try:
            topics.all_devices(kind)
            per_device.append(kind)
        except InvalidTopic:
            broadcast.append(kind)
    return tuple(broadcast), tuple(per_device)


def acl_text(fleet: str, devices: Sequence[str], *, observer: bool = False) -> str:
    """The Mosquitto ACL of a fleet (see "Security model" in the module docstring)."""
    topics = Topics(fleet)
    broadcast, per_device = topic_kinds()
    lines = [f"# biofed fleet {fleet}: written by biofed provision; revoke rewrites it", "", f"user {COORDINATOR_ID}"]
    lines += [f"topic readwrite {topics.base}/{kind}" for kind in broadcast]
    lines += [f"topic read {topics.all_devices(kind)}" for kind in per_device]
    if observer:
        lines += ["", f"user {OBSERVER_ID}", f"topic read {topics.base}/#"]
    for device in devices:
        lines += ["", f"user {device}"]
        lines += [f"topic read {topics.base}/{kind}" for kind in broadcast]
        lines += [f"topic write {topics.base}/{kind}/{validate_id(device)}" for kind in per_device]
    return "\n".join(lines) + "\n"


def mosquitto_config_text(layout: FleetLayout, port: int, bind: str, n_identities: int) -> str:
    """``broker/mosquitto.conf`` of a provisioned fleet of ``n_identities`` logins
    (coordinator, devices, observer; absolute paths)."""
    broker = FleetLayout(layout.root.resolve())
    max_queued_messages, max_queued_bytes = fleet_queue_limits(n_identities)
    lines = [
        f"# written by biofed provision for {broker.root}; run: biofed broker --config {broker.broker_service_config}",
        "# SIGHUP re-reads the password file, the ACL and the CRL (biofed provision revoke --pid).",
        *mosquitto_common_lines(
            broker.broker_data, max_queued_messages=max_queued_messages, max_queued_bytes=max_queued_bytes
        ),
        "allow_anonymous false",
        f"password_file {broker.password_file}",
        f"acl_file {broker.acl_file}",
        # Listener options below this line (above it they would open a default listener on 1883).
        f"listener {port} {bind}".rstrip(),
        "protocol mqtt",
        f"max_connections {2 * n_identities}",
        # Sessions are keyed by user name: an identity cannot take over another's session.
        "use_username_as_clientid true",
        f"cafile {broker.broker_dir / 'ca.pem'}",
        f"certfile {broker.server_cert}",
        f"keyfile {broker.server_key}",
        f"crlfile {broker.crl_file}",
        "require_certificate true",
        # The certificate's common name is the user name: a certificate logs in only as its own identity.
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- manifest
def _read_manifest(layout: FleetLayout) -> dict:
    try:
        data = json.loads(layout.manifest.read_text())
    except FileNotFoundError:
        raise ProvisionError(
            f"{layout.root} is not a provisioned fleet directory: no fleet.json "
            f"(create one with biofed provision --fleet NAME --devices N --out DIR)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"{layout.manifest}: cannot read the fleet manifest: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise ProvisionError(f"{layout.manifest}: not a version {MANIFEST_VERSION} biofed fleet manifest")
    return data


def _fleet_from_manifest(layout: FleetLayout, data: dict) -> ProvisionedFleet:
    devices = data["devices"]
    return ProvisionedFleet(
        layout=layout,
        fleet=data["fleet"],
        host=data["host"],
        port=int(data["port"]),
        devices=tuple(d for d, entry in devices.items() if entry.get("revoked") is None),
        revoked=tuple(d for d, entry in devices.items() if entry.get("revoked") is not None),
        observer=OBSERVER_ID in data["identities"],
    )


def load_fleet(directory: str | Path) -> ProvisionedFleet:
    """The fleet provisioned in ``directory`` (from its ``fleet.json``)."""
    layout = FleetLayout(Path(directory).resolve())
    return _fleet_from_manifest(layout, _read_manifest(layout))


# ----------------------------------------------------------------------------- provision
def _device_ids(devices: int | Sequence[str], prefix: str) -> list[str]:
    if isinstance(devices, int):
        if devices < 1:
            raise ProvisionError(f"the number of devices must be >= 1, got {devices}")
        width = max(3, len(str(devices)))
        ids = [f"{prefix}{i:0{width}d}" for i in range(1, devices + 1)]
    else:
        ids = list(devices)
        if not ids:
            raise ProvisionError("no device ids given")
    for device in ids:
        try:
            validate_id(device)
        except InvalidTopic as exc:
            raise ProvisionError(f"{exc} (check the device prefix)") from None
        if device in RESERVED_IDS:
            raise ProvisionError(f"{device!r} is reserved for the {device} identity; pick other device ids")
    if len(set(ids)) != len(ids):
        duplicates = sorted({d for d in ids if ids.count(d) > 1})
        raise ProvisionError(f"duplicate device ids: {duplicates}")
    return ids


def provision_fleet(
    out: str | Path,
    fleet: str,
    devices: int | Sequence[str],
    *,
    host: str = LOOPBACK,
    port: int = DEFAULT_TLS_PORT,
    bind: str | None = None,
    server_names: Sequence[str] = (),
    observer: bool = True,
    device_prefix: str = DEFAULT_DEVICE_PREFIX,
    cert_days: int = DEFAULT_CERT_DAYS,
    rounds: int = RECOMMENDED_ROUNDS,
) -> ProvisionedFleet:
    """Create a secured fleet in the new (or empty) directory ``out``.

    Parameters
    ----------
    out : path
        Fleet directory; must not exist or be empty (nothing is ever overwritten).
    fleet : str
        Fleet id (topics ``biofed/{fleet}/...``).
    devices : int or sequence of str
        Number of devices (ids ``{device_prefix}001`` ...) or the device ids themselves.
    host : str
        Address devices and coordinator connect to; written into their configs and into
        the server certificate (IP or DNS name).
    port : int
        TLS port of the broker.
    bind : str, optional
        Address the broker listens on; default ``host`` when it is an IP address, else
        every interface.
    server_names : sequence of str
        More names or addresses for the server certificate (localhost, 127.0.0.1 and ::1
        are always in it).
    observer : bool
        Also create read-only ``observer`` credentials (``biofed status``, monitoring, the
        demo); the coordinator config's ``[status_broker]`` uses them.
    device_prefix : str
        Prefix of generated device ids.
    cert_days : int
        Validity of the server and client certificates.
    rounds : int
        ``rounds`` written into ``coordinator.toml`` (edit it afterwards); the ``[dp]`` there
        holds :data:`biofed.config.RECOMMENDED_PRIVACY`, sized for the default rounds.

    Returns
    -------
    ProvisionedFleet

    Raises
    ------
    ProvisionError
        Bad ids or port, ``out`` not empty, or ``mosquitto_passwd`` missing or failing.
    """
    started = time.perf_counter()
    try:
        Topics(fleet)
    except InvalidTopic as exc:
        raise ProvisionError(str(exc)) from None
    ids = _device_ids(devices, device_prefix)
    if not 1 <= port <= 65535:
        raise ProvisionError(f"port must be in 1..65535, got {port}")
    if cert_days < 1:
        raise ProvisionError(f"cert_days must be >= 1, got {cert_days}")
    mosquitto_passwd_binary()  # fail before writing anything
    if bind is None:
        try:
            ipaddress.ip_address(host)
            bind = host
        except ValueError:
            bind = ""
    root = Path(out).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ProvisionError(
            f"{root} exists and is not an empty directory; provision into a new directory "
            f"(nothing is overwritten: old credentials would stay valid)"
        )
    layout = FleetLayout(root)
    created = not root.exists()
    try:
        provisioned = _provision_into(
            layout,
            fleet,
            ids,
            host=host,
            port=port,
            bind=bind,
            server_names=server_names,
            observer=observer,
            cert_days=cert_days,
            rounds=rounds,
        )
    except BaseException:
        # never leave a half-made fleet (a retry would find the directory in use)
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    logger.info(
        "provisioned fleet %s (%d devices) in %s in %.2f s", fleet, len(ids), root, time.perf_counter() - started
    )
    return provisioned


def _provision_into(
    layout: FleetLayout,
    fleet: str,
    ids: list[str],
    *,
    host: str,
    port: int,
    bind: str,
    server_names: Sequence[str],
    observer: bool,
    cert_days: int,
    rounds: int,
) -> ProvisionedFleet:
    root = layout.root
    identities = [COORDINATOR_ID, *ids, *((OBSERVER_ID,) if observer else ())]

    _mkdir(root, 0o755)
    _mkdir(root / "devices", 0o755)
    _mkdir(layout.keys_dir, 0o755)
    for directory in (
        layout.ca_cert.parent,
        layout.broker_dir,
        layout.broker_data,
        *(layout.identity_dir(i) for i in identities),
    ):
        _mkdir(directory, _PRIVATE_DIR)

    now = _now()
    ca_key, ca_cert = _make_ca(fleet, now)
    ca_pem = _cert_pem(ca_cert)
    _write(layout.ca_cert, ca_pem, _PUBLIC)
    _write(layout.ca_key, _key_pem(ca_key), _SECRET)
    _write(layout.broker_dir / "ca.pem", ca_pem, _PUBLIC)
    names = [host, *server_names, "localhost", LOOPBACK, "::1"]
    server_key, server_cert = _issue(ca_key, ca_cert, host, server_names=names, days=cert_days, now=now)
    _write(layout.server_cert, _cert_pem(server_cert), _PUBLIC)
    _write(layout.server_key, _key_pem(server_key), _SECRET)

    passwords: dict[str, str] = {}
    manifest_ids: dict[str, dict] = {}
    for identity in identities:
        key, cert = _issue(ca_key, ca_cert, identity, days=cert_days, now=now)
        _write(layout.client_cert(identity), _cert_pem(cert), _PUBLIC)
        _write(layout.client_key(identity), _key_pem(key), _SECRET)
        _write(layout.client_ca(identity), ca_pem, _PUBLIC)
        passwords[identity] = secrets.token_urlsafe(24)
        _write(layout.mqtt_password(identity), passwords[identity] + "\n", _SECRET)
        if identity != OBSERVER_ID:
            signing = Ed25519PrivateKey.generate()
            _write(layout.signing_key(identity), _key_pem(signing), _SECRET)
            _write(layout.public_key(identity), _public_pem(signing), _PUBLIC)
        manifest_ids[identity] = {"serial": format(cert.serial_number, "x")}
    coordinator_key = layout.public_key(COORDINATOR_ID).read_bytes()
    for device in ids:
        own_keys = layout.identity_keys_dir(device)
        _mkdir(own_keys, 0o755)
        _write(own_keys / layout.public_key(COORDINATOR_ID).name, coordinator_key, _PUBLIC)
        shutil.copyfile(layout.public_key(device), own_keys / layout.public_key(device).name)
        (own_keys / layout.public_key(device).name).chmod(_PUBLIC)
    _write_password_file(layout, passwords)
    _write(layout.acl_file, acl_text(fleet, ids, observer=observer), _SECRET)
    _write_crl(layout, {}, number=1)
    _write(layout.broker_config, mosquitto_config_text(layout, port, bind, len(identities)), _PUBLIC)

    manifest = {
        "version": MANIFEST_VERSION,
        "fleet": fleet,
        "host": host,
        "port": port,
        "bind": bind,
        "created": now.isoformat(),
        "crl_number": 1,
        "identities": {i: manifest_ids[i] for i in identities if i not in ids},
        "devices": {d: {**manifest_ids[d], "revoked": None} for d in ids},
    }
    _write(layout.manifest, json.dumps(manifest, indent=1) + "\n", _PUBLIC)
    provisioned = _fleet_from_manifest(layout, manifest)
    _write_allow_list(provisioned)
    _write_configs(provisioned, rounds)
    return provisioned


def _write_allow_list(fleet: ProvisionedFleet) -> None:
    _write(
        fleet.layout.allowed_devices,
        json.dumps({"fleet": fleet.fleet, "devices": list(fleet.devices)}, indent=1) + "\n",
        _PUBLIC,
    )


def _write_configs(fleet: ProvisionedFleet, rounds: int) -> None:
    """``device.toml`` per device and ``coordinator.toml``, each checked by loading it."""
    layout = fleet.layout
    for device in fleet.devices:
        folder = layout.identity_dir(device)
        text = toml_document(
            {
                "device_id": device,
                "fleet": fleet.fleet,
                "recordings": [],
                "store_path": "features.sqlite",
                **_signing_table(fleet, device, relative_to=folder),
            },
            {"broker": _broker_table(fleet, device, relative_to=folder)},
            header=f"biofed device {device} of fleet {fleet.fleet} (written by biofed provision).\n"
            'Add the device\'s recordings, e.g. recordings = ["data/s01_1.edf"]; paths are relative to this file.',
        )
        _write(folder / "device.toml", text, _PUBLIC)
        load_config(folder / "device.toml", DeviceConfig)
    folder = layout.identity_dir(COORDINATOR_ID)
    tables = {"broker": _broker_table(fleet, COORDINATOR_ID, relative_to=folder), "dp": RECOMMENDED_PRIVACY}
    if fleet.observer:  # read-only: biofed status never takes over the coordinator's session
        observer = _broker_table(fleet, OBSERVER_ID, relative_to=None)
        for key in ("ca_file", "cert_file", "key_file", "password_file"):  # ../observer/...: relative, like the rest
            observer[key] = os.path.relpath(observer[key], folder)
        tables["status_broker"] = observer
    text = toml_document(
        {
            "fleet": fleet.fleet,
            "rounds": rounds,
            "min_devices": len(fleet.devices) // 2 + 1,
            "state_dir": "state",
            "allowed_devices_file": layout.allowed_devices.name,
            **_signing_table(fleet, COORDINATOR_ID, relative_to=folder),
        },
        tables,
        header=f"biofed coordinator of fleet {fleet.fleet} (written by biofed provision).\n"
        "`biofed config init coordinator` lists every other setting; "
        "`biofed status --config THIS_FILE` shows the fleet.\n"
        "[dp] is client-level DP: the settings biofed demo runs with, and a budget.",
    )
    _write(layout.coordinator_config, text, _PUBLIC)
    load_config(layout.coordinator_config, CoordinatorConfig, environ={})
    _write(
        layout.broker_service_config,
        toml_document(
            {"mosquitto": True, "mosquitto_conf": layout.broker_config.name},
            header=f"biofed broker of fleet {fleet.fleet} (written by biofed provision): "
            "biofed broker --config THIS_FILE",
        ),
        _PUBLIC,
    )
    load_config(layout.broker_service_config, BrokerServiceConfig, environ={})


# ----------------------------------------------------------------------------- revoke
def reload_broker(pid: int) -> None:
    """Send SIGHUP to Mosquitto ``pid``: it re-reads the password file, ACL and CRL."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ProvisionError(
            f"no process {pid}: is mosquitto running? (restarting it also applies the change)"
        ) from None
    except PermissionError:
        raise ProvisionError(f"not allowed to signal process {pid}; run as the broker's user or root") from None


def revoke_device(directory: str | Path, device_id: str, *, broker_pid: int | None = None) -> ProvisionedFleet:
    """Take ``device_id`` out of the fleet in ``directory`` (see "Revocation" in the module
    docstring); with ``broker_pid`` send that Mosquitto a SIGHUP afterwards.

    Raises
    ------
    ProvisionError
        Not a fleet directory, unknown or already revoked device, CA key missing,
        ``mosquitto_passwd`` failing, or the pid cannot be signalled.
    """
    layout = FleetLayout(Path(directory).resolve())
    manifest = _read_manifest(layout)
    entry = manifest["devices"].get(device_id)
    if entry is None:
        raise ProvisionError(
            f"{device_id!r} is not a device of fleet {manifest['fleet']!r} in {layout.root} "
            f"(devices: {', '.join(list(manifest['devices'])[:10])} ...)"
        )
    if entry["revoked"] is not None:
        raise ProvisionError(f"{device_id!r} was already revoked at {entry['revoked']}")
    mosquitto_passwd_binary()
    when = _now()
    entry["revoked"] = when.isoformat()
    revoked = {
        int(e["serial"], 16): datetime.fromisoformat(e["revoked"])
        for e in manifest["devices"].values()
        if e["revoked"] is not None
    }
    manifest["crl_number"] = int(manifest.get("crl_number", 1)) + 1
    _write_crl(layout, revoked, manifest["crl_number"])
    # A retry after a failed revocation may find the user gone already (-D would fail).
    if any(line.startswith(f"{device_id}:") for line in layout.password_file.read_text().splitlines()):
        _run_passwd("-D", str(layout.password_file), device_id)
        layout.password_file.chmod(_SECRET)
    fleet = _fleet_from_manifest(layout, manifest)
    _write(layout.acl_file, acl_text(fleet.fleet, fleet.devices, observer=fleet.observer), _SECRET)
    _write_allow_list(fleet)
    listed = layout.revoked_keys.read_text().splitlines() if layout.revoked_keys.is_file() else []
    if device_id not in listed:
        _write(layout.revoked_keys, "\n".join([*listed, device_id]) + "\n", _PUBLIC)
    _write(layout.manifest, json.dumps(manifest, indent=1) + "\n", _PUBLIC)
    logger.info("revoked %s of fleet %s (certificate serial %s)", device_id, fleet.fleet, entry["serial"])
    if broker_pid is not None:
        reload_broker(broker_pid)
    return fleet


# ----------------------------------------------------------------------------- CLI
@click.group(
    "provision",
    invoke_without_command=True,
    epilog=examples(
        "biofed provision --fleet ward7 --devices 20 --host 10.0.0.5 --out fleet",
        "biofed provision --fleet lab --devices 3 --out lab-fleet --no-observer",
        "biofed provision revoke device-007 --fleet-dir fleet",
    ),
)
@click.option("--fleet", default=None, help="Fleet id (topics biofed/FLEET/...).")
@click.option("--devices", "n_devices", type=click.IntRange(1), default=None, help="Number of devices.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Fleet folder to create (new or empty).",
)
@click.option(
    "--host",
    default=LOOPBACK,
    show_default=True,
    help="Broker address the devices and coordinator use (IP or DNS name; goes into the server certificate).",
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=DEFAULT_TLS_PORT, show_default=True, help="TLS port of the broker."
)
@click.option("--bind", default=None, help="Address the broker listens on [default: --host if it is an IP, else all].")
@click.option(
    "--server-name", "server_names", multiple=True, help="Extra DNS name or IP for the server certificate (repeatable)."
)
@click.option(
    "--prefix",
    "device_prefix",
    default=DEFAULT_DEVICE_PREFIX,
    show_default=True,
    help="Device id prefix (ids PREFIX001, PREFIX002, ...).",
)
@click.option(
    "--observer/--no-observer",
    default=True,
    show_default=True,
    help="Create read-only observer credentials (biofed status, dashboards).",
)
@click.option(
    "--days",
    "cert_days",
    type=click.IntRange(1),
    default=DEFAULT_CERT_DAYS,
    show_default=True,
    help="Validity of the server and client certificates.",
)
@click.pass_context
def provision_command(
    ctx: click.Context,
    fleet: str | None,
    n_devices: int | None,
    out: Path | None,
    host: str,
    port: int,
    bind: str | None,
    server_names: tuple[str, ...],
    device_prefix: str,
    observer: bool,
    cert_days: int,
) -> None:
    """Create a secured fleet: CA, TLS certificates, MQTT passwords and ACL for Mosquitto,
    signing keys and a ready config per device and for the coordinator.

    Then run the broker with: biofed broker --config OUT/broker/broker.toml
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--fleet", fleet), ("--devices", n_devices), ("--out", out)) if value is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or use a sub-command: revoke)")
    started = time.perf_counter()
    try:
        provisioned = provision_fleet(
            out,
            fleet,
            n_devices,
            host=host,
            port=port,
            bind=bind,
            server_names=server_names,
            observer=observer,
            device_prefix=device_prefix,
            cert_days=cert_days,
        )
    except ProvisionError as exc:
        raise click.ClickException(str(exc)) from None
    layout = provisioned.layout
    click.echo(
        f"fleet {provisioned.fleet}: {len(provisioned.devices)} devices provisioned in {layout.root} "
        f"({time.perf_counter() - started:.2f} s)"
    )
    click.echo(f"  broker:      biofed broker --config {layout.broker_service_config}   (TLS on {host}:{port})")
    click.echo(f"  coordinator: biofed coordinator --config {layout.coordinator_config} --metrics-port 9100")
    click.echo(f"  status:      biofed status --config {layout.coordinator_config}")
    click.echo(
        f"  device:      biofed edge --config {layout.device_config(provisioned.devices[0])}   "
        f"(add its recordings first; copy devices/<id>/ to the device)"
    )
    click.echo(f"  revoke:      biofed provision revoke --fleet-dir {layout.root} DEVICE [--pid BROKER_PID]")


@provision_command.command(
    "revoke",
    epilog=examples(
        "biofed provision revoke device-007 --fleet-dir fleet",
        'biofed provision revoke device-007 --fleet-dir fleet --pid "$(pgrep mosquitto)"',
    ),
)
@click.option(
    "--fleet-dir",
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Fleet directory made by biofed provision (--dir is the older spelling).",
)
@click.option(
    "--pid",
    "broker_pid",
    type=int,
    default=None,
    help="Mosquitto's pid: send it SIGHUP so the revocation applies now (else at its next restart).",
)
@click.argument("device")
def revoke_command(directory: Path, broker_pid: int | None, device: str) -> None:
    """Revoke DEVICE: password, ACL, certificate (CRL), allow list and signing key."""
    try:
        fleet = revoke_device(directory, device, broker_pid=broker_pid)
    except ProvisionError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {device} of fleet {fleet.fleet}; {len(fleet.devices)} devices remain")
    if broker_pid is None:
        click.echo("  apply it now: kill -HUP <mosquitto pid>  (or restart the broker)")
    else:
        click.echo(f"  sent SIGHUP to mosquitto (pid {broker_pid})")


__all__ = [
    "COORDINATOR_ID",
    "DEFAULT_TLS_PORT",
    "OBSERVER_ID",
    "RESERVED_IDS",
    "FleetLayout",
    "ProvisionError",
    "ProvisionedFleet",
    "acl_text",
    "load_fleet",
    "mosquitto_config_text",
    "mosquitto_passwd_binary",
    "provision_command",
    "provision_fleet",
    "reload_broker",
    "revoke_device",
]
