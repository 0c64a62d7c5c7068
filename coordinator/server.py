"""The federated coordinator: the loop that runs a fleet's rounds over MQTT.

:class:`Coordinator` is a thin loop over three parts, each in its own module:

- :mod:`biofed.coordinator.ingest`: the inbound path (decode, allow list, dedupe, routing);
- :mod:`biofed.coordinator.phases`: the round phases, pure functions from (state, replies)
  to (new state, DP event, payload);
- :mod:`biofed.coordinator.central_dp`: central DP composed once around the strategy.

The loop owns what those leave out: the broker connection, the clock (deadlines, outages),
the state database (one commit per round) and the privacy mechanism that runs each phase's
release.

Flow (the "Federated flow" contract shared with ``biofed.edge``)
----------------------------------------------------------------
::

    WAITING -> MOMENTS -> COVARIANCE [-> STATISTICS] -> TRAINING x rounds -> EVALUATING -> DONE
                 (basis phases: one Sketch per device)  (Updates)   (eval-only Updates)

With ``[training] algorithm = "one_shot"`` the STATISTICS phase follows the basis: every
device sends its clipped class means (and within-class scatter) in the basis space as one
packed :class:`Sketch` (:mod:`biofed.protocol.statistics`), released once (``z_s``, ledger
kind ``"statistics"``) and solved as a ridge LDA whose :class:`Model` is published like a
training round's; ``rounds`` fine-tuning rounds (0: none) follow.

With ``[model] standardization = "device"`` (the default) there is no MOMENTS phase: every
device z-scores its rows with its own training split's mean and scale, the covariance task
carries no ``stats_mean``/``stats_scale``, the devices send the correlation matrix of their
standardized rows and the :class:`Basis` has mean 0, scale 1 and ``standardization="device"``.
The basis phases use their own DP parameters: ``dp.basis_noise_multiplier`` (z_b) and
``dp.basis_clip_norm`` (C_b), each phase one ``kind="basis"`` ledger event with z_b.

Every round: wait until ``min_devices`` devices are online (retained ``status/{id}``;
their MQTT last will is "offline"), select participants, publish the :class:`Task`
retained with an absolute deadline, collect replies until the deadline or until every
participant has replied (or gone offline), then

- with >= ``min_devices`` replies: aggregate, account, commit (one SQLite transaction),
  publish the result retained (:class:`Basis` after the covariance phase, :class:`Model`
  after each training round) and print one line;
- with fewer: nothing is published; the round is retried with a fresh selection and a
  new round number, at most ``max_retries`` times, then the run aborts. What already
  reached the coordinator stays charged (local-mode replies, an unmasked sum; see below).

Task round numbers increase across phases and are never reused (a retry or a restart
takes the next one), so a device never sees two different tasks with one round number.

Inbound messages go through :class:`~biofed.coordinator.ingest.Ingest`, which drops
(with one log line) whatever is malformed, unexpected or a duplicate, so nothing a device
sends can stop the coordinator.

Differential privacy (client level; see :mod:`biofed.privacy_ledger`)
----------------------------------------------------------------------
Every charge goes through the coordinator's :class:`~biofed.privacy_mechanism.PrivacyMechanism`
(:attr:`Coordinator.mechanism`), which writes the ledger to the state database before
anything it covers is published (write-ahead: a crash in between over-counts on restart).
Its noise generator is its own; device sampling, model initialisation and the MQTT
reconnect jitter each have another.

central
    Devices clip; the mechanism clips again, sums, adds ``N(0, (z C)^2)`` and charges the
    round; the coordinator divides by ``n`` (:class:`~biofed.coordinator.central_dp.DPAggregator`,
    built once per run). With adaptive clipping the update uses ``z_delta`` and the
    devices' ``norm_bit`` move C
    (:class:`~biofed.coordinator.clipping.AdaptiveClipping`), released in the same charge.
    Robust strategies (trimmed mean, median) are refused with noise: their sensitivity is
    not C/n (without noise they are charged as ``z = 0``: epsilon is infinite).
local
    The coordinator is the adversary: devices clip, noise and charge through their own
    gates and send no data-dependent cleartext. The coordinator charges every round (and
    basis phase) before its task goes out, so retried and abandoned rounds are in epsilon.
distributed
    Training rounds are secure-aggregated (:mod:`biofed.coordinator.secure_aggregation`,
    :mod:`biofed.secure_aggregation`): each device sends an ``Update`` with an empty delta and no
    metrics, then its clipped update plus a noise share of std ``z C / sqrt(n_min)``
    (``n_min = Task.secagg_threshold``: ``dp.secagg_threshold``, never below
    ``min_devices``, default ``min_devices``) masked, and the coordinator learns only the
    sum over the survivors; the new model is ``strategy.server_update(params, sum /
    survivors)`` (FedAvg family only: robust strategies need the individual updates). The
    round is charged ``distributed_noise_multiplier(z, n_min, survivors)`` before the
    unmask request goes out; as ``n_min >= min_devices`` an unmasked sum always has enough
    survivors to be used, never discarded. Basis phases are answered as in local mode.

Sampling: the participants of a round are published (``Task.participants``) and so is
their count (``Model.n_devices``); amplification by sampling needs a secret sample, so
every round is charged with ``q = 1`` whatever ``sampling_rate`` is.

Signed messages: with ``signing_key_file`` every message the coordinator publishes is
signed; with ``keys_dir`` inbound messages without a valid signature of a known, unrevoked
device are dropped (:mod:`biofed.signing`). With ``allowed_devices_file`` messages of devices
not on the allow list are dropped too (:class:`~biofed.coordinator.ingest.AllowList`; a revocation while running takes
effect at the next message: the device is no longer online, selected or waited for).

Broker outages and overload
---------------------------
A broker outage of any length is ridden out: the MQTT client reconnects with backoff,
every publish (task, model, basis) waits in its queue until the broker acknowledges it
(:meth:`Coordinator._publish` keeps handling inbound messages meanwhile), so a committed
round's model goes out when the broker returns. The deadline rule: the clock of an open
round stops while the coordinator is disconnected; its deadline moves forward by the
length of the outage and the task is republished with that deadline once the broker is
back, and the round then waits for every participant until that deadline, whatever last
wills the outage released (:meth:`Coordinator._extend_deadline`). Secure-aggregation step timeouts are not
extended: an outage there ends the round with the survivors, as a dropout would.
Inbound overload is shed per sender by the client's inbox (:mod:`biofed.inbox`); replies
already accepted into an open round are held in memory and committed with the round.

Exported model (see :mod:`biofed.coordinator.onnx_export`)
-----------------------------------------------------------
After every training round the global model is written to ``state_dir/models/round_NNNNN``
(``.npz`` model file + ``.onnx`` graph) and ``state_dir/model_latest.{npz,onnx}``, and the
ONNX bytes ride along in the retained :class:`Model` message (``Model.onnx``), so a device
predicts with onnxruntime without any graph code of its own. The finished run adds
``model_final.npz`` / ``model_final.onnx``. The ONNX metadata carries the feature layout,
which the coordinator learns from the devices' retained statuses (``Status.layout``): the
layout reported by the most devices among those whose width equals the basis's. Without
any reported layout only the ``.npz`` files are written. An export failure is logged; the
round stays committed.

Ledger entries per round: basis phases ``kind="basis"``, the one-shot statistics
``kind="statistics"`` (z_s), training rounds ``kind="train"``, all with ``q = 1``. Before the
first round the run's plan (every release it will make) is logged with its epsilon
(:func:`~biofed.coordinator.phases.planned_epsilons`; ``biofed privacy --config`` prints it).
A round where fewer devices replied than were selected keeps the noise
``z C`` on the sum (``C`` still bounds each device), so it is recorded with the same ``z``;
only utility suffers. The budget is checked with the next round's parameters before every
round; training stops (and the evaluation still runs) when the next round would exceed it.
Evaluation replies are not released: in central mode the per-device balanced accuracies are
logged in the coordinator's own state; in local and distributed modes devices send none.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from biofed.config import ConfigError, CoordinatorConfig
from biofed.coordinator.ingest import AllowList, Ingest, OpenRound
from biofed.coordinator.onnx_export import ExportError, export_onnx, export_round
from biofed.coordinator.phases import (
    PendingPhase,
    PhaseOutcome,
    basis_phase,
    charge_before_task,
    compose_rounds,
    evaluate_phase,
    make_task,
    planned_epsilons,
    round_record,
    select_participants,
    standardization,
    statistics_phase,
    train_phase,
    unmask_charge,
)
from biofed.coordinator.secure_aggregation import SecureAggregationRound
from biofed.coordinator.state import (
    CoordinatorState,
    RoundRecord,
    Snapshot,
    StateDirLock,
    StateError,
)
from biofed.kernels.random_state import check_random_state
from biofed.metrics import CoordinatorMetrics, serve
from biofed.model import FeatureLayout, ModelFile, ModelFormatError, PrivacySpec
from biofed.mqtt import ConnectError, MqttClient, MqttError
from biofed.privacy_ledger import ACCOUNTANTS, PrivacyLedger
from biofed.privacy_mechanism import PrivacyMechanism
from biofed.protocol import (
    BASIS_PHASES,
    Message,
    Model,
    Task,
    Topics,
    encode_message,
)
from biofed.signing import signing_from_config

logger = logging.getLogger(__name__)

__all__ = ["COORDINATOR_SENDER", "Coordinator", "CoordinatorError", "RunState"]

COORDINATOR_SENDER = "coordinator"
"""Sender id of every message the coordinator publishes."""

_OUTAGE_LOG_INTERVAL_S = 30.0  # how often a publish held up by a broker outage is logged


class CoordinatorError(RuntimeError):
    """The coordinator cannot start or continue (bad settings, broker unreachable, too few devices)."""


class RunState(enum.Enum):
    """Where the coordinator's state machine is; ``recoverable`` says whether a new
    ``run()`` on the same state directory continues from here."""

    STARTING = "starting", True
    """Opening the state and connecting to the broker."""
    WAITING = "waiting", True
    """Fewer than ``min_devices`` devices online; waiting for more."""
    MOMENTS = "moments", True
    """Basis phase 1: collecting the devices' moment statistics."""
    COVARIANCE = "covariance", True
    """Basis phase 2: collecting the covariance of standardized features."""
    STATISTICS = "statistics", True
    """One-shot: collecting the devices' class statistics in the basis space."""
    TRAINING = "training", True
    """A training round is open."""
    EVALUATING = "evaluating", True
    """The final model is being evaluated on the devices' held-out windows."""
    DONE = "done", False
    """All rounds ran (or the privacy budget stopped training); final model written."""
    STOPPED = "stopped", True
    """:meth:`Coordinator.stop` was called; the open round (if any) was abandoned uncommitted."""
    ABORTED = "aborted", True
    """Too few devices (discovery timeout or too many retries); see the log."""

    def __new__(cls, value: str, recoverable: bool) -> RunState:
        member = object.__new__(cls)
        member._value_ = value
        member.recoverable = recoverable
        return member


