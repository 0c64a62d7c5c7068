"""The biofed wire protocol: MQTT topics and a versioned msgpack envelope.

Shared by the coordinator and the device agent (which never import each other). Nothing
here touches the network; :mod:`biofed.mqtt` moves the bytes.

Topics
------
Everything of one fleet lives under ``biofed/{fleet}/``::

    biofed/{fleet}/model                    global model           coordinator -> devices, retained
    biofed/{fleet}/task                     round task             coordinator -> devices, retained
    biofed/{fleet}/basis                    shared feature basis   coordinator -> devices, retained
    biofed/{fleet}/update/{device_id}       model update           device -> coordinator
    biofed/{fleet}/sketch/{device_id}       basis sketch           device -> coordinator
    biofed/{fleet}/status/{device_id}       liveness, retained; the MQTT last will is "offline"
    biofed/{fleet}/prediction/{device_id}   on-device predictions  device -> anyone
    biofed/{fleet}/secagg/{device_id}       secure-aggregation step device -> coordinator
    biofed/{fleet}/secagg_relay             secure-aggregation step coordinator -> devices

Fleet and device ids match ``[A-Za-z0-9_-]{1,64}`` (no MQTT wildcards, no ``/``).

Envelope
--------
One msgpack map per MQTT payload (never pickle)::

    {"v": SCHEMA_VERSION, "k": kind, "f": fleet, "r": round, "s": sender,
     "id": 16 random bytes, "t": created (unix seconds), "p": payload map}

``p`` maps str to None, bool, int, float, str, a list of those, a nested map of the same
(depth <= 3) or a typed array. Typed arrays travel as msgpack ExtType code 1 whose data is
``dtype code (1 byte) | ndim (1 byte) | ndim little-endian uint64 dims | raw little-endian
bytes``; only float32, float64, int32, int64 and uint8 exist, and the byte length must
equal ``prod(shape) * itemsize``. Decoded arrays are read-only views of the message.

Each ``kind`` has a frozen payload dataclass (:class:`Task`, :class:`Update`,
:class:`Model`, :class:`Basis`, :class:`Sketch`, :class:`Status`, :class:`Prediction`)
that validates itself on construction, so a decoded :class:`Message` always holds a
well-formed payload. The envelope round is the payload's ``round`` field (stored once).

Decoding checks the size *before* unpacking and unpacks with hard limits on every
length prefix; any failure raises a :class:`ProtocolError` subclass, which a receiver
logs and drops (the process never dies on bad input). QoS 1 may deliver a message twice:
:class:`SeenMessageIds` makes handlers idempotent.

Signed messages
---------------
With a ``signer`` (:class:`biofed.signing.Signer`), :func:`encode_message` wraps the
envelope bytes above in a second msgpack map::

    {"s": sender, "e": envelope bytes, "sig": Ed25519 signature (64 bytes)}

The signature covers :data:`SIGNATURE_CONTEXT` followed by the exact envelope bytes, so
the fleet, kind, round, sender, message id, created time and payload are all signed; a
message replayed into another round or re-targeted to another fleet, topic or sender
fails verification. With a ``verifier`` (:class:`biofed.signing.Verifier` or
:class:`biofed.signing.KeyRing`) :func:`decode_message` checks the size, unpacks only the
small outer map, verifies the signature with the outer sender's public key and only then
parses the envelope (whose sender must equal the outer one); unsigned messages are refused
(:class:`UnsignedMessage`: no downgrade). A :class:`~biofed.signing.Verifier` then
rejects stale or replayed messages (:class:`StaleMessage`, :class:`ReplayedMessage`).
Without a verifier, signed and unsigned messages are both accepted and the signature is
not checked (``Message.verified`` is False), so unsigned deployments are unchanged.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeAlias

import msgpack
import numpy as np

SCHEMA_VERSION = 1
"""Envelope version. Bump it on any incompatible change; receivers reject other versions."""

TOPIC_ROOT = "biofed"
KINDS = ("task", "update", "model", "basis", "status", "sketch", "prediction", "secagg", "secagg_relay")
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""Default cap on one encoded message (16 MiB; a 1 M-parameter float64 update is 8 MiB)."""

TRUST_MODES = ("central", "local", "distributed")
PHASES = ("moments", "covariance", "train", "evaluate")
"""Task phases in the order a federation runs them: two basis phases (standardization
moments, then the covariance of standardized features; a fleet with device standardization
skips the moments), training rounds, one evaluation."""
BASIS_PHASES = ("moments", "covariance")
STANDARDIZATIONS = ("global", "device")
"""How devices standardize raw feature rows before the basis projection (:attr:`Basis.standardization`)."""
OPTIMIZERS = ("sgd", "adam")
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STATE_PATTERN = re.compile(r"[a-z_]{1,32}")

# Wire dtype codes. Explicit little-endian so big-endian hosts agree with everybody else.
_DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("u1"),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_CODES.items()}
ALLOWED_DTYPES = ("float32", "float64", "int32", "int64", "uint8")
_ARRAY_EXT = 1
_MAX_NDIM = 8
_MAX_DEPTH = 3
_MESSAGE_ID_BYTES = 16

# Limits handed to msgpack.unpackb so no length prefix can make it allocate more than the
# message itself could hold (lists such as Task.participants are the longest containers).
_MAX_STR_LEN = 64 * 1024
_MAX_ARRAY_LEN = 100_000
_MAX_MAP_LEN = 256

SIGNATURE_CONTEXT = b"biofed-envelope-v1\x00"
"""Domain-separation prefix of every signed byte string (never a valid msgpack envelope)."""
SIGNATURE_BYTES = 64
_SIGNED_KEYS = {"s", "e", "sig"}
_SIGNED_PREFIX = b"\x83"  # msgpack fixmap of 3 entries


# ----------------------------------------------------------------------------- errors
class ProtocolError(ValueError):
    """Base class of every decode or validation failure; receivers log and drop."""


class MessageTooLarge(ProtocolError):
    """The message, or a length declared inside it, exceeds the configured limit."""


class MalformedMessage(ProtocolError):
    """The bytes are not a valid biofed envelope (garbage, truncated, wrong field types)."""


class UnsupportedVersion(ProtocolError):
    """The envelope's schema version is not :data:`SCHEMA_VERSION`."""


class WrongFleet(ProtocolError):
    """The message belongs to another fleet than the receiver's."""


class UnexpectedKind(ProtocolError):
    """The message kind is not what the receiver (or the topic) expects."""


class SenderMismatch(ProtocolError):
    """The envelope's sender differs from the device id in the topic it arrived on."""


class InvalidTopic(ProtocolError):
    """A topic or id does not follow the biofed topic layout."""


class InvalidPayload(ProtocolError):
    """The payload does not match its kind's schema (missing field, bad shape, NaN ...)."""


class BadSignature(ProtocolError):
    """The signature does not verify with the claimed sender's public key (forged,
    tampered, or re-targeted to another round, fleet or sender)."""


