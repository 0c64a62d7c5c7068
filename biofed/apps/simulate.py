"""``biofed simulate``: a fleet of many devices in one process, over a real broker.

Each simulated device is a real :class:`biofed.edge.agent.EdgeAgent`: its own MQTT
connection and client id with a persistent session and last will, its own keys (``--sign``)
and its own SQLite feature store, answering tasks through the agent's own handlers. What the
devices share is the process: one import of the Numba kernels (compiled once), one network
thread serving every connection (:class:`biofed.mqtt_loop.NetworkLoop`: paho's thread per
client would hit ``select()``'s 1024 file-descriptor limit at about 300 clients), one pool of
dispatcher threads that runs :meth:`EdgeAgent.handle_message` for every device (device ``i``
always on shard ``i % workers``, so each device sees its messages in order), one thread
that republishes "online" after reconnects, and one scheduler for delayed publications.
The coordinator runs as its own process (``biofed coordinator``), as in production.

Devices
-------
- Up to one device per source, each source's recordings are the device's own: eegmat
  subjects (``--data``) or synthetic devices written as FIF + WAV, ingested by the agent's
  own replay path.
- More devices than sources: every source is ingested once (a real agent and its pipeline),
  and its feature windows are dealt to ``ceil(devices / sources)`` small devices, each given
  ``--windows-per-device`` consecutive windows of every class (disjoint while the source
  has enough, else evenly spaced, overlapping blocks), stored with
  :meth:`EdgeAgent.store_windows`.

Faults (``--faults``, seeded by ``--fault-seed``)
--------------------------------------------------
:class:`FaultPlan` scripts, per training round ordinal, what the simulator does right after
it sees that round's task: drop a fraction of the devices' connections (no DISCONNECT: the
broker publishes their wills, paho reconnects them and they rejoin), restart the broker
(Mosquitto, same port and persistence), ``kill -9`` the coordinator and start it again on its
state directory. Throughout the run a fixed fraction of devices is slow (their updates go out
``slow_delay_s`` late, after the deadline) and a fraction publishes every update twice
(QoS 1 duplicates); the slow devices' updates arrive late, for a closed round.
:func:`check_federation` then verifies the coordinator's committed state: every accepted
message counted once, one per device and round, each round's device count equal to its
accepted messages, the ledger charging every committed basis and training round (at most one
more per coordinator crash), and the reported epsilon equal to dp-accounting's over what the
ledger charged.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
import queue
import resource
import shutil
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click
import numpy as np
import psutil

from biofed.apps.demo import (
    ALGORITHM_ROUNDS,
    FLEET,
    SYNTHETIC_DEVICES,
    DemoError,
    DemoSettings,
    eegmat_devices,
    federation_options,
    write_configs,
)
from biofed.apps.federation import spawn, terminate, write_synthetic_devices
from biofed.cli_options import examples, logging_options
from biofed.mqtt_loop import FileLimitError, NetworkLoop, ensure_open_files

logger = logging.getLogger(__name__)

__all__ = [
    "FaultPlan",
    "FleetWatcher",
    "SimulatedFleet",
    "check_federation",
    "run_simulation",
    "simulate_command",
    "split_windows",
]

WINDOWS_PER_DEVICE = 16
"""Consecutive windows of each class a split device gets (its last 20 % per class are held out)."""
FDS_PER_DEVICE = 4
"""File descriptors a simulated device holds open: its MQTT socket and its SQLite feature store
(the database, its write-ahead log and the WAL index)."""
FD_HEADROOM = 1024
"""File descriptors of the process itself (libraries, logs, the source agents, the watcher)."""


# ----------------------------------------------------------------------------- faults
@dataclass(frozen=True)
class FaultPlan:
    """A seeded fault schedule. Round keys are training round ordinals (1 = first training round).

    ``drop``: ``{ordinal: fraction}`` of devices whose connection is cut right after the task;
    ``broker_restart`` / ``coordinator_kill``: ordinals at which the broker restarts
    (``broker_down_s`` down) or the coordinator gets SIGKILL and is started again;
    ``slow_fraction``: devices whose updates go out ``slow_delay_s`` late (after the round's
    deadline); ``duplicate_fraction``: devices that publish every update twice.
    """

    seed: int = 0
    drop: Mapping[int, float] = field(default_factory=dict)
    broker_restart: tuple[int, ...] = ()
    coordinator_kill: tuple[int, ...] = ()
    slow_fraction: float = 0.0
    slow_delay_s: float = 0.0
    duplicate_fraction: float = 0.0
    broker_down_s: float = 1.0
    action_delay_s: float = 0.3
    """Seconds after a round's task before its faults strike (mid-round)."""

    @classmethod
    def standard(cls, seed: int, round_deadline_s: float) -> FaultPlan:
        """The CI schedule: drops in rounds 1 and 4, broker restart in round 2, coordinator
        kill -9 in round 3; 5 % slow devices, 5 % duplicating devices throughout."""
        return cls(
            seed=seed,
            drop={1: 0.1, 4: 0.1},
            broker_restart=(2,),
            coordinator_kill=(3,),
            slow_fraction=0.05,
            slow_delay_s=round_deadline_s + 1.0,
            duplicate_fraction=0.05,
        )

    def pick(self, devices: Sequence[str], fraction: float, salt: int) -> set[str]:
        """The seeded subset of ``devices`` (``round(fraction * n)`` of them) for one fault."""
        if fraction <= 0:
            return set()
        rng = np.random.default_rng([self.seed, salt])
        n = max(1, round(fraction * len(devices)))
        return {devices[i] for i in rng.choice(len(devices), size=min(n, len(devices)), replace=False)}


