"""Prometheus metrics of the coordinator and the device agent (``prometheus_client``).

Each process keeps its metrics in its own :class:`prometheus_client.CollectorRegistry`
(so several coordinators or agents in one process, as in the tests and the demo, never
share series) and serves them on ``http://HOST:PORT/metrics`` when its config has
``[metrics] port`` (:func:`serve`). The round loops call a few hooks (bytes moved, a round
opened or closed, a task answered, windows stored); everything else is read from the
process's own state when Prometheus scrapes, so the loops carry no bookkeeping.

Coordinator series (prefix ``biofed_coordinator_``)::

    rounds_total{phase}                      closed rounds
    round{phase}                             number of the last closed round
    train_rounds_done                        training rounds committed
    round_duration_seconds{phase}            histogram: task published -> round committed
    devices_online / devices_known           devices whose retained status is not "offline" / ever seen
    updates_accepted_total{kind}             update, sketch and secagg messages accepted into a round
    messages_rejected_total{reason}          messages dropped, by reason (bad signature, late, ...)
    epsilon_spent{accountant}                privacy spent (dp-accounting, at delta)
    epsilon_budget                           dp.epsilon_budget (absent without a budget)
    delta                                    dp.delta
    received_bytes_total / sent_bytes_total  MQTT payload bytes in and out
    state{state}                             1 for the current run state

Agent series (prefix ``biofed_agent_``)::

    windows_ingested_total                   feature windows stored since start
    last_task_round / last_task_timestamp_seconds{phase}   the last task answered
    received_bytes_total / sent_bytes_total  MQTT payload bytes in and out
    state{state}                             1 for the current agent state

Both registries also carry ``process_resident_memory_bytes`` (RSS), CPU seconds and open
file descriptors (:class:`prometheus_client.ProcessCollector`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from biofed.config import MetricsSettings

logger = logging.getLogger(__name__)

ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
"""Round latency histogram buckets (seconds): from a fast loopback round to a full deadline."""


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it."""

    def __init__(self, registry: CollectorRegistry, settings: MetricsSettings) -> None:
        try:
            self._server, self._thread = start_http_server(settings.port, addr=settings.host, registry=registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {settings.host}:{settings.port}: {exc}") from None
        self.host, self.port = self._server.server_address[:2]
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, settings: MetricsSettings) -> MetricsServer | None:
    """Serve ``registry`` as configured (None when ``settings.port`` is None).

    Raises
    ------
    OSError
        The port is taken or the address is not local.
    """
    return None if settings.port is None else MetricsServer(registry, settings)


def _state_family(name: str, doc: str, states: Any, current: Any) -> GaugeMetricFamily:
    """One series per member of the enum ``states``: 1 for ``current``, else 0."""
    family = GaugeMetricFamily(name, doc, labels=["state"])
    for state in states:
        family.add_metric([state.value], 1.0 if state is current else 0.0)
    return family