class UnsignedMessage(BadSignature):
    """A message without signature reached a receiver that requires signatures."""


class UnknownSender(ProtocolError):
    """The claimed sender has no public key in the receiver's key ring, or was revoked."""


class StaleMessage(ProtocolError):
    """The message's created time is outside the receiver's allowed clock skew."""


class ReplayedMessage(ProtocolError):
    """The message id was already accepted once (a replay or a QoS 1 redelivery)."""


# ----------------------------------------------------------------------------- topics
def validate_id(value: object, what: str = "device id") -> str:
    """Return ``value`` if it is a valid fleet/device id, else raise :class:`InvalidTopic`."""
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise InvalidTopic(
            f"invalid {what} {value!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return value


_BROADCAST_KINDS = ("model", "task", "basis", "secagg_relay")
_DEVICE_KINDS = ("update", "sketch", "status", "prediction", "secagg")


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet.

    Examples
    --------
    >>> t = Topics("ward7")
    >>> t.update("pi-01")
    'biofed/ward7/update/pi-01'
    >>> t.parse("biofed/ward7/status/pi-01")
    ('status', 'pi-01')
    """

    fleet: str

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def task(self) -> str:
        return f"{self.base}/task"

    @property
    def basis(self) -> str:
        return f"{self.base}/basis"

    def update(self, device_id: str) -> str:
        return f"{self.base}/update/{validate_id(device_id)}"

    def sketch(self, device_id: str) -> str:
        return f"{self.base}/sketch/{validate_id(device_id)}"

    def status(self, device_id: str) -> str:
        return f"{self.base}/status/{validate_id(device_id)}"

    def prediction(self, device_id: str) -> str:
        return f"{self.base}/prediction/{validate_id(device_id)}"

    def secagg(self, device_id: str) -> str:
        return f"{self.base}/secagg/{validate_id(device_id)}"

    @property
    def secagg_relay(self) -> str:
        return f"{self.base}/secagg_relay"

    def all_devices(self, kind: str) -> str:
        """Subscription filter for one device-to-coordinator kind, e.g. ``biofed/f/update/+``."""
        if kind not in _DEVICE_KINDS:
            raise InvalidTopic(f"kind {kind!r} has no per-device topic; use one of {_DEVICE_KINDS}")
        return f"{self.base}/{kind}/+"

    def parse(self, topic: str) -> tuple[str, str | None]:
        """Split a topic of this fleet into ``(kind, device_id)``; device_id is None for
        the broadcast topics (model, task, basis). Raises :class:`InvalidTopic`."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != TOPIC_ROOT or parts[1] != self.fleet:
            raise InvalidTopic(f"topic {topic!r} is not under {self.base}/")
        kind = parts[2]
        if kind in _BROADCAST_KINDS and len(parts) == 3:
            return kind, None
        if kind in _DEVICE_KINDS and len(parts) == 4:
            return kind, validate_id(parts[3])
        raise InvalidTopic(
            f"topic {topic!r} is not a biofed topic: expected {self.base}/({'|'.join(_BROADCAST_KINDS)}) "
            f"or {self.base}/({'|'.join(_DEVICE_KINDS)})/<device_id>"
        )

    def device_id(self, topic: str, kind: str) -> str:
        """The device id of a per-device topic of ``kind``; raises :class:`InvalidTopic`."""
        found, device = self.parse(topic)
        if found != kind or device is None:
            raise InvalidTopic(f"topic {topic!r} is not a {kind} topic of fleet {self.fleet!r}")
        return device


# ----------------------------------------------------------------------------- arrays
def _encode_array(array: np.ndarray) -> msgpack.ExtType:
    if array.dtype.kind == "O":
        raise InvalidPayload("object arrays cannot be sent; convert to a numeric dtype")
    wire = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    code = _CODE_OF_DTYPE.get(wire)
    if code is None:
        raise InvalidPayload(
            f"array dtype {array.dtype} cannot be sent; use one of {', '.join(ALLOWED_DTYPES)} "
            f"(e.g. .astype(np.float32))"
        )
    if array.ndim > _MAX_NDIM:
        raise InvalidPayload(f"array has {array.ndim} dimensions; at most {_MAX_NDIM} are supported")
    data = np.ascontiguousarray(array, dtype=wire)
    header = struct.pack(f"<BB{array.ndim}Q", code, array.ndim, *array.shape)
    return msgpack.ExtType(_ARRAY_EXT, header + data.tobytes())


def _decode_array(code: int, data: bytes) -> np.ndarray:
    if code != _ARRAY_EXT:
        raise MalformedMessage(f"unknown msgpack extension type {code}")
    if len(data) < 2:
        raise MalformedMessage("typed array header is truncated")
    dtype = _DTYPE_CODES.get(data[0])
    if dtype is None:
        raise MalformedMessage(f"typed array has unknown dtype code {data[0]} (object dtype is never allowed)")
    ndim = data[1]
    if ndim > _MAX_NDIM:
        raise MalformedMessage(f"typed array declares {ndim} dimensions; at most {_MAX_NDIM} are allowed")
    header_len = 2 + 8 * ndim
    if len(data) < header_len:
        raise MalformedMessage("typed array shape is truncated")
    shape = struct.unpack_from(f"<{ndim}Q", data, 2)
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data) - header_len:
        raise MalformedMessage(
            f"typed array of shape {shape} and dtype {dtype.name} needs {expected} bytes, "
            f"message carries {len(data) - header_len}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


# ----------------------------------------------------------------------------- payload values
@dataclass(frozen=True)
class PayloadBounds:
    """The bounds every payload value obeys, checked on encode and on decode before any
    schema sees the value: map nesting, container lengths, string sizes, integer range.
    They restate the unpacker's length limits so a value built in Python is held to the
    same rules as one read off the wire."""

    max_depth: int = _MAX_DEPTH
    max_string_chars: int = _MAX_STR_LEN
    max_list_items: int = _MAX_ARRAY_LEN
    max_map_items: int = _MAX_MAP_LEN
    int_range: tuple[int, int] = (-(2**63), 2**64 - 1)  # what msgpack can carry

    def check_scalar(self, value: Any, path: str) -> None:
        if isinstance(value, str) and len(value) > self.max_string_chars:
            raise InvalidPayload(f"{path} is a string of {len(value)} characters, at most {self.max_string_chars}")
        if isinstance(value, int) and not isinstance(value, bool) and not self.int_range[0] <= value <= self.int_range[1]:
            raise InvalidPayload(f"{path} = {value} is outside the 64-bit integer range")


PAYLOAD_BOUNDS = PayloadBounds()


def _check_value(value: Any, path: str, depth: int = 0) -> Any:
    """Validate one payload value against :data:`PAYLOAD_BOUNDS` (on both encode and
    decode); return it, frozen."""
    if value is None or isinstance(value, (bool, int, str, float, np.ndarray)):
        PAYLOAD_BOUNDS.check_scalar(value, path)
        return value
    if isinstance(value, (list, tuple)):
        if len(value) > PAYLOAD_BOUNDS.max_list_items:
            raise InvalidPayload(f"{path} has {len(value)} items, at most {PAYLOAD_BOUNDS.max_list_items}")
        for i, item in enumerate(value):
            if not (item is None or isinstance(item, (bool, int, float, str))):
                raise InvalidPayload(f"{path}[{i}] is a {type(item).__name__}; lists hold only scalars and strings")
            PAYLOAD_BOUNDS.check_scalar(item, f"{path}[{i}]")
        return tuple(value)
    if isinstance(value, Mapping):
        if depth >= PAYLOAD_BOUNDS.max_depth:
            raise InvalidPayload(f"{path} nests maps deeper than {PAYLOAD_BOUNDS.max_depth} levels")
        if len(value) > PAYLOAD_BOUNDS.max_map_items:
            raise InvalidPayload(f"{path} has {len(value)} entries, at most {PAYLOAD_BOUNDS.max_map_items}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidPayload(f"{path} has a non-string key {key!r}")
            out[key] = _check_value(item, f"{path}.{key}", depth + 1)
        return MappingProxyType(out)
    raise InvalidPayload(f"{path} is a {type(value).__name__}, which the protocol cannot carry")


def _to_wire(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _encode_array(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {key: _to_wire(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(item) for item in value]
    return value


# ----------------------------------------------------------------------------- schema helpers
def _int(value: Any, name: str, *, minimum: int | None = 0) -> int:
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise InvalidPayload(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidPayload(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(value: Any, name: str, *, minimum: float | None = None, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidPayload(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidPayload(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise InvalidPayload(f"{name} must be >= {minimum}, got {value}")
    return value


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidPayload(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidPayload(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)


def _array(value: Any, name: str, *, ndim: int, floating: bool = True, finite: bool = True) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise InvalidPayload(f"{name} must be a typed array, got {type(value).__name__}")
    if value.ndim != ndim:
        raise InvalidPayload(f"{name} must be {ndim}-D, got shape {value.shape}")
    if floating and value.dtype.kind != "f":
        raise InvalidPayload(f"{name} must be float32 or float64, got {value.dtype}")
    if finite and value.dtype.kind == "f" and not np.isfinite(value.sum()):
        bad = int(np.count_nonzero(~np.isfinite(value)))
        if bad:
            raise InvalidPayload(f"{name} contains {bad} NaN/inf values")
    return value


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


# ----------------------------------------------------------------------------- payload schemas
@dataclass(frozen=True, eq=False)
class Task:
    """Round task, coordinator -> devices (retained on ``task``).

    ``model`` is the flat parameter vector of :mod:`biofed.kernels.training` (layout fixed
    by ``len(classes)`` and ``hidden``; the input dimension is the basis rank). Devices not
    in ``participants`` skip the round (empty = everybody). ``deadline`` is absolute unix
    time; updates arriving later are dropped.

    DP: ``trust_mode`` ``"central"`` (devices clip, coordinator noises), ``"local"`` (device
    clips and adds Gaussian noise of std ``noise_multiplier * clip_norm`` itself) or
    ``"distributed"`` (each device adds its share of the noise). With
    ``adaptive_clipping`` the device reports ``Update.norm_bit``.

    ``phase`` (one of :data:`PHASES`) says what the devices compute: ``"moments"`` and
    ``"covariance"`` ask for a :class:`Sketch` (``model`` may then be empty), ``"train"`` for
    an :class:`Update`, ``"evaluate"`` for an :class:`Update` with an empty delta,
    ``n_examples=0`` and the eval metrics filled. ``stats_mean``/``stats_scale`` ((d,) each,
    scale > 0) are set only in the covariance phase of a fleet with *global*
    standardization: the standardization the devices apply before computing ``Z.T @ Z / n``.
    A covariance task without them asks for *device* standardization: each device z-scores
    its training rows with their own mean and scale (which never leave the device).

    ``secagg_threshold`` (distributed trust mode; 0 otherwise) is the minimum number of
    survivors of the round's secure aggregation (:mod:`biofed.secagg`): each device adds
    noise of std ``noise_multiplier * clip_norm / sqrt(secagg_threshold)`` and its delta
    travels only masked, in :class:`SecAggUpload` steps.
    """

    KIND: ClassVar[str] = "task"
    round: int
    model: np.ndarray
    basis_version: int
    classes: tuple[str, ...]
    deadline: float
    hidden: int = 0
    trust_mode: str = "central"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    adaptive_clipping: bool = False
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    optimizer: str = "sgd"
    l2: float = 0.0
    prox_mu: float = 0.0
    participants: tuple[str, ...] = ()
    phase: str = "train"
    stats_mean: np.ndarray | None = None
    stats_scale: np.ndarray | None = None
    secagg_threshold: int = 0

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "Task.round"))
        _set(self, "model", _array(self.model, "Task.model", ndim=1))
        _set(self, "basis_version", _int(self.basis_version, "Task.basis_version"))
        _set(self, "classes", _strings(self.classes, "Task.classes"))
        if len(self.classes) < 2:
            raise InvalidPayload(f"Task.classes needs at least 2 class names, got {self.classes}")
        _set(self, "deadline", _float(self.deadline, "Task.deadline", minimum=0.0))
        _set(self, "hidden", _int(self.hidden, "Task.hidden"))
        _set(self, "trust_mode", _choice(self.trust_mode, "Task.trust_mode", TRUST_MODES))
        _set(self, "clip_norm", _float(self.clip_norm, "Task.clip_norm", minimum=0.0))
        if self.clip_norm <= 0:
            raise InvalidPayload(f"Task.clip_norm must be > 0, got {self.clip_norm}")
        _set(self, "noise_multiplier", _float(self.noise_multiplier, "Task.noise_multiplier", minimum=0.0))
        if not isinstance(self.adaptive_clipping, bool):
            raise InvalidPayload(f"Task.adaptive_clipping must be a bool, got {self.adaptive_clipping!r}")
        _set(self, "local_epochs", _int(self.local_epochs, "Task.local_epochs", minimum=1))
        _set(self, "lr", _float(self.lr, "Task.lr", minimum=0.0))
        _set(self, "batch_size", _int(self.batch_size, "Task.batch_size", minimum=1))
        _set(self, "optimizer", _choice(self.optimizer, "Task.optimizer", OPTIMIZERS))
        _set(self, "l2", _float(self.l2, "Task.l2", minimum=0.0))
        _set(self, "prox_mu", _float(self.prox_mu, "Task.prox_mu", minimum=0.0))
        _set(self, "participants", _strings(self.participants, "Task.participants"))
        for device in self.participants:
            validate_id(device)
        _set(self, "phase", _choice(self.phase, "Task.phase", PHASES))
        _set(self, "secagg_threshold", _int(self.secagg_threshold, "Task.secagg_threshold"))
        if (self.stats_mean is None) != (self.stats_scale is None):
            raise InvalidPayload("Task.stats_mean and Task.stats_scale must be given together (or neither)")
        if self.stats_mean is not None:
            mean = _array(self.stats_mean, "Task.stats_mean", ndim=1)
            scale = _array(self.stats_scale, "Task.stats_scale", ndim=1)
            if scale.shape != mean.shape:
                raise InvalidPayload(f"Task.stats_scale must have shape {mean.shape} like stats_mean, got {scale.shape}")
            if np.any(scale <= 0):
                raise InvalidPayload("Task.stats_scale must be > 0 everywhere")
            _set(self, "stats_mean", mean)
            _set(self, "stats_scale", scale)

    def to_payload(self) -> dict[str, Any]:
        return _fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Task:
        return _from_payload(cls, round, payload)


@dataclass(frozen=True, eq=False)
class UpdateMetrics:
    """Device-side measurements sent with every update (all finite, >= 0).

    ``eval_balanced_accuracy`` (in [0, 1], None when not measured) is the balanced accuracy
    of the task's *incoming* model on the device's ``eval_windows`` held-out windows,
    measured before local training.
    """

    loss: float
    n_windows: int
    rss_bytes: int
    cpu_time_s: float
    bytes_sent: int = 0
    bytes_received: int = 0
    eval_balanced_accuracy: float | None = None
    eval_windows: int = 0

    def __post_init__(self) -> None:
        for name in ("loss", "cpu_time_s"):
            _set(self, name, _float(getattr(self, name), f"UpdateMetrics.{name}", minimum=0.0))
        for name in ("n_windows", "rss_bytes", "bytes_sent", "bytes_received", "eval_windows"):
            _set(self, name, _int(getattr(self, name), f"UpdateMetrics.{name}"))
        accuracy = _float(self.eval_balanced_accuracy, "UpdateMetrics.eval_balanced_accuracy", minimum=0.0,
                          allow_none=True)
        if accuracy is not None and accuracy > 1.0:
            raise InvalidPayload(f"UpdateMetrics.eval_balanced_accuracy must be <= 1, got {accuracy}")
        _set(self, "eval_balanced_accuracy", accuracy)


@dataclass(frozen=True, eq=False)
class Update:
    """Model update, device -> coordinator (``update/{device_id}``).

    ``delta`` = local params - task params, already clipped to ``Task.clip_norm``
    (``clipped`` says whether clipping changed it). ``norm_bit`` is 1 when the unclipped
    norm was <= clip norm, 0 otherwise, None unless the task asked for adaptive clipping.
    """

    KIND: ClassVar[str] = "update"
    round: int
    basis_version: int
    delta: np.ndarray
    n_examples: int
    clipped: bool
    metrics: UpdateMetrics
    norm_bit: int | None = None

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "Update.round"))
        _set(self, "basis_version", _int(self.basis_version, "Update.basis_version"))
        _set(self, "delta", _array(self.delta, "Update.delta", ndim=1))
        _set(self, "n_examples", _int(self.n_examples, "Update.n_examples"))
        if not isinstance(self.clipped, bool):
            raise InvalidPayload(f"Update.clipped must be a bool, got {self.clipped!r}")
        if isinstance(self.metrics, Mapping):
            _set(self, "metrics", _metrics_from(self.metrics))
        elif not isinstance(self.metrics, UpdateMetrics):
            raise InvalidPayload(f"Update.metrics must be UpdateMetrics, got {type(self.metrics).__name__}")
        if self.norm_bit is not None and (isinstance(self.norm_bit, bool) or self.norm_bit not in (0, 1)):
            raise InvalidPayload(f"Update.norm_bit must be 0, 1 or None, got {self.norm_bit!r}")

    def to_payload(self) -> dict[str, Any]:
        payload = _fields_payload(self, skip=("round", "metrics"))
        payload["metrics"] = {f.name: getattr(self.metrics, f.name) for f in fields(UpdateMetrics)}
        return payload

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Update:
        return _from_payload(cls, round, payload)


def _metrics_from(value: Mapping[str, Any]) -> UpdateMetrics:
    try:
        return UpdateMetrics(**value)
    except TypeError as exc:
        raise InvalidPayload(f"Update.metrics: {exc}") from None


@dataclass(frozen=True, eq=False)
class Model:
    """Global model after a round, coordinator -> devices (retained on ``model``).

    ``epsilon`` is the privacy spent so far at the configured delta (None without DP).
    ``onnx`` is the serialized ONNX model of the same parameters and basis (uint8 bytes,
    ``features`` input, metadata of :mod:`biofed.model.format`; built by
    :mod:`biofed.coordinator.onnx_export`), empty when the coordinator knows no feature layout.
    """

    KIND: ClassVar[str] = "model"
    round: int
    params: np.ndarray
    basis_version: int
    classes: tuple[str, ...]
    hidden: int = 0
    n_devices: int = 0
    epsilon: float | None = None
    onnx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint8))

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "Model.round"))
        _set(self, "params", _array(self.params, "Model.params", ndim=1))
        _set(self, "basis_version", _int(self.basis_version, "Model.basis_version"))
        _set(self, "classes", _strings(self.classes, "Model.classes"))
        _set(self, "hidden", _int(self.hidden, "Model.hidden"))
        _set(self, "n_devices", _int(self.n_devices, "Model.n_devices"))
        _set(self, "epsilon", _float(self.epsilon, "Model.epsilon", minimum=0.0, allow_none=True))
        _set(self, "onnx", _array(self.onnx, "Model.onnx", ndim=1, floating=False))
        if self.onnx.dtype != np.uint8:
            raise InvalidPayload(f"Model.onnx must be a uint8 byte array, got {self.onnx.dtype}")

    def to_payload(self) -> dict[str, Any]:
        return _fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Model:
        return _from_payload(cls, round, payload)


@dataclass(frozen=True, eq=False)
class Basis:
    """Shared feature basis, coordinator -> devices (retained on ``basis``).

    Devices project standardized features: ``((X - mean) / scale) @ components.T``.
    ``components`` is (k, d); ``mean`` and ``scale`` are (d,), scale > 0.

    ``standardization`` (one of :data:`STANDARDIZATIONS`): ``"global"`` (the default, and
    what a message without the field means) – ``mean``/``scale`` are the fleet's; ``"device"``
    – every device first z-scores its rows with the mean and scale of its own training
    split, and ``mean`` is then all zeros and ``scale`` all ones (checked).
    """

    KIND: ClassVar[str] = "basis"
    round: int
    version: int
    components: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    feature_names: tuple[str, ...] = ()
    standardization: str = "global"

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "Basis.round"))
        _set(self, "version", _int(self.version, "Basis.version"))
        _set(self, "components", _array(self.components, "Basis.components", ndim=2))
        d = self.components.shape[1]
        for name in ("mean", "scale"):
            value = _array(getattr(self, name), f"Basis.{name}", ndim=1)
            if value.shape != (d,):
                raise InvalidPayload(f"Basis.{name} must have shape ({d},) to match components, got {value.shape}")
            _set(self, name, value)
        if np.any(self.scale <= 0):
            raise InvalidPayload("Basis.scale must be > 0 everywhere")
        _set(self, "feature_names", _strings(self.feature_names, "Basis.feature_names"))
        if self.feature_names and len(self.feature_names) != d:
            raise InvalidPayload(f"Basis.feature_names has {len(self.feature_names)} names for {d} features")
        _set(self, "standardization", _choice(self.standardization, "Basis.standardization", STANDARDIZATIONS))
        if self.standardization == "device" and (np.any(self.mean != 0) or np.any(self.scale != 1)):
            raise InvalidPayload('Basis.standardization = "device" needs mean all zeros and scale all ones: '
                                 "the devices standardize with their own statistics")

    def to_payload(self) -> dict[str, Any]:
        return _fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Basis:
        return _from_payload(cls, round, payload)


@dataclass(frozen=True, eq=False)
class Sketch:
    """A device's statistic for a basis phase, device -> coordinator (``sketch/{device_id}``).

    ``statistic`` (D,) is clipped to L2 norm ``Task.clip_norm`` (``clipped`` says whether
    clipping changed it); in local trust mode the device has also added N(0, (z*C)^2).
    With X the device's raw (n, d) training feature rows, ``d = n_features``:

    - ``phase="moments"``: ``concat(mean(X, 0), mean(X**2, 0))``, D = 2d;
    - ``phase="covariance"``: ``(Z.T @ Z / n).ravel()`` with
      ``Z = (X - Task.stats_mean) / Task.stats_scale``, D = d*d.
    """

    KIND: ClassVar[str] = "sketch"
    round: int
    basis_version: int
    phase: str
    statistic: np.ndarray
    clipped: bool
    n_features: int

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "Sketch.round"))
        _set(self, "basis_version", _int(self.basis_version, "Sketch.basis_version"))
        _set(self, "phase", _choice(self.phase, "Sketch.phase", BASIS_PHASES))
        _set(self, "statistic", _array(self.statistic, "Sketch.statistic", ndim=1))
        if not isinstance(self.clipped, bool):
            raise InvalidPayload(f"Sketch.clipped must be a bool, got {self.clipped!r}")
        _set(self, "n_features", _int(self.n_features, "Sketch.n_features", minimum=1))
        d = self.n_features
        expected = 2 * d if self.phase == "moments" else d * d
        if self.statistic.shape != (expected,):
            raise InvalidPayload(
                f"Sketch.statistic of phase {self.phase!r} with n_features={d} must have shape ({expected},), "
                f"got {self.statistic.shape}"
            )

    def to_payload(self) -> dict[str, Any]:
        return _fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Sketch:
        return _from_payload(cls, round, payload)


