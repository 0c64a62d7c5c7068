"""MQTT brokers for biofed: an embedded amqtt broker and a Mosquitto launcher.

- :func:`start_embedded_broker` runs amqtt (MQTT 3.1.1 only) in a background thread with
  its own asyncio loop, on loopback. Good for tests, demos and a laptop fleet. amqtt 0.12
  has no message size limit of its own (it reads a packet's declared remaining length
  with ``readexactly``), so multi-megabyte updates pass; nothing needs raising. Clients
  must send a user name (any; :class:`biofed.mqtt.MqttClient` sends its client id):
  amqtt queues QoS 1 messages for offline persistent sessions only when they are not
  anonymous.
- :func:`write_mosquitto_config` / :func:`start_mosquitto` run a real Mosquitto (MQTT 5)
  with limits fit for federated learning: Mosquitto's default ``max_queued_messages`` of
  1000 silently drops QoS 1 messages for a slow or offline subscriber, so it is raised to
  100 000; the packet size is capped just above the protocol's message limit, and every
  client's queue has a byte limit too (``max_queued_bytes``; 0 would let one flooding
  client grow the broker without bound).
- ``biofed broker [--port N] [--mosquitto] [--dir D]`` runs either until Ctrl-C or SIGTERM
  (which stops a Mosquitto child too).

Queue arithmetic (:func:`fleet_queue_limits`)
--------------------------------------------
Mosquitto queues QoS 1 messages per subscribing client while it is offline or slow; past
``max_queued_messages`` or ``max_queued_bytes`` it drops new ones silently. The longest
queue is the coordinator's: it subscribes to every device's status, update, sketch and
secagg topics. While the coordinator is away no new round opens, so one device has at
most its reply to the open task, the 4 secure-aggregation steps of that round and its
status changes (online, offline, every reconnect) to send; :data:`QUEUED_MESSAGES_PER_DEVICE`
(64) covers that with room for 50 reconnects. One reply of the default models (k = 32
features, a few hundred hidden units at most, a handful of classes: under 10 000 float64
parameters, 80 kB; its masked secure-aggregation words as large) fits
:data:`QUEUED_BYTES_PER_DEVICE` (1 MiB) with the steps and statuses. A fleet of ``n``
devices therefore needs ``max_queued_messages >= 64 n`` and ``max_queued_bytes >= n MiB``;
the limits never go below 100 000 messages and 512 MiB (the plain broker's values, ample
for up to 1 500 devices and 512 devices respectively). A device's own queue holds the
tasks and models published while it is away; dropping old ones loses nothing, because the
retained latest ones are delivered again at its reconnect.

The plain config has no authentication (any client, any user name) and no TLS, on
127.0.0.1. A secured fleet (TLS with client certificates, passwords, per-device ACLs and
a revocation list) gets its config from ``biofed provision`` (:mod:`biofed.apps.provision`,
which shares :func:`mosquitto_common_lines`); run it with
``start_mosquitto(config_file=DIR/broker/mosquitto.conf)`` or
``biofed broker --config DIR/broker/mosquitto.conf``. Mosquitto re-reads its password
file, ACL file and revocation list on SIGHUP (:meth:`MosquittoBroker.reload`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from biofed.cli_options import config_option, examples, load_config_or_exit, logging_options, override_options
from biofed.config import BrokerServiceConfig
from biofed.protocol import DEFAULT_MAX_BYTES

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MOSQUITTO_MAX_QUEUED_MESSAGES = 100_000
MOSQUITTO_MAX_QUEUED_BYTES = 512 * 1024 * 1024
MOSQUITTO_MAX_INFLIGHT_MESSAGES = 100
MOSQUITTO_MAX_PACKET_SIZE = DEFAULT_MAX_BYTES + 64 * 1024  # one message plus topic/headers
QUEUED_MESSAGES_PER_DEVICE = 64
"""Messages one device may need queued for an absent coordinator (see the module docstring)."""
QUEUED_BYTES_PER_DEVICE = 1024 * 1024
"""Bytes one device may need queued for an absent coordinator (see the module docstring)."""


def fleet_queue_limits(n_devices: int) -> tuple[int, int]:
    """``(max_queued_messages, max_queued_bytes)`` for a fleet of ``n_devices``: enough for
    every device's messages to an absent coordinator (the arithmetic of the module
    docstring), never below the plain broker's limits."""
    if not isinstance(n_devices, int) or n_devices < 0:
        raise ValueError(f"n_devices must be an integer >= 0, got {n_devices!r}")
    return (
        max(MOSQUITTO_MAX_QUEUED_MESSAGES, QUEUED_MESSAGES_PER_DEVICE * n_devices),
        max(MOSQUITTO_MAX_QUEUED_BYTES, QUEUED_BYTES_PER_DEVICE * n_devices),
    )


