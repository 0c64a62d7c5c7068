"""``biofed status``: one view of a fleet, from the broker's retained topics and the coordinator's state.

The devices come from their retained ``status/{id}`` messages (the MQTT last will makes a
vanished device "offline"); the model version from the retained ``model`` topic; the
round, the phase and the privacy spent from the coordinator's state database in
``state_dir`` (read while the coordinator runs; whether one runs is read from its lock).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from biofed.cli_options import config_option, examples, load_config_or_exit
from biofed.config import ConfigError, CoordinatorConfig
from biofed.coordinator.state import DB_NAME, CoordinatorState, StateError, running_coordinator
from biofed.mqtt import ConnectError, MqttClient, MqttError
from biofed.protocol import ProtocolError, Topics, decode_topic_message

QUIET_S = 0.3
"""A fresh subscription's retained burst is taken as complete after this long without a message."""


@dataclass
class DeviceStatus:
    device: str
    state: str
    online: bool
    round: int
    last_seen: float
    """Unix time the device's latest status was sent."""
    detail: str = ""


@dataclass
class CoordinatorStatus:
    running: bool
    pid: int | None
    phase: str | None
    """Next phase to run ("covariance", "train", "evaluate", "done"); None before the first start."""
    round: int
    """Last round number used (task rounds count basis, training and evaluation rounds)."""
    train_rounds_done: int
    rounds: int
    stop_reason: str | None
    epsilon: float | None
    """Privacy spent, by the budget accountant (None before the first private round)."""
    epsilon_pld: float | None
    epsilon_budget: float | None
    delta: float
    accountant: str


@dataclass
class FleetStatus:
    fleet: str
    time: float
    coordinator: CoordinatorStatus
    model_version: int | None
    """Round of the retained global model (None: none published, or no broker)."""
    devices: list[DeviceStatus] = field(default_factory=list)
    broker_error: str | None = None

    @property
    def online(self) -> int:
        return sum(d.online for d in self.devices)

    def to_json_dict(self) -> dict:
        out = asdict(self)
        out["online"] = self.online
        out["offline"] = len(self.devices) - self.online
        for key, value in out["coordinator"].items():
            if isinstance(value, float) and not math.isfinite(value):
                out["coordinator"][key] = str(value)
        return out


def coordinator_status(config: CoordinatorConfig) -> CoordinatorStatus:
    """The coordinator's progress from ``config.state_dir`` (nothing is created there); the
    budget, delta and accountant are the ones of its last committed round, else the config's."""
    dp = config.dp
    pid = running_coordinator(config.state_dir)
    status = CoordinatorStatus(
        running=pid is not None,
        pid=pid if pid and pid > 0 else None,
        phase=None,
        round=0,
        train_rounds_done=0,
        rounds=config.rounds,
        stop_reason=None,
        epsilon=None,
        epsilon_pld=None,
        epsilon_budget=dp.epsilon_budget,
        delta=dp.delta,
        accountant=dp.accountant,
    )
    if not (Path(config.state_dir) / DB_NAME).is_file():
        return status
    try:
        store = CoordinatorState(config.state_dir, config.fleet)
    except StateError as exc:
        raise ConfigError(str(exc)) from None
    try:
        snapshot, history = store.load(), store.history()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{config.state_dir}: cannot read the coordinator state: {exc}") from None
    finally:
        store.close()
    if snapshot is not None:
        status.phase, status.round = snapshot.phase, snapshot.next_round - 1
        status.train_rounds_done, status.stop_reason = snapshot.train_rounds_done, snapshot.stop_reason
        if snapshot.ledger:  # the budget and delta the coordinator ran with (its command line may override the file)
            ledger = json.loads(snapshot.ledger)
            status.epsilon_budget, status.delta = ledger.get("epsilon_budget"), ledger.get("delta", dp.delta)
            status.accountant = (ledger.get("accountants") or [dp.accountant])[0]
    if history:
        last = history[-1]
        rdp, pld = last.epsilon_rdp, last.epsilon_pld
        status.epsilon = pld if status.accountant == "pld" and pld is not None else rdp
        status.epsilon_pld = pld
    return status