@dataclass(frozen=True, eq=False)
class Status:
    """Device liveness (retained on ``status/{device_id}``).

    ``state`` is a short lowercase word: ``"online"``, ``"offline"`` (the MQTT last will,
    see :func:`offline_status`), ``"idle"``, ``"training"`` ... ``round`` is the last round
    the device saw. ``layout`` is the device's feature layout as JSON
    (:class:`biofed.model.FeatureLayout`; empty until the device has ingested data): the
    coordinator writes it into the exported ONNX model.
    """

    KIND: ClassVar[str] = "status"
    round: int
    state: str
    basis_version: int = 0
    n_rows: int = 0
    detail: str = ""
    layout: str = ""

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "Status.round"))
        if not isinstance(self.state, str) or _STATE_PATTERN.fullmatch(self.state) is None:
            raise InvalidPayload(f"Status.state must be a lowercase word (a-z, '_'), got {self.state!r}")
        _set(self, "basis_version", _int(self.basis_version, "Status.basis_version"))
        _set(self, "n_rows", _int(self.n_rows, "Status.n_rows"))
        if not isinstance(self.detail, str):
            raise InvalidPayload(f"Status.detail must be a string, got {self.detail!r}")
        if not isinstance(self.layout, str):
            raise InvalidPayload(f"Status.layout must be a JSON string, got {type(self.layout).__name__}")

    def to_payload(self) -> dict[str, Any]:
        return _fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Status:
        return _from_payload(cls, round, payload)