class CoordinatorMetrics(Collector):
    """The coordinator's registry: hook counters plus the state read at scrape time.

    Parameters
    ----------
    coordinator : biofed.coordinator.server.Coordinator
        Read at scrape time: ``ingest`` (online, known, dropped), ``state``, ``config.dp``.
    """

    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator
        self.registry = CollectorRegistry()
        prefix = "biofed_coordinator_"
        self.rounds = Counter(prefix + "rounds", "Closed rounds", ["phase"], registry=self.registry)
        self.round_number = Gauge(
            prefix + "round", "Number of the last closed round", ["phase"], registry=self.registry
        )
        self.round_duration = Histogram(
            prefix + "round_duration_seconds",
            "Task published -> round committed",
            ["phase"],
            buckets=ROUND_BUCKETS,
            registry=self.registry,
        )
        self.accepted = Counter(
            prefix + "updates_accepted", "Device replies accepted into a round", ["kind"], registry=self.registry
        )
        self.received_bytes = Counter(prefix + "received_bytes", "MQTT payload bytes received", registry=self.registry)
        self.sent_bytes = Counter(prefix + "sent_bytes", "MQTT payload bytes published", registry=self.registry)
        self._opened: dict[int, float] = {}
        self._epsilons: dict[str, float] = {}
        self._lock = threading.Lock()
        self.registry.register(self)
        ProcessCollector(registry=self.registry)

    # hooks of the round loop
    def received(self, topic: str, nbytes: int, result: str) -> None:
        """One inbound message of ``nbytes`` that :meth:`Ingest.handle` answered ``result``."""
        self.received_bytes.inc(nbytes)
        if result == "accepted":
            parts = topic.split("/")
            self.accepted.labels(parts[2] if len(parts) > 2 else "unknown").inc()

    def sent(self, nbytes: int) -> None:
        self.sent_bytes.inc(nbytes)

    def round_opened(self, round_: int) -> None:
        with self._lock:
            self._opened[round_] = time.time()

    def round_closed(self, record: Any) -> None:
        """A committed :class:`~biofed.coordinator.state.RoundRecord`."""
        self.rounds.labels(record.phase).inc()
        self.round_number.labels(record.phase).set(record.round)
        with self._lock:
            opened = self._opened.pop(record.round, None)
            self._opened.clear()  # rounds abandoned by a retry never close
        if opened is not None:
            self.round_duration.labels(record.phase).observe(max(0.0, record.finished - opened))
        self.set_epsilons({"rdp": record.epsilon_rdp, "pld": record.epsilon_pld})

    def set_epsilons(self, epsilons: dict[str, float | None]) -> None:
        with self._lock:
            self._epsilons.update({k: v for k, v in epsilons.items() if v is not None})

    # scrape
    def collect(self) -> Iterator[Metric]:
        coordinator = self._coordinator
        ingest = coordinator.ingest
        prefix = "biofed_coordinator_"
        yield GaugeMetricFamily(
            prefix + "devices_online", "Devices whose retained status is not offline", value=len(ingest.online)
        )
        yield GaugeMetricFamily(
            prefix + "devices_known", "Devices that ever published a status", value=len(ingest.known)
        )
        rejected = CounterMetricFamily(
            prefix + "messages_rejected", "Inbound messages dropped, by reason", labels=["reason"]
        )
        for reason, count in sorted(dict(ingest.dropped).items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            prefix + "train_rounds_done", "Training rounds committed", value=coordinator.snapshot.train_rounds_done
        )
        spent = GaugeMetricFamily(
            prefix + "epsilon_spent", "Privacy spent at delta (dp-accounting)", labels=["accountant"]
        )
        with self._lock:
            for accountant, value in sorted(self._epsilons.items()):
                spent.add_metric([accountant], value)
        yield spent
        dp = coordinator.config.dp
        if dp.epsilon_budget is not None:
            yield GaugeMetricFamily(prefix + "epsilon_budget", "dp.epsilon_budget", value=dp.epsilon_budget)
        yield GaugeMetricFamily(prefix + "delta", "dp.delta", value=dp.delta)
        yield _state_family(prefix + "state", "1 for the current run state", type(coordinator.state), coordinator.state)


class AgentMetrics(Collector):
    """The device agent's registry: windows stored and the last task (hooks), bytes and
    state (read from the agent at scrape time), RSS (process collector)."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self.registry = CollectorRegistry()
        prefix = "biofed_agent_"
        self.windows = Counter(
            prefix + "windows_ingested", "Feature windows stored since start", registry=self.registry
        )
        self.last_task_round = Gauge(
            prefix + "last_task_round", "Round of the last task answered", registry=self.registry
        )
        self.last_task_time = Gauge(
            prefix + "last_task_timestamp_seconds",
            "Unix time of the last task answered",
            ["phase"],
            registry=self.registry,
        )
        self.registry.register(self)
        ProcessCollector(registry=self.registry)

    def stored(self, n_windows: int) -> None:
        self.windows.inc(n_windows)

    def task_answered(self, round_: int, phase: str) -> None:
        self.last_task_round.set(round_)
        self.last_task_time.labels(phase).set(time.time())

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        prefix = "biofed_agent_"
        yield CounterMetricFamily(prefix + "received_bytes", "MQTT payload bytes received", value=agent.bytes_received)
        yield CounterMetricFamily(prefix + "sent_bytes", "MQTT payload bytes published", value=agent.bytes_sent)
        yield CounterMetricFamily(prefix + "dropped_messages", "Inbound messages dropped", value=agent.dropped_messages)
        yield _state_family(prefix + "state", "1 for the current agent state", type(agent.state), agent.state)


__all__ = ["AgentMetrics", "CoordinatorMetrics", "MetricsServer", "ROUND_BUCKETS", "serve"]
