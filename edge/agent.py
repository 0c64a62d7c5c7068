"""The MQTT device agent: ingest recordings into the feature store, answer federated tasks.

Life of an agent (``biofed edge --config device.toml``)
-------------------------------------------------------
1. **Ingest.** The configured recordings are replayed (:func:`biofed.datasets.replay` at
   ``replay_speed``) through :class:`~biofed.edge.pipeline.StreamingPipeline` into the
   :class:`~biofed.edge.store.FeatureStore` as raw, labelled feature rows. Files are grouped
   into *streams* as ``biofed replay`` does: a file joins the stream of the file before it when
   it only adds modalities that stream lacks and the subjects agree (an EDF/FIF with EEG + ECG
   and the WAV recorded with it); every stream has its own pipeline. Streams play one after the
   other on a device clock (each stream starts ``window_s + hop_s`` after the last stored
   window), so window times increase across sessions and the held-out rule of
   :mod:`biofed.edge.split` ("last 20 % of each label in time order") is well defined.
   Ingestion is recorded in the side table ``agent_ingested`` of the store's SQLite file: a
   stream is marked *pending* before its first row is written and *done* after its last, and a
   restarted agent deletes the rows of a pending stream and replays it, so a restart neither
   duplicates nor loses windows. Files already done are not read again. With
   ``replay_speed == 0`` ingestion finishes before the agent connects; with a real-time speed
   it runs in a background thread while the agent already answers tasks with the rows stored
   so far (a live sensor).
2. **Connect.** :class:`biofed.mqtt.MqttClient` with a persistent session under the stable
   client id ``device_id``, last will = retained ``Status("offline")``; then a retained
   ``Status("online", basis_version)`` and subscriptions to ``task``, ``basis`` and
   ``model``. The first connection is retried with capped, jittered exponential backoff;
   later reconnects are paho's (see :mod:`biofed.mqtt`), after each of which the agent
   publishes its "online" status again (the broker may have published the will meanwhile).
3. **Serve.** Every inbound message goes through :meth:`EdgeAgent.handle_message`, which
   returns what to publish. Undecodable or invalid messages, duplicates (QoS 1 redelivery,
   retained re-delivery: :class:`~biofed.protocol.SeenMessageIds`), tasks whose deadline has
   passed, tasks that do not list this device, tasks for a basis version other than the
   device's and any other bad input are logged and dropped: the agent never dies on input.
4. **Stop.** SIGTERM/SIGINT set a stop event; the agent publishes a retained
   ``Status("offline")`` and disconnects cleanly.

Task phases (the "Federated flow" contract)
-------------------------------------------
With ``X`` the device's raw training rows (labels in ``Task.classes``, minus the held-out
windows of :func:`biofed.edge.split.holdout_split`), every statistic and update is clipped to
L2 norm ``Task.clip_norm``. In ``"local"`` and ``"distributed"`` trust modes the coordinator
is the adversary, so the device is the release gate: its
:class:`~biofed.privacy_mechanism.PrivacyMechanism` clips, adds
``N(0, (Task.noise_multiplier * clip_norm)^2)`` to sketches and local-mode updates and
charges the device's own ledger durably (``agent_privacy_ledger`` in the store's SQLite
file) before the value is published. A distributed-mode *training* update is instead
secure-aggregated (:mod:`biofed.edge.secure_aggregation`): the mechanism adds only the noise
share of std ``noise_multiplier * clip_norm / sqrt(Task.secagg_threshold)``, the device
sends an ``Update`` with an empty delta and its keys, and answers the coordinator's
``secagg_relay`` steps; the delta leaves the device only masked. In those two modes nothing
data-dependent travels in cleartext: ``n_examples``, ``clipped``, ``norm_bit`` and every
metric (loss, windows, held-out accuracy, RSS, CPU time, bytes) are zero or absent, the
sketch's ``clipped`` is False, and the status never carries a row count.

Signed messages
---------------
With ``signing_key_file`` the agent signs everything it publishes (its last will too);
with ``keys_dir`` it accepts only messages with a valid signature of a known, unrevoked
sender (:mod:`biofed.signing`), within ``max_clock_skew_s`` and never twice.

``moments``     Sketch of ``concat(mean(X, 0), mean(X**2, 0))``.
``covariance``  Sketch of ``(Z.T @ Z / n).ravel()``, ``Z = (X - stats_mean) / stats_scale``;
                a task without ``stats_mean`` asks for *device standardization*:
                ``Z = (X - m) / s`` with the mean and scale of the device's own training rows
                (:func:`biofed.edge.split.device_standardization`; they never leave the device).
``train``       Project the training and held-out rows onto the current basis (the task's
                ``basis_version`` must be the device's: a task for a newer basis waits for it
                until its deadline, one for an older basis is refused), measure the balanced
                accuracy of the incoming model on the held-out rows, train locally
                (:func:`biofed.kernels.training.train` with the task's settings, FedProx
                centre = incoming model), ``delta = new - model``, clip (``norm_bit`` with
                adaptive clipping), noise, publish an :class:`~biofed.protocol.Update` with
                metrics (loss, windows, RSS, CPU seconds of the task, MQTT payload bytes sent
                and received so far).
``evaluate``    Update with an empty delta, ``n_examples = 0`` and the eval metrics (``loss``
                is then the held-out cross-entropy).

On-device predictions (``predict = true``)
------------------------------------------
Every retained global :class:`~biofed.protocol.Model` carries the coordinator's ONNX export
(``Model.onnx``, see :mod:`biofed.coordinator.onnx_export`). The agent loads it into
onnxruntime (:class:`biofed.edge.inference.OnnxModel`), refuses it when its feature layout is
not the device's (logged), classifies the newest stored windows at once and then every new
window as ingestion produces it, publishing :class:`~biofed.protocol.Prediction` messages on
``prediction/{device_id}`` (``t`` = the windows' times on the device clock of the store) and
logging the predicted class counts. A model without ONNX bytes (a coordinator that knows no
feature layout) is scored with the Numba kernels and the device's basis instead. The device's
layout is reported in its status (``Status.layout``) and kept in the side table
``agent_layout`` so a restarted agent that ingests nothing new still reports it.
"""

