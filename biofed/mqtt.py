"""A small, robust paho-mqtt 2.x wrapper shared by the coordinator and the device agent.

What it adds to paho
--------------------
- Protocol choice: ``"5"``, ``"3.1.1"`` or ``"auto"``. Auto tries MQTT v5 with a short
  CONNACK timeout, then 3.1.1 (amqtt 0.12 speaks only 3.1.1 and a paho v5 client never
  completes the handshake with it).
- A persistent session: stable ``client_id`` with ``clean_start=False`` (v5, plus a
  session expiry interval) or ``clean_session=False`` (3.1.1), so QoS 1 messages queued
  by the broker while a device is offline are delivered when it comes back.
- Reconnect with capped exponential backoff: paho's ``reconnect_delay_set`` doubles the
  delay up to the cap; the delays are scaled by a random factor in [1, 2) per client so a
  fleet that lost its broker does not reconnect in lockstep.
- Subscriptions are remembered and renewed in ``on_connect`` after every reconnect.
- ``publish`` waits for the PUBACK (QoS 1) and raises :class:`PublishError` on timeout
  or, on MQTT 5, when the PUBACK carries a failure reason (e.g. "Not authorized" by the
  broker's ACL).
  A message published while the connection is down stays in paho's queue and goes out
  after the reconnect; the wait covers that too.
- Incoming messages land in a bounded :class:`biofed.inbox.Inbox` read with
  :meth:`MqttClient.receive`. The network thread never blocks on it: it always returns
  at once, so PUBACKs, pings and the acknowledgements of our own publishes keep flowing
  while the application is busy. Overload is shed by policy (a per-sender rate limit,
  then the oldest messages of the sender with the longest backlog), counted in
  :attr:`MqttClient.shed` and logged. Consumers must be idempotent
  (:class:`biofed.protocol.SeenMessageIds`): QoS 1 may deliver twice.

- TLS (:class:`TlsSettings`): TLS 1.2 or newer, the broker's certificate verified against
  a CA file *and* its host name (the certificate's subject alternative names must hold the
  address the client connects to), optionally a client certificate for mutual TLS.
  :meth:`MqttClient.from_config` builds a client from a :class:`biofed.config.BrokerConfig`
  (TLS files, user name, password or password file).

Paho warns that in-flight QoS > 0 messages die with the process; uploads therefore carry
their round and message id and are safe to repeat.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from biofed.inbox import Inbox

if TYPE_CHECKING:
    from biofed.config import BrokerConfig
    from biofed.mqtt_loop import NetworkLoop

logger = logging.getLogger(__name__)


class _NotConnectedIsExpected(logging.Filter):
    """paho logs "Client is not connected" at ERROR whenever its network thread wakes on a
    closed socket: during every reconnect while the broker is away, and after a deliberate
    close. Both are expected (the connection-lost warning already said so): debug, not error."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "Client is not connected" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_paho_logger = logging.getLogger(__name__ + ".paho")
"""paho's own log records (a child of this module's logger, with the filter above)."""
_paho_logger.addFilter(_NotConnectedIsExpected())

ProtocolChoice = Literal["auto", "5", "3.1.1"]
PROTOCOLS: tuple[str, ...] = ("auto", "5", "3.1.1")
_PAHO_VERSION = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


class MqttError(RuntimeError):
    """Base class of MQTT wrapper errors."""


class ConnectError(MqttError):
    """The broker could not be reached or refused the connection."""


class PublishError(MqttError):
    """A publish was refused or not acknowledged in time."""


@dataclass(frozen=True)
class Will:
    """MQTT last will: published by the broker when the client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class TlsSettings:
    """TLS of a broker connection.

    Parameters
    ----------
    ca_file : path
        PEM CA certificate(s) the broker's certificate must chain to.
    cert_file, key_file : path, optional
        PEM client certificate and its private key (mutual TLS); both or neither.
    check_hostname : bool
        Require the broker certificate's subject alternative names to match the host
        connected to (default True; turn off only for a broker reached through an address
        its certificate does not name).
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        """A client SSL context: TLS >= 1.2, CA verification, the client certificate loaded.

        Raises
        ------
        ConnectError
            A file is missing or not a valid PEM certificate/key (the message names it).
        """
        if (self.cert_file is None) != (self.key_file is None):
            raise ConnectError("TLS cert_file and key_file go together: give both (mutual TLS) or neither")
        for what, path in (("ca_file", self.ca_file), ("cert_file", self.cert_file), ("key_file", self.key_file)):
            if path is not None and not Path(path).is_file():
                raise ConnectError(f"TLS {what} {path} not found (biofed provision writes it into the device's folder)")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = self.check_hostname
        try:
            context.load_verify_locations(cafile=str(self.ca_file))
        except (ssl.SSLError, ValueError) as exc:
            raise ConnectError(f"TLS ca_file {self.ca_file} is not a PEM CA certificate: {exc}") from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
            except (ssl.SSLError, ValueError) as exc:
                raise ConnectError(
                    f"TLS client certificate {self.cert_file} / key {self.key_file} cannot be loaded "
                    f"(not PEM, encrypted, or the key does not match the certificate): {exc}"
                ) from None
        return context