# ----------------------------------------------------------------------------- devices
def split_windows(
    labels: np.ndarray, t: np.ndarray, n_devices: int, per_class: int, classes: Sequence[str]
) -> list[np.ndarray]:
    """Row indices of ``n_devices`` small devices dealt from one source's windows.

    For each class in ``classes`` the rows (in time order) are cut into ``n_devices``
    consecutive blocks of ``per_class`` windows: disjoint when the class has at least
    ``n_devices * per_class`` windows, else evenly spaced (overlapping) blocks.
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
    for label in classes:
        rows = np.flatnonzero(labels == label)
        rows = rows[np.argsort(t[rows], kind="stable")]
        if rows.size == 0:
            continue
        block = min(per_class, rows.size)
        starts = (
            np.linspace(0, rows.size - block, n_devices).round().astype(int)
            if n_devices * block > rows.size
            else np.arange(n_devices) * block
        )
        for j, start in enumerate(starts):
            parts[j].append(rows[start : start + block])
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def _load_agent(toml: Path, node=None):
    """The agent of ``toml``; with ``node`` (host, port) it connects there instead."""
    from biofed.config import DeviceConfig, load_config
    from biofed.edge.agent import EdgeAgent

    config = load_config(toml, DeviceConfig)
    if node is not None:
        config = config.model_copy(
            update={"broker": config.broker.model_copy(update={"host": node[0], "port": node[1]})}
        )
    return EdgeAgent(config)


# ----------------------------------------------------------------------------- the fleet
class SimulatedFleet:
    """Many :class:`~biofed.edge.agent.EdgeAgent` s served by one pool of threads.

    Parameters
    ----------
    agents : sequence of EdgeAgent
        The devices (their stores already filled, or filled by :meth:`ingest`).
    workers : int
        Dispatcher threads; device ``i`` is served by thread ``i % workers``.
    plan : FaultPlan, optional
        Slow and duplicating devices (the round-triggered faults are the caller's).
    """

    def __init__(self, agents: Sequence, *, workers: int = 4, plan: FaultPlan | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.agents = list(agents)
        self.plan = plan or FaultPlan()
        ids = [a.device_id for a in self.agents]
        self.slow = self.plan.pick(ids, self.plan.slow_fraction, salt=1)
        self.duplicating = self.plan.pick(ids, self.plan.duplicate_fraction, salt=2)
        self._stop = threading.Event()
        self._shards = [queue.Queue(maxsize=10_000) for _ in range(workers)]
        self._threads: list[threading.Thread] = []
        self._delayed: list[tuple[float, int, int, object]] = []
        self._delayed_cv = threading.Condition()
        self._sequence = 0
        self.late_published = 0
        self.duplicates_published = 0
        self._network: NetworkLoop | None = None

    @property
    def network(self) -> NetworkLoop:
        """The one network thread serving every device's MQTT connection (started on first use)."""
        if self._network is None:
            self._network = NetworkLoop()
        return self._network

    @classmethod
    def from_configs(cls, tomls, **kwargs) -> SimulatedFleet:
        """A fleet of the agents of the device config files ``tomls``."""
        return cls([_load_agent(Path(toml)) for toml in tomls], **kwargs)

    def launch(self) -> threading.Thread:
        """Ingest every device's recordings, then open every session, in a background thread
        (``biofed demo`` runs its fleet this way while it watches the coordinator)."""

        def run() -> None:
            try:
                from biofed.edge.warmup import warmup

                warmup()
                self.ingest()
                if not self._stop.is_set():
                    self.start()
            except Exception:  # noqa: BLE001 - reported; the coordinator then times out waiting
                logger.exception("the simulated fleet failed to start")

        thread = threading.Thread(target=run, name="fleet-launch", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def ingest(self, threads: int = 2) -> int:
        """Run every agent's :meth:`~EdgeAgent.ingest` (a small pool: the kernels are shared);
        returns the rows added."""
        with ThreadPoolExecutor(threads, thread_name_prefix="ingest") as pool:
            return sum(pool.map(lambda agent: agent.ingest(self._stop), self.agents))

    def start(self, connect_threads: int = 16) -> None:
        """Start the dispatcher, then open every device's session (in parallel)."""
        for k, shard in enumerate(self._shards):
            thread = threading.Thread(target=self._serve, args=(shard,), name=f"fleet-{k}", daemon=True)
            thread.start()
            self._threads.append(thread)
        for target, name in ((self._watch_connections, "fleet-reconnect"), (self._run_delayed, "fleet-delayed")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

        def open_one(index: int) -> bool:
            shard = self._shards[index % len(self._shards)]
            return self.agents[index].open_session(
                self._stop, on_message=lambda inbound: self._enqueue(shard, (index, inbound)), network=self.network
            )

        with ThreadPoolExecutor(connect_threads, thread_name_prefix="connect") as pool:
            opened = sum(pool.map(open_one, range(len(self.agents))))
        logger.info("%d of %d simulated devices online", opened, len(self.agents))

    def _enqueue(self, shard: queue.Queue, item) -> None:
        while not self._stop.is_set():  # blocking holds the PUBACK, as a full agent inbox does
            try:
                shard.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Every device goes offline cleanly; the threads stop; the stores close."""
        self._stop.set()
        with self._delayed_cv:
            self._delayed_cv.notify_all()
        with ThreadPoolExecutor(16, thread_name_prefix="close") as pool:
            list(pool.map(lambda agent: agent.close_session(), self.agents))
        for thread in self._threads:
            thread.join(timeout=5.0)
        if self._network is not None:
            self._network.stop()
        for agent in self.agents:
            agent.close()

    def drop_connections(self, devices: set[str]) -> int:
        """Cut the TCP connection of ``devices`` without DISCONNECT (a network failure: the
        broker publishes their wills; paho reconnects them with backoff)."""
        dropped = 0
        for agent in self.agents:
            client = agent.mqtt
            if agent.device_id in devices and client is not None and client.drop_connection():
                dropped += 1
        return dropped

    # ------------------------------------------------------------------ threads
    def _serve(self, shard: queue.Queue) -> None:
        while not self._stop.is_set():
            try:
                index, inbound = shard.get(timeout=0.25)
            except queue.Empty:
                continue
            agent = self.agents[index]
            for out in agent.handle_message(inbound.topic, inbound.payload):
                self._emit(index, out)

    def _emit(self, index: int, out) -> None:
        agent = self.agents[index]
        is_update = out.topic == agent.topics.update(agent.device_id)
        if is_update and agent.device_id in self.slow:
            with self._delayed_cv:
                self._sequence += 1
                heapq.heappush(self._delayed, (time.monotonic() + self.plan.slow_delay_s, self._sequence, index, out))
                self._delayed_cv.notify()
            return
        agent.publish(out)
        if is_update and agent.device_id in self.duplicating:
            agent.publish(out)  # the same bytes, the same message id: a QoS 1 redelivery
            self.duplicates_published += 1

    def _run_delayed(self) -> None:
        while not self._stop.is_set():
            with self._delayed_cv:
                while not self._stop.is_set() and (not self._delayed or self._delayed[0][0] > time.monotonic()):
                    wait = self._delayed[0][0] - time.monotonic() if self._delayed else None
                    self._delayed_cv.wait(wait)
                if self._stop.is_set():
                    return
                _, _, index, out = heapq.heappop(self._delayed)
            self.agents[index].publish(out)
            self.late_published += 1

    def _watch_connections(self) -> None:
        while not self._stop.wait(0.5):
            for agent in self.agents:
                agent.check_connection()


# ----------------------------------------------------------------------------- observation
@dataclass
class RoundTiming:
    round: int
    phase: str
    task_at: float
    task_bytes: int
    updates: list[tuple[float, str, int]] = field(default_factory=list)
    closed_at: float | None = None
    result_bytes: int = 0


class FleetWatcher:
    """Subscribes to the task, model, basis and update topics and timestamps them
    (``time.monotonic``); calls ``on_task(round, phase, train_ordinal)`` for each new task."""

    def __init__(
        self,
        broker,
        protocol: str,
        on_task: Callable[[int, str, int], None] | None = None,
        username: str | None = None,
        password: str | None = None,
        network=None,
    ) -> None:
        from biofed.mqtt import MqttClient
        from biofed.protocol import Topics

        self.topics = Topics(FLEET)
        self.rounds: dict[int, RoundTiming] = {}
        self.train_ordinal = 0
        self._on_task = on_task
        self._lock = threading.Lock()
        self.client = MqttClient(
            broker.host,
            broker.port,
            "simulate-watcher",
            protocol=protocol,
            clean=True,
            on_message=self._handle,
            username=username,
            password=password,
            network=network,
        )

    def start(self) -> FleetWatcher:
        self.client.connect()
        for topic in (
            self.topics.task,
            self.topics.model,
            self.topics.basis,
            self.topics.all_devices("update"),
            self.topics.all_devices("sketch"),
        ):
            self.client.subscribe(topic, qos=1)
        return self

    def stop(self) -> None:
        self.client.close()

    def _handle(self, inbound) -> None:
        from biofed.protocol import Basis, Model, ProtocolError, Sketch, Task, Update, decode_topic_message

        now = time.monotonic()
        if inbound.retain:
            return  # a retained copy from before this subscription
        try:
            message = decode_topic_message(self.topics, inbound.topic, inbound.payload)
        except ProtocolError:
            return
        payload = message.payload
        fire = None
        with self._lock:
            if isinstance(payload, Task) and payload.round not in self.rounds:
                self.rounds[payload.round] = RoundTiming(payload.round, payload.phase, now, len(inbound.payload))
                if payload.phase == "train":
                    self.train_ordinal += 1
                    fire = (payload.round, payload.phase, self.train_ordinal)
            elif isinstance(payload, (Update, Sketch)) and payload.round in self.rounds:
                self.rounds[payload.round].updates.append((now, message.sender, len(inbound.payload)))
            elif isinstance(payload, (Model, Basis)) and payload.round in self.rounds:
                timing = self.rounds[payload.round]
                timing.closed_at = timing.closed_at or now
                timing.result_bytes = len(inbound.payload)
        if fire is not None and self._on_task is not None:
            threading.Thread(target=self._on_task, args=fire, daemon=True).start()

    def summary(self, accepted: Mapping[int, set[str]]) -> dict:
        """Per closed round: close latency after its last *accepted* update, updates/s and
        bytes per update; p50/p95 over the rounds."""
        rows = []
        with self._lock:
            for timing in sorted(self.rounds.values(), key=lambda r: r.round):
                devices = accepted.get(timing.round)
                if timing.closed_at is None or not devices:
                    continue
                arrivals = [(t, s, n) for t, s, n in timing.updates if s in devices and t <= timing.closed_at]
                if not arrivals:
                    continue
                first, last = min(a[0] for a in arrivals), max(a[0] for a in arrivals)
                rows.append(
                    {
                        "round": timing.round,
                        "phase": timing.phase,
                        "devices": len(devices),
                        "close_after_last_update_s": round(timing.closed_at - last, 4),
                        "task_to_close_s": round(timing.closed_at - timing.task_at, 3),
                        "updates_per_s": round(len(arrivals) / max(last - first, 1e-6), 1),
                        "bytes_per_update": int(np.mean([a[2] for a in arrivals])),
                        # what one device moves: the task and the round's result in, its reply out
                        "bytes_per_device": int(np.mean([a[2] for a in arrivals]))
                        + timing.task_bytes
                        + timing.result_bytes,
                    }
                )
        train = [r for r in rows if r["phase"] == "train"]
        latencies = [r["close_after_last_update_s"] for r in train]
        return {
            "rounds": rows,
            "updates_per_s": float(np.median([r["updates_per_s"] for r in train])) if train else None,
            "bytes_per_device_per_round": int(np.mean([r["bytes_per_device"] for r in train])) if train else None,
            "close_latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "close_latency_p95_s": float(np.percentile(latencies, 95)) if latencies else None,
        }


# ----------------------------------------------------------------------------- checks
def _accepted_by_round(state_dir: Path) -> dict[int, list[tuple[str, str]]]:
    from biofed.coordinator.state import DB_NAME

    db = sqlite3.connect(f"file:{state_dir / DB_NAME}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT message_id, round, device_id FROM accepted").fetchall()
    finally:
        db.close()
    out: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for message_id, round_, device in rows:
        out[round_].append((message_id, device))
    return out


def check_federation(state_dir: Path, *, expected_train_rounds: int | None = None, restarts: int = 0) -> list[str]:
    """Problems with the coordinator's committed state (empty: all invariants hold).

    Checks: no device counted twice in a round; every committed round's ``n_devices`` equals
    its accepted messages; no accepted message outside a committed round; the ledger has
    charged every committed basis, statistics and training round (and at most one more per coordinator
    restart: a round is charged durably before its release, so a crash in between
    over-counts); the last reported epsilon equals dp-accounting's (RDP) over what the ledger
    charged; ``expected_train_rounds`` rounds trained.
    """
    from biofed.coordinator.state import CoordinatorState
    from biofed.privacy_ledger import PrivacyLedger, make_accountant

    state_dir = Path(state_dir)
    problems = []
    store = CoordinatorState(state_dir, FLEET)
    try:
        history = store.history()
        snapshot = store.load()
    finally:
        store.close()
    accepted = _accepted_by_round(state_dir)
    committed = {r.round: r for r in history}
    for round_, rows in accepted.items():
        devices = [d for _, d in rows]
        if len(set(devices)) != len(devices):
            problems.append(
                f"round {round_}: a device counted twice ({len(devices)} rows, {len(set(devices))} devices)"
            )
        if round_ not in committed:
            problems.append(f"round {round_}: {len(rows)} accepted messages but no committed round")
    for record in history:
        n = len(accepted.get(record.round, []))
        if n != record.n_devices:
            problems.append(f"round {record.round} ({record.phase}): n_devices {record.n_devices} but {n} accepted")
    if snapshot is None or snapshot.ledger is None:
        return problems + ["no committed ledger"]
    ledger = PrivacyLedger.from_json(snapshot.ledger)
    for kind, phases in (("basis", ("moments", "covariance")), ("statistics", ("statistics",)), ("train", ("train",))):
        rounds = [r.round for r in history if r.phase in phases]
        charged = ledger.count(kind)
        # charged durably before release: a crash between charge and commit over-counts, never under
        if not len(rounds) <= charged <= len(rounds) + restarts:
            problems.append(f"ledger charged {charged} {kind} rounds for {len(rounds)} committed ({restarts} restarts)")
    last = next((r for r in reversed(history) if r.epsilon_rdp is not None), None)
    if last is not None and math.isfinite(last.epsilon_rdp):
        accountant = make_accountant("rdp")  # dp-accounting itself, over what the ledger charged
        for group in ledger.groups:
            accountant.compose(group.event)
        fresh = accountant.get_epsilon(ledger.delta)
        if not math.isclose(fresh, last.epsilon_rdp, rel_tol=1e-9):
            problems.append(f"reported epsilon {last.epsilon_rdp} != dp-accounting's {fresh} for the charged rounds")
    trained = sum(1 for r in history if r.phase == "train")
    if expected_train_rounds is not None and trained != expected_train_rounds:
        problems.append(f"{trained} training rounds committed, expected {expected_train_rounds}")
    return problems


# ----------------------------------------------------------------------------- run
@dataclass(frozen=True)
class FleetOptions:
    """What ``biofed simulate`` adds to the demo's settings."""

    workers: int = 4
    windows_per_device: int = WINDOWS_PER_DEVICE
    plan: FaultPlan | None = None
    cluster: object | None = None
    """A running :class:`biofed.apps.rabbitmq.RabbitCluster` to use instead of a broker of our own:
    the coordinator connects to its first node, device ``i`` to node ``i % len(nodes)``,
    over MQTT 3.1.1, with a :class:`~biofed.apps.rabbitmq.RetainedMirror` running."""


def _source_files(settings: DemoSettings, n_sources: int) -> dict[str, list[Path]]:
    if settings.data is not None:
        devices = eegmat_devices(Path(settings.data))
        if not devices:
            raise DemoError(f"no eegmat subjects (SubjectNN_1.edf + SubjectNN_2.edf) found in {settings.data}")
        return dict(list(devices.items())[:n_sources])
    return write_synthetic_devices(
        settings.out / "data", n_sources, duration_s=settings.synthetic_seconds, random_state=settings.seed
    )


def build_agents(
    settings: DemoSettings,
    options: FleetOptions,
    host: str,
    port: int,
    protocol: str,
    nodes: Sequence[tuple[str, int]] = (),
    login: Mapping | None = None,
):
    """``(agents, device_tomls, rss_base)``: the fleet's configs written, its stores filled;
    ``rss_base`` is the process RSS before the fleet's agents existed (imports, compiled
    kernels and, for dealt devices, the source recordings' ingestion included). With
    ``nodes``, device ``i`` connects to ``nodes[i % len(nodes)]``; ``login`` (user name and
    password) goes into every broker config."""
    from biofed.apps.demo import CLASSES
    from biofed.edge.warmup import warmup

    warmup()  # every kernel signature the agents use, compiled (or loaded) once for all of them
    process = psutil.Process()

    n = settings.devices or SYNTHETIC_DEVICES
    n_sources = n if settings.data is not None else min(n, SYNTHETIC_DEVICES)
    sources = _source_files(settings, n_sources)
    if len(sources) >= n:
        _, tomls = write_configs(settings, dict(list(sources.items())[:n]), host, port, protocol, broker_extra=login)
        rss_base = process.memory_info().rss
        agents = [_load_agent(toml, nodes[i % len(nodes)] if nodes else None) for i, toml in enumerate(tomls.values())]
        rows = SimulatedFleet(agents).ingest()
        click.echo(f"{len(agents)} devices ingested their own recordings: {rows} windows")
        return agents, tomls, rss_base
    per_source = math.ceil(n / len(sources))
    names = {source: [f"{source}-{j:04d}" for j in range(per_source)] for source in sources}
    flat = [name for group in names.values() for name in group][:n]
    _, tomls = write_configs(settings, {name: [] for name in flat}, host, port, protocol, broker_extra=login)
    source_settings = replace(settings, out=settings.out / "sources")
    _, source_tomls = write_configs(source_settings, sources, host, port, protocol, broker_extra=login)
    source_agents = [_load_agent(toml) for toml in source_tomls.values()]
    SimulatedFleet(source_agents).ingest()
    rss_base = process.memory_info().rss
    agents = []
    for source_agent in source_agents:
        X, labels, t = source_agent.store.read()
        members = [name for name in names[source_agent.device_id] if name in tomls]
        for name, rows in zip(members, split_windows(labels, t, len(members), options.windows_per_device, CLASSES)):
            agent = _load_agent(tomls[name], nodes[len(agents) % len(nodes)] if nodes else None)
            agent.store_windows(
                X[rows],
                labels[rows],
                t[rows],
                layout_hash=source_agent.store.layout_hash,
                layout_json=source_agent.layout_json,
                source=f"split:{source_agent.device_id}",
            )
            agents.append(agent)
        source_agent.close()
    click.echo(
        f"{len(agents)} devices dealt from {len(sources)} sources ({options.windows_per_device} windows per class each)"
    )
    return agents, tomls, rss_base


class _Coordinator:
    """The coordinator process; restartable after ``kill -9``."""

    def __init__(self, toml: Path, logs: Path, timeout_s: float) -> None:
        self.toml, self.logs, self.timeout_s = toml, logs, timeout_s
        self.starts = 0
        self.child = None

    def start(self) -> None:
        self.starts += 1
        self.child = spawn(
            "coordinator",
            ["coordinator", "--config", str(self.toml), "--discovery-timeout", repr(self.timeout_s)],
            self.logs / f"coordinator-{self.starts}.log",
        )

    def kill9(self) -> None:
        os.kill(self.child.process.pid, signal.SIGKILL)
        self.child.process.wait()


def _reserve_open_files(n_devices: int) -> None:
    """Raise the open-file limit for ``n_devices`` before the broker starts: Mosquitto, started
    from this process, inherits the limit and holds one socket per device."""
    try:
        ensure_open_files(FDS_PER_DEVICE * n_devices + FD_HEADROOM, f"a simulation of {n_devices} devices")
    except FileLimitError as exc:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard == resource.RLIM_INFINITY:
            raise DemoError(str(exc)) from None
        most = max(hard - FD_HEADROOM, 0) // FDS_PER_DEVICE
        raise DemoError(
            f"{exc} Within the hard limit of {hard}, one process simulates at most {most} devices."
        ) from None


def run_simulation(settings: DemoSettings, options: FleetOptions = FleetOptions()) -> dict:
    """Run a federation of ``settings.devices`` simulated devices; returns the summary
    (also written to ``summary.json``). Raises :class:`DemoError` when it cannot finish."""
    from biofed.apps.broker import start_embedded_broker, start_mosquitto

    out = settings.out.resolve()
    settings = replace(settings, out=out)
    for stale in ("state", "devices", "sources", "logs"):
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    plan = options.plan
    if plan is not None and plan.broker_restart and not settings.mosquitto:
        raise DemoError("the broker restart fault needs --mosquitto (the embedded broker keeps no sessions)")
    _reserve_open_files(settings.devices or SYNTHETIC_DEVICES)
    process = psutil.Process()
    cluster = options.cluster
    if cluster is not None:
        from biofed.apps.rabbitmq import RetainedMirror
        from biofed.protocol import Topics

        broker, protocol = cluster.nodes[0], "3.1.1"
        topics = Topics(FLEET)
        login = {"username": cluster.username, "password": cluster.password}
        mirror = RetainedMirror(
            cluster.nodes, [topics.task, topics.basis, topics.model, topics.all_devices("status")], **login
        ).start()
        nodes = [(node.host, node.port) for node in cluster.nodes]
    else:
        broker = start_mosquitto(out / "mosquitto") if settings.mosquitto else start_embedded_broker()
        protocol, mirror, nodes, login = ("5" if settings.mosquitto else "3.1.1"), None, [], {}
    holder = {"broker": broker}
    coordinator_rss_mb: dict[int, float] = {}  # training round ordinal -> coordinator RSS when its task appeared
    coordinator = fleet = watcher = None
    faults: list[str] = []
    try:
        started = time.monotonic()
        agents, tomls, rss_before = build_agents(settings, options, broker.host, broker.port, protocol, nodes, login)
        fleet = SimulatedFleet(agents, workers=options.workers, plan=plan)
        ids = [a.device_id for a in agents]
        coordinator = _Coordinator(out / "coordinator.toml", out / "logs", settings.timeout_s)

        def on_task(round_: int, phase: str, ordinal: int) -> None:
            try:  # the coordinator's RSS as each training round opens: flat memory shows here
                coordinator_rss_mb[ordinal] = round(
                    psutil.Process(coordinator.child.process.pid).memory_info().rss / 1e6, 1
                )
            except psutil.Error:
                pass
            if plan is None:
                return
            time.sleep(plan.action_delay_s)
            fraction = plan.drop.get(ordinal, 0.0)
            if fraction:
                n = fleet.drop_connections(plan.pick(ids, fraction, salt=100 + ordinal))
                faults.append(f"round {round_} (training round {ordinal}): dropped {n} device connections")
            if ordinal in plan.broker_restart:
                current = holder["broker"]
                current.stop()
                time.sleep(plan.broker_down_s)
                holder["broker"] = start_mosquitto(current.directory, current.port, host=current.host)
                faults.append(f"round {round_} (training round {ordinal}): broker restarted")
            if ordinal in plan.coordinator_kill:
                coordinator.kill9()
                coordinator.start()
                faults.append(f"round {round_} (training round {ordinal}): coordinator kill -9, restarted")
            logger.info("fault: %s", faults[-1] if faults else "none")

        watcher = FleetWatcher(broker, protocol, on_task=on_task, network=fleet.network, **login).start()
        coordinator.start()
        if cluster is not None:  # RabbitMQ: no retained statuses for its status/+ subscription
            _wait_for_session(cluster, f"coordinator-{FLEET}", coordinator, settings.timeout_s)
        fleet.start()
        rss_fleet = process.memory_info().rss
        ready_s = time.monotonic() - started
        click.echo(
            f"{len(agents)} simulated devices online in {ready_s:.1f} s; "
            f"{(rss_fleet - rss_before) / len(agents) / 1e6:.2f} MB per device"
        )
        usage: dict[int, tuple[float, int]] = {}  # coordinator pid -> (CPU seconds, peak RSS)
        broker_usage: dict[int, tuple[float, int]] = {}
        while True:
            child = coordinator.child
            _sample(child.process.pid, usage)
            if cluster is None and settings.mosquitto:
                _sample(holder["broker"].process.pid, broker_usage)
            code = child.process.poll()
            if code is not None and child is coordinator.child:
                break
            if time.monotonic() - started > settings.timeout_s:
                raise DemoError(
                    f"the simulated federation did not finish within {settings.timeout_s:g} s\n{child.tail()}"
                )
            time.sleep(0.2)
        if code != 0:
            raise DemoError(f"the coordinator exited with code {code}\n{coordinator.child.tail()}")
        elapsed = time.monotonic() - started
        rss_peak = process.memory_info().rss
    finally:
        if watcher is not None:
            watcher.stop()
        if fleet is not None:
            fleet.close()
        if coordinator is not None and coordinator.child is not None:
            terminate([coordinator.child])
        if mirror is not None:
            mirror.stop()
        if cluster is None:
            holder["broker"].stop()
    state = out / "state"
    accepted = {r: {d for _, d in rows} for r, rows in _accepted_by_round(state).items()}
    timing = watcher.summary(accepted)
    problems = check_federation(state, expected_train_rounds=settings.rounds, restarts=coordinator.starts - 1)
    records = json.loads((state / "rounds.json").read_text())
    summary = {
        "devices": len(ids),
        "rounds": settings.rounds,
        "broker": (
            f"rabbitmq cluster ({len(cluster.nodes)} nodes)"
            if cluster is not None
            else "mosquitto"
            if settings.mosquitto
            else "amqtt"
        ),
        "wall_s": round(elapsed, 1),
        "ready_s": round(ready_s, 1),
        "memory_per_device_mb": round((rss_fleet - rss_before) / len(ids) / 1e6, 3),
        "process_rss_mb": round(rss_peak / 1e6, 1),
        "faults": faults,
        "slow_devices": len(fleet.slow),
        "duplicating_devices": len(fleet.duplicating),
        "late_published": fleet.late_published,
        "duplicates_published": fleet.duplicates_published,
        "devices_per_broker": dict(sorted(_count(f"{a.config.broker.host}:{a.config.broker.port}" for a in agents))),
        "coordinator_starts": coordinator.starts,
        "problems": problems,
        **timing,
        "coordinator_cpu_s": round(sum(cpu for cpu, _ in usage.values()), 2),
        "coordinator_rss_mb": round(max((rss for _, rss in usage.values()), default=0) / 1e6, 1),
        "broker_rss_mb": round(max((rss for _, rss in broker_usage.values()), default=0) / 1e6, 1),
        "coordinator_rss_mb_by_round": dict(sorted(coordinator_rss_mb.items())),
        "first_round_s": _first_round_s(watcher, started),
        "epsilon": records[-1].get("epsilon_rdp") if records else None,
        "balanced_accuracy": next((r.get("balanced_accuracy") for r in records if r["phase"] == "evaluate"), None),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for line in faults:
        click.echo(f"fault: {line}")
    click.echo(
        f"{len(ids)} devices, {sum(1 for r in records if r['phase'] == 'train')} training rounds in "
        f"{elapsed:.0f} s; round close after the last accepted update p50 "
        f"{_seconds(timing['close_latency_p50_s'])}, p95 {_seconds(timing['close_latency_p95_s'])}; first round "
        f"closed {summary['first_round_s']} s after start; {summary['memory_per_device_mb']:.2f} MB per device, "
        f"RSS {summary['process_rss_mb']:.0f} MB (devices) + {summary['coordinator_rss_mb']:.0f} MB (coordinator)"
        f" + {summary['broker_rss_mb']:.0f} MB (broker); evaluation balanced accuracy "
        f"{summary['balanced_accuracy']}; epsilon {summary['epsilon']}"
    )
    click.echo("checks: " + ("all invariants hold" if not problems else "; ".join(problems)))
    return summary


def _wait_for_session(cluster, client_id: str, coordinator: _Coordinator, timeout_s: float) -> None:
    """Wait until ``client_id``'s persistent session queue exists on the cluster."""
    deadline = time.monotonic() + timeout_s
    while not cluster.session_exists(client_id):
        if coordinator.child.process.poll() is not None or time.monotonic() > deadline:
            raise DemoError(f"the coordinator never subscribed on the cluster\n{coordinator.child.tail()}")
        time.sleep(0.2)


def _first_round_s(watcher: FleetWatcher, started: float) -> float | None:
    """Seconds from the simulation's start to the close of the first round."""
    closed = [r.closed_at for r in watcher.rounds.values() if r.closed_at is not None]
    return round(min(closed) - started, 1) if closed else None


def _count(values) -> list[tuple[str, int]]:
    counts: dict[str, int] = defaultdict(int)
    for value in values:
        counts[value] += 1
    return list(counts.items())


def _sample(pid: int, usage: dict[int, tuple[float, int]]) -> None:
    """Record the CPU seconds and peak RSS of process ``pid`` so far."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            cpu = proc.cpu_times()
            rss = proc.memory_info().rss
    except psutil.Error:
        return
    previous = usage.get(pid, (0.0, 0))
    usage[pid] = (cpu.user + cpu.system, max(rss, previous[1]))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


@click.command(
    "simulate",
    epilog=examples(
        "biofed simulate --devices 1000 --rounds 3 --mosquitto --noise-multiplier 0",
        "biofed simulate --devices 100 --mosquitto --faults --deadline 10 --min-devices 50",
        "biofed simulate --data /work/shared/datasets/eegmat --devices 34 --mosquitto",
    ),
)
@click.option(
    "--devices",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Simulated devices (all in this process).",
)
@click.option(
    "--algorithm",
    type=click.Choice(sorted(ALGORITHM_ROUNDS)),
    default=DemoSettings.algorithm,
    show_default=True,
    help="fedavg: DP-FedAvg training rounds; one_shot: one private release of the class statistics (ridge "
    "LDA, as `biofed demo`), then --rounds fine-tuning rounds.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Training rounds (after one_shot: fine-tuning rounds; >= 1 with fedavg).",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="eegmat folder: its subjects are the sources (default: synthetic sources).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("biofed-simulate"),
    show_default=True,
    help="Report folder (configs, logs, stores, summary.json).",
)
@click.option(
    "--windows-per-device",
    type=click.IntRange(min=5),
    default=WINDOWS_PER_DEVICE,
    show_default=True,
    help="Windows of each class a device dealt from a source gets.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Dispatcher threads serving all devices.",
)
@click.option(
    "--deadline",
    "round_deadline_s",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="Round deadline (s).",
)
@click.option(
    "--min-devices",
    type=click.IntRange(min=1),
    default=None,
    help="Replies a round needs (default: all devices; lower it with faults).",
)
@click.option(
    "--sampling-rate",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    help="Poisson sampling rate q of the training rounds (default: every device every round); lower "
    "--min-devices to match.",
)
@click.option(
    "--faults",
    is_flag=True,
    help="Run the seeded fault schedule (needs --mosquitto): connection drops, a broker restart, a "
    "coordinator kill -9, slow and duplicating devices; then check every invariant.",
)
@click.option("--fault-seed", type=int, default=0, show_default=True, help="Seed of the fault schedule.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=1800.0,
    show_default=True,
    help="Global timeout (s).",
)
@federation_options(seed_help="Seed of the synthetic data.")
@logging_options(default_level="warning")
def simulate_command(windows_per_device, workers, sampling_rate, faults, fault_seed, **options) -> None:
    """Run a federation of many simulated devices in this one process over a real broker.

    Every device is a real edge agent with its own MQTT session, keys and feature store;
    the coordinator is its own process.
    """
    settings = DemoSettings(**options, sampling_rate="all" if sampling_rate is None else sampling_rate)
    plan = FaultPlan.standard(fault_seed, settings.round_deadline_s) if faults else None
    if faults and settings.min_devices is None:  # slow and dropped devices must not stall every round
        settings = replace(settings, min_devices=max(1, settings.devices // 2))
    try:
        summary = run_simulation(
            settings, FleetOptions(workers=workers, windows_per_device=windows_per_device, plan=plan)
        )
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    if summary["problems"]:
        raise click.ClickException("the federation's invariants do not hold: " + "; ".join(summary["problems"]))