@dataclass(frozen=True, eq=False)
class Prediction:
    """On-device predictions (``prediction/{device_id}``): class probabilities ``proba``
    (N, len(classes)) of the windows ending at unix times ``t`` (N,), from model ``round``."""

    KIND: ClassVar[str] = "prediction"
    round: int
    t: np.ndarray
    proba: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "Prediction.round"))
        _set(self, "t", _array(self.t, "Prediction.t", ndim=1))
        _set(self, "proba", _array(self.proba, "Prediction.proba", ndim=2))
        _set(self, "classes", _strings(self.classes, "Prediction.classes"))
        expected = (self.t.shape[0], len(self.classes))
        if self.proba.shape != expected:
            raise InvalidPayload(f"Prediction.proba must have shape {expected} (len(t), len(classes)), got {self.proba.shape}")

    def to_payload(self) -> dict[str, Any]:
        return _fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Prediction:
        return _from_payload(cls, round, payload)


SECAGG_UPLOAD_STEPS = ("advertise", "shares", "masked", "unmask")
"""Device -> coordinator steps of a secure-aggregation round (:mod:`biofed.secagg`)."""
SECAGG_RELAY_STEPS = ("keys", "shares", "unmask")
"""Coordinator -> devices steps of a secure-aggregation round."""
_SECAGG_PUBLIC_KEYS_BYTES = 64  # X25519 c_pk | s_pk
_SECAGG_SHARE_BYTES = 66  # one element of GF(2^521 - 1)
_SECAGG_MAX_CIPHERTEXT = 1024


