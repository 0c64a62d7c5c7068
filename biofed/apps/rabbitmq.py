"""A RabbitMQ cluster with the MQTT plugin on loopback: the clustered broker for large fleets.

:func:`start_rabbitmq_cluster` runs ``nodes`` RabbitMQ nodes (Debian ``rabbitmq-server``,
3.10) on this machine, clustered by classic peer discovery, each with an MQTT listener.
Everything listens on 127.0.0.1 only: a private ``epmd`` (``ERL_EPMD_ADDRESS=127.0.0.1`` on a
free port), node names ``...@localhost``, inter-node distribution bound to 127.0.0.1 on a
fixed port per node, and the AMQP, MQTT and management listeners. The Debian wrapper
scripts run the server as the ``rabbitmq`` user, so the cluster's folders (config,
database, logs) are created under a fresh ``/tmp/biofed-rabbitmq-*`` owned by that user.

What differs from Mosquitto, and how biofed handles it
------------------------------------------------------
- **MQTT 3.1.1 only** (the 3.10 plugin has no MQTT 5): clients use ``protocol = "3.1.1"``
  (``"auto"`` also works: the v5 probe is refused and it falls back). biofed uses no v5
  feature it cannot do without (message expiry is dropped on 3.1.1).
- **Retained messages are node-local**: a retained task, basis or model published through
  node A is not delivered as retained to a client that subscribes on node B later (a device
  that joins or reconnects after the publish). Live routing is cluster-wide. The
  :class:`RetainedMirror` re-publishes every retained message of the fleet's coordinator
  topics on the other nodes; live subscribers then receive a second copy with the same
  message id, which agents drop as a duplicate (:class:`biofed.protocol.SeenMessageIds`).
- **Retained messages reach only subscriptions without wildcards**: the coordinator's
  ``status/+`` subscription gets no retained "online" statuses, so devices that came online
  before the coordinator's first subscription stay unknown to it. The coordinator's
  persistent session is a durable queue that collects every status while it is away
  (restarts, ``kill -9``), so it suffices that this queue exists before the devices come
  online: start the coordinator first once (:meth:`RabbitCluster.session_exists` tells when).
- **Sessions map to queues**: a persistent MQTT session (``clean_session = false``) is a
  durable queue on the node the client first connected to; it survives reconnects to
  either node, but its messages are unavailable while that node is down.
- **Client ids are tracked cluster-wide with Raft**: a 2-node cluster has no majority once a
  node is down, so MQTT connections are refused until it is back; production clusters
  have 3 or 5 nodes.
- Topic levels map to AMQP routing-key words (``/`` becomes ``.``), so a device or fleet id
  must not contain ``.`` (biofed ids are ``[A-Za-z0-9_-]``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pwd
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from biofed.apps.broker import LOOPBACK, BrokerError, free_port, wait_for_port

logger = logging.getLogger(__name__)

__all__ = ["RabbitCluster", "RabbitNode", "RetainedMirror", "rabbitmq_binary", "start_rabbitmq_cluster"]

_WRAPPER = Path("/usr/sbin/rabbitmq-server")
_USER = "rabbitmq"
_PLUGINS = "[rabbitmq_mqtt,rabbitmq_management]."


def rabbitmq_binary() -> Path:
    """The Debian ``rabbitmq-server`` wrapper; :class:`BrokerError` when missing or unusable."""
    if not _WRAPPER.is_file():
        raise BrokerError("rabbitmq-server is not installed (Debian/Ubuntu: sudo apt-get install rabbitmq-server)")
    try:
        pwd.getpwnam(_USER)
    except KeyError:
        raise BrokerError(f"the {_USER!r} user of the rabbitmq-server package is missing") from None
    if os.geteuid() != 0:
        raise BrokerError("the rabbitmq-server wrapper switches to the rabbitmq user: run as root")
    return _WRAPPER


@dataclass
class RabbitNode:
    """One running node."""

    name: str
    host: str
    mqtt_port: int
    amqp_port: int
    management_port: int
    dist_port: int
    directory: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def port(self) -> int:
        """The MQTT port (what biofed's broker configs need)."""
        return self.mqtt_port

    def beam_pid(self) -> int | None:
        try:
            return int((self.directory / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM the Erlang VM (a graceful shutdown), then the wrapper's process group."""
        pid = self.beam_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@dataclass
class RabbitCluster:
    """Running nodes and their private epmd; :meth:`stop` ends everything and removes the folder."""

    nodes: list[RabbitNode]
    directory: Path
    epmd: subprocess.Popen = field(repr=False)
    epmd_port: int = 0
    username: str = "guest"
    """MQTT user every client of this test cluster uses (RabbitMQ's ``guest``, loopback only)."""
    password: str = field(default="guest", repr=False)

    @property
    def host(self) -> str:
        return self.nodes[0].host

    @property
    def port(self) -> int:
        return self.nodes[0].mqtt_port

    def session_exists(self, client_id: str) -> bool:
        """Whether the persistent MQTT session of ``client_id`` exists: its durable QoS 1
        queue (``mqtt-subscription-{client_id}qos1``), via node 1's management API."""
        from urllib.error import HTTPError
        from urllib.parse import quote

        try:
            _management_get(self.nodes[0], f"/api/queues/%2F/{quote(f'mqtt-subscription-{client_id}qos1', safe='')}")
        except HTTPError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    def pids(self) -> list[int]:
        """The Erlang VMs' and epmd's process ids."""
        return [p for p in (n.beam_pid() for n in self.nodes) if p is not None] + [self.epmd.pid]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        if self.epmd.poll() is None:
            self.epmd.terminate()
            try:
                self.epmd.wait(10)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _node_config(node: str, peers: Sequence[str], amqp: int, mqtt: int, management: int) -> str:
    lines = [
        f"listeners.tcp.1 = {LOOPBACK}:{amqp}",
        f"mqtt.listeners.tcp.1 = {LOOPBACK}:{mqtt}",
        "mqtt.allow_anonymous = true",
        "mqtt.vhost = /",
        "mqtt.exchange = amq.topic",
        "mqtt.subscription_ttl = 86400000",
        f"management.tcp.ip = {LOOPBACK}",
        f"management.tcp.port = {management}",
        "loopback_users.guest = true",
        "log.console = false",
        "log.file.level = info",
        "cluster_formation.peer_discovery_backend = classic_config",
        *(f"cluster_formation.classic_config.nodes.{i} = {peer}" for i, peer in enumerate(peers, start=1)),
    ]
    return "\n".join(lines) + "\n"


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)


def start_rabbitmq_cluster(nodes: int = 2, *, timeout_s: float = 180.0) -> RabbitCluster:
    """Start a ``nodes``-node RabbitMQ cluster with MQTT on loopback (see the module docstring).

    Node 1 starts first; the others join it through classic peer discovery and are started
    one after the other. Returns when every node's MQTT listener accepts connections and
    the cluster has all its members. Raises :class:`BrokerError` (with the node's log tail)
    when a node does not come up within ``timeout_s``.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    wrapper = rabbitmq_binary()
    epmd_binary = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
    user = pwd.getpwnam(_USER)
    base = Path(tempfile.mkdtemp(prefix="biofed-rabbitmq-"))
    tag = base.name.rsplit("-", 1)[-1].lower().replace("_", "")
    names = [f"biofed{tag}{i}@localhost" for i in range(1, nodes + 1)]
    epmd_port = free_port()
    common_env = {
        **os.environ,
        "ERL_EPMD_ADDRESS": LOOPBACK,
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_USE_LONGNAME": "false",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    epmd = subprocess.Popen(
        [epmd_binary, "-address", LOOPBACK, "-port", str(epmd_port)],
        env=common_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cluster = RabbitCluster([], base, epmd, epmd_port)
    try:
        wait_for_port(LOOPBACK, epmd_port, 10.0, epmd)
        for name in names:
            directory = base / name.split("@")[0]
            (directory / "log").mkdir(parents=True)
            ports = {"amqp": free_port(), "mqtt": free_port(), "management": free_port(), "dist": free_port()}
            (directory / "rabbitmq.conf").write_text(
                _node_config(name, names, ports["amqp"], ports["mqtt"], ports["management"])
            )
            (directory / "enabled_plugins").write_text(_PLUGINS + "\n")
            _chown_tree(base, user.pw_uid, user.pw_gid)
            env = {
                **common_env,
                "RABBITMQ_NODENAME": name,
                "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
                "RABBITMQ_NODE_PORT": str(ports["amqp"]),
                "RABBITMQ_DIST_PORT": str(ports["dist"]),
                "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
                "RABBITMQ_LOG_BASE": str(directory / "log"),
                "RABBITMQ_PID_FILE": str(directory / "pid"),
            }
            log = (directory / "console.log").open("w")
            process = subprocess.Popen(
                [str(wrapper)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(directory),
            )
            log.close()
            node = RabbitNode(
                name, LOOPBACK, ports["mqtt"], ports["amqp"], ports["management"], ports["dist"], directory, process
            )
            cluster.nodes.append(node)
            try:
                wait_for_port(LOOPBACK, node.mqtt_port, timeout_s, process)
            except BrokerError as exc:
                raise BrokerError(f"RabbitMQ node {name}: {exc}\n{_log_tail(directory)}") from None
            logger.info("RabbitMQ node %s: MQTT on %s:%d", name, LOOPBACK, node.mqtt_port)
        _wait_for_members(cluster, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _log_tail(directory: Path, n: int = 30) -> str:
    parts = []
    for path in [directory / "console.log", *sorted((directory / "log").glob("*.log"))]:
        try:
            parts.append(f"--- {path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:]))
        except OSError:
            continue
    return "\n".join(parts)


def _management_get(node: RabbitNode, path: str):
    """GET ``path`` of ``node``'s management API (loopback, the guest user); the parsed JSON."""
    import base64
    import urllib.request

    request = urllib.request.Request(f"http://{LOOPBACK}:{node.management_port}{path}")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def _wait_for_members(cluster: RabbitCluster, timeout_s: float) -> None:
    """Poll node 1's management API until every node is a running cluster member."""
    deadline = time.monotonic() + timeout_s
    want = {n.name for n in cluster.nodes}
    running: set[str] = set()
    while time.monotonic() < deadline:
        try:
            running = {n["name"] for n in _management_get(cluster.nodes[0], "/api/nodes") if n.get("running")}
        except OSError:
            running = set()
        if want <= running:
            return
        time.sleep(1.0)
    raise BrokerError(f"RabbitMQ cluster: running members {sorted(running)}, expected {sorted(want)}")


class RetainedMirror:
    """Makes the fleet's retained messages retained on every node of a RabbitMQ cluster.

    RabbitMQ keeps retained messages per node, so a client subscribing on another node than
    the publisher's would miss the retained task, basis, model or a device's status. Live
    routing is cluster-wide, so one subscriber on ``nodes[0]`` sees every publication on
    ``topics`` (biofed publishes these only retained); the mirror re-publishes each payload
    it has not mirrored before, in arrival order (so the newest is retained last), with
    ``retain`` through a connection to every node; its own copies coming back are skipped. Live subscribers get the
    copies too: agents and the coordinator drop them as duplicate message ids.
    """

    def __init__(
        self,
        nodes: Sequence,
        topics: Sequence[str],
        *,
        client_id: str = "biofed-retained-mirror",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        from biofed.mqtt import MqttClient

        login = dict(protocol="3.1.1", clean=True, username=username, password=password)
        self.topics = list(topics)
        self.capacity = 100_000
        """Messages remembered as mirrored (older ones could be mirrored again)."""
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self.mirrored = 0
        self._source = MqttClient(nodes[0].host, nodes[0].port, f"{client_id}-in", on_message=self._copy, **login)
        self._targets = [MqttClient(n.host, n.port, f"{client_id}-{i}", **login) for i, n in enumerate(nodes)]
        self._thread = threading.Thread(target=self._run, name="retained-mirror", daemon=True)

    def start(self) -> RetainedMirror:
        for target in self._targets:
            target.connect()
        self._thread.start()
        self._source.connect()
        for topic in self.topics:
            self._source.subscribe(topic, qos=1)
        return self

    def _copy(self, inbound) -> None:
        key = (inbound.topic, hashlib.sha256(inbound.payload).digest())
        with self._lock:
            if key in self._seen:
                return  # our own copy routed back, or a redelivery
            self._seen[key] = None
            if len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        self._queue.put((inbound.topic, inbound.payload))

    def _run(self) -> None:
        from biofed.mqtt import MqttError

        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload = item
            for target in self._targets:
                try:
                    target.publish(topic, payload, retain=True)
                except MqttError as exc:
                    logger.error("retained mirror: %s not copied: %s", topic, exc)
            self.mirrored += 1

    def stop(self) -> None:
        self._source.close()
        self._queue.put(None)
        self._thread.join(timeout=10.0)
        for target in self._targets:
            target.close()