from __future__ import annotations

import enum
import logging
import math
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from biofed.config import ConfigError, DeviceConfig
from biofed.edge.inference import InferenceError, OnnxModel
from biofed.edge.pipeline import PipelineConfig
from biofed.edge.split import balanced_accuracy, device_standardization, holdout_split
from biofed.edge.secure_aggregation import SecureAggregationParticipant
from biofed.edge.store import FeatureStore, StoreError
from biofed.kernels import check_random_state, clip_l2, dp_sgd, n_params, predict_proba, project, train
from biofed.metrics import AgentMetrics
from biofed.model import FeatureLayout, LayoutError
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import Charge, ClippedSum, PrivacyMechanism
from biofed.mqtt import ConnectError, MqttClient, MqttError, Will
from biofed.secure_aggregation import SecAggError, SecAggRelay
from biofed.signing import signing_from_config
from biofed.protocol import (
    Basis,
    Message,
    Model,
    Prediction,
    ProtocolError,
    ReplayedMessage,
    SeenMessageIds,
    Sketch,
    Status,
    Task,
    Topics,
    Update,
    UpdateMetrics,
    decode_topic_message,
    encode_message,
    offline_status,
)

__all__ = ["AgentState", "EdgeAgent", "LocalData", "Outgoing", "labelled_split"]

logger = logging.getLogger(__name__)