def _bytes_array(value: Any, name: str, *, size: int | None = None, max_size: int | None = None) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise InvalidPayload(f"{name} must be a 1-D uint8 array (bytes), got {getattr(value, 'dtype', type(value).__name__)}")
    if size is not None and value.size != size:
        raise InvalidPayload(f"{name} must hold {size} bytes, got {value.size}")
    if max_size is not None and value.size > max_size:
        raise InvalidPayload(f"{name} holds {value.size} bytes, at most {max_size} are allowed")
    return value


def _id_map(value: Any, name: str, check) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidPayload(f"{name} must be a map of device id to value, got {type(value).__name__}")
    out = {}
    for key, item in value.items():
        try:
            validate_id(key)
        except InvalidTopic as exc:
            raise InvalidPayload(f"{name}: {exc}") from None
        out[key] = check(item, f"{name}[{key!r}]")
    return MappingProxyType(out)


def _is_blank(value: Any) -> bool:
    if isinstance(value, (Mapping, tuple)):
        return not value
    return value is None or (isinstance(value, int) and value == 0)


def _step_fields(obj: Any, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """The step's ``required`` fields must be set, and no field outside it and ``optional``."""
    for f in fields(obj):
        if f.name in ("round", "step"):
            continue
        blank = _is_blank(getattr(obj, f.name))
        if f.name in required and blank:
            raise InvalidPayload(f"{obj.KIND} step {obj.step!r} needs {f.name}")
        if f.name not in required and f.name not in optional and not blank:
            raise InvalidPayload(f"{obj.KIND} step {obj.step!r} must not carry {f.name}")


def _nonblank_payload(obj: Any) -> dict[str, Any]:
    return {name: value for name, value in _fields_payload(obj, skip=("round",)).items() if not _is_blank(value)}


@dataclass(frozen=True, eq=False)
class SecAggUpload:
    """One device's secure-aggregation step, device -> coordinator (``secagg/{device_id}``).

    Byte strings travel as uint8 arrays. Per ``step`` (see :mod:`biofed.secagg`):

    - ``"advertise"``: ``public_keys`` (64,) = X25519 ``c_pk | s_pk``;
    - ``"shares"``: ``ciphertexts`` {recipient id: (<= 1024,)} and ``commitment`` (32,);
    - ``"masked"``: ``masked`` (m,) int64, the masked input's Z_{2^64} words (bit pattern);
    - ``"unmask"``: ``b_shares`` and ``key_shares`` {device id: (66,)} (field elements).

    Maps hold at most 256 entries, which caps a secure-aggregation round at 257 devices.
    """

    KIND: ClassVar[str] = "secagg"
    round: int
    step: str
    public_keys: np.ndarray | None = None
    ciphertexts: Mapping[str, np.ndarray] = field(default_factory=dict)
    commitment: np.ndarray | None = None
    masked: np.ndarray | None = None
    b_shares: Mapping[str, np.ndarray] = field(default_factory=dict)
    key_shares: Mapping[str, np.ndarray] = field(default_factory=dict)

    _STEP_FIELDS: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({
        "advertise": ("public_keys",), "shares": ("ciphertexts", "commitment"), "masked": ("masked",),
        "unmask": ("b_shares",),
    })

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "SecAggUpload.round"))
        _set(self, "step", _choice(self.step, "SecAggUpload.step", SECAGG_UPLOAD_STEPS))
        if self.public_keys is not None:
            _bytes_array(self.public_keys, "SecAggUpload.public_keys", size=_SECAGG_PUBLIC_KEYS_BYTES)
        _set(self, "ciphertexts", _id_map(self.ciphertexts, "SecAggUpload.ciphertexts",
                                          lambda v, n: _bytes_array(v, n, max_size=_SECAGG_MAX_CIPHERTEXT)))
        if self.commitment is not None:
            _bytes_array(self.commitment, "SecAggUpload.commitment", size=32)
        if self.masked is not None:
            masked = self.masked
            if not isinstance(masked, np.ndarray) or masked.dtype != np.int64 or masked.ndim != 1 or masked.size == 0:
                raise InvalidPayload("SecAggUpload.masked must be a non-empty 1-D int64 array (the uint64 words' bits)")
        for name in ("b_shares", "key_shares"):
            _set(self, name, _id_map(getattr(self, name), f"SecAggUpload.{name}",
                                     lambda v, n: _bytes_array(v, n, size=_SECAGG_SHARE_BYTES)))
        # key shares are empty when nobody dropped out
        _step_fields(self, self._STEP_FIELDS[self.step], ("key_shares",) if self.step == "unmask" else ())
        if set(self.b_shares) & set(self.key_shares):
            raise InvalidPayload("SecAggUpload reveals both shares of one device")

    def to_payload(self) -> dict[str, Any]:
        return _nonblank_payload(self)

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> SecAggUpload:
        return _from_payload(cls, round, payload)