_PHASE_STATES = {
    "moments": RunState.MOMENTS,
    "covariance": RunState.COVARIANCE,
    "statistics": RunState.STATISTICS,
    "train": RunState.TRAINING,
    "evaluate": RunState.EVALUATING,
}


# ----------------------------------------------------------------------------- coordinator
@dataclass(frozen=True)
class _Collected:
    round: int
    replies: dict[str, Message]
    n_selected: int
    attempts: int
    secure: SecureAggregationRound | None = None

    @property
    def n_contributions(self) -> int:
        """Devices whose input is in the round's output: the survivors of a secure round
        (their metrics-only updates may be missing), else the replies."""
        return len(self.secure.result.survivors) if self.secure is not None else len(self.replies)


class Coordinator:
    """The round loop of one fleet; :meth:`run` blocks, :meth:`stop` ends it from any thread.

    Parameters
    ----------
    config : CoordinatorConfig
        Fleet, broker, rounds, sampling, strategy, model and DP settings; state lives in
        ``config.state_dir``.
    discovery_timeout_s : float or None
        How long to wait for ``min_devices`` online devices before aborting (None: forever).
    max_retries : int
        Re-runs of a round that got fewer than ``min_devices`` replies before aborting.
    basis_clip_norm : float or None
        Clip norm C_b of the basis statistics, overriding ``config.dp.basis_clip_norm``
        (``biofed coordinator --basis-clip-norm``); None: ``config.dp.basis_clip_norm``, or
        ``config.dp.clip_norm`` when that is unset too.
    accountants : sequence of {"rdp", "pld"} or None
        Epsilons reported per round; the first is the budget accountant. None:
        ``config.dp.accountant`` then the other one. PLD is slower to compute than RDP.
    rng : numpy.random.Generator or None
        Seeds the device-sampling and model-initialization generators (two independent
        streams spawned from it); None (production) is OS-seeded. Privacy noise never comes
        from it: it is drawn by the coordinator's :class:`~biofed.privacy_mechanism.PrivacyMechanism`,
        and the MQTT reconnect jitter has its own generator too.
    on_round : callable or None
        Called with each :class:`RoundRecord` after its commit (the CLI prints it).
    client_id : str or None
        MQTT client id; default ``coordinator-{fleet}``.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        discovery_timeout_s: float | None = 300.0,
        max_retries: int = 3,
        basis_clip_norm: float | None = None,
        accountants: tuple[str, ...] | None = None,
        rng: np.random.Generator | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        client_id: str | None = None,
    ) -> None:
        self.config = config
        dp = config.dp
        if max_retries < 0:
            raise CoordinatorError(f"max_retries must be >= 0, got {max_retries}")
        self.discovery_timeout_s = discovery_timeout_s
        self.max_retries = int(max_retries)
        try:
            composition = compose_rounds(config, basis_clip_norm=basis_clip_norm)
        except ValueError as exc:
            raise CoordinatorError(str(exc)) from None
        self.settings = composition.settings
        """What every round of the run is built with (:mod:`biofed.coordinator.phases`)."""
        self.strategy = composition.strategy
        self.central_dp = composition.central_dp
        """The central-DP composition around :attr:`strategy`, built once (central mode, FedAvg family)."""
        if accountants is None:
            accountants = (dp.accountant, *[a for a in ACCOUNTANTS if a != dp.accountant])
        self.accountants = tuple(accountants)
        self._sampling_rng, self._init_rng = check_random_state(rng).spawn(2)
        self.on_round = on_round
        self.topics = Topics(config.fleet)
        self.client_id = client_id or f"coordinator-{config.fleet}"
        try:
            self._signer, verifier = signing_from_config(config, COORDINATOR_SENDER)
        except ValueError as exc:
            raise CoordinatorError(str(exc)) from None
        self._stop = threading.Event()
        self.shed_messages = 0
        """Inbound messages shed by the MQTT inbox's overload policy in finished runs (:mod:`biofed.inbox`)."""
        self._state = RunState.STARTING
        self._store: CoordinatorState | None = None
        self._dir_lock: StateDirLock | None = None
        self._client: MqttClient | None = None
        try:
            allowed = None if config.allowed_devices_file is None else AllowList(config.allowed_devices_file)
        except ConfigError as exc:
            raise CoordinatorError(str(exc)) from None
        self.ingest = Ingest(self.topics, max_bytes=config.broker.max_message_bytes, verifier=verifier, allowed=allowed)
        self.snapshot = Snapshot(clip_norm=dp.clip_norm)
        self.ledger = PrivacyLedger(dp.delta, self.accountants, dp.epsilon_budget)
        self.mechanism = PrivacyMechanism(self.ledger, persist=self._persist_ledger)
        """The coordinator's release gate: every round whose output reached the adversary of
        the trust mode is charged through it, durably, before anything is published."""
        self.metrics = CoordinatorMetrics(self)
        """Prometheus series (served on ``config.metrics`` while :meth:`run` runs)."""

    # ------------------------------------------------------------------ public API
    @property
    def state(self) -> RunState:
        """The current :class:`RunState`."""
        return self._state

    def stop(self) -> None:
        """Ask :meth:`run` to return (thread-safe). An open round is abandoned: nothing of
        it is committed or accounted, and a restart runs it again under a new number."""
        self._stop.set()

    def history(self) -> list[RoundRecord]:
        """Closed rounds so far, read from the state database (safe from any thread, during
        or after :meth:`run`)."""
        store = CoordinatorState(self.config.state_dir, self.config.fleet)
        try:
            return store.history()
        finally:
            store.close()

    def epsilons(self) -> dict[str, float]:
        """``{accountant: epsilon}`` spent so far at ``config.dp.delta``."""
        return self.ledger.epsilons()

    def run(self) -> RunState:
        """Run (or resume) the federation until done, stopped or aborted.

        Returns
        -------
        RunState
            ``DONE``, ``STOPPED`` or ``ABORTED``.

        Raises
        ------
        CoordinatorError
            The broker is unreachable or the state directory belongs to another fleet.
        StateError
            The state directory cannot be written (read-only, full, I/O error), or another
            coordinator runs on ``config.state_dir`` (:class:`StateDirLock`); logged. The last
            committed round is intact: rerun once the directory is fixed.
        """
        self._stop.clear()
        metrics_server = None
        try:
            self._open_state()
            if not self._check_plan():
                return self._state
            self.metrics.set_epsilons(self.ledger.epsilons())
            try:
                metrics_server = serve(self.metrics.registry, self.config.metrics)
            except OSError as exc:
                raise CoordinatorError(f"[metrics] {exc}") from None
            self._connect()
            while not self._stop.is_set():
                phase = self.snapshot.phase
                if phase == "done":
                    self._state = RunState.DONE
                    break
                if not self._step(phase):
                    break
            if self._stop.is_set() and self._state is not RunState.DONE:
                self._state = RunState.STOPPED
                logger.info("coordinator stopped; resume with the same state_dir")
        except StateError as exc:  # storage faults are loud: one clear line, then the caller exits
            logger.error("state storage failed, stopping: %s", exc)
            raise
        finally:
            self.ingest.open = None
            if self._client is not None:
                self.shed_messages += self._client.shed
                self._client.close()
                self._client = None
            if self._store is not None:
                self._store.close()
                self._store = None
            if self._dir_lock is not None:
                self._dir_lock.release()
                self._dir_lock = None
            if metrics_server is not None:
                metrics_server.close()
        return self._state

    # ------------------------------------------------------------------ plumbing
    def _open_state(self) -> None:
        self._state = RunState.STARTING
        self._dir_lock = StateDirLock(self.config.state_dir)
        try:
            self._store = CoordinatorState(self.config.state_dir, self.config.fleet)
        except StateError:
            self._dir_lock.release()
            self._dir_lock = None
            raise
        loaded = self._store.load()
        if loaded is not None:
            self.snapshot = loaded
            self.ledger = PrivacyLedger(self.config.dp.delta, self.accountants, self.config.dp.epsilon_budget)
            self.mechanism.ledger = self.ledger
            if loaded.ledger is not None:
                self._restore_ledger(PrivacyLedger.from_json(loaded.ledger))
            if loaded.strategy_state:
                self.strategy.load_state_dict(loaded.strategy_state)
            logger.info(
                "resuming fleet %s from %s: phase %s, next round %d, %d training rounds done, epsilon %s",
                self.config.fleet,
                self._store.path,
                loaded.phase,
                loaded.next_round,
                loaded.train_rounds_done,
                self._format_eps(),
            )
        for message_id in self._store.accepted_ids():
            self.ingest.seen.add(message_id)

    def _check_plan(self) -> bool:
        """Log the epsilon of every release the run plans (basis, statistics, rounds), and
        warn when it exceeds the budget (training then stops early). False (aborted): a fresh
        one-shot run whose basis and statistics releases alone, which its model cannot do
        without, exceed the budget; nothing is released then."""
        planned = planned_epsilons(self.config, self.settings)
        budget = self.config.dp.epsilon_budget
        accountant = self.ledger.budget_accountant
        logger.info(
            "privacy plan (%s, %d training rounds, every release counted): epsilon %s at delta %g",
            self.settings.algorithm,
            self.config.rounds,
            ", ".join(f"{value:.4g} ({name})" for name, value in planned.items()),
            self.config.dp.delta,
        )
        if budget is not None and planned[accountant] > budget:
            logger.warning(
                "the planned epsilon %.4g (%s) exceeds dp.epsilon_budget = %g: training stops before the round "
                "that would cross it",
                planned[accountant],
                accountant,
                budget,
            )
        if budget is None or self.settings.algorithm != "one_shot" or len(self.ledger):
            return True
        needed = planned_epsilons(self.config.model_copy(update={"rounds": 0}), self.settings)[accountant]
        if needed > budget:
            return self._abort(
                f"the basis and the one-shot statistics releases alone spend epsilon {needed:.4g} ({accountant}), "
                f"above dp.epsilon_budget = {budget:g}; nothing was released. Raise dp.statistics_noise_multiplier "
                "or dp.basis_noise_multiplier, or the budget"
            )
        return True

    def _restore_ledger(self, persisted: PrivacyLedger) -> None:
        """Re-record the persisted entries (what was spent) under this run's accountants and
        budget (the config may raise or lower the budget between runs)."""
        if persisted.delta != self.config.dp.delta:
            logger.warning(
                "dp.delta changed from %g to %g: epsilon is now reported at the new delta",
                persisted.delta,
                self.config.dp.delta,
            )
        self.ledger.extend(persisted)

    def _persist_ledger(self, ledger: PrivacyLedger) -> None:
        """The mechanism's write-ahead: the ledger is in the state database before the
        charged value is published (a crash in between over-counts on restart)."""
        self.snapshot.ledger = ledger.to_json()
        self._store.write_ledger(self.snapshot.ledger)

    def _connect(self) -> None:
        try:  # address, protocol, limits, TLS files and credentials of config.broker
            self._client = MqttClient.from_config(self.config.broker, self.client_id)
        except (ConnectError, ConfigError) as exc:  # a TLS or password file is missing or invalid
            raise CoordinatorError(str(exc)) from None
        try:
            self._client.connect()
            for kind in ("status", "update", "sketch", "secagg"):
                self._client.subscribe(self.topics.all_devices(kind), qos=1)
        except (ConnectError, MqttError) as exc:
            self._client.close()
            self._client = None
            raise CoordinatorError(str(exc)) from None

    def _pump(self, timeout_s: float) -> None:
        """Handle inbound messages for up to ``timeout_s`` (returns after the first batch)."""
        self.ingest.refresh_allowed()
        message = self._client.receive(timeout_s)
        while message is not None:
            result = self.ingest.handle(message.topic, message.payload)
            self.metrics.received(message.topic, len(message.payload), result)
            message = self._client.receive(0)

    def _publish(self, topic: str, payload, *, retain: bool = True) -> bool:
        """Publish and wait for the broker's acknowledgement for as long as it takes,
        handling inbound messages meanwhile (the network thread never blocks, so the wait
        ends as soon as the broker answers). During a broker outage the message waits in
        the client's queue and goes out after the reconnect. False: stopped first, or the
        broker refused it (logged)."""
        data = encode_message(
            payload,
            fleet=self.config.fleet,
            sender=COORDINATOR_SENDER,
            max_bytes=self.config.broker.max_message_bytes,
            signer=self._signer,
        )
        try:
            info = self._client.publish(topic, data, qos=1, retain=retain, wait=False)
        except MqttError as exc:
            logger.error("%s of round %d not published: %s", payload.KIND, payload.round, exc)
            return False
        started = time.monotonic()
        warned = 0.0
        while not self._client.acknowledged(info):
            if self._stop.is_set():
                return False
            waited = time.monotonic() - started
            if waited - warned >= _OUTAGE_LOG_INTERVAL_S:
                warned = waited
                logger.warning(
                    "%s of round %d not acknowledged for %.0f s (broker %s); it is queued and goes "
                    "out when the broker is back",
                    payload.KIND,
                    payload.round,
                    waited,
                    "connected" if self._client.connected else "unreachable",
                )
            self._pump(0.1)
        refused = self._client.refusal(info)
        if refused is not None:
            logger.error(
                "%s of round %d refused by the broker: %s (check the broker's ACL for user %r)",
                payload.KIND,
                payload.round,
                refused,
                self.config.broker.username or self.client_id,
            )
            return False
        self.metrics.sent(len(data))
        if warned:
            logger.info(
                "%s of round %d published after %.0f s", payload.KIND, payload.round, time.monotonic() - started
            )
        return True

    def _format_eps(self) -> str:
        eps = self.ledger.epsilon()
        return f"{eps:.4g} ({self.ledger.budget_accountant}, delta={self.ledger.delta:g})"

    # ------------------------------------------------------------------ state machine
    def _step(self, phase: str) -> bool:
        """Run one round of ``phase``; False ends :meth:`run`."""
        if phase == "moments" and self.config.model.standardization == "device":
            # device standardization: no moments phase, the devices z-score with their own statistics
            phase = self.snapshot.phase = "covariance"
        if phase in BASIS_PHASES:
            if self.ledger.would_exceed(1.0, self.settings.basis_noise_multiplier):
                return self._abort(
                    f"the {phase} basis phase alone would exceed the privacy budget "
                    f"epsilon={self.config.dp.epsilon_budget}; raise dp.epsilon_budget or dp.basis_noise_multiplier"
                )
            return self._basis_round(phase)
        if phase == "statistics":
            if self.ledger.would_exceed(1.0, self.settings.statistics_noise_multiplier):
                return self._abort(
                    f"the one-shot statistics release would exceed the privacy budget "
                    f"epsilon={self.config.dp.epsilon_budget}; raise dp.epsilon_budget or "
                    "dp.statistics_noise_multiplier"
                )
            return self._statistics_round()
        if phase == "train":
            if self.snapshot.train_rounds_done >= self.config.rounds:
                self._advance_to_evaluate("all training rounds done")
                return True
            if self.ledger.would_exceed(1.0, self.config.dp.noise_multiplier):
                self._advance_to_evaluate(
                    f"privacy budget: the next round would exceed epsilon={self.config.dp.epsilon_budget}"
                )
                return True
            return self._train_round()
        if phase == "evaluate":
            return self._evaluate_round()
        return self._abort(f"unknown phase {phase!r} in the state database")

    def _abort(self, reason: str) -> bool:
        logger.error("aborting: %s", reason)
        self._state = RunState.ABORTED
        return False

    def _wait_for_devices(self) -> bool:
        need = self.config.min_devices
        if len(self.ingest.online) >= need:
            return True
        previous = self._state
        self._state = RunState.WAITING
        start = time.monotonic()
        last_log = -math.inf
        while len(self.ingest.online) < need:
            if self._stop.is_set():
                return False
            waited = time.monotonic() - start
            if self.discovery_timeout_s is not None and waited > self.discovery_timeout_s:
                self._abort(
                    f"only {len(self.ingest.online)} of the {need} devices needed (min_devices) came online "
                    f"within {self.discovery_timeout_s:g} s; start more devices or lower min_devices"
                )
                return False
            if waited - last_log >= 10.0:
                logger.info("waiting for devices: %d online, %d needed (min_devices)", len(self.ingest.online), need)
                last_log = waited
            self._pump(0.1)
        self._state = previous
        return True

    def _collect(self, phase: str) -> _Collected | None:
        """Select, publish the task, gather replies; retry short rounds. None: stopped/aborted."""
        attempts = 0
        while True:
            attempts += 1
            if not self._wait_for_devices():
                return None
            if attempts > 1 and phase == "train" and self.ledger.would_exceed(1.0, self.config.dp.noise_multiplier):
                self._advance_to_evaluate("privacy budget: a retried round (q = 1) would exceed the budget")
                return None
            participants = select_participants(
                self.ingest.online, phase, self.settings.sampling_rate, self._sampling_rng
            )
            if len(participants) >= self.config.min_devices:
                collected = self._gather(phase, participants, attempts)
                if collected is None:
                    return None
                if collected.n_contributions >= self.config.min_devices:
                    return collected
                reason = (
                    f"round {collected.round} ({phase}) closed with {collected.n_contributions} of "
                    f"{len(participants)} replies, fewer than min_devices={self.config.min_devices}"
                )
            else:
                reason = (
                    f"sampling selected {len(participants)} of {len(self.ingest.online)} online devices, "
                    f"fewer than min_devices={self.config.min_devices}"
                )
            if attempts > self.max_retries:
                self._abort(f"{reason}; gave up after {attempts} attempts (max_retries={self.max_retries})")
                return None
            logger.warning(
                "%s: nothing published (what reached the coordinator is accounted); retrying (attempt %d of %d)",
                reason,
                attempts + 1,
                self.max_retries + 1,
            )

    def _gather(self, phase: str, participants: list[str], attempts: int) -> _Collected | None:
        snap = self.snapshot
        round_ = snap.next_round
        snap.next_round += 1
        self._store.reserve_round(snap.next_round)
        deadline = time.time() + self.config.round_deadline_s
        task = make_task(self.settings, snap, round_, phase, participants, deadline)
        self.ingest.open = OpenRound(
            round=round_,
            phase=phase,
            participants=frozenset(participants),
            deadline=deadline,
            basis_version=snap.basis_version,
            n_params=(0 if phase == "evaluate" else None if snap.params is None else snap.params.size),
            n_features=(
                snap.n_features
                if phase == "covariance"
                else snap.basis_components.shape[0]
                if phase == "statistics"
                else None
            ),
            statistic_size=(
                self.settings.statistics_size(snap.basis_components.shape[0]) if phase == "statistics" else None
            ),
            need_norm_bit=phase == "train" and self.settings.adaptive_clipping,
        )
        if task.secagg_threshold:
            self.ingest.open.secure = SecureAggregationRound(
                fleet=self.config.fleet,
                round=round_,
                participants=participants,
                vector_size=snap.params.size,
                threshold=task.secagg_threshold,
                advertise_deadline=deadline,
                step_timeout_s=self.config.dp.secagg_step_timeout_s,
            )
        self._state = _PHASE_STATES[phase]
        downtime_at_start = self._client.downtime_s()
        charge = charge_before_task(self.settings, round_, phase)
        if charge is not None:
            self.mechanism.charge(charge)
        self.metrics.round_opened(round_)
        self._publish(self.topics.task, task)
        logger.info(
            "round %d (%s): task published to %d devices, deadline in %g s",
            round_,
            phase,
            len(participants),
            self.config.round_deadline_s,
        )
        if self.ingest.open.secure is not None:
            return self._gather_secure(round_, participants, attempts)
        try:
            while not self._stop.is_set():
                # The round clock stands still while the broker is unreachable (see _extend_deadline).
                paused_s = self._client.downtime_s() - downtime_at_start
                task = self._extend_deadline(task, deadline, paused_s)
                remaining = task.deadline - time.time()
                # a participant that went offline (its last will) is not waited for, unless the
                # broker itself went away meanwhile: it publishes every client's will as it goes
                waiting = set(participants) - set(self.ingest.open.received)
                if not paused_s:
                    waiting &= self.ingest.online
                if (remaining <= 0 and self._client.connected) or not waiting:
                    break
                self._pump(min(0.1, remaining) if remaining > 0 else 0.1)
            else:
                return None
            replies = dict(self.ingest.open.received)
        finally:
            self.ingest.open = None
        missing = sorted(set(participants) - set(replies))
        if missing:
            logger.info("round %d (%s): no reply from %s", round_, phase, ", ".join(missing))
        return _Collected(round_, replies, len(participants), attempts)

    def _extend_deadline(self, task: Task, planned_deadline: float, paused_s: float) -> Task:
        """The deadline rule for broker outages: a round's deadline is its planned deadline
        plus every second the coordinator was disconnected from the broker since the task
        was published (the round clock pauses during an outage; replies sent meanwhile wait
        in the devices' queues). Once connected again, a deadline moved by more than a
        second is republished in the (retained) task, so devices that saw the old deadline
        pass still answer. After an outage, "offline" statuses no longer end the round
        early (a broker that goes down publishes every client's last will): only replies
        or the deadline do. Returns the task in force."""
        deadline = planned_deadline + paused_s
        self.ingest.open.deadline = deadline
        if deadline - task.deadline < 1.0 or not self._client.connected:
            return task
        logger.info(
            "round %d: the broker was unreachable for %.0f s; deadline extended by as much",
            task.round,
            deadline - task.deadline,
        )
        task = replace(task, deadline=deadline)
        self._publish(self.topics.task, task)
        return task

    def _gather_secure(self, round_: int, participants: list[str], attempts: int) -> _Collected | None:
        """Run the secure-aggregation steps of a distributed-mode round; the replies are the
        metrics-only updates of the devices whose masked input is in the sum."""
        secure = self.ingest.open.secure
        try:
            while not secure.finished:
                if self._stop.is_set():
                    return None
                self._pump(0.05)
                relay = secure.poll()
                if relay is not None:
                    if relay.step == "unmask":  # from here the survivors' sum can be unmasked: charge it first
                        self.mechanism.charge(
                            unmask_charge(
                                self.settings,
                                round_,
                                self.snapshot.clip_norm,
                                self.snapshot.params.size,
                                secure.fixed_point.resolution,
                                len(relay.survivors),
                            )
                        )
                    self._publish(self.topics.secagg_relay, relay, retain=False)
                    logger.info(
                        "round %d: secure aggregation step %s with %d devices",
                        round_,
                        secure.step,
                        len(secure.expected),
                    )
            received = dict(self.ingest.open.received)
        finally:
            self.ingest.open = None
        survivors = set() if secure.result is None else set(secure.result.survivors)
        replies = {device: message for device, message in received.items() if device in survivors}
        if survivors - set(replies):
            logger.warning(
                "round %d: %s sent masked inputs but no metrics update",
                round_,
                ", ".join(sorted(survivors - set(replies))),
            )
        return _Collected(round_, replies, len(participants), attempts, secure if survivors else None)

    def _accepted_rows(self, collected: _Collected) -> list[tuple[str, int, str, str]]:
        return [(m.message_id, collected.round, device, m.kind) for device, m in collected.replies.items()]

    # ------------------------------------------------------------------ phases
    def _close(self, pending: PendingPhase) -> PhaseOutcome:
        """Run a phase's release through the mechanism, close it and take its new state."""
        outcome = pending.close(() if pending.release is None else pending.release.run(self.mechanism))
        self.snapshot = outcome.state
        return outcome

    def _basis_round(self, phase: str) -> bool:
        collected = self._collect(phase)
        if collected is None:
            return False
        sketches = [m.payload for m in collected.replies.values()]
        outcome = self._close(
            basis_phase(self.settings, self.snapshot, collected.round, phase, sketches, self._init_rng)
        )
        record = self._commit(collected, phase, sampling_rate=1.0, clip_norm=self.settings.basis_clip_norm)
        if outcome.payload is not None:
            self._publish(self.topics.basis, outcome.payload)
        self._report(record)
        return True

    def _statistics_round(self) -> bool:
        collected = self._collect("statistics")
        if collected is None:
            return False
        sketches = [m.payload for _, m in sorted(collected.replies.items())]
        outcome = self._close(statistics_phase(self.settings, self.snapshot, collected.round, sketches))
        record = self._commit(collected, "statistics", sampling_rate=1.0, clip_norm=None)
        self._publish_model(outcome.payload, collected.round)
        self._report(record)
        return True

    def _publish_model(self, model: Model, round_: int) -> None:
        eps = self.ledger.epsilon()
        self._publish(
            self.topics.model,
            replace(model, epsilon=eps if math.isfinite(eps) else None, onnx=self._export(round_)),
        )

    def _train_round(self) -> bool:
        collected = self._collect("train")
        if collected is None:
            return not self._stop.is_set() and self._state is not RunState.ABORTED
        clip = self.snapshot.clip_norm
        updates = {device: m.payload for device, m in collected.replies.items()}
        secure_mean = None if collected.secure is None else collected.secure.mean_update()
        outcome = self._close(
            train_phase(
                self.settings,
                self.snapshot,
                collected.round,
                updates,
                strategy=self.strategy,
                central_dp=self.central_dp,
                secure_mean=secure_mean,
            )
        )
        record = self._commit(collected, "train", sampling_rate=1.0, clip_norm=clip)
        self._publish_model(outcome.payload, collected.round)
        self._report(record)
        return True

    def _advance_to_evaluate(self, reason: str) -> None:
        logger.info("training finished: %s", reason)
        self.snapshot.phase = "evaluate"
        self.snapshot.stop_reason = reason
        self._store.commit_round(self.snapshot)

    def _evaluate_round(self) -> bool:
        if not self._wait_for_devices():
            return False
        participants = select_participants(
            self.ingest.online, "evaluate", self.settings.sampling_rate, self._sampling_rng
        )
        collected = self._gather("evaluate", participants, 1)
        if collected is None:
            return False
        self.snapshot = evaluate_phase(self.snapshot).state
        record = self._commit(collected, "evaluate", sampling_rate=None, clip_norm=None)
        self._write_final()
        self._report(record)
        self._state = RunState.DONE
        return True

    # ------------------------------------------------------------------ commit and report
    def _commit(
        self, collected: _Collected, phase: str, *, sampling_rate: float | None, clip_norm: float | None
    ) -> RoundRecord:
        snap = self.snapshot
        snap.ledger = self.ledger.to_json()
        record = round_record(
            self.settings,
            snap,
            collected.round,
            phase,
            [m.payload for m in collected.replies.values()],
            n_selected=collected.n_selected,
            attempts=collected.attempts,
            epsilons=self.ledger.epsilons(),
            sampling_rate=sampling_rate,
            clip_norm=clip_norm,
            finished=time.time(),
        )
        self._store.commit_round(snap, accepted=self._accepted_rows(collected), record=record)
        self._store.write_rounds_json()
        return record

    def _report(self, record: RoundRecord) -> None:
        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        eps = self.ledger.epsilon()
        logger.info(
            "round %d (%s%s): %d/%d devices, mean loss %s, balanced accuracy %s, epsilon %.4g (%s) at delta %g",
            record.round,
            record.phase,
            "" if record.train_round is None else f" {record.train_round}",
            record.n_devices,
            record.n_selected,
            fmt(record.mean_loss, ".4f"),
            fmt(record.balanced_accuracy, ".3f"),
            eps,
            self.ledger.budget_accountant,
            self.ledger.delta,
        )
        self.metrics.round_closed(record)
        if self.on_round is not None:
            self.on_round(record)

    def _write_final(self) -> None:
        snap, cfg = self.snapshot, self.config
        train_rounds = [r.round for r in self._store.history() if r.phase in ("statistics", "train")]
        model = self._model_file(train_rounds[-1] if train_rounds else 0)
        try:
            replace(model, stop_reason=snap.stop_reason).save(cfg.state_dir / "model_final.npz")
        except OSError as exc:
            raise StateError(f"{cfg.state_dir / 'model_final.npz'}: cannot write the final model: {exc}") from None
        if model.layout is not None:
            try:
                export_onnx(model, cfg.state_dir / "model_final.onnx")
            except (ExportError, OSError) as exc:
                logger.error("final model: ONNX export failed: %s", exc)
        logger.info("final model written to %s (epsilon %s)", cfg.state_dir / "model_final.npz", self._format_eps())

    # ------------------------------------------------------------------ exported model
    def _feature_layout(self) -> FeatureLayout | None:
        """The layout reported by the most devices among those as wide as the basis (None: none)."""
        d = self.snapshot.n_features
        votes: Counter[str] = Counter()
        for device, text in sorted(self.ingest.layouts.items()):
            try:
                layout = FeatureLayout.from_json(text)
            except ModelFormatError as exc:  # total: any text gives a layout or this error
                logger.warning("device %s reported an unreadable feature layout, ignored: %s", device, exc)
                continue
            if layout.n_features == d:
                votes[text] += 1
        if not votes:
            return None
        if len(votes) > 1:
            logger.warning(
                "devices report %d different feature layouts of %d features; the ONNX model carries "
                "the most common one",
                len(votes),
                d,
            )
        return FeatureLayout.from_json(votes.most_common(1)[0][0])

    def _model_file(self, round_: int) -> ModelFile:
        snap, cfg = self.snapshot, self.config
        budget = self.ledger.budget_accountant
        epsilons = self.ledger.epsilons()
        privacy = PrivacySpec(
            epsilon=epsilons[budget] if math.isfinite(epsilons[budget]) else None,
            delta=self.ledger.delta,
            accountant=budget,
            epsilons=epsilons,
            trust_mode=cfg.dp.trust_mode,
            noise_multiplier=cfg.dp.noise_multiplier,
        )
        return ModelFile(
            params=snap.params,
            classes=tuple(cfg.model.classes),
            hidden=cfg.model.hidden,
            basis=(snap.basis_components, snap.basis_mean, snap.basis_scale),
            basis_version=snap.basis_version,
            fleet=cfg.fleet,
            round=round_,
            train_round=snap.train_rounds_done,
            layout=self._feature_layout(),
            privacy=privacy,
            standardization=standardization(snap),
        )

    def _export(self, round_: int) -> np.ndarray:
        """Write the round's model files; return the ONNX bytes for the Model message (empty if none)."""
        try:
            _, path = export_round(self.config.state_dir, self._model_file(round_))
            return np.empty(0, dtype=np.uint8) if path is None else np.frombuffer(path.read_bytes(), dtype=np.uint8)
        except (ExportError, ModelFormatError, OSError) as exc:
            logger.error("round %d: model export failed (the round is committed): %s", round_, exc)
            return np.empty(0, dtype=np.uint8)