class BrokerError(RuntimeError):
    """A broker could not be started."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now on ``host`` (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections; :class:`BrokerError` on timeout
    or if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"broker process exited with code {process.returncode} before listening on port {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing listens on {host}:{port} after {timeout_s:g} s") from None
            time.sleep(0.05)


# ----------------------------------------------------------------------------- amqtt
@dataclass
class EmbeddedBroker:
    """An amqtt broker running in a daemon thread; :meth:`stop` shuts it down."""

    host: str
    port: int
    _thread: threading.Thread = field(repr=False)
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _stop: asyncio.Event = field(repr=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the broker down and join its thread (idempotent)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("embedded broker on port %d did not stop within %g s", self.port, timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_AMQTT_CONFIG = {
    # biofed owns the TCP server (see start_embedded_broker) and hands amqtt each accepted
    # connection through its "external" listener, so stop() can close every socket.
    "listeners": {"default": {"type": "external"}},
    # amqtt keeps no offline QoS 1 messages for anonymous sessions (it marks every session
    # anonymous when allow_anonymous is on), so it is off: any client that sends a user name
    # is accepted, and biofed.mqtt always sends one. No $SYS publisher, no packet logger.
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}},
}


def start_embedded_broker(host: str = LOOPBACK, port: int = 0, *, timeout_s: float = 10.0) -> EmbeddedBroker:
    """Start amqtt (MQTT 3.1.1) in a background thread.

    Parameters
    ----------
    host : str
        Address to listen on (loopback by default).
    port : int
        TCP port; 0 picks a free one.
    timeout_s : float
        How long to wait for the listener.

    Returns
    -------
    EmbeddedBroker
        With ``host``, ``port`` and ``stop()``; also a context manager.

    Notes
    -----
    amqtt 0.12's own shutdown can hang while a client packet is being handled, leaving
    client sockets open. Here biofed runs the TCP server itself: ``stop()`` closes the
    listener, aborts every client connection (clients see the broker vanish, as with a
    crash) and only then shuts amqtt down, with a timeout.
    """
    from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter  # heavy import, only when needed
    from amqtt.broker import Broker

    ready = threading.Event()
    state: dict = {}

    async def serve() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["stop"] = stop = asyncio.Event()
        writers: set[asyncio.StreamWriter] = set()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.add(writer)
            try:
                await broker.external_connected(StreamReaderAdapter(reader), StreamWriterAdapter(writer), "default")
            except Exception as exc:  # noqa: BLE001 - e.g. an MQTT 5 CONNECT amqtt cannot parse
                logger.debug("client connection ended with %s: %s", type(exc).__name__, exc)
            finally:
                writers.discard(writer)
                writer.transport.abort()

        try:
            broker = Broker(_AMQTT_CONFIG)
            await broker.start()
            server = await asyncio.start_server(on_client, host, port, reuse_address=True)
        except Exception as exc:  # noqa: BLE001 - reported to the starting thread
            state["error"] = exc
            ready.set()
            return
        state["port"] = server.sockets[0].getsockname()[1]
        ready.set()
        await stop.wait()
        server.close()
        for writer in list(writers):
            writer.transport.abort()
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=5.0)
        except TimeoutError:
            logger.warning("amqtt shutdown did not finish within 5 s; abandoning it")

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="amqtt-broker", daemon=True)
    thread.start()
    if not ready.wait(timeout_s):
        raise BrokerError(f"embedded amqtt broker did not start within {timeout_s:g} s")
    if "error" in state:
        thread.join(timeout_s)
        raise BrokerError(f"embedded amqtt broker failed to listen on {host}:{port}: {state['error']}")
    logger.info("embedded amqtt broker listening on %s:%d", host, state["port"])
    return EmbeddedBroker(host, state["port"], thread, state["loop"], state["stop"])


# ----------------------------------------------------------------------------- mosquitto
def mosquitto_common_lines(
    data_dir: Path,
    *,
    max_queued_messages: int = MOSQUITTO_MAX_QUEUED_MESSAGES,
    max_queued_bytes: int = MOSQUITTO_MAX_QUEUED_BYTES,
    max_inflight_messages: int = MOSQUITTO_MAX_INFLIGHT_MESSAGES,
    max_packet_size: int = MOSQUITTO_MAX_PACKET_SIZE,
) -> list[str]:
    """Config lines every biofed Mosquitto shares: the process user, persistence and the log
    in ``data_dir``, and the per-client queue/packet limits (see the module docstring)."""
    for name, value in (
        ("max_queued_messages", max_queued_messages),
        ("max_queued_bytes", max_queued_bytes),
        ("max_inflight_messages", max_inflight_messages),
        ("max_packet_size", max_packet_size),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return [
        # Started as root, mosquitto would switch to user "mosquitto", which cannot write
        # the persistence and log files in `data_dir` nor read biofed's 0600 key files;
        # stay the user who started it.
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        "per_listener_settings false",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 60",
        "persistent_client_expiration 7d",
        f"max_queued_messages {max_queued_messages}",
        f"max_queued_bytes {max_queued_bytes}",
        f"max_inflight_messages {max_inflight_messages}",
        f"max_packet_size {max_packet_size}",
        f"log_dest file {data_dir}/mosquitto.log",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
    ]


def write_mosquitto_config(
    directory: str | Path,
    port: int,
    *,
    host: str = LOOPBACK,
    max_queued_messages: int = MOSQUITTO_MAX_QUEUED_MESSAGES,
    max_queued_bytes: int = MOSQUITTO_MAX_QUEUED_BYTES,
    max_inflight_messages: int = MOSQUITTO_MAX_INFLIGHT_MESSAGES,
    max_packet_size: int = MOSQUITTO_MAX_PACKET_SIZE,
) -> Path:
    """Write ``directory/mosquitto.conf`` for a plain (anonymous, no TLS) biofed broker.

    Persistence (sessions, retained model/task/basis, queued QoS 1 messages) and the log
    live in ``directory``. Returns the config path.
    """
    if not isinstance(port, int) or port <= 0:
        raise ValueError(f"port must be a positive integer, got {port!r}")
    directory = Path(directory).resolve()
    common = mosquitto_common_lines(
        directory,
        max_queued_messages=max_queued_messages,
        max_queued_bytes=max_queued_bytes,
        max_inflight_messages=max_inflight_messages,
        max_packet_size=max_packet_size,
    )
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "# written by biofed.apps.broker.write_mosquitto_config",
        *common,
        f"listener {port} {host}",
        "protocol mqtt",
        "allow_anonymous true",
        "",
    ]
    path = directory / "mosquitto.conf"
    path.write_text("\n".join(lines))
    return path


def mosquitto_binary() -> str:
    """Path of the ``mosquitto`` executable; :class:`BrokerError` if it is not installed."""
    found = shutil.which("mosquitto") or next(
        (str(p) for p in (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto")) if p.is_file()), None
    )
    if found is None:
        raise BrokerError(
            "the mosquitto binary was not found on PATH or in /usr/sbin; install it "
            "(Debian/Ubuntu/Raspberry Pi OS: sudo apt-get install mosquitto) or use the embedded broker"
        )
    return found


@dataclass
class MosquittoBroker:
    """A running Mosquitto process; :meth:`stop` terminates it."""

    host: str
    port: int
    directory: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate (then kill) the process and wait for it (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)

    def __enter__(self) -> MosquittoBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_LISTENER = re.compile(r"^\s*listener\s+(\d+)(?:\s+(\S+))?\s*$", re.MULTILINE)
_LOG_FILE = re.compile(r"^\s*log_dest\s+file\s+(\S.*?)\s*$", re.MULTILINE)


def read_mosquitto_listener(config_file: str | Path) -> tuple[str, int]:
    """``(host, port)`` of the first ``listener`` line of a Mosquitto config; the host is
    loopback when the listener binds every interface. :class:`BrokerError` when there is none."""
    config_file = Path(config_file)
    try:
        text = config_file.read_text()
    except OSError as exc:
        raise BrokerError(f"cannot read mosquitto config {config_file}: {exc}") from None
    match = _LISTENER.search(text)
    if match is None:
        raise BrokerError(f"mosquitto config {config_file} has no 'listener PORT [ADDRESS]' line")
    address = match.group(2)
    return (LOOPBACK if address in (None, "0.0.0.0", "::") else address), int(match.group(1))


def start_mosquitto(
    directory: str | Path | None = None,
    port: int = 0,
    *,
    host: str = LOOPBACK,
    timeout_s: float = 10.0,
    config_file: str | Path | None = None,
    **config: int,
) -> MosquittoBroker:
    """Run ``mosquitto -c`` until it accepts connections: with a plain config written into
    ``directory`` (:func:`write_mosquitto_config`, extra keywords go there), or with a
    ready ``config_file`` (e.g. ``DIR/broker/mosquitto.conf`` from ``biofed provision``).

    Parameters
    ----------
    directory : path
        Config, persistence database and log of a plain broker. Not with ``config_file``.
    port : int
        TCP port of a plain broker; 0 picks a free one. Not with ``config_file``, whose
        first ``listener`` line gives address and port.
    timeout_s : float
        How long to wait for the port.
    config_file : path, optional
        A complete Mosquitto config to run as it is.

    Raises
    ------
    BrokerError
        mosquitto is not installed, exits early (the message quotes its log) or never listens.
    """
    if config_file is not None and (directory is not None or port or config):
        raise ValueError("start_mosquitto: give either config_file or directory/port/limits, not both")
    if config_file is None and directory is None:
        raise ValueError("start_mosquitto needs a directory (plain broker) or a config_file (provisioned broker)")
    binary = mosquitto_binary()
    if config_file is not None:
        conf = Path(config_file).resolve()
        host, port = read_mosquitto_listener(conf)
    else:
        port = port or free_port(host)
        conf = write_mosquitto_config(directory, port, host=host, **config)
    # Own session: a Ctrl-C in the terminal reaches only the caller, which then stops us.
    process = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        wait_for_port(host, port, timeout_s, process)
    except BaseException as exc:
        if not isinstance(exc, BrokerError):  # e.g. KeyboardInterrupt: never leak the process
            process.kill()
            process.wait()
            raise
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=timeout_s)
        log_match = _LOG_FILE.search(conf.read_text())
        log = Path(log_match.group(1)) if log_match else conf.parent / "mosquitto.log"
        detail = (stderr or b"").decode(errors="replace").strip()
        if log.is_file():
            detail += "\n" + log.read_text(errors="replace").strip()[-4000:]
        raise BrokerError(f"{exc}; mosquitto said:\n{detail}") from None
    logger.info("mosquitto (pid %d) listening on %s:%d, data in %s", process.pid, host, port, conf.parent)
    return MosquittoBroker(host, port, conf.parent, process)


# ----------------------------------------------------------------------------- CLI
@click.command(
    "broker",
    epilog=examples(
        "biofed broker                                   # embedded amqtt on 127.0.0.1:1883",
        "biofed broker --mosquitto --port 1884 --data-dir broker-data",
        "biofed broker --config fleet/broker/broker.toml  # a provisioned fleet's TLS broker",
        "biofed config init broker --out broker.toml",
    ),
)
@config_option("broker", required=False)
@override_options(BrokerServiceConfig, aliases={"data_dir": "--dir"})
@logging_options(default_level="warning")
def broker_command(config_path: Path | None, overrides: dict) -> None:
    """Run an MQTT broker for a biofed fleet until Ctrl-C or SIGTERM.

    --config is a biofed broker TOML file; a Mosquitto config (FILE.conf, as older
    versions took) is still accepted and run as --mosquitto-conf.
    """
    if config_path is not None and config_path.suffix == ".conf" and overrides.get("mosquitto_conf") is None:
        logger.warning(
            "--config %s is a Mosquitto config: pass it as --mosquitto-conf (--config takes biofed TOML)", config_path
        )
        overrides["mosquitto_conf"], config_path = config_path, None
    settings = load_config_or_exit(config_path, BrokerServiceConfig, overrides)
    config_file, use_mosquitto, directory = settings.mosquitto_conf, settings.mosquitto, settings.data_dir
    host, port = settings.host, settings.port
    if config_file is not None and not config_file.is_file():
        raise click.BadParameter(f"{config_file} does not exist", param_hint="mosquitto_conf")

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="biofed-broker-") as scratch:
        running: EmbeddedBroker | MosquittoBroker | None = None
        try:
            if config_file is not None:
                running = start_mosquitto(config_file=config_file)
                click.echo(
                    f"mosquitto (pid {running.process.pid}) listening on {running.host}:{running.port} with "
                    f"{config_file}; kill -HUP {running.process.pid} reloads passwords, ACL and CRL; "
                    f"Ctrl-C stops it"
                )
            elif use_mosquitto:
                running = start_mosquitto(directory or Path(scratch), port, host=host)
                click.echo(
                    f"mosquitto listening on {running.host}:{running.port} "
                    f"(data in {running.directory}); Ctrl-C stops it"
                )
            else:
                running = start_embedded_broker(host, port)
                click.echo(f"amqtt broker (MQTT 3.1.1) listening on {running.host}:{running.port}; Ctrl-C stops it")
            while running.alive:
                time.sleep(0.5)
            raise click.ClickException("the broker stopped unexpectedly; run with --log-level debug for its log")
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("stopping broker")
        finally:
            if running is not None:
                running.stop()