@dataclass(frozen=True, eq=False)
class SecAggRelay:
    """A secure-aggregation step broadcast by the coordinator (``secagg_relay``).

    Per ``step``:

    - ``"keys"``: ``threshold`` (>= 1) and ``public_keys`` {device id: (64,) uint8}, U1;
    - ``"shares"``: ``ciphertexts`` {recipient: {sender: (<= 1024,) uint8}}, U2's shares;
    - ``"unmask"``: ``survivors`` (U3) and ``dropped`` (U2 minus U3), disjoint.
    """

    KIND: ClassVar[str] = "secagg_relay"
    round: int
    step: str
    threshold: int = 0
    public_keys: Mapping[str, np.ndarray] = field(default_factory=dict)
    ciphertexts: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    _STEP_FIELDS: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({
        "keys": ("threshold", "public_keys"), "shares": ("ciphertexts",), "unmask": ("survivors",),
    })

    def __post_init__(self) -> None:
        _set(self, "round", _int(self.round, "SecAggRelay.round"))
        _set(self, "step", _choice(self.step, "SecAggRelay.step", SECAGG_RELAY_STEPS))
        _set(self, "threshold", _int(self.threshold, "SecAggRelay.threshold"))
        _set(self, "public_keys", _id_map(self.public_keys, "SecAggRelay.public_keys",
                                          lambda v, n: _bytes_array(v, n, size=_SECAGG_PUBLIC_KEYS_BYTES)))
        _set(self, "ciphertexts", _id_map(
            self.ciphertexts, "SecAggRelay.ciphertexts",
            lambda inner, n: _id_map(inner, n, lambda v, m: _bytes_array(v, m, max_size=_SECAGG_MAX_CIPHERTEXT))))
        for name in ("survivors", "dropped"):
            values = _strings(getattr(self, name), f"SecAggRelay.{name}")
            for device in values:
                validate_id(device)
            _set(self, name, values)
        if set(self.survivors) & set(self.dropped):
            raise InvalidPayload("SecAggRelay names a device both as survivor and as dropped")
        _step_fields(self, self._STEP_FIELDS[self.step], ("dropped",) if self.step == "unmask" else ())

    def to_payload(self) -> dict[str, Any]:
        return _nonblank_payload(self)

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> SecAggRelay:
        return _from_payload(cls, round, payload)


Payload: TypeAlias = Task | Update | Model | Basis | Sketch | Status | Prediction | SecAggUpload | SecAggRelay
PAYLOAD_TYPES: Mapping[str, type] = MappingProxyType(
    {cls.KIND: cls for cls in (Task, Update, Model, Basis, Sketch, Status, Prediction, SecAggUpload, SecAggRelay)}
)


def _fields_payload(obj: Any, skip: Sequence[str]) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in skip}


def _from_payload(cls: type, round: int, payload: Mapping[str, Any]) -> Any:
    schema = [f for f in fields(cls) if f.name != "round"]
    unknown = set(payload) - {f.name for f in schema}
    if unknown:
        raise InvalidPayload(f"{cls.KIND} payload has unknown fields {sorted(unknown)}")
    for f in schema:
        if f.default is MISSING and f.default_factory is MISSING and f.name not in payload:
            raise InvalidPayload(f"{cls.KIND} payload lacks field {f.name!r}")
    try:
        return cls(round=round, **payload)
    except TypeError as exc:
        raise InvalidPayload(f"{cls.KIND} payload: {exc}") from None