@dataclass(frozen=True)
class InboundMessage:
    """One received MQTT message."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def _is_published(info: paho.MQTTMessageInfo) -> bool:
    """Whether the PUBACK arrived. paho's ``is_published()`` raises RuntimeError for a message
    published while disconnected (rc MQTT_ERR_NO_CONN) even after the reconnect sent it, so
    read its flag."""
    with info._condition:
        return info._published


class MqttClient:
    """One MQTT connection with a persistent session, a bounded inbox and QoS 1 publishing.

    Parameters
    ----------
    host, port : str, int
        Broker address.
    client_id : str
        Stable client id (the device id); the broker keeps the session under it.
    protocol : {"auto", "5", "3.1.1"}
        MQTT version; see the module docstring for ``"auto"``.
    keepalive : int
        Seconds between pings; the broker declares the client dead (and publishes the
        will) after 1.5 keepalive periods of silence.
    will : Will, optional
        Last will, e.g. a retained "offline" status.
    clean : bool
        Start a fresh session (drops messages queued for this client id). Default False.
    session_expiry_s : int
        v5 only: how long the broker keeps the session of a disconnected client.
    connect_timeout_s : float
        How long :meth:`connect` waits for the CONNACK.
    v5_probe_timeout_s : float
        With ``protocol="auto"``: how long to wait for a v5 CONNACK before trying 3.1.1.
    inbox_size : int
        Capacity of the inbox of received messages (see the module docstring).
    inbox_rate_per_s, inbox_burst : float
        Per-sender rate limit of the inbox (:class:`biofed.inbox.Inbox`); None (the default
        here): no limit. :meth:`from_config` applies the broker config's limit (50 messages
        per second with bursts of 500 by default), which the coordinator and agents use.
    reconnect_min_delay_s, reconnect_max_delay_s : float
        Reconnect backoff bounds (before the per-client jitter factor in [1, 2)).
    max_inflight : int
        QoS 1 messages sent but not yet acknowledged at any time.
    random_state : int, numpy.random.Generator or None
        Source of the reconnect jitter.
    username, password : str, optional
        Credentials; the user name defaults to ``client_id`` (the embedded amqtt broker
        keeps offline messages only for sessions with a user name).
    tls : TlsSettings, optional
        Connect over TLS (see :class:`TlsSettings`); None: plain TCP.
    on_message : callable, optional
        Called on the network thread with each :class:`InboundMessage` instead of putting
        it in the inbox (a process hosting many clients feeds one shared dispatcher this
        way). It must not drop messages; blocking in it holds the PUBACK like a full inbox.
    network : biofed.mqtt_loop.NetworkLoop, optional
        Serve the connection from this shared network thread instead of a paho thread of
        its own (a process hosting hundreds of clients); reconnects then follow the same
        backoff from that thread.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        protocol: ProtocolChoice = "auto",
        keepalive: int = 30,
        will: Will | None = None,
        clean: bool = False,
        session_expiry_s: int = 86_400,
        connect_timeout_s: float = 10.0,
        v5_probe_timeout_s: float = 2.0,
        inbox_size: int = 10_000,
        inbox_rate_per_s: float | None = None,
        inbox_burst: float = 500.0,
        reconnect_min_delay_s: float = 1.0,
        reconnect_max_delay_s: float = 60.0,
        max_inflight: int = 64,
        random_state: int | np.random.Generator | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: TlsSettings | None = None,
        on_message: Callable[[InboundMessage], None] | None = None,
        network: NetworkLoop | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not client_id:
            raise ValueError("client_id must be a non-empty, stable id (e.g. the device id)")
        if inbox_size < 1:
            raise ValueError(f"inbox_size must be >= 1, got {inbox_size}")
        if not 0 < reconnect_min_delay_s <= reconnect_max_delay_s:
            raise ValueError(
                f"need 0 < reconnect_min_delay_s <= reconnect_max_delay_s, got "
                f"{reconnect_min_delay_s} and {reconnect_max_delay_s}"
            )
        self.host = host
        self.port = int(port)
        self.client_id = client_id
        self.protocol = protocol
        self.keepalive = int(keepalive)
        self.will = will
        self.clean = clean
        self.session_expiry_s = int(session_expiry_s)
        self.connect_timeout_s = connect_timeout_s
        self.v5_probe_timeout_s = v5_probe_timeout_s
        self.max_inflight = max_inflight
        self._credentials = (username or client_id, password)
        self.tls = tls
        self._ssl_context = tls.context() if tls is not None else None
        jitter = 1.0 + np.random.default_rng(random_state).random()
        self._reconnect_delays = (reconnect_min_delay_s * jitter, reconnect_max_delay_s * jitter)
        self._inbox: Inbox[InboundMessage] = Inbox(inbox_size, rate_per_s=inbox_rate_per_s, burst=inbox_burst)
        self._deliver = on_message
        self._network = network
        self._backoff_s: float | None = None
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._suback = threading.Condition(self._lock)
        self._acked_mids: set[int] = set()
        self._connections_lost = 0  # a SUBACK awaited on a lost connection never comes
        self._refused: dict[int, str] = {}  # mid -> failure reason of its latest (v5) PUBACK
        self._connected = threading.Event()
        self._down_since: float | None = None  # monotonic time the connection dropped
        self._downtime_s = 0.0
        self._connack = threading.Event()
        self._connack_error: str | None = None
        self._closing = False
        self._client: paho.Client | None = None
        self.protocol_version: str | None = None
        """The MQTT version in use after :meth:`connect`: ``"5"`` or ``"3.1.1"``."""

    @classmethod
    def from_config(cls, broker: BrokerConfig, client_id: str, **kwargs: Any) -> MqttClient:
        """A client for ``broker`` (a :class:`biofed.config.BrokerConfig`): address, protocol,
        keepalive, timeouts, inbox size, TLS files and credentials from the config;
        ``kwargs`` (e.g. ``will``, ``clean``, ``random_state``) go to the constructor and
        override the config.

        Raises
        ------
        ConnectError
            A TLS file is missing or invalid.
        biofed.config.ConfigError
            The password file cannot be read.
        """
        tls = None
        if broker.tls:
            tls = TlsSettings(broker.ca_file, broker.cert_file, broker.key_file)
        settings = dict(
            protocol=broker.protocol,
            keepalive=broker.keepalive,
            connect_timeout_s=broker.connect_timeout_s,
            session_expiry_s=broker.session_expiry_s,
            inbox_size=broker.inbox_size,
            inbox_rate_per_s=broker.inbox_rate_per_s,
            inbox_burst=broker.inbox_burst,
            username=broker.username,
            password=broker.read_password(),
            tls=tls,
        )
        settings.update(kwargs)
        return cls(broker.host, broker.port, client_id, **settings)

    # ------------------------------------------------------------------ lifecycle
    def connect(self) -> MqttClient:
        """Connect (blocking until the CONNACK) and start the network thread.

        Raises
        ------
        ConnectError
            The broker is unreachable, refused the connection, or never answered.
        """
        versions = ("5", "3.1.1") if self.protocol == "auto" else (self.protocol,)
        failures = []
        for version in versions:
            probing = self.protocol == "auto" and version == "5"
            timeout = self.v5_probe_timeout_s if probing else self.connect_timeout_s
            client = self._make_client(version)
            self._connack.clear()
            self._connack_error = None
            try:
                if version == "5":
                    client.connect(
                        self.host,
                        self.port,
                        self.keepalive,
                        clean_start=self.clean,
                        properties=self._connect_properties(),
                    )
                else:
                    client.connect(self.host, self.port, self.keepalive)
            except ssl.SSLError as exc:  # an OSError too: report it as what it is
                raise ConnectError(
                    f"TLS handshake with MQTT broker {self.host}:{self.port} failed: {exc} (check the CA file, the "
                    f"client certificate, and that the broker certificate names {self.host!r}; a plain-TCP port "
                    f"also fails this way)"
                ) from exc
            except OSError as exc:
                raise ConnectError(f"cannot reach MQTT broker {self.host}:{self.port}: {exc}") from exc
            if self._network is None:
                client.loop_start()
            if self._connack.wait(timeout) and self._connack_error is None:
                self._client = client
                self.protocol_version = version
                logger.info("connected to %s:%d as %r (MQTT %s)", self.host, self.port, self.client_id, version)
                return self
            reason = self._connack_error or f"no CONNACK within {timeout:g} s"
            failures.append(f"MQTT {version}: {reason}")
            client.disconnect()
            self._stop_network(client)
            logger.info("MQTT %s connection to %s:%d failed (%s)", version, self.host, self.port, reason)
        raise ConnectError(
            f"MQTT broker {self.host}:{self.port} did not accept the connection ({'; '.join(failures)}); "
            f"check the broker address, its protocol (config broker.protocol = auto | 5 | 3.1.1) and, for a "
            f"provisioned broker, TLS (broker.tls, ca_file, cert_file, key_file) and the user name and password"
        )

    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._closing = True
        if self._client is not None:
            # paho's network thread logs a spurious "Client is not connected" at ERROR level
            # when it wakes after a deliberate disconnect (even while disconnect() runs);
            # nothing from this point on is news.
            self._client.disable_logger()
            self._client.disconnect()
            self._stop_network(self._client)
            self._client = None
        self._connected.clear()

    def drop_connection(self) -> bool:
        """Cut the TCP connection without a DISCONNECT, as a network failure does: the broker
        publishes the last will and paho reconnects with its backoff (fault injection in
        simulations and tests). False when there is no open connection."""
        client = self._client
        sock = None if client is None else client.socket()
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True

    def _stop_network(self, client: paho.Client) -> None:
        if self._network is None:
            client.loop_stop()
        else:
            self._network.forget(client)

    def _reconnect(self) -> None:
        """Network-loop mode: reconnect now (called from the loop thread), or schedule the next try."""
        client = self._client
        if client is None or self._closing:
            return
        try:
            client.reconnect()
        except OSError as exc:
            logger.debug("reconnect to %s:%d failed: %s", self.host, self.port, exc)
            self._network.reconnect_later(self, self._next_backoff())

    def _next_backoff(self) -> float:
        low, high = self._reconnect_delays
        self._backoff_s = low if self._backoff_s is None else min(2 * self._backoff_s, high)
        return self._backoff_s

    def __enter__(self) -> MqttClient:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True while the connection is up (it may drop and come back)."""
        return self._connected.is_set()

    def downtime_s(self) -> float:
        """Seconds this client has been disconnected since :meth:`connect` (outages so far,
        including one going on now); a round clock subtracts it to pause during outages."""
        with self._lock:
            ongoing = 0.0 if self._down_since is None else time.monotonic() - self._down_since
            return self._downtime_s + ongoing

    def acknowledged(self, info: paho.MQTTMessageInfo) -> bool:
        """Whether the broker acknowledged a publish made with ``wait=False`` (it may have
        been queued while offline and sent after the reconnect)."""
        return _is_published(info)

    def refusal(self, info: paho.MQTTMessageInfo) -> str | None:
        """The failure reason of an acknowledged MQTT 5 publish (e.g. "Not authorized"), or None."""
        with self._lock:
            return self._refused.pop(info.mid, None)

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        """Block until (re)connected; False on timeout."""
        return self._connected.wait(timeout_s)

    # ------------------------------------------------------------------ traffic
    def subscribe(self, topic_filter: str, qos: int = 1, *, timeout_s: float = 10.0) -> None:
        """Subscribe (renewed after every reconnect) and wait for the SUBACK while the connection
        stays up.

        May be called before :meth:`connect`; the subscription is then made on connect. If the
        connection drops before the SUBACK, the wait ends there: the reconnect's ``on_connect``
        subscribes again.

        Raises
        ------
        MqttError
            The connection stayed up but no SUBACK came within ``timeout_s``.
        """
        with self._lock:
            self._subscriptions[topic_filter] = qos
            lost = self._connections_lost
        client = self._client
        if client is None or not self.connected:
            return  # on_connect subscribes
        result, mid = client.subscribe(topic_filter, qos)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return  # the connection just dropped; on_connect subscribes again
        with self._suback:
            if not self._suback.wait_for(lambda: mid in self._acked_mids or self._connections_lost != lost, timeout_s):
                raise MqttError(f"no SUBACK for {topic_filter!r} within {timeout_s:g} s")
            self._acked_mids.discard(mid)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
        wait: bool = True,
        timeout_s: float = 30.0,
    ) -> paho.MQTTMessageInfo:
        """Publish ``payload``; with ``wait`` block until the broker acknowledged it.

        ``expiry_s`` sets the v5 message expiry interval (ignored on 3.1.1). Returns
        paho's ``MQTTMessageInfo`` (``wait_for_publish``/``is_published`` for ``wait=False``).

        Raises
        ------
        PublishError
            Refused by paho (e.g. payload too large), not acknowledged in ``timeout_s``, or
            (MQTT 5) acknowledged with a failure reason such as "Not authorized" (the
            broker's ACL); MQTT 3.1.1 brokers drop unauthorized messages silently.
        """
        client = self._require_client()
        properties = None
        if expiry_s is not None and self.protocol_version == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = int(expiry_s)
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic!r} refused: {paho.error_string(info.rc)}")
        if not wait or qos == 0:
            return info
        deadline = time.monotonic() + timeout_s
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            info.wait_for_publish(timeout_s)
        while not _is_published(info) and time.monotonic() < deadline:
            time.sleep(0.05)  # queued while offline: sent after the reconnect
        if not _is_published(info):
            raise PublishError(f"publish to {topic!r} not acknowledged within {timeout_s:g} s")
        with self._lock:
            refused = self._refused.pop(info.mid, None)
        if refused is not None:
            raise PublishError(
                f"publish to {topic!r} refused by the broker: {refused} (a provisioned broker's ACL "
                f"lets user {self._credentials[0]!r} publish only to its own topics)"
            )
        return info

    def receive(self, timeout_s: float | None = None) -> InboundMessage | None:
        """Next received message, or None after ``timeout_s`` (None blocks forever)."""
        return self._inbox.get(timeout_s)

    @property
    def shed(self) -> int:
        """Inbound messages shed by the inbox's overload policy so far."""
        return self._inbox.shed_total()

    # ------------------------------------------------------------------ paho plumbing
    def _require_client(self) -> paho.Client:
        if self._client is None:
            raise MqttError("not connected: call connect() first")
        return self._client

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if self.clean else self.session_expiry_s
        return properties

    def _make_client(self, version: str) -> paho.Client:
        kwargs = {} if version == "5" else {"clean_session": self.clean}
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=_PAHO_VERSION[version],
            **kwargs,
        )
        client.enable_logger(_paho_logger)
        if self._network is not None:
            self._network.prepare(client, self)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
        client.username_pw_set(*self._credentials)
        client.reconnect_delay_set(*self._reconnect_delays)
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(0)  # unbounded: QoS 1 uploads are never dropped locally
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason_code: object, properties: object
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            self._connack_error = f"refused: {reason_code}"
            self._connack.set()
            return
        with self._lock:
            self._acked_mids.clear()
            subscriptions = list(self._subscriptions.items())
            if self._down_since is not None:
                self._downtime_s += time.monotonic() - self._down_since
                self._down_since = None
        for topic_filter, qos in subscriptions:
            client.subscribe(topic_filter, qos)
        self._backoff_s = None
        self._connected.set()
        self._connack.set()
        logger.debug("MQTT connected (session present: %s)", getattr(flags, "session_present", None))

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason_code: object, properties: object
    ) -> None:
        self._connected.clear()
        with self._suback:
            if self._down_since is None and self._connack.is_set():
                self._down_since = time.monotonic()
            self._connections_lost += 1
            self._suback.notify_all()
        if not self._connack.is_set():  # closed during the handshake: fail connect() now
            self._connack_error = f"broker closed the connection before the CONNACK ({reason_code})"
            self._connack.set()
        elif not self._closing and self._client is not None:
            logger.warning("MQTT connection to %s:%d lost (%s); reconnecting", self.host, self.port, reason_code)
            if self._network is not None:  # paho's own thread would reconnect by itself
                self._network.reconnect_later(self, self._next_backoff())

    def _on_publish(
        self, client: paho.Client, userdata: object, mid: int, reason_code: object, properties: object
    ) -> None:
        # paho calls this before it marks the message published, so publish() sees the reason
        with self._lock:
            if getattr(reason_code, "is_failure", False):
                self._refused[mid] = str(reason_code)
            else:
                self._refused.pop(mid, None)

    def _on_subscribe(
        self, client: paho.Client, userdata: object, mid: int, reason_codes: object, properties: object
    ) -> None:
        with self._suback:
            self._acked_mids.add(mid)
            self._suback.notify_all()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:  # a topic that is not UTF-8 is no biofed topic
            logger.warning("dropped a message whose topic is not UTF-8: %r", message._topic[:200])
            return
        inbound = InboundMessage(topic, bytes(message.payload), message.qos, bool(message.retain))
        if self._deliver is not None:
            self._deliver(inbound)
            return
        self._inbox.put(topic, inbound)


__all__ = [
    "ConnectError",
    "InboundMessage",
    "MqttClient",
    "MqttError",
    "PROTOCOLS",
    "PublishError",
    "TlsSettings",
    "Will",
]