_INGEST_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_ingested (
    path TEXT PRIMARY KEY,
    stream TEXT NOT NULL,
    done INTEGER NOT NULL,
    n_rows INTEGER NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS agent_layout (
    hash TEXT PRIMARY KEY,
    layout TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_privacy_ledger (
    id INTEGER PRIMARY KEY CHECK (id IN (1, 2)),
    ledger TEXT NOT NULL
);
"""
_CLIENT_LEDGER, _RECORD_LEDGER = 1, 2
"""Rows of ``agent_privacy_ledger``: the client-level and the record-level (DP-SGD) ledger."""
_APPEND_EVERY = 64
"""Rows buffered before a store append while ingesting (one durable transaction each)."""
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
    """Computing a basis-phase statistic."""
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


@dataclass(frozen=True)
class LocalData:
    """The device's labelled windows of the task's classes, split for training and evaluation.

    ``X`` (N, d) raw rows, ``y`` (N,) class indices into ``Task.classes``, ``train`` and
    ``held_out`` (N,) disjoint boolean masks.
    """

    X: np.ndarray
    y: np.ndarray
    train: np.ndarray
    held_out: np.ndarray

    def standardization(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, scale)`` of the training rows (:func:`biofed.edge.split.device_standardization`):
        what a device of a ``standardization = "device"`` fleet z-scores every row with."""
        return device_standardization(self.X[self.train])


def labelled_split(X: np.ndarray, labels: np.ndarray, t: np.ndarray, classes: Sequence[str]) -> LocalData:
    """Keep the rows labelled with one of ``classes`` and split them with :func:`holdout_split`.

    ``X`` (N, d), ``labels`` (N,) str and ``t`` (N,) as :meth:`FeatureStore.read` returns them.
    The one place where a device's stored rows become training and held-out sets (the demo's
    centralized baseline calls it on each device's store too).
    """
    index = {name: i for i, name in enumerate(classes)}
    keep = np.array([label in index for label in labels], dtype=bool)
    X, labels, t = X[keep], labels[keep], t[keep]
    y = np.array([index[label] for label in labels], dtype=np.int64)
    train_mask, held_out = holdout_split(labels, t)
    return LocalData(X, y, train_mask, held_out)


def recording_files(config: DeviceConfig) -> list[Path]:
    """``config.recordings`` and the files of its ``kind = "file"`` sources (a folder's recordings, sorted)."""
    from biofed.datasets import recordings_in

    files = list(config.recordings)
    for source in config.sources:
        if source.kind == "file":
            files += recordings_in(source.path) if source.path.is_dir() else [source.path]
    return files


def _stream_key(paths: Sequence[Path]) -> str:
    return "+".join(str(p) for p in paths)


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
        self.last_round = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.dropped_messages = 0
        self.rejections: Counter[str] = Counter()
        """Inbound messages not acted on, per reason (a :class:`~biofed.protocol.ProtocolError`
        class name, ``"duplicate"``, ``"secagg"`` or ``"internal error"``)."""
        self._process = psutil.Process()
        self.store = FeatureStore(config.store_path, max_rows=config.store_max_rows)
        self._ingest_db = sqlite3.connect(config.store_path, check_same_thread=False, isolation_level=None,
                                          timeout=30.0)
        self._ingest_db.executescript(_INGEST_SCHEMA)
        self._ingest_db.execute("PRAGMA synchronous=FULL")
        self._ingest_lock = threading.Lock()
        self.mechanism = PrivacyMechanism(self._stored_ledger(_CLIENT_LEDGER),
                                          persist=lambda ledger: self._persist_ledger(_CLIENT_LEDGER, ledger))
        """The device's client-level release gate (local and distributed trust modes): every
        noised update, sketch and noise share is charged to the device's own ledger, durably
        (in the store's SQLite file), before it is published."""
        self.record_mechanism = PrivacyMechanism(self._stored_ledger(_RECORD_LEDGER),
                                                 persist=lambda ledger: self._persist_ledger(_RECORD_LEDGER, ledger))
        """The record-level gate of DP-SGD (``[dp] record_noise_multiplier``): every step's
        noised gradient sum is charged to the device's record-level ledger."""
        self._client: MqttClient | None = None
        self._downtime_seen = 0.0
        self.layout_json = self._stored_layout()
        """The device's feature layout (JSON of :class:`biofed.model.FeatureLayout`), "" until known."""
        self.predictor: OnnxModel | None = None
        """The ONNX global model predictions are made with (``predict = true``)."""
        self._predict_standardization: tuple[np.ndarray, np.ndarray] | None = None
        """Device standardization applied to raw rows before :attr:`predictor` (None: global)."""
        self.metrics = AgentMetrics(self)
        """Prometheus series (served on ``config.metrics`` while :meth:`run` runs)."""

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

    def close(self) -> None:
        """Close the store (idempotent)."""
        self.store.close()
        with self._ingest_lock:
            self._ingest_db.close()

    # ------------------------------------------------------------------ layout
    def _stored_ledger(self, row_id: int) -> PrivacyLedger:
        row = self._ingest_db.execute("SELECT ledger FROM agent_privacy_ledger WHERE id = ?", (row_id,)).fetchone()
        ledger = PrivacyLedger(self.config.dp.delta, ("rdp",))
        if row is not None:
            ledger.extend(PrivacyLedger.from_json(row[0]))
        return ledger

    def _persist_ledger(self, row_id: int, ledger: PrivacyLedger) -> None:
        with self._ingest_lock:
            self._ingest_db.execute("INSERT OR REPLACE INTO agent_privacy_ledger(id, ledger) VALUES (?, ?)",
                                    (row_id, ledger.to_json()))

    def privacy_report(self) -> dict[str, float | None]:
        """The device's two guarantees at ``[dp] delta``, never mixed: ``client_epsilon``
        (its client-level ledger: what it released in local/distributed trust modes; 0.0
        when it released nothing itself) and ``record_epsilon`` (record-level DP-SGD; None
        when record-level DP is off)."""
        record = None if self.config.dp.record_noise_multiplier is None else self.record_mechanism.ledger.epsilon()
        return {"client_epsilon": self.mechanism.ledger.epsilon(), "record_epsilon": record,
                "delta": self.config.dp.delta}

    def _stored_layout(self) -> str:
        current = self.store.layout_hash
        if current is None:
            return ""
        with self._ingest_lock:
            row = self._ingest_db.execute("SELECT layout FROM agent_layout WHERE hash = ?", (current,)).fetchone()
        return row[0] if row else ""

    def _remember_layout(self, layout: FeatureLayout) -> None:
        text = layout.to_json()
        if text == self.layout_json:
            return
        with self._ingest_lock:
            self._ingest_db.execute("INSERT OR REPLACE INTO agent_layout(hash, layout) VALUES (?, ?)",
                                    (layout.hash, text))
        self.layout_json = text
        predictor = self.predictor
        if predictor is not None and not self._fits(predictor):
            self.predictor = None

    def _fits(self, predictor: OnnxModel) -> bool:
        """Whether ``predictor`` was trained on this device's feature layout (logged when not)."""
        if not self.layout_json:
            return True  # nothing ingested yet: checked again when the first stream fixes the layout
        problem = predictor.layout.mismatch(FeatureLayout.from_json(self.layout_json))
        if problem is not None:
            logger.error("%s: %s does not fit this device: %s; no predictions with it", self.device_id,
                         predictor.name, problem)
            return False
        return True

    # ------------------------------------------------------------------ ingestion
    def _ingested_paths(self) -> set[str]:
        with self._ingest_lock:
            return {row[0] for row in self._ingest_db.execute("SELECT path FROM agent_ingested WHERE done = 1")}

    def _recover_pending(self) -> None:
        """Delete the rows of streams whose ingestion was interrupted (they are replayed)."""
        with self._ingest_lock:
            pending = {row[0] for row in self._ingest_db.execute("SELECT stream FROM agent_ingested WHERE done = 0")}
            for stream in pending:
                deleted = self._ingest_db.execute("DELETE FROM windows WHERE source = ?", (stream,)).rowcount
                logger.warning("%s: ingestion of %s was interrupted; dropped its %d stored rows, replaying it",
                               self.device_id, stream, deleted)
            self._ingest_db.execute("DELETE FROM agent_ingested WHERE done = 0")

    def _mark(self, paths: Sequence[Path], stream: str, *, done: bool, n_rows: int = 0) -> None:
        with self._ingest_lock:
            self._ingest_db.executemany(
                "INSERT OR REPLACE INTO agent_ingested(path, stream, done, n_rows, finished) VALUES (?, ?, ?, ?, ?)",
                [(str(p), stream, int(done), n_rows, time.time() if done else None) for p in paths],
            )

    def _next_stream_offset(self) -> float:
        with self._ingest_lock:
            row = self._ingest_db.execute("SELECT MAX(t) FROM windows").fetchone()
        last = row[0] if row and row[0] is not None else None
        return 0.0 if last is None else float(last) + self.pipeline_config.window_s + self.pipeline_config.hop_s

    def _streams(self, paths: Sequence[Path]):
        """Read ``paths`` one by one and yield ``(paths, recordings)`` per stream (unreadable files skipped)."""
        from biofed.datasets import RecordingError, read_recording
        from biofed.datasets.replay import group_streams

        def readable():
            for path in paths:
                try:
                    yield Path(path), read_recording(path)
                except (RecordingError, OSError) as exc:
                    logger.error("%s: cannot read recording %s, skipped: %s", self.device_id, path, exc)

        for stream in group_streams(readable(), self.pipeline_config.modalities):
            yield [path for path, _ in stream], [recording for _, recording in stream]

    def _open_store_for(self, layout_hash: str) -> bool:
        """Make the store read/write ``layout_hash``; False when it already holds another layout."""
        current = self.store.layout_hash
        if current == layout_hash:
            return True
        if current is None:  # empty store: bind it to this layout
            self.store.close()
            self.store = FeatureStore(self.config.store_path, max_rows=self.config.store_max_rows,
                                      layout_hash=layout_hash)
            return True
        return False

    def ingest(self, stop: threading.Event | None = None, *, paths: Sequence[Path] | None = None) -> int:
        """Replay every configured recording (or ``paths``) not ingested yet into the store.

        Returns the number of rows added. Unreadable files and streams whose feature layout
        differs from the stored one are logged and skipped (a device has one sensor layout).
        Windows overlapping a ``BAD*`` annotation are not stored.
        """
        from biofed.datasets import replay
        from biofed.datasets.live import BadSpans
        from biofed.datasets.recording import stream_channels
        from biofed.datasets.replay import bad_spans
        from biofed.edge.continuous import LiveFeatures

        self._recover_pending()
        done = self._ingested_paths()
        configured = recording_files(self.config) if paths is None else list(paths)
        todo = [p for p in configured if str(p) not in done]
        skipped = len(configured) - len(todo)
        if skipped:
            logger.info("%s: %d recording(s) already ingested, skipped", self.device_id, skipped)
        added = 0
        for stream_paths, recordings in self._streams(todo):
            if stop is not None and stop.is_set():
                break
            stream = _stream_key(stream_paths)
            channels = stream_channels(recordings)
            try:
                layout = FeatureLayout.from_channels(channels, self.pipeline_config)
            except LayoutError as exc:
                logger.error("%s: stream %s has no usable layout, skipped: %s", self.device_id, stream, exc)
                continue
            if not self._open_store_for(layout.hash):
                logger.error(
                    "%s: stream %s has feature layout %s (%d features) but the store %s holds layout %s; "
                    "a device keeps one sensor layout: skipped", self.device_id, stream, layout.hash,
                    layout.n_features, self.config.store_path, self.store.layout_hash,
                )
                continue
            self._remember_layout(layout)
            offset = self._next_stream_offset()
            self._mark(stream_paths, stream, done=False)
            bad = BadSpans()
            for recording in recordings:  # every recording of a stream starts at its t = 0
                for onset, end in bad_spans(recording):
                    bad.add(onset, end)
            features = LiveFeatures(self.pipeline_config, layout, bad)
            rows: list = []
            n_stream = 0
            interrupted = False
            for chunk in replay(recordings, speed=self.config.replay_speed):
                if stop is not None and stop.is_set():
                    interrupted = True
                    break
                new = features.feed(chunk)
                rows.extend(new)
                self._predict_rows(new, offset)  # a prediction for every new window, as it is produced
                if len(rows) >= _APPEND_EVERY:
                    n_stream += self._append_rows(rows, offset, stream)
                    rows = []
            if interrupted:
                logger.info("%s: stopped while ingesting %s (replayed again on restart)", self.device_id, stream)
                break
            features.pipeline.flush()
            n_stream += self._append_rows(rows, offset, stream)
            self._mark(stream_paths, stream, done=True, n_rows=n_stream)
            added += n_stream
            logger.info("%s: ingested %s: %d windows of %d features%s", self.device_id, stream, n_stream,
                        layout.n_features, f" ({features.rejected_bad} overlapping BAD annotations dropped)"
                        if features.rejected_bad else "")
        return added

    def _predict_rows(self, rows: list, offset: float) -> None:
        """Classify new raw rows with the current global model and publish the prediction (``predict``)."""
        predictor = self.predictor
        if not rows or predictor is None:
            return
        t = offset + np.array([r.t for r in rows])
        try:
            self._publish(self._prediction(predictor, np.stack([r.vector for r in rows]), t))
        except InferenceError as exc:
            logger.error("%s: prediction failed, predictions stopped: %s", self.device_id, exc)
            self.predictor = None

    def _append_rows(self, rows: list, offset: float, stream: str) -> int:
        if not rows:
            return 0
        X = np.stack([r.vector for r in rows])
        t = np.array([offset + r.t for r in rows])
        try:
            self.store.append(X, [r.label for r in rows], t, source=stream)
        except StoreError as exc:
            logger.error("%s: %d windows of %s not stored: %s", self.device_id, len(rows), stream, exc)
            return 0
        self.metrics.stored(len(rows))
        return len(rows)

    def store_windows(self, X: np.ndarray, labels: Sequence[str], t: np.ndarray, *, layout_hash: str,
                      layout_json: str, source: str) -> int:
        """Add feature windows computed elsewhere with the same pipeline (a simulator deals the
        windows of a few recordings to many small devices). ``layout_hash`` / ``layout_json``:
        the :class:`~biofed.model.FeatureLayout` hash and JSON of the rows. Returns the rows added.

        Raises
        ------
        StoreError
            The store already holds rows of another layout, or the rows are invalid.
        """
        if not self._open_store_for(layout_hash):
            raise StoreError(f"{self.config.store_path} holds layout {self.store.layout_hash}, not {layout_hash}")
        with self._ingest_lock:
            self._ingest_db.execute("INSERT OR REPLACE INTO agent_layout(hash, layout) VALUES (?, ?)",
                                    (layout_hash, layout_json))
        self.layout_json = layout_json
        self.store.append(X, list(labels), t, source=source)
        return len(t)

    # ------------------------------------------------------------------ local data
    def local_data(self, classes: Sequence[str]) -> LocalData:
        """The stored windows labelled with one of ``classes``, split by :func:`holdout_split`."""
        return labelled_split(*self.store.read(), classes)

    # ------------------------------------------------------------------ messages
    def handle_message(self, topic: str, data: bytes) -> list[Outgoing]:
        """Process one inbound MQTT message; return the messages to publish.

        Never raises on bad input: decoding errors, invalid payloads, duplicates and
        unanswerable tasks are logged and dropped (an empty list is returned).
        """
        with self._lock:
            self.bytes_received += len(data)
            try:
                message = decode_topic_message(self.topics, topic, data,
                                               max_bytes=self.config.broker.max_message_bytes,
                                               verifier=self._verifier)
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
                logger.exception("%s: failed to handle the %s message of round %d; dropped",
                                 self.device_id, message.kind, message.round)
                return []

    def _dispatch(self, message: Message) -> list[Outgoing]:
        payload = message.payload
        if isinstance(payload, Basis):
            return self._on_basis(payload)
        if isinstance(payload, Task):
            return self._on_task(payload)
        if isinstance(payload, Model):
            return self._on_model(payload)
        if isinstance(payload, SecAggRelay):
            return self._on_secagg(payload)
        logger.debug("%s: ignoring a %s message", self.device_id, message.kind)
        return []

    def _encode(self, payload) -> bytes:
        return encode_message(payload, fleet=self.config.fleet, sender=self.device_id,
                              max_bytes=self.config.broker.max_message_bytes, signer=self._signer)

    def status_message(self, state: str = "online", detail: str = "") -> Outgoing:
        """The retained status of this device (``online`` with row count and basis version)."""
        # no row count: how much data a device holds is data-dependent and the status is readable fleet-wide
        status = Status(round=self.last_round, state=state, detail=detail,
                        basis_version=0 if self.basis is None else self.basis.version, layout=self.layout_json)
        return Outgoing(self.topics.status(self.device_id), self._encode(status), retain=True)

    def _on_basis(self, basis: Basis) -> list[Outgoing]:
        d = self.n_features
        if d is not None and basis.components.shape[1] != d:
            logger.error("%s: basis version %d has %d features, this device's rows have %d; basis refused",
                         self.device_id, basis.version, basis.components.shape[1], d)
            return []
        if self.basis is not None and basis.version < self.basis.version:
            logger.info("%s: stale basis version %d ignored (have %d)", self.device_id, basis.version,
                        self.basis.version)
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
        if not self.config.predict:
            return []
        X, _, t = self.store.read(limit=_PREDICT_ROWS)
        device_mode = (self.basis is not None and self.basis.version == model.basis_version
                       and self.basis.standardization == "device")
        data = self.local_data(model.classes) if device_mode else None
        if device_mode and not data.train.any():
            self.predictor = None
            logger.warning("%s: the model of round %d needs this device's standardization, but the device has no "
                           "training windows of classes %s yet; no predictions", self.device_id, model.round,
                           model.classes)
            return []
        if model.onnx.size:
            self.predictor = None  # predictions follow the latest global model, or stop
            try:
                predictor = OnnxModel(model.onnx.tobytes(), name=f"the global model of round {model.round}")
            except InferenceError as exc:
                logger.error("%s: %s; no predictions with it", self.device_id, exc)
                return []
            if not self._fits(predictor):
                return []
            # device standardization: z-score with the training statistics as of the model's arrival
            self._predict_standardization = None if data is None else data.standardization()
            self.predictor = predictor
            logger.info("%s: predicting with %s", self.device_id, predictor.describe())
            return [self._prediction(predictor, X, t)] if X.shape[0] else []
        # a coordinator without a feature layout sends no ONNX: the Numba path with this device's basis
        self.predictor = None
        if self.basis is None or model.basis_version != self.basis.version:
            return []
        k = self.basis.components.shape[0]
        if X.shape[0] == 0 or model.params.shape[0] != n_params(k, len(model.classes), model.hidden):
            return []
        proba = predict_proba(model.params, self._project(X, data), len(model.classes), model.hidden)
        prediction = Prediction(round=model.round, t=t, proba=proba, classes=model.classes)
        return [Outgoing(self.topics.prediction(self.device_id), self._encode(prediction))]

    def _prediction(self, predictor: OnnxModel, X: np.ndarray, t: np.ndarray) -> Outgoing:
        """Classify raw rows ``X`` with the ONNX model; log the counts; the Prediction to publish."""
        standardization = self._predict_standardization
        if standardization is not None:  # the model of a device-standardized fleet takes z-scored rows
            X = (X - standardization[0]) / standardization[1]
        proba = predictor.predict_features(X)
        counts = np.bincount(proba.argmax(axis=1), minlength=len(predictor.classes))
        logger.info("%s: predicted %d window(s) at t=%.0f-%.0f s: %s", self.device_id, len(t), t[0], t[-1],
                    ", ".join(f"{c} {n}" for c, n in zip(predictor.classes, counts)))
        prediction = Prediction(round=predictor.metadata.round, t=t, proba=proba, classes=predictor.classes)
        return Outgoing(self.topics.prediction(self.device_id), self._encode(prediction))

    def _on_task(self, task: Task) -> list[Outgoing]:
        now = self._clock()
        if task.deadline <= now:
            logger.info("%s: task of round %d (%s) expired %.1f s ago; skipped", self.device_id, task.round,
                        task.phase, now - task.deadline)
            return []
        if task.participants and self.device_id not in task.participants:
            logger.debug("%s: not selected for round %d", self.device_id, task.round)
            return []
        key = (task.round, task.phase)
        if key in self._answered:
            logger.debug("%s: round %d (%s) already answered", self.device_id, task.round, task.phase)
            return []
        self.last_round = max(self.last_round, task.round)
        if task.phase in ("moments", "covariance"):
            out = self._sketch(task)
        else:
            if not self._basis_ready(task):
                return []
            out = self._train(task) if task.phase == "train" else self._evaluate(task)
        if out:
            self._answered.add(key)
            self.metrics.task_answered(task.round, task.phase)
        self._enter(AgentState.IDLE)
        return out

    def _basis_ready(self, task: Task) -> bool:
        have = None if self.basis is None else self.basis.version
        if have == task.basis_version:
            return True
        if have is None or task.basis_version > have:
            logger.info("%s: round %d needs basis version %d, have %s; waiting for it until the deadline",
                        self.device_id, task.round, task.basis_version, have)
            self._pending_task = task
        else:
            logger.warning("%s: round %d (%s) is for basis version %d but this device has version %d; refused",
                           self.device_id, task.round, task.phase, task.basis_version, have)
        return False

    def _release(self, task: Task, vector: np.ndarray, kind: str) -> np.ndarray:
        """``vector`` clipped to ``task.clip_norm``; in local and distributed modes noised
        with ``N(0, (z C)^2)`` and charged by this device's privacy mechanism first (the
        coordinator is the adversary there). In central mode the device only clips: the
        coordinator's mechanism noises and charges."""
        if task.trust_mode == "central":
            return clip_l2(vector, task.clip_norm)[0]
        (noised,) = self.mechanism.release(self._charge(task, kind),
                                           ClippedSum(vector, task.clip_norm, task.noise_multiplier * task.clip_norm))
        return noised

    def _charge(self, task: Task, kind: str) -> Charge:
        """The device ledger's entry for a release answering ``task``. Entries are numbered
        by the device's own release count (a new coordinator state restarts the task round
        numbers; the device's ledger spans every coordinator it ever answered)."""
        return Charge(len(self.mechanism.ledger), kind, 1.0, task.noise_multiplier)

    def _sketch(self, task: Task) -> list[Outgoing]:
        self._enter(AgentState.SKETCHING)
        data = self.local_data(task.classes)
        X = data.X[data.train]
        if X.shape[0] == 0:
            logger.warning("%s: no training windows of classes %s; cannot answer the %s phase of round %d",
                           self.device_id, task.classes, task.phase, task.round)
            return []
        d = X.shape[1]
        if task.phase == "moments":
            statistic = np.concatenate([X.mean(axis=0), (X * X).mean(axis=0)])
        else:
            if task.stats_mean is None:  # device standardization: this device's own statistics
                mean, scale = data.standardization()
            elif task.stats_mean.shape != (d,):
                logger.error("%s: covariance task of round %d has stats_mean of shape %s, this device has %d "
                             "features; refused", self.device_id, task.round, task.stats_mean.shape, d)
                return []
            else:
                mean, scale = task.stats_mean, task.stats_scale
            Z = (X - mean) / scale
            statistic = (Z.T @ Z / Z.shape[0]).ravel()
        norm = float(np.linalg.norm(statistic))
        released = self._release(task, statistic, "basis")
        sketch = Sketch(round=task.round, basis_version=task.basis_version, phase=task.phase, statistic=released,
                        clipped=task.trust_mode == "central" and norm > task.clip_norm, n_features=d)
        logger.info("%s: %s statistic of round %d from %d windows (norm %.3g, clip %.3g)", self.device_id,
                    task.phase, task.round, X.shape[0], norm, task.clip_norm)
        return [Outgoing(self.topics.sketch(self.device_id), self._encode(sketch))]

    def _project(self, X: np.ndarray, data: LocalData | None) -> np.ndarray:
        """Standardize raw rows ``X`` and project them onto the basis. With a
        ``standardization="device"`` basis (mean 0, scale 1) the rows are z-scored with the
        statistics of ``data``'s training rows (the same for training, held-out and live rows)."""
        basis = self.basis
        if basis.standardization == "device":
            mean, scale = data.standardization()
            return project(X, basis.components, mean=mean, scale=scale)
        return project(X, basis.components, mean=basis.mean, scale=basis.scale)

    def _check_model_size(self, task: Task) -> bool:
        k = self.basis.components.shape[0]
        expected = n_params(k, len(task.classes), task.hidden)
        if task.model.shape[0] != expected:
            logger.error("%s: round %d model has %d parameters, expected %d for k=%d, %d classes, hidden=%d; refused",
                         self.device_id, task.round, task.model.shape[0], expected, k, len(task.classes), task.hidden)
            return False
        return True

    def _held_out_metrics(self, task: Task, data: LocalData) -> tuple[float | None, int, float | None]:
        """(balanced accuracy, windows, mean cross-entropy) of the task's model on held-out rows."""
        if not data.held_out.any():
            return None, 0, None
        Z = self._project(data.X[data.held_out], data)
        y = data.y[data.held_out]
        proba = predict_proba(task.model, Z, len(task.classes), task.hidden)
        accuracy = balanced_accuracy(y, proba.argmax(axis=1))
        loss = float(-np.mean(np.log(np.maximum(proba[np.arange(y.size), y], 1e-300))))
        return accuracy, int(y.size), loss

    def _metrics(self, task: Task, loss: float, n_windows: int, cpu_start: float, accuracy,
                 eval_windows: int) -> UpdateMetrics:
        if task.trust_mode != "central":  # data-dependent cleartext must not reach the coordinator
            return UpdateMetrics(loss=0.0, n_windows=0, rss_bytes=0, cpu_time_s=0.0)
        return UpdateMetrics(
            loss=loss, n_windows=n_windows, rss_bytes=int(self._process.memory_info().rss),
            cpu_time_s=max(time.process_time() - cpu_start, 0.0), bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received, eval_balanced_accuracy=accuracy, eval_windows=eval_windows,
        )

    def _train(self, task: Task) -> list[Outgoing]:
        self._enter(AgentState.TRAINING)
        cpu_start = time.process_time()
        if not self._check_model_size(task):
            return []
        data = self.local_data(task.classes)
        if not data.train.any():
            logger.warning("%s: no training windows of classes %s for round %d", self.device_id, task.classes,
                           task.round)
            return []
        accuracy, eval_windows, _ = self._held_out_metrics(task, data)
        Z = self._project(data.X[data.train], data)
        y = data.y[data.train]
        params, loss = self._local_training(task, Z, y)
        raw_delta = params - task.model
        norm = float(np.linalg.norm(raw_delta))
        secure = task.trust_mode == "distributed"
        central = task.trust_mode == "central"
        if secure:  # the delta travels only masked; the participant adds the noise share through the mechanism
            try:
                self._secagg = SecureAggregationParticipant(self.device_id, self.config.fleet, task, raw_delta,
                                                            mechanism=self.mechanism,
                                                            charge=self._charge(task, "train"))
            except SecAggError as exc:
                logger.error("%s: round %d: %s; not answered", self.device_id, task.round, exc)
                return []
            delta = np.empty(0, dtype=np.float64)
        else:
            delta = self._release(task, raw_delta, "train")
        update = Update(
            round=task.round, basis_version=task.basis_version, delta=delta,
            n_examples=int(y.size) if central else 0, clipped=central and norm > task.clip_norm,
            norm_bit=int(norm <= task.clip_norm) if task.adaptive_clipping and central else None,
            metrics=self._metrics(task, loss, int(y.size), cpu_start, accuracy, eval_windows),
        )
        logger.info("%s: round %d trained on %d windows: loss %.4f, |delta| %.3g (clip %.3g), held-out balanced "
                    "accuracy of the incoming model %s", self.device_id, task.round, y.size, loss, norm,
                    task.clip_norm, "n/a" if accuracy is None else f"{accuracy:.3f}")
        out = [Outgoing(self.topics.update(self.device_id), self._encode(update))]
        if secure:
            out.append(Outgoing(self.topics.secagg(self.device_id), self._encode(self._secagg.start())))
        return out

    def _local_training(self, task: Task, Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """``(new params, loss)`` of local training from the task's model on projected rows ``Z``
        (labels ``y``): minibatch SGD/Adam, or record-level DP-SGD through :attr:`record_mechanism`
        when ``[dp] record_noise_multiplier`` is set. The one step of a training round that depends
        on the learning rule (the audit's canary clients replace it; clipping, noise and publishing
        stay the agent's)."""
        common = dict(lr=task.lr, optimizer=task.optimizer, l2=task.l2, prox_mu=task.prox_mu,
                      prox_center=task.model if task.prox_mu > 0 else None, random_state=self._train_rng)
        dp = self.config.dp
        if dp.record_noise_multiplier is None:
            return train(task.model, Z, y, len(task.classes), task.hidden, epochs=task.local_epochs,
                         batch_size=task.batch_size, **common)
        z, clip, q = dp.record_noise_multiplier, dp.record_clip_norm, dp.record_sampling_rate
        gate = self.record_mechanism

        def release(grads: np.ndarray) -> np.ndarray:
            return gate.release(Charge(len(gate.ledger), "train", q, z), ClippedSum(grads, clip, z * clip))[0]

        params, loss = dp_sgd(task.model, Z, y, len(task.classes), task.hidden,
                              steps=math.ceil(task.local_epochs / q), sampling_rate=q, release=release, **common)
        report = self.privacy_report()
        logger.info("%s: privacy after round %d: record-level epsilon %.4g (DP-SGD, q=%g, z=%g) | client-level "
                    "epsilon of this device's own releases %.4g, at delta %g", self.device_id, task.round,
                    report["record_epsilon"], q, z, report["client_epsilon"], report["delta"])
        return params, 0.0 if math.isnan(loss) else loss

    def _on_secagg(self, relay: SecAggRelay) -> list[Outgoing]:
        """Answer the coordinator's next secure-aggregation step of the current round."""
        participant = self._secagg
        if participant is None or relay.round != participant.round:
            logger.debug("%s: secagg %s relay of round %d is not for an open round here; ignored",
                         self.device_id, relay.step, relay.round)
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

    def _evaluate(self, task: Task) -> list[Outgoing]:
        self._enter(AgentState.EVALUATING)
        cpu_start = time.process_time()
        if not self._check_model_size(task):
            return []
        data = self.local_data(task.classes)
        accuracy, eval_windows, loss = self._held_out_metrics(task, data)
        if accuracy is None:
            logger.warning("%s: no held-out windows to evaluate round %d on", self.device_id, task.round)
            return []
        update = Update(
            round=task.round, basis_version=task.basis_version, delta=np.empty(0, dtype=np.float64), n_examples=0,
            clipped=False, metrics=self._metrics(task, loss, eval_windows, cpu_start, accuracy, eval_windows),
        )
        logger.info("%s: evaluated round %d on %d held-out windows: balanced accuracy %.3f", self.device_id,
                    task.round, eval_windows, accuracy)
        return [Outgoing(self.topics.update(self.device_id), self._encode(update))]

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
        will = Will(self.topics.status(self.device_id), offline_status(fleet=self.config.fleet,
                                                                        device_id=self.device_id,
                                                                        signer=self._signer))
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
                logger.info("%s: offline status not delivered (%s); the broker publishes the last will",
                            self.device_id, exc)
        client.close()
        self._client = None

    def run(self, stop: threading.Event) -> None:
        """Warm up, ingest, connect and serve tasks until ``stop`` is set; then go offline cleanly."""
        from biofed.edge.continuous import ContinuousIngestion

        ingest_thread = None
        self._enter(AgentState.STARTING)
        if self.config.warmup:  # compile (or load) every kernel now, so no task waits on the JIT
            from biofed.edge.warmup import warmup

            logger.info("%s: kernels warmed up in %.1f s", self.device_id, warmup())
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