class FleetWatcher:
    """A read-only subscription to a fleet's retained status and model topics."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.topics = Topics(config.fleet)
        self.max_bytes = config.broker.max_message_bytes
        broker = config.status_broker or config.broker
        self.client = MqttClient.from_config(broker, f"status-{os.getpid()}-{os.urandom(3).hex()}", clean=True)
        self.devices: dict[str, DeviceStatus] = {}
        self.model_version: int | None = None

    def connect(self) -> None:
        self.client.connect()
        self.client.subscribe(self.topics.all_devices("status"), qos=1)
        self.client.subscribe(self.topics.model, qos=1)

    def pump(self, timeout_s: float, *, until_quiet: bool = False) -> None:
        """Take in messages for up to ``timeout_s``; with ``until_quiet`` stop after
        :data:`QUIET_S` without one (a fresh subscription's retained burst is over)."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            inbound = self.client.receive(min(QUIET_S, remaining) if until_quiet else remaining)
            if inbound is None:
                if until_quiet:
                    return
                continue
            try:
                message = decode_topic_message(self.topics, inbound.topic, inbound.payload, max_bytes=self.max_bytes)
            except ProtocolError:
                continue  # not ours to judge: the coordinator logs and drops bad messages
            if message.kind == "model":
                self.model_version = max(self.model_version or 0, message.round)
            elif message.kind == "status":
                known = self.devices.get(message.sender)
                if known is not None and known.last_seen > message.created:
                    continue
                payload = message.payload
                self.devices[message.sender] = DeviceStatus(
                    device=message.sender,
                    state=payload.state,
                    online=payload.state != "offline",
                    round=payload.round,
                    last_seen=message.created,
                    detail=payload.detail,
                )

    def close(self) -> None:
        self.client.close()


def fleet_status(
    config: CoordinatorConfig, watcher: FleetWatcher | None, broker_error: str | None = None
) -> FleetStatus:
    """The fleet now: the watcher's devices and model plus the coordinator's state."""
    return FleetStatus(
        fleet=config.fleet,
        time=time.time(),
        coordinator=coordinator_status(config),
        model_version=None if watcher is None else watcher.model_version,
        devices=[] if watcher is None else sorted(watcher.devices.values(), key=lambda d: d.device),
        broker_error=broker_error,
    )


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render(status: FleetStatus) -> str:
    """The human-readable view of :func:`fleet_status`."""
    c = status.coordinator
    if c.phase is None:
        progress = "no round yet"
    else:
        progress = f"phase {c.phase}, round {c.round}, training round {c.train_rounds_done} of {c.rounds}" + (
            f" (stopped: {c.stop_reason})" if c.stop_reason else ""
        )
    running = f"running (pid {c.pid})" if c.running and c.pid else "running" if c.running else "not running"
    lines = [f"fleet {status.fleet}: coordinator {running}; {progress}"]
    model = "none published" if status.model_version is None else f"round {status.model_version}"
    lines.append(f"model: {model}")
    if c.epsilon is None:
        spent = "nothing spent yet"
    elif math.isinf(c.epsilon):
        spent = "epsilon inf (no noise: not private)"
    else:
        spent = f"epsilon {c.epsilon:.3g} ({c.accountant})"
    budget = "no budget" if c.epsilon_budget is None else f"budget {c.epsilon_budget:g}"
    share = ""
    if c.epsilon is not None and c.epsilon_budget is not None and math.isfinite(c.epsilon):
        share = f" [{100 * c.epsilon / c.epsilon_budget:.0f}% of budget]"
    lines.append(f"privacy: {spent}, {budget} at delta {c.delta:g}{share}")
    if status.broker_error is not None:
        lines.append(f"devices: unknown ({status.broker_error})")
        return "\n".join(lines)
    lines.append(f"devices: {status.online} online, {len(status.devices) - status.online} offline")
    if status.devices:
        width = max(6, *(len(d.device) for d in status.devices))
        lines.append(f"  {'DEVICE':<{width}}  {'STATE':<10} {'ROUND':>5}  LAST SEEN")
        for d in status.devices:
            lines.append(f"  {d.device:<{width}}  {d.state:<10} {d.round:>5}  {_ago(status.time - d.last_seen)}")
    return "\n".join(lines)


@click.command(
    "status",
    epilog=examples(
        "biofed status --config coordinator.toml",
        "biofed status --config coordinator.toml --json",
        "biofed status --config coordinator.toml --watch --interval 5",
        exit_codes="Exit codes: 0 shown; 1 the broker is unreachable or the state unreadable; "
        "2 usage error (missing or invalid config file).",
    ),
)
@config_option("coordinator")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with --watch: one JSON document per line).")
@click.option("--watch", is_flag=True, help="Keep showing the fleet every --interval seconds until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.5),
    default=2.0,
    show_default=True,
    help="Seconds between views with --watch.",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0.1),
    default=3.0,
    show_default=True,
    help="Longest wait for the broker's retained statuses.",
)
@click.option("--no-broker", is_flag=True, help="Show only the coordinator's state (no broker connection).")
def status_command(
    config_path: Path, as_json: bool, watch: bool, interval: float, wait_s: float, no_broker: bool
) -> None:
    """Show the fleet: devices online and offline with last seen, the round, epsilon spent
    against the budget and the model version.

    Reads the config the coordinator runs with (for [status_broker], else [broker], and
    state_dir). It only subscribes: nothing is published and the state is not changed.
    """
    config = load_config_or_exit(config_path, CoordinatorConfig)
    watcher, broker_error = None, None
    if not no_broker:
        try:
            watcher = FleetWatcher(config)
            watcher.connect()
            watcher.pump(wait_s, until_quiet=True)
        except (ConnectError, MqttError, ConfigError) as exc:
            if watcher is not None:
                watcher.close()
            if not watch:
                raise click.ClickException(f"{exc} (--no-broker shows the coordinator's state alone)") from None
            watcher, broker_error = None, str(exc)

    def show() -> None:
        try:
            status = fleet_status(config, watcher, broker_error)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        if as_json:
            click.echo(json.dumps(status.to_json_dict(), indent=None if watch else 1))
        else:
            if watch:
                click.clear()
            click.echo(render(status))

    try:
        show()
        while watch:
            if watcher is not None:
                watcher.pump(interval)
            else:
                time.sleep(interval)
            show()
    except KeyboardInterrupt:
        pass
    finally:
        if watcher is not None:
            watcher.close()


__all__ = [
    "CoordinatorStatus",
    "DeviceStatus",
    "FleetStatus",
    "FleetWatcher",
    "coordinator_status",
    "fleet_status",
    "render",
    "status_command",
]
