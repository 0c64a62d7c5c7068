"""The versioned msgpack envelope: encoding, decoding, signatures.

Envelope
--------
One msgpack map per MQTT payload (never pickle)::

    {"v": SCHEMA_VERSION, "k": kind, "f": fleet, "r": round, "s": sender,
     "id": 16 random bytes, "t": created (unix seconds), "p": payload map}

``p`` is the kind's payload (:data:`PAYLOAD_TYPES`) as a map of the values
:mod:`biofed.protocol.values` allows, arrays as :mod:`biofed.protocol.arrays` lays them out.

Decoding checks the size *before* unpacking and unpacks with hard limits on every
length prefix; any failure raises a :class:`~biofed.protocol.errors.ProtocolError`
subclass, which a receiver logs and drops (the process never dies on bad input). QoS 1
may deliver a message twice: :class:`~biofed.protocol.idempotency.SeenMessageIds` makes
handlers idempotent.

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
(:class:`~biofed.protocol.errors.UnsignedMessage`: no downgrade). A
:class:`~biofed.signing.Verifier` then rejects stale or replayed messages
(:class:`~biofed.protocol.errors.StaleMessage`,
:class:`~biofed.protocol.errors.ReplayedMessage`). Without a verifier, signed and unsigned
messages are both accepted and the signature is not checked (``Message.verified`` is
False), so unsigned deployments are unchanged.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias

import msgpack

from biofed.protocol.arrays import decode_array
from biofed.protocol.errors import (
    BadSignature,
    InvalidPayload,
    InvalidTopic,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    SenderMismatch,
    UnexpectedKind,
    UnsignedMessage,
    UnsupportedVersion,
    WrongFleet,
)
from biofed.protocol.payloads import Basis, Model, Prediction, Sketch, Status, Task, Update
from biofed.protocol.schema import check_int
from biofed.protocol.topics import Topics, validate_id
from biofed.protocol.values import MAX_ARRAY_LEN, MAX_MAP_LEN, MAX_STR_LEN, check_value, to_wire
from biofed.secure_aggregation.messages import SecAggRelay, SecAggUpload

SCHEMA_VERSION = 1
"""Envelope version. Bump it on any incompatible change; receivers reject other versions."""
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
"""Default cap on one encoded message (16 MiB; a 1 M-parameter float64 update is 8 MiB)."""
_MESSAGE_ID_BYTES = 16

SIGNATURE_CONTEXT = b"biofed-envelope-v1\x00"
"""Domain-separation prefix of every signed byte string (never a valid msgpack envelope)."""
SIGNATURE_BYTES = 64
_SIGNED_KEYS = {"s", "e", "sig"}
_SIGNED_PREFIX = b"\x83"  # msgpack fixmap of 3 entries

Payload: TypeAlias = Task | Update | Model | Basis | Sketch | Status | Prediction | SecAggUpload | SecAggRelay
PAYLOAD_TYPES: Mapping[str, type] = MappingProxyType(
    {cls.KIND: cls for cls in (Task, Update, Model, Basis, Sketch, Status, Prediction, SecAggUpload, SecAggRelay)}
)
"""The payload class of every message kind."""


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
    values = check_value(payload.to_payload(), kind)
    envelope = {
        "v": SCHEMA_VERSION,
        "k": kind,
        "f": fleet,
        "r": payload.round,
        "s": sender,
        "id": message_id,
        "t": float(time.time() if created is None else created),
        "p": to_wire(values),
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
        return _decode_message(data, max_bytes=max_bytes, fleet=fleet, kinds=kinds, verifier=verifier, sender=sender)
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
            ext_hook=decode_array,
            max_bin_len=max_bytes,
            max_ext_len=max_bytes,
            max_str_len=min(max_bytes, MAX_STR_LEN),
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
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
        raise MalformedMessage(f"envelope fields {sorted(envelope)} differ from the expected {sorted(_ENVELOPE_KEYS)}")
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
        round_ = check_int(envelope["r"], "round")
        if not isinstance(envelope["p"], dict):
            raise InvalidPayload(f"payload must be a map, got {type(envelope['p']).__name__}")
        values = check_value(envelope["p"], kind)
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
    topics: Topics,
    topic: str,
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
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
    return decode_message(
        data, max_bytes=max_bytes, fleet=topics.fleet, kinds=(kind,), verifier=verifier, sender=device
    )


def offline_status(*, fleet: str, device_id: str, round: int = 0, signer: MessageSigner | None = None) -> bytes:
    """The encoded ``Status(state="offline")`` to register as a device's MQTT last will."""
    return encode_message(Status(round=round, state="offline"), fleet=fleet, sender=device_id, signer=signer)


__all__ = [
    "DEFAULT_MAX_BYTES",
    "PAYLOAD_TYPES",
    "SCHEMA_VERSION",
    "SIGNATURE_BYTES",
    "SIGNATURE_CONTEXT",
    "Message",
    "MessageSigner",
    "MessageVerifier",
    "Payload",
    "decode_message",
    "decode_topic_message",
    "encode_message",
    "offline_status",
]
