"""The MQTT device agent: a thin loop around ingestion, the task handlers and predictions.

Life of an agent (``biofed edge --config device.toml``)
-------------------------------------------------------
1. **Ingest.** :class:`~biofed.edge.ingestion.Ingestion` replays the configured recordings
   into the :class:`~biofed.edge.store.FeatureStore` (streams, device clock, and the store's
   ingestion ledger that makes a restart neither duplicate nor lose windows). With
   ``replay_speed == 0`` ingestion finishes before the agent connects; with a real-time speed
   it runs in a background thread while the agent already answers tasks with the rows stored
   so far (a live sensor). Live sources and watched folders run beside it
   (:class:`~biofed.edge.continuous.ContinuousIngestion`).
2. **Connect.** :class:`biofed.mqtt.MqttClient` with a persistent session under the stable
   client id ``device_id``, last will = retained ``Status("offline")``; then a retained
   ``Status("online", basis_version)`` and subscriptions to ``task``, ``basis``, ``model``
   and ``secagg_relay``. The first connection is retried with capped, jittered exponential
   backoff; later reconnects are paho's (see :mod:`biofed.mqtt`), after each of which the
   agent publishes its "online" status again (the broker may have published the will
   meanwhile).
3. **Serve.** Every inbound message goes through :meth:`EdgeAgent.handle_message`, which
   returns what to publish. Undecodable or invalid messages, duplicates (QoS 1 redelivery,
   retained re-delivery: :class:`~biofed.protocol.SeenMessageIds`), tasks whose deadline has
   passed, tasks that do not list this device, tasks for a basis version other than the
   device's and any other bad input are logged and dropped: the agent never dies on input.
   A task for a newer basis waits for it until its deadline; one for an older basis is
   refused. The answers themselves are the pure functions of :mod:`biofed.edge.tasks`.
4. **Stop.** SIGTERM/SIGINT set a stop event; the agent publishes a retained
   ``Status("offline")`` and disconnects cleanly.

Release gate
------------
In ``"local"`` and ``"distributed"`` trust modes the coordinator is the adversary, so the
device is the release gate (:class:`~biofed.edge.tasks.DeviceRelease`): its
:class:`~biofed.privacy_mechanism.PrivacyMechanism` clips, adds
``N(0, (Task.noise_multiplier * clip_norm)^2)`` to sketches and local-mode updates and charges
the device's own ledger durably (in the store's file) before the value is published. A
distributed-mode *training* update is instead secure-aggregated
(:mod:`biofed.edge.secure_aggregation`): the mechanism adds only the noise share of std
``noise_multiplier * clip_norm / sqrt(Task.secagg_threshold)``, the device sends an ``Update``
with an empty delta and its keys, and answers the coordinator's ``secagg_relay`` steps; the
delta leaves the device only masked. In those two modes nothing data-dependent travels in
cleartext, and the status never carries a row count. In ``"central"`` mode the device only
clips; the coordinator's mechanism noises and charges.

Signed messages
---------------
With ``signing_key_file`` the agent signs everything it publishes (its last will too);
with ``keys_dir`` it accepts only messages with a valid signature of a known, unrevoked
sender (:mod:`biofed.signing`), within ``max_clock_skew_s`` and never twice.

Personalization
---------------
With ``[personalization] enabled`` (the default) every global logistic-regression model
(each :class:`~biofed.protocol.Model`, and the evaluation task's model) is fine-tuned on the
device's own training windows (:func:`~biofed.edge.tasks.personal_model`). The personal
model stays in :attr:`EdgeAgent.personal`; its held-out balanced accuracy is logged beside
the global model's, and only in central trust mode does it travel, in the evaluation reply's
metrics.

Predictions
-----------
With ``predict = true`` every global :class:`~biofed.protocol.Model` goes to the device's
:class:`~biofed.edge.prediction.DevicePredictor`, and the agent publishes its
:class:`~biofed.protocol.Prediction` messages on ``prediction/{device_id}``: the newest
stored windows at once, then every new window as ingestion produces it. The device's layout
is reported in its status (``Status.layout``) and kept in the store, so a restarted agent
that ingests nothing new still reports it.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psutil

from biofed.config import ConfigError, DeviceConfig
from biofed.edge.ingestion import Ingestion
from biofed.edge.pipeline import FeatureRow, PipelineConfig
from biofed.edge.prediction import DevicePredictor
from biofed.edge.secure_aggregation import SecureAggregationParticipant
from biofed.edge.store import FeatureStore
from biofed.edge.tasks import (
    Admission,
    DeviceRelease,
    DeviceUsage,
    LocalData,
    PersonalModel,
    TaskRefused,
    admit,
    evaluate_reply,
    labelled_split,
    personal_model,
    sketch_reply,
    statistics_reply,
    train_locally,
    train_reply,
)
from biofed.kernels.random_state import check_random_state
from biofed.metrics import AgentMetrics
from biofed.mqtt import ConnectError, MqttClient, MqttError, Will
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import PrivacyMechanism
from biofed.protocol import (
    Basis,
    Message,
    Model,
    ProtocolError,
    ReplayedMessage,
    SeenMessageIds,
    Status,
    Task,
    Topics,
    decode_topic_message,
    encode_message,
    offline_status,
)
from biofed.secure_aggregation import SecAggError, SecAggRelay
from biofed.signing import signing_from_config

__all__ = ["AgentState", "EdgeAgent", "Outgoing"]

logger = logging.getLogger(__name__)

_PREDICT_ROWS = 64
"""Newest stored windows classified when ``predict`` is on and a new global model arrives."""


_OFFLINE_PUBLISH_TIMEOUT_S = 2.0
"""How long a stopping agent waits for the broker to acknowledge its "offline" status."""


class AgentState(enum.Enum):
    """What the agent is doing. ``recoverable``: the agent returns to serving by itself."""

    STARTING = ("starting", True)
    """Ingesting the configured recordings before the first connection."""
    CONNECTING = ("connecting", True)
    """Waiting for the broker (first connection, retried with backoff)."""
    IDLE = ("idle", True)
    """Connected, waiting for a task."""
    SKETCHING = ("sketching", True)
    """Computing a basis-phase or one-shot statistic."""
    TRAINING = ("training", True)
    """Evaluating the incoming model and training locally."""
    EVALUATING = ("evaluating", True)
    """Evaluating the final model (evaluate phase)."""
    STOPPING = ("stopping", False)
    """Shutdown requested: publishing the offline status, disconnecting."""
    STOPPED = ("stopped", False)
    """Disconnected; :meth:`EdgeAgent.run` has returned."""

    def __new__(cls, value: str, recoverable: bool) -> AgentState:
        member = object.__new__(cls)
        member._value_ = value
        member.recoverable = recoverable
        return member


@dataclass(frozen=True)
class Outgoing:
    """One message the agent wants published."""

    topic: str
    payload: bytes
    retain: bool = False


class EdgeAgent:
    """One device: feature store, MQTT session and the federated task handlers.

    Parameters
    ----------
    config : DeviceConfig
        The device's settings (``biofed edge --config``).
    random_state : None, int or numpy.random.Generator
        Drives only the minibatch shuffles of local training. DP noise always comes from a
        generator seeded from OS entropy.
    clock : callable
        Unix time source for deadlines (tests pass a fixed clock).
    """

    def __init__(self, config: DeviceConfig, *, random_state=None, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(config, DeviceConfig):
            raise TypeError(f"config must be a DeviceConfig, got {type(config).__name__}")
        self.config = config
        self.device_id = config.device_id
        self.topics = Topics(config.fleet)
        self.pipeline_config = PipelineConfig(
            window_s=config.pipeline.window_s, hop_s=config.pipeline.hop_s, n_mels=config.pipeline.n_mels
        )
        self._clock = clock
        self._train_rng = check_random_state(random_state)
        self._seen = SeenMessageIds(capacity=10_000)
        self._signer, self._verifier = signing_from_config(config, self.device_id)
        self._secagg: SecureAggregationParticipant | None = None
        self._answered: set[tuple[int, str]] = set()
        self._pending_task: Task | None = None
        self._lock = threading.RLock()
        self._state = AgentState.STARTING
        self.basis: Basis | None = None
        self.model: Model | None = None
        self.personal: PersonalModel | None = None
        """The latest global model fine-tuned on this device's windows (never sent)."""
        self.last_round = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.dropped_messages = 0
        self.rejections: Counter[str] = Counter()
        """Inbound messages not acted on, per reason (a :class:`~biofed.protocol.ProtocolError`
        class name, ``"duplicate"``, ``"secagg"`` or ``"internal error"``)."""
        self._process = psutil.Process()
        self.store = FeatureStore(config.store_path, max_rows=config.store_max_rows)
        self.mechanism = PrivacyMechanism(
            self._stored_ledger("client"), persist=lambda ledger: self._persist_ledger("client", ledger)
        )
        """The device's client-level release gate (local and distributed trust modes): every
        noised update, sketch and noise share is charged to the device's own ledger, durably
        (in the store's SQLite file), before it is published."""
        self.record_mechanism = PrivacyMechanism(
            self._stored_ledger("record"), persist=lambda ledger: self._persist_ledger("record", ledger)
        )
        """The record-level gate of DP-SGD (``[dp] record_noise_multiplier``): every step's
        noised gradient sum is charged to the device's record-level ledger."""
        self.release = DeviceRelease(self.mechanism)
        """Clips every statistic and update; noises and charges them through :attr:`mechanism`
        in local and distributed trust modes."""
        self._client: MqttClient | None = None
        self._downtime_seen = 0.0
        self.metrics = AgentMetrics(self)
        """Prometheus series (served on ``config.metrics`` while :meth:`run` runs)."""
        self.predictions = DevicePredictor(self.device_id)
        """The global model this device classifies its windows with (``predict = true``)."""
        self.ingestion = Ingestion(
            config,
            self.store,
            self.pipeline_config,
            on_rows=self._predict_rows,
            on_layout=self.predictions.set_layout,
            on_stored=self.metrics.stored,
        )
        """Recordings and live rows into :attr:`store`."""
        self.predictions.set_layout(self.ingestion.layout_json)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> AgentState:
        """The current :class:`AgentState`."""
        return self._state

    def _enter(self, state: AgentState) -> None:
        if state is not self._state:
            logger.debug("%s: %s -> %s", self.device_id, self._state.value, state.value)
            self._state = state

    @property
    def n_rows(self) -> int:
        """Feature windows in the store."""
        return len(self.store)

    @property
    def n_features(self) -> int | None:
        """Width d of the stored raw rows (None while the store is empty)."""
        X, _, _ = self.store.read(limit=1)
        return X.shape[1] if X.shape[0] else None

    @property
    def layout_json(self) -> str:
        """The device's feature layout (JSON of :class:`biofed.model.FeatureLayout`), "" until known."""
        return self.ingestion.layout_json

    @property
    def predictor(self):
        """The ONNX global model predictions are made with (:class:`~biofed.edge.inference.OnnxModel`; None: none)."""
        return self.predictions.model

    def close(self) -> None:
        """Close the store (idempotent)."""
        self.store.close()

    # ------------------------------------------------------------------ privacy
    def _stored_ledger(self, name: str) -> PrivacyLedger:
        ledger = PrivacyLedger(self.config.dp.delta, ("rdp",))
        text = self.store.privacy_ledger_json(name)
        if text is not None:
            ledger.extend(PrivacyLedger.from_json(text))
        return ledger

    def _persist_ledger(self, name: str, ledger: PrivacyLedger) -> None:
        self.store.save_privacy_ledger_json(name, ledger.to_json())

    def privacy_report(self) -> dict[str, float | None]:
        """The device's two guarantees at ``[dp] delta``, never mixed: ``client_epsilon``
        (its client-level ledger: what it released in local/distributed trust modes; 0.0
        when it released nothing itself) and ``record_epsilon`` (record-level DP-SGD; None
        when record-level DP is off)."""
        record = None if self.config.dp.record_noise_multiplier is None else self.record_mechanism.ledger.epsilon()
        return {
            "client_epsilon": self.mechanism.ledger.epsilon(),
            "record_epsilon": record,
            "delta": self.config.dp.delta,
        }

    # ------------------------------------------------------------------ data
    def ingest(self, stop: threading.Event | None = None, *, paths: Sequence[Path] | None = None) -> int:
        """Replay every configured recording (or ``paths``) not ingested yet into the store
        (:meth:`Ingestion.ingest <biofed.edge.ingestion.Ingestion.ingest>`); the rows added."""
        return self.ingestion.ingest(stop, paths=paths)

    def store_windows(
        self, X: np.ndarray, labels: Sequence[str], t: np.ndarray, *, layout_hash: str, layout_json: str, source: str
    ) -> int:
        """Add feature windows computed elsewhere (:meth:`Ingestion.store_windows
        <biofed.edge.ingestion.Ingestion.store_windows>`); the rows added."""
        return self.ingestion.store_windows(
            X, labels, t, layout_hash=layout_hash, layout_json=layout_json, source=source
        )

    def local_data(self, classes: Sequence[str]) -> LocalData:
        """The stored windows labelled with one of ``classes``, split by :func:`~biofed.edge.split.holdout_split`."""
        return labelled_split(*self.store.read(labels=classes), classes)

    def _predict_rows(self, rows: list[FeatureRow], offset: float) -> None:
        """Publish the prediction of new raw rows with the current global model (``predict``)."""
        prediction = self.predictions.predict_rows(rows, offset)
        if prediction is not None:
            self._publish(Outgoing(self.topics.prediction(self.device_id), self._encode(prediction)))

    # ------------------------------------------------------------------ messages
    def handle_message(self, topic: str, data: bytes) -> list[Outgoing]:
        """Process one inbound MQTT message; return the messages to publish.

        Never raises on bad input: decoding errors, invalid payloads, duplicates and
        unanswerable tasks are logged and dropped (an empty list is returned).
        """
        with self._lock:
            self.bytes_received += len(data)
            try:
                message = decode_topic_message(
                    self.topics, topic, data, max_bytes=self.config.broker.max_message_bytes, verifier=self._verifier
                )
            except ReplayedMessage as exc:
                # A retained task or model is delivered again at every reconnect: expected, not an attack sign.
                self.rejections[type(exc).__name__] += 1
                logger.debug("%s: dropped a message on %s: %s", self.device_id, topic, exc)
                return []
            except ProtocolError as exc:
                self.dropped_messages += 1
                self.rejections[type(exc).__name__] += 1
                logger.warning("%s: dropped a message on %s: %s", self.device_id, topic, exc)
                return []
            if not self._seen.add(message.message_id):
                self.rejections["duplicate"] += 1
                logger.debug("%s: duplicate %s message %s dropped", self.device_id, message.kind, message.message_id)
                return []
            try:
                return self._dispatch(message)
            except Exception:  # noqa: BLE001 - a long-running agent logs and drops, never dies on input
                self.dropped_messages += 1
                self.rejections["internal error"] += 1
                logger.exception(
                    "%s: failed to handle the %s message of round %d; dropped",
                    self.device_id,
                    message.kind,
                    message.round,
                )
                return []

    def _dispatch(self, message: Message) -> list[Outgoing]:
        answers = self.answer(message.payload)
        if answers is None:
            logger.debug("%s: ignoring a %s message", self.device_id, message.kind)
            return []
        return answers

    def answer(self, payload) -> list[Outgoing] | None:
        """Act on one decoded payload (:class:`~biofed.protocol.Basis`, ``Task``, ``Model`` or
        ``SecAggRelay``); the messages to publish. None: not a payload a device acts on."""
        if isinstance(payload, Basis):
            return self._on_basis(payload)
        if isinstance(payload, Task):
            return self._on_task(payload)
        if isinstance(payload, Model):
            return self._on_model(payload)
        if isinstance(payload, SecAggRelay):
            return self._on_secagg(payload)
        return None

    def _encode(self, payload) -> bytes:
        return encode_message(
            payload,
            fleet=self.config.fleet,
            sender=self.device_id,
            max_bytes=self.config.broker.max_message_bytes,
            signer=self._signer,
        )

    def status_message(self, state: str = "online", detail: str = "") -> Outgoing:
        """The retained status of this device (``online`` with row count and basis version)."""
        # no row count: how much data a device holds is data-dependent and the status is readable fleet-wide
        status = Status(
            round=self.last_round,
            state=state,
            detail=detail,
            basis_version=0 if self.basis is None else self.basis.version,
            layout=self.layout_json,
        )
        return Outgoing(self.topics.status(self.device_id), self._encode(status), retain=True)

    def _on_basis(self, basis: Basis) -> list[Outgoing]:
        d = self.n_features
        if d is not None and basis.components.shape[1] != d:
            logger.error(
                "%s: basis version %d has %d features, this device's rows have %d; basis refused",
                self.device_id,
                basis.version,
                basis.components.shape[1],
                d,
            )
            return []
        if self.basis is not None and basis.version < self.basis.version:
            logger.info(
                "%s: stale basis version %d ignored (have %d)", self.device_id, basis.version, self.basis.version
            )
            return []
        self.basis = basis
        logger.info("%s: basis version %d (k=%d, d=%d)", self.device_id, basis.version, *basis.components.shape)
        out = [self.status_message()]
        pending, self._pending_task = self._pending_task, None
        if pending is not None:
            out += self._on_task(pending)
        return out

    def _on_model(self, model: Model) -> list[Outgoing]:
        self.model = model
        self._personalize(model.params, model.classes, model.hidden, model.basis_version, f"round {model.round}")
        if not self.config.predict:
            return []
        X, _, t = self.store.read(limit=_PREDICT_ROWS)
        personal = self.personal
        if self.config.personalization.predict_with_personal and personal is not None:
            if np.array_equal(personal.source, model.params):  # this model's personal version
                logger.info("%s: predicting with this device's personal model of round %d", self.device_id, model.round)
                model = replace(model, params=personal.params, onnx=np.empty(0, dtype=np.uint8))
        prediction = self.predictions.on_model(model, self.basis, X, t, self.local_data)
        if prediction is None:
            return []
        return [Outgoing(self.topics.prediction(self.device_id), self._encode(prediction))]

    def _on_task(self, task: Task) -> list[Outgoing]:
        now = self._clock()
        have = None if self.basis is None else self.basis.version
        admission = admit(task, device_id=self.device_id, now=now, answered=self._answered, basis_version=have)
        if admission is Admission.EXPIRED:
            logger.info(
                "%s: task of round %d (%s) expired %.1f s ago; skipped",
                self.device_id,
                task.round,
                task.phase,
                now - task.deadline,
            )
            return []
        if admission is Admission.NOT_SELECTED:
            logger.debug("%s: not selected for round %d", self.device_id, task.round)
            return []
        if admission is Admission.ANSWERED:
            logger.debug("%s: round %d (%s) already answered", self.device_id, task.round, task.phase)
            return []
        self.last_round = max(self.last_round, task.round)
        if admission is Admission.WAIT_FOR_BASIS:
            logger.info(
                "%s: round %d needs basis version %d, have %s; waiting for it until the deadline",
                self.device_id,
                task.round,
                task.basis_version,
                have,
            )
            self._pending_task = task
            return []
        if admission is Admission.STALE_BASIS:
            logger.warning(
                "%s: round %d (%s) is for basis version %d but this device has version %d; refused",
                self.device_id,
                task.round,
                task.phase,
                task.basis_version,
                have,
            )
            return []
        try:
            out = self._answer_task(task)
        except TaskRefused as exc:
            logger.log(exc.level, "%s: %s", self.device_id, exc)
            out = []
        if out:
            self._answered.add((task.round, task.phase))
            self.metrics.task_answered(task.round, task.phase)
        self._enter(AgentState.IDLE)
        return out

    def _personalize(
        self, params: np.ndarray, classes: tuple[str, ...], hidden: int, basis_version: int, source: str
    ) -> PersonalModel | None:
        """:attr:`personal` for the global ``params`` (computed once per global model; None:
        personalization is off, the model is not a logistic regression on this device's basis,
        or the device cannot fine-tune it, logged)."""
        settings = self.config.personalization
        basis = self.basis
        if not settings.enabled or hidden or basis is None or basis.version != basis_version:
            return None
        cached = self.personal
        if cached is not None and cached.basis_version == basis_version and np.array_equal(cached.source, params):
            return cached
        try:
            personal = personal_model(
                params,
                len(classes),
                self.local_data(classes),
                basis,
                epochs=settings.epochs,
                lr=settings.lr,
                prox_mu=settings.prox_mu,
                random_state=self._train_rng,
            )
        except TaskRefused as exc:
            logger.info("%s: no personal model of the global model of %s: %s", self.device_id, source, exc)
            return None
        self.personal = personal

        def fmt(accuracy: float | None) -> str:
            return "n/a" if accuracy is None else f"{accuracy:.3f}"

        logger.info(
            "%s: personal model of the global model of %s (kept on this device): held-out balanced accuracy %s, "
            "global model %s, on %d windows",
            self.device_id,
            source,
            fmt(personal.held_out.accuracy),
            fmt(personal.global_held_out.accuracy),
            personal.held_out.windows,
        )
        return personal

    def _answer_task(self, task: Task) -> list[Outgoing]:
        """Run the task's handler of :mod:`biofed.edge.tasks` on the stored rows; what to publish."""
        if task.phase in ("moments", "covariance"):
            self._enter(AgentState.SKETCHING)
            reply = sketch_reply(task, self.local_data(task.classes), self.release)
            logger.info(
                "%s: %s statistic of round %d from %d windows (norm %.3g, clip %.3g)",
                self.device_id,
                task.phase,
                task.round,
                reply.n_windows,
                reply.norm,
                task.clip_norm,
            )
            return [Outgoing(self.topics.sketch(self.device_id), self._encode(reply.sketch))]
        if task.phase == "statistics":
            self._enter(AgentState.SKETCHING)
            reply = statistics_reply(task, self.local_data(task.classes), self.basis, self.release)
            logger.info(
                "%s: class statistics of round %d from %d windows (packed norm %.3g)",
                self.device_id,
                task.round,
                reply.n_windows,
                reply.norm,
            )
            return [Outgoing(self.topics.sketch(self.device_id), self._encode(reply.sketch))]
        usage = self._usage(time.process_time())
        if task.phase == "train":
            return self._train(task, usage)
        self._enter(AgentState.EVALUATING)
        personal = self._personalize(task.model, task.classes, task.hidden, task.basis_version, f"round {task.round}")
        evaluation = evaluate_reply(
            task, self.local_data(task.classes), self.basis, usage, None if personal is None else personal.held_out
        )
        logger.info(
            "%s: evaluated round %d on %d held-out windows: balanced accuracy %.3f",
            self.device_id,
            task.round,
            evaluation.held_out.windows,
            evaluation.held_out.accuracy,
        )
        return [Outgoing(self.topics.update(self.device_id), self._encode(evaluation.update))]

    def _usage(self, cpu_start: float) -> Callable[[], DeviceUsage]:
        def measure() -> DeviceUsage:
            return DeviceUsage(
                rss_bytes=int(self._process.memory_info().rss),
                cpu_time_s=max(time.process_time() - cpu_start, 0.0),
                bytes_sent=self.bytes_sent,
                bytes_received=self.bytes_received,
            )

        return measure

    def _train(self, task: Task, usage: Callable[[], DeviceUsage]) -> list[Outgoing]:
        self._enter(AgentState.TRAINING)
        reply = train_reply(
            task,
            self.local_data(task.classes),
            self.basis,
            local_training=self._local_training,
            release=self.release,
            usage=usage,
        )
        secure = task.trust_mode == "distributed"
        if secure:  # the delta travels only masked; the participant adds the noise share through the mechanism
            try:
                self._secagg = SecureAggregationParticipant(
                    self.device_id,
                    self.config.fleet,
                    task,
                    reply.raw_delta,
                    mechanism=self.mechanism,
                    charge=self.release.charge(task, "train"),
                )
            except SecAggError as exc:
                logger.error("%s: round %d: %s; not answered", self.device_id, task.round, exc)
                return []
        accuracy = reply.held_out.accuracy
        logger.info(
            "%s: round %d trained on %d windows: loss %.4f, |delta| %.3g (clip %.3g), held-out balanced "
            "accuracy of the incoming model %s",
            self.device_id,
            task.round,
            reply.n_windows,
            reply.loss,
            reply.norm,
            task.clip_norm,
            "n/a" if accuracy is None else f"{accuracy:.3f}",
        )
        out = [Outgoing(self.topics.update(self.device_id), self._encode(reply.update))]
        if secure:
            out.append(Outgoing(self.topics.secagg(self.device_id), self._encode(self._secagg.start())))
        return out

    def _local_training(self, task: Task, Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """``(new params, loss)`` of local training (:func:`~biofed.edge.tasks.train_locally`):
        minibatch SGD/Adam, or record-level DP-SGD through :attr:`record_mechanism` when
        ``[dp] record_noise_multiplier`` is set. The one step of a training round that depends
        on the learning rule (the audit's canary clients replace it; clipping, noise and
        publishing stay the agent's)."""
        dp = self.config.dp
        result = train_locally(
            task, Z, y, random_state=self._train_rng, record_dp=dp, record_gate=self.record_mechanism
        )
        if dp.record_noise_multiplier is not None:
            report = self.privacy_report()
            logger.info(
                "%s: privacy after round %d: record-level epsilon %.4g (DP-SGD, q=%g, z=%g) | client-level "
                "epsilon of this device's own releases %.4g, at delta %g",
                self.device_id,
                task.round,
                report["record_epsilon"],
                dp.record_sampling_rate,
                dp.record_noise_multiplier,
                report["client_epsilon"],
                report["delta"],
            )
        return result

    def _on_secagg(self, relay: SecAggRelay) -> list[Outgoing]:
        """Answer the coordinator's next secure-aggregation step of the current round."""
        participant = self._secagg
        if participant is None or relay.round != participant.round:
            logger.debug(
                "%s: secagg %s relay of round %d is not for an open round here; ignored",
                self.device_id,
                relay.step,
                relay.round,
            )
            return []
        try:
            answer = participant.handle(relay)
        except SecAggError as exc:
            self.dropped_messages += 1
            self.rejections["secagg"] += 1
            logger.warning("%s: secagg %s relay of round %d refused: %s", self.device_id, relay.step, relay.round, exc)
            return []
        if participant.finished:
            self._secagg = None
        return [Outgoing(self.topics.secagg(self.device_id), self._encode(answer))]

    # ------------------------------------------------------------------ MQTT loop
    @property
    def mqtt(self) -> MqttClient | None:
        """The MQTT client of the open session (None outside :meth:`open_session` / :meth:`close_session`)."""
        return self._client

    def publish(self, out: Outgoing) -> None:
        """Publish one of :meth:`handle_message`'s answers (QoS 1; failures are logged)."""
        self._publish(out)

    def _publish(self, out: Outgoing) -> None:
        """Publish, waiting for the acknowledgement only while connected: during a broker
        outage the message waits in the client's queue and goes out after the reconnect,
        and the agent keeps serving meanwhile."""
        client = self._client
        if client is None:
            return
        try:
            client.publish(out.topic, out.payload, retain=out.retain, wait=client.connected)
            self.bytes_sent += len(out.payload)
        except MqttError as exc:
            logger.error("%s: could not publish to %s: %s", self.device_id, out.topic, exc)

    def _connect(self, stop: threading.Event, **client_options) -> MqttClient | None:
        broker = self.config.broker
        will = Will(
            self.topics.status(self.device_id),
            offline_status(fleet=self.config.fleet, device_id=self.device_id, signer=self._signer),
        )
        delay = 1.0
        jitter = np.random.default_rng()
        while not stop.is_set():
            try:  # address, protocol, limits, TLS files and credentials of config.broker
                return MqttClient.from_config(broker, self.device_id, will=will, **client_options).connect()
            except (ConnectError, ConfigError) as exc:  # ConfigError: unreadable password file
                wait = delay * (1.0 + jitter.random())
                logger.warning("%s: %s; retrying in %.1f s", self.device_id, exc, wait)
                stop.wait(wait)
                delay = min(2 * delay, 60.0)
        return None

    def open_session(self, stop: threading.Event, **client_options) -> bool:
        """Connect (retrying until ``stop``), subscribe and publish the "online" status.

        ``client_options`` go to :class:`biofed.mqtt.MqttClient` (a simulator hosting many
        agents passes ``on_message`` to feed its shared dispatcher). False: stopped first.
        """
        self._enter(AgentState.CONNECTING)
        client = self._connect(stop, **client_options)
        if client is None:
            return False
        self._client = client
        self._downtime_seen = client.downtime_s()
        for topic in (self.topics.basis, self.topics.task, self.topics.model, self.topics.secagg_relay):
            try:
                client.subscribe(topic, qos=1)
            except MqttError as exc:  # remembered: renewed on the next (re)connect
                logger.warning("%s: subscription to %s not confirmed yet: %s", self.device_id, topic, exc)
        self._publish(self.status_message())
        logger.info("%s: online with %d windows", self.device_id, self.n_rows)
        self._enter(AgentState.IDLE)
        return True

    def check_connection(self) -> None:
        """Back after an outage, however short or unnoticed by the serving loop (it may have
        waited in a publish meanwhile): publish the "online" status again, since the broker
        may have published the last will. Call it periodically while serving."""
        client = self._client
        if client is None or not client.connected:
            return
        downtime = client.downtime_s()
        if downtime != self._downtime_seen:
            self._downtime_seen = downtime
            logger.info("%s: reconnected", self.device_id)
            self._publish(self.status_message())

    def serve(self, topic: str, payload: bytes) -> None:
        """Handle one inbound message and publish what it asks for."""
        for out in self.handle_message(topic, payload):
            self._publish(out)

    def close_session(self) -> None:
        """Publish the "offline" status and disconnect cleanly (idempotent)."""
        client = self._client
        if client is None:
            return
        self._enter(AgentState.STOPPING)
        offline = self.status_message("offline")
        if client.connected:  # disconnected, nothing goes out now; the broker has our last will
            try:  # bounded: should the broker go away now, its last will says "offline" anyway
                client.publish(offline.topic, offline.payload, retain=True, timeout_s=_OFFLINE_PUBLISH_TIMEOUT_S)
            except MqttError as exc:
                logger.info(
                    "%s: offline status not delivered (%s); the broker publishes the last will", self.device_id, exc
                )
        client.close()
        self._client = None

    def run(self, stop: threading.Event) -> None:
        """Warm up, ingest, connect and serve tasks until ``stop`` is set; then go offline cleanly."""
        from biofed.edge.continuous import ContinuousIngestion

        ingest_thread = None
        self._enter(AgentState.STARTING)
        if self.config.warmup:  # compile every kernel into the cache now, so no task waits on the JIT
            from biofed.edge.warmup import warmup_in_subprocess

            logger.info("%s: kernels warmed up in %.1f s", self.device_id, warmup_in_subprocess(stop))
        continuous = ContinuousIngestion(self) if ContinuousIngestion.needed(self.config) else None
        if continuous is not None:
            continuous.start(stop)
        if self.config.replay_speed == 0:
            self.ingest(stop)
        else:
            ingest_thread = threading.Thread(target=self._ingest_live, args=(stop,), name="ingest", daemon=True)
            ingest_thread.start()
        if not self.open_session(stop):
            self._enter(AgentState.STOPPED)
            return
        try:
            while not stop.is_set():
                self.check_connection()
                inbound = self._client.receive(timeout_s=0.25)
                if inbound is not None:
                    self.serve(inbound.topic, inbound.payload)
        finally:
            self.close_session()
            if ingest_thread is not None:
                ingest_thread.join(timeout=10.0)
            if continuous is not None:
                continuous.join()
            self._enter(AgentState.STOPPED)
            logger.info("%s: offline", self.device_id)

    def _ingest_live(self, stop: threading.Event) -> None:
        try:
            added = self.ingest(stop)
        except Exception:  # noqa: BLE001 - the agent keeps serving with the rows it has
            logger.exception("%s: ingestion failed", self.device_id)
            return
        if added and not stop.is_set():
            self._publish(self.status_message())
