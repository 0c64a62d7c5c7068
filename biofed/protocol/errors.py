"""The protocol's exceptions: every decode or validation failure is a :class:`ProtocolError`,
which a receiver logs and drops (the process never dies on bad input)."""

from __future__ import annotations


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


__all__ = [
    "BadSignature",
    "InvalidPayload",
    "InvalidTopic",
    "MalformedMessage",
    "MessageTooLarge",
    "ProtocolError",
    "ReplayedMessage",
    "SenderMismatch",
    "StaleMessage",
    "UnexpectedKind",
    "UnknownSender",
    "UnsignedMessage",
    "UnsupportedVersion",
    "WrongFleet",
]
