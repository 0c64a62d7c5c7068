"""The coordinator's inbound path: decode, admit, deduplicate and route every MQTT message.

:class:`Ingest` takes each message the coordinator's client receives and

- decodes it with the fleet's size limit (and signature check, with ``keys_dir``);
- admits only devices on the allow list (:class:`AllowList`, with ``allowed_devices_file``);
- routes statuses to the online set and the reported feature layouts, secure-aggregation
  uploads to the open round's :class:`~biofed.coordinator.secure_aggregation.SecureAggregationRound`,
  and replies (:class:`~biofed.protocol.Update`, :class:`~biofed.protocol.Sketch`) to the
  :class:`OpenRound`;
- drops, with one log line and a count per reason, whatever is malformed, oversized, from
  another fleet, from a device never seen online, for another round, past the deadline, for
  another basis version, from a device not selected, a second reply of a device, or a
  duplicate message id (QoS 1 redelivery; the ids of committed replies are persisted, so a
  restarted coordinator does not accept them again).

Nothing a device sends can stop the coordinator. Ingest holds no broker and reads the time
only through its injectable ``clock``, so it is tested message by message.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from biofed.config import ConfigError, load_allowed_devices
from biofed.coordinator.secure_aggregation import SecureAggregationRound
from biofed.model import FeatureLayout, ModelFormatError
from biofed.protocol import (
    SKETCH_PHASES,
    Message,
    MessageVerifier,
    ProtocolError,
    SeenMessageIds,
    Sketch,
    Status,
    Topics,
    Update,
    decode_topic_message,
)
from biofed.secure_aggregation import SecAggError, SecAggUpload

logger = logging.getLogger(__name__)

__all__ = ["AllowList", "Ingest", "OpenRound"]


class AllowList:
    """The admitted devices of an allow list file (``allowed_devices.json``), re-read by
    :meth:`refresh` whenever the file changes (``biofed provision revoke`` rewrites it).

    Raises
    ------
    ConfigError
        At construction: the file is missing or invalid. A later change to an invalid or
        missing file is logged and the previous list kept, so a half-edited file never
        admits everybody or nobody.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp = self._file_stamp()
        self.devices = load_allowed_devices(self.path)

    def __contains__(self, device: object) -> bool:
        return device in self.devices

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    def refresh(self) -> frozenset[str]:
        """Re-read the file if it changed; returns the devices taken off the list."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return frozenset()
        self._stamp = stamp
        try:
            devices = load_allowed_devices(self.path)
        except ConfigError as exc:
            logger.error("%s; keeping the previous allow list of %d devices", exc, len(self.devices))
            return frozenset()
        removed, added = self.devices - devices, devices - self.devices
        self.devices = devices
        logger.info(
            "allow list %s changed: %d devices (removed %s, added %s)",
            self.path,
            len(devices),
            sorted(removed) or "none",
            sorted(added) or "none",
        )
        return removed


@dataclass
class OpenRound:
    """The round currently accepting replies.

    ``n_params`` is the update length expected in training (0 for evaluation replies);
    ``n_features`` the sketch dimension expected (None in the moments phase until the
    first accepted sketch fixes it: every device must report the same feature count).
    """

    round: int
    phase: str
    participants: frozenset[str]
    deadline: float
    basis_version: int
    n_params: int | None = None
    n_features: int | None = None
    statistic_size: int | None = None
    """The packed statistics length of a statistics-phase round (None: any the sketch allows)."""
    need_norm_bit: bool = False
    received: dict[str, Message] = field(default_factory=dict)
    secure: SecureAggregationRound | None = None
    """The secure aggregation of a distributed-mode training round (updates carry no delta)."""

    @property
    def kind(self) -> str:
        return "sketch" if self.phase in SKETCH_PHASES else "update"


class Ingest:
    """The coordinator's inbound path: decode, validate, deduplicate, route.

    Parameters
    ----------
    topics : Topics
        The fleet's topics.
    max_bytes : int
        Larger payloads are dropped before decoding.
    seen : SeenMessageIds
        Ids of accepted messages (pre-filled from the state database on restart).
    clock : callable
        Unix time now (the deadline check).
    verifier : biofed.signing.Verifier or None
        Require valid signatures (see :func:`biofed.protocol.decode_message`).
    allowed : AllowList or None
        Drop every message of a device not on it; None: any device of the fleet.
    """

    def __init__(
        self,
        topics: Topics,
        *,
        max_bytes: int,
        seen: SeenMessageIds | None = None,
        clock: Callable[[], float] = time.time,
        verifier: MessageVerifier | None = None,
        allowed: AllowList | None = None,
    ) -> None:
        self.topics = topics
        self.max_bytes = max_bytes
        self.verifier = verifier
        self.allowed = allowed
        self.seen = seen if seen is not None else SeenMessageIds(1_000_000)
        self.clock = clock
        self.known: set[str] = set()
        """Devices that ever published a status."""
        self.online: set[str] = set()
        """Devices whose latest status is not "offline"."""
        self.layouts: dict[str, str] = {}
        """Latest feature layout (JSON, :class:`biofed.model.FeatureLayout`) each device reported."""
        self.open: OpenRound | None = None
        self.dropped: Counter[str] = Counter()
        """Drop counts per reason (for tests and the benchmark)."""

    def refresh_allowed(self) -> None:
        """Pick up a changed allow list: a device taken off it is no longer online or known,
        so it is neither selected nor waited for."""
        if self.allowed is None:
            return
        for device in self.allowed.refresh():
            self.known.discard(device)
            if device in self.online:
                self.online.discard(device)
                logger.warning(
                    "device %s was removed from the allow list; ignoring it (%d online)", device, len(self.online)
                )

    def _drop(self, reason: str, topic: str, detail: str) -> str:
        self.dropped[reason] += 1
        logger.warning("dropped message on %s: %s (%s)", topic, reason, detail)
        return "dropped"

    def handle(self, topic: str, payload: bytes) -> str:
        """Process one inbound MQTT message; never raises on any input.

        Every rejection is counted in :attr:`dropped` under its reason; a failure inside
        the handling of one message (a bug) costs that message (reason ``"internal error"``,
        logged with its traceback), never the coordinator.

        Returns
        -------
        str
            ``"accepted"`` (a reply stored in :attr:`open`), ``"status"``, ``"secagg"`` or
            ``"dropped"``.
        """
        try:
            return self._handle(topic, payload)
        except Exception as exc:  # noqa: BLE001 - one message never stops the coordinator
            self.dropped["internal error"] += 1
            logger.exception("dropped message on %r: internal error handling it (%s)", topic, type(exc).__name__)
            return "dropped"

    def _handle(self, topic: str, payload: bytes) -> str:
        try:
            message = decode_topic_message(
                self.topics, topic, payload, max_bytes=self.max_bytes, verifier=self.verifier
            )
        except ProtocolError as exc:
            return self._drop(type(exc).__name__, topic, str(exc))
        if self.allowed is not None and message.sender not in self.allowed:
            return self._drop("not admitted", topic, f"{message.sender} is not on the allow list {self.allowed.path}")
        if message.kind == "status":
            return self._status(message)
        if message.kind == "secagg":
            return self._secagg(topic, message)
        if message.kind not in ("update", "sketch"):
            return self._drop("unexpected kind", topic, f"{message.kind} is not sent to the coordinator")
        return self._reply(topic, message)

    def _status(self, message: Message) -> str:
        device, status = message.sender, message.payload
        assert isinstance(status, Status)
        self.known.add(device)
        if status.layout:
            try:  # parsed once here, so a bad layout never reaches the export after a round
                FeatureLayout.from_json(status.layout)
            except ModelFormatError as exc:
                self.dropped["bad layout"] += 1
                logger.warning("device %s reported an unreadable feature layout, ignored: %s", device, exc)
            else:
                self.layouts[device] = status.layout
        if status.state == "offline":
            if device in self.online:
                self.online.discard(device)
                logger.info("device %s is offline (%d online)", device, len(self.online))
        elif device not in self.online:
            self.online.add(device)
            logger.info("device %s is online (%s; %d online)", device, status.state, len(self.online))
        return "status"

    def _secagg(self, topic: str, message: Message) -> str:
        rnd = self.open
        if rnd is None or rnd.secure is None:
            return self._drop("no secure aggregation", topic, f"secagg for round {message.round}")
        payload = message.payload
        assert isinstance(payload, SecAggUpload)
        try:
            rnd.secure.handle(message.sender, payload)
        except SecAggError as exc:
            return self._drop("secagg", topic, str(exc))
        return "secagg"

    def _reply(self, topic: str, message: Message) -> str:
        device, payload = message.sender, message.payload
        rnd = self.open
        if device not in self.known:
            return self._drop("unknown device", topic, f"{device} never published a status")
        if message.message_id in self.seen:
            return self._drop("duplicate", topic, f"message id {message.message_id} was already accepted")
        if rnd is None:
            return self._drop("no open round", topic, f"{message.kind} for round {message.round}")
        if message.round != rnd.round:
            return self._drop("wrong round", topic, f"round {message.round}, the open round is {rnd.round}")
        if message.kind != rnd.kind:
            return self._drop("wrong kind", topic, f"a {message.kind} in the {rnd.phase} phase")
        if self.clock() > rnd.deadline:
            return self._drop("late", topic, f"arrived {self.clock() - rnd.deadline:.2f} s after the deadline")
        if payload.basis_version != rnd.basis_version:
            return self._drop(
                "basis version", topic, f"basis version {payload.basis_version}, current is {rnd.basis_version}"
            )
        if device not in rnd.participants:
            return self._drop("not selected", topic, f"{device} is not a participant of round {rnd.round}")
        if device in rnd.received:
            return self._drop("second reply", topic, f"{device} already replied in round {rnd.round}")
        problem = self._check_payload(rnd, payload)
        if problem is not None:
            return self._drop("bad payload", topic, problem)
        if isinstance(payload, Sketch) and rnd.n_features is None:
            rnd.n_features = payload.n_features
        self.seen.add(message.message_id)
        rnd.received[device] = message
        return "accepted"

    @staticmethod
    def _check_payload(rnd: OpenRound, payload: Update | Sketch) -> str | None:
        if isinstance(payload, Sketch):
            if payload.phase != rnd.phase:
                return f"a {payload.phase} sketch in the {rnd.phase} phase"
            if rnd.n_features is not None and payload.n_features != rnd.n_features:
                return f"{payload.n_features} features, the round has {rnd.n_features}"
            if rnd.statistic_size is not None and payload.statistic.shape != (rnd.statistic_size,):
                return f"statistics of {payload.statistic.size} entries, the round expects {rnd.statistic_size}"
            return None
        if rnd.phase == "evaluate":
            if payload.delta.size or payload.n_examples:
                return "an evaluation reply must have an empty delta and n_examples=0"
            return None
        if rnd.secure is not None:
            return (
                "a distributed-mode update must not carry its delta (it is secure-aggregated)"
                if payload.delta.size
                else None
            )
        if payload.delta.shape != (rnd.n_params,):
            return f"delta has {payload.delta.size} parameters, the model has {rnd.n_params}"
        if rnd.need_norm_bit and payload.norm_bit is None:
            return "adaptive clipping is on but the update carries no norm_bit"
        return None