# ----------------------------------------------------------------------------- envelope
@dataclass(frozen=True, eq=False)
class Message:
    """A decoded, validated message. ``payload`` is the kind's schema object.

    ``verified`` is True when the receiver checked the sender's signature.
    """

    version: int
    kind: str
    fleet: str
    round: int
    sender: str
    message_id: str
    created: float
    payload: Payload = field(repr=False)
    verified: bool = False


class MessageSigner(Protocol):
    """What :func:`encode_message` needs from a signer (:class:`biofed.signing.Signer`)."""

    key_id: str

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""


class MessageVerifier(Protocol):
    """What :func:`decode_message` needs from a verifier (:class:`biofed.signing.KeyRing`
    or :class:`biofed.signing.Verifier`). An optional ``admit(message)`` method, called
    after the envelope is validated, applies replay checks."""

    def verify(self, sender: str, data: bytes, signature: bytes) -> None:
        """Raise :class:`UnknownSender` or :class:`BadSignature` unless ``signature`` is
        ``sender``'s signature of ``data``."""


def encode_message(
    payload: Payload,
    *,
    fleet: str,
    sender: str,
    message_id: bytes | None = None,
    created: float | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    signer: MessageSigner | None = None,
) -> bytes:
    """Encode ``payload`` (a :class:`Task`, :class:`Update`, ...) into one message.

    Parameters
    ----------
    payload : Task | Update | Model | Basis | Sketch | Status | Prediction
        The kind is taken from its type; the envelope round from ``payload.round``.
    fleet, sender : str
        Fleet id and the sending device id (the coordinator uses its own id, e.g.
        ``"coordinator"``).
    message_id : bytes, optional
        16 bytes; fresh random bytes by default. Re-sending the same message (a retry)
        should reuse the id so receivers drop the duplicate.
    created : float, optional
        Unix time; now by default.
    max_bytes : int
        Refuse to produce a message larger than this (the receiver would drop it).
    signer : biofed.signing.Signer, optional
        Sign the envelope (see "Signed messages" in the module docstring); its ``key_id``
        must be ``sender``. None: an unsigned message, byte-identical to older versions.

    Returns
    -------
    bytes
    """
    kind = getattr(type(payload), "KIND", None)
    if kind not in PAYLOAD_TYPES or not isinstance(payload, PAYLOAD_TYPES[kind]):
        raise InvalidPayload(f"cannot encode a {type(payload).__name__}; pass one of {sorted(PAYLOAD_TYPES)} payloads")
    validate_id(fleet, "fleet")
    validate_id(sender, "sender")
    message_id = os.urandom(_MESSAGE_ID_BYTES) if message_id is None else message_id
    if not isinstance(message_id, bytes) or len(message_id) != _MESSAGE_ID_BYTES:
        raise InvalidPayload(f"message_id must be {_MESSAGE_ID_BYTES} bytes, got {message_id!r}")
    values = _check_value(payload.to_payload(), kind)
    envelope = {
        "v": SCHEMA_VERSION,
        "k": kind,
        "f": fleet,
        "r": payload.round,
        "s": sender,
        "id": message_id,
        "t": float(time.time() if created is None else created),
        "p": _to_wire(values),
    }
    data = msgpack.packb(envelope, use_bin_type=True)
    if signer is not None:
        if getattr(signer, "key_id", None) != sender:
            raise InvalidPayload(
                f"signer key {getattr(signer, 'key_id', None)!r} cannot sign messages of sender {sender!r}; "
                "load the sender's own signing key"
            )
        signature = signer.sign(SIGNATURE_CONTEXT + data)
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            raise InvalidPayload(f"signer returned {signature!r}, expected {SIGNATURE_BYTES} bytes")
        data = msgpack.packb({"s": sender, "e": data, "sig": signature}, use_bin_type=True)
    if len(data) > max_bytes:
        raise MessageTooLarge(f"encoded {kind} message is {len(data)} bytes, above the {max_bytes}-byte limit")
    return data


def decode_message(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    fleet: str | None = None,
    kinds: Sequence[str] | None = None,
    verifier: MessageVerifier | None = None,
    sender: str | None = None,
) -> Message:
    """Decode and validate one message; every failure is a :class:`ProtocolError`.

    Total: whatever ``data`` holds, the result is a valid :class:`Message` or a
    :class:`ProtocolError` (an unexpected failure inside decoding, such as a recursion or
    overflow error, is reported as :class:`MalformedMessage`), never another exception.

    Parameters
    ----------
    data : bytes
        The MQTT payload.
    max_bytes : int
        Messages longer than this are rejected before any parsing (:class:`MessageTooLarge`).
    fleet : str, optional
        Expected fleet (:class:`WrongFleet` otherwise).
    kinds : sequence of str, optional
        Accepted kinds (:class:`UnexpectedKind` otherwise).
    verifier : biofed.signing.Verifier or biofed.signing.KeyRing, optional
        Require a valid signature, checked before the envelope is parsed
        (:class:`UnsignedMessage`, :class:`UnknownSender`, :class:`BadSignature`), then
        the verifier's replay checks (``admit``). None: signatures are not checked.
    sender : str, optional
        Expected sender (:class:`SenderMismatch` otherwise), checked before the verifier
        records the message id, so a message posted on another device's topic cannot
        spend the id of the genuine one.

    Returns
    -------
    Message
    """
    try:
        return _decode_message(data, max_bytes=max_bytes, fleet=fleet, kinds=kinds, verifier=verifier,
                               sender=sender)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - total: one message never escapes as another error type
        raise MalformedMessage(f"undecodable message ({type(exc).__name__}: {exc})") from None


def _decode_message(
    data: bytes,
    *,
    max_bytes: int,
    fleet: str | None,
    kinds: Sequence[str] | None,
    verifier: MessageVerifier | None,
    sender: str | None,
) -> Message:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageTooLarge(f"message is {len(data)} bytes, above the {max_bytes}-byte limit")
    if verifier is not None and bytes(data[:1]) != _SIGNED_PREFIX:
        # Refused before parsing: a signed frame always starts as a 3-entry fixmap.
        raise UnsignedMessage("message is not signed, and this receiver accepts only signed messages")
    outer = _unpack(data, max_bytes)
    signed = isinstance(outer, dict) and set(outer) == _SIGNED_KEYS
    if not signed:
        if verifier is not None:
            raise UnsignedMessage("message is not signed, and this receiver accepts only signed messages")
        return _check_sender(_validate_envelope(outer, fleet=fleet, kinds=kinds), sender)
    claimed, inner, signature = outer["s"], outer["e"], outer["sig"]
    if not isinstance(claimed, str) or not isinstance(inner, bytes) or not isinstance(signature, bytes):
        raise MalformedMessage("signed message fields have the wrong types (s: str, e: bytes, sig: bytes)")
    if len(signature) != SIGNATURE_BYTES:
        raise BadSignature(f"signature is {len(signature)} bytes, expected {SIGNATURE_BYTES}")
    if verifier is not None:
        try:
            validate_id(claimed, "sender")
        except InvalidTopic as exc:
            raise MalformedMessage(str(exc)) from None
        verifier.verify(claimed, SIGNATURE_CONTEXT + inner, signature)
    message = _validate_envelope(_unpack(inner, max_bytes), fleet=fleet, kinds=kinds)
    if message.sender != claimed:
        raise SenderMismatch(f"message signed by {claimed!r} claims sender {message.sender!r}")
    _check_sender(message, sender)
    if verifier is None:
        return message
    message = replace(message, verified=True)
    admit = getattr(verifier, "admit", None)
    if admit is not None:
        admit(message)
    return message


def _check_sender(message: Message, sender: str | None) -> Message:
    if sender is not None and message.sender != sender:
        raise SenderMismatch(f"message on the topic of {sender!r} claims sender {message.sender!r}")
    return message


def _unpack(data: bytes, max_bytes: int) -> Any:
    try:
        envelope = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_decode_array,
            max_bin_len=max_bytes,
            max_ext_len=max_bytes,
            max_str_len=min(max_bytes, _MAX_STR_LEN),
            max_array_len=_MAX_ARRAY_LEN,
            max_map_len=_MAX_MAP_LEN,
        )
    except ProtocolError:
        raise
    except ValueError as exc:  # msgpack reports both limit and format errors as ValueError
        if "exceeds max" in str(exc):
            raise MessageTooLarge(f"message declares a length above the limits: {exc}") from None
        raise MalformedMessage(f"not a msgpack message: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise MalformedMessage(f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    return envelope


_ENVELOPE_KEYS = {"v", "k", "f", "r", "s", "id", "t", "p"}


def _validate_envelope(envelope: Any, *, fleet: str | None, kinds: Sequence[str] | None) -> Message:
    if not isinstance(envelope, dict):
        raise MalformedMessage(f"message is a msgpack {type(envelope).__name__}, not an envelope map")
    version = envelope.get("v")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise UnsupportedVersion(f"schema version {version!r} is not supported (this build speaks {SCHEMA_VERSION})")
    if set(envelope) != _ENVELOPE_KEYS:
        raise MalformedMessage(
            f"envelope fields {sorted(envelope)} differ from the expected {sorted(_ENVELOPE_KEYS)}"
        )
    kind = envelope["k"]
    if not isinstance(kind, str) or kind not in PAYLOAD_TYPES:
        raise MalformedMessage(f"unknown message kind {kind!r}")
    if kinds is not None and kind not in kinds:
        raise UnexpectedKind(f"got a {kind} message, expected one of {tuple(kinds)}")
    try:
        message_fleet = validate_id(envelope["f"], "fleet")
        sender = validate_id(envelope["s"], "sender")
    except InvalidTopic as exc:
        raise MalformedMessage(str(exc)) from None
    if fleet is not None and message_fleet != fleet:
        raise WrongFleet(f"message is for fleet {message_fleet!r}, this receiver serves {fleet!r}")
    message_id = envelope["id"]
    if not isinstance(message_id, bytes) or len(message_id) != _MESSAGE_ID_BYTES:
        raise MalformedMessage(f"message id must be {_MESSAGE_ID_BYTES} bytes")
    created = envelope["t"]
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise MalformedMessage(f"created time must be a finite number, got {created!r}")
    try:
        round_ = _int(envelope["r"], "round")
        if not isinstance(envelope["p"], dict):
            raise InvalidPayload(f"payload must be a map, got {type(envelope['p']).__name__}")
        values = _check_value(envelope["p"], kind)
        payload = PAYLOAD_TYPES[kind].from_payload(round_, values)
    except InvalidPayload as exc:
        raise InvalidPayload(f"{kind} from {sender!r}: {exc}") from None
    return Message(
        version=version,
        kind=kind,
        fleet=message_fleet,
        round=round_,
        sender=sender,
        message_id=message_id.hex(),
        created=float(created),
        payload=payload,
    )


def decode_topic_message(
    topics: Topics, topic: str, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
    verifier: MessageVerifier | None = None,
) -> Message:
    """Decode a message received on ``topic`` and check it belongs there.

    The fleet must be ``topics.fleet``, the kind must be the topic's kind and, on
    per-device topics, the envelope sender must be the device id in the topic
    (:class:`SenderMismatch`), so one device cannot post updates as another through a
    topic it may write to. ``verifier`` as in :func:`decode_message`.
    """
    if not isinstance(topic, str):
        raise InvalidTopic(f"topic must be a string, got {type(topic).__name__}")
    kind, device = topics.parse(topic)
    return decode_message(data, max_bytes=max_bytes, fleet=topics.fleet, kinds=(kind,), verifier=verifier,
                          sender=device)


def offline_status(*, fleet: str, device_id: str, round: int = 0, signer: MessageSigner | None = None) -> bytes:
    """The encoded ``Status(state="offline")`` to register as a device's MQTT last will."""
    return encode_message(Status(round=round, state="offline"), fleet=fleet, sender=device_id, signer=signer)


# ----------------------------------------------------------------------------- idempotency
class SeenMessageIds:
    """Bounded LRU set of message ids, so QoS 1 redeliveries are processed once.

    Thread-safe. ``add`` returns True the first time an id is seen, False for duplicates.
    The oldest ids are forgotten beyond ``capacity``; size it above the number of
    messages that can be in flight between a publish and its redelivery.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, message_id: str) -> bool:
        with self._lock:
            if message_id in self._ids:
                self._ids.move_to_end(message_id)
                return False
            self._ids[message_id] = None
            if len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
            return True

    def __contains__(self, message_id: object) -> bool:
        with self._lock:
            return message_id in self._ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)


__all__ = [
    "ALLOWED_DTYPES", "BASIS_PHASES", "DEFAULT_MAX_BYTES", "KINDS", "PAYLOAD_BOUNDS", "PAYLOAD_TYPES", "PHASES",
    "PayloadBounds", "SCHEMA_VERSION",
    "STANDARDIZATIONS",
    "SIGNATURE_BYTES", "SIGNATURE_CONTEXT", "TRUST_MODES",
    "BadSignature", "MessageSigner", "MessageVerifier", "ReplayedMessage", "StaleMessage", "UnknownSender",
    "UnsignedMessage",
    "SECAGG_RELAY_STEPS", "SECAGG_UPLOAD_STEPS", "SecAggRelay", "SecAggUpload",
    "Basis", "InvalidPayload", "InvalidTopic", "MalformedMessage", "Message", "MessageTooLarge", "Model",
    "Payload", "Prediction", "ProtocolError", "SeenMessageIds", "SenderMismatch", "Sketch", "Status", "Task",
    "Topics", "UnexpectedKind", "UnsupportedVersion", "Update", "UpdateMetrics", "WrongFleet",
    "decode_message", "decode_topic_message", "encode_message", "offline_status", "validate_id",
]
