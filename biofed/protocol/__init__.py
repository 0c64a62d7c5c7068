"""The biofed wire protocol: MQTT topics and a versioned msgpack envelope.

Shared by the coordinator and the device agent (which never import each other). Nothing
here touches the network; :mod:`biofed.mqtt` moves the bytes. One module per concern:

- :mod:`~biofed.protocol.topics`: the topic layout of a fleet and the id rule;
- :mod:`~biofed.protocol.envelope`: the envelope, its encoding, decoding and signatures;
- :mod:`~biofed.protocol.payloads`: one frozen, self-validating dataclass per message kind
  (the secure-aggregation steps are in :mod:`biofed.secure_aggregation.messages`);
- :mod:`~biofed.protocol.values`, :mod:`~biofed.protocol.arrays`,
  :mod:`~biofed.protocol.schema`: what a payload may hold and how it is checked;
- :mod:`~biofed.protocol.statistics`: the packed layout of the one-shot class statistics;
- :mod:`~biofed.protocol.errors`: every failure is a :class:`ProtocolError`;
- :mod:`~biofed.protocol.idempotency`: :class:`SeenMessageIds` for QoS 1 redeliveries.

Examples
--------
>>> import numpy as np
>>> from biofed.protocol import Topics, Update, UpdateMetrics, decode_topic_message, encode_message
>>> update = Update(round=3, basis_version=1, delta=np.zeros(4), n_examples=10, clipped=False,
...                 metrics=UpdateMetrics(loss=0.5, n_windows=10, rss_bytes=0, cpu_time_s=0.1))
>>> topics = Topics("ward7")
>>> data = encode_message(update, fleet="ward7", sender="pi-01")
>>> message = decode_topic_message(topics, topics.update("pi-01"), data)
>>> message.kind, message.round, message.sender
('update', 3, 'pi-01')
"""

from biofed.protocol.arrays import ALLOWED_DTYPES
from biofed.protocol.envelope import (
    DEFAULT_MAX_BYTES,
    PAYLOAD_TYPES,
    SCHEMA_VERSION,
    SIGNATURE_BYTES,
    SIGNATURE_CONTEXT,
    Message,
    MessageSigner,
    MessageVerifier,
    Payload,
    decode_message,
    decode_topic_message,
    encode_message,
    offline_status,
)
from biofed.protocol.errors import (
    BadSignature,
    InvalidPayload,
    InvalidTopic,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    ReplayedMessage,
    SenderMismatch,
    StaleMessage,
    UnexpectedKind,
    UnknownSender,
    UnsignedMessage,
    UnsupportedVersion,
    WrongFleet,
)
from biofed.protocol.idempotency import SeenMessageIds
from biofed.protocol.payloads import (
    BASIS_PHASES,
    OPTIMIZERS,
    PHASES,
    SKETCH_PHASES,
    STANDARDIZATIONS,
    TRUST_MODES,
    Basis,
    Model,
    Prediction,
    Sketch,
    Status,
    Task,
    Update,
    UpdateMetrics,
)
from biofed.protocol.topics import (
    BROADCAST_KINDS,
    DEVICE_KINDS,
    ID_PATTERN,
    KINDS,
    TOPIC_ROOT,
    Topics,
    validate_id,
)
from biofed.protocol.values import PAYLOAD_BOUNDS, PayloadBounds

__all__ = [
    "ALLOWED_DTYPES",
    "BASIS_PHASES",
    "BROADCAST_KINDS",
    "DEFAULT_MAX_BYTES",
    "DEVICE_KINDS",
    "ID_PATTERN",
    "KINDS",
    "OPTIMIZERS",
    "PAYLOAD_BOUNDS",
    "PAYLOAD_TYPES",
    "PHASES",
    "SCHEMA_VERSION",
    "SIGNATURE_BYTES",
    "SIGNATURE_CONTEXT",
    "SKETCH_PHASES",
    "STANDARDIZATIONS",
    "TOPIC_ROOT",
    "TRUST_MODES",
    "BadSignature",
    "Basis",
    "InvalidPayload",
    "InvalidTopic",
    "MalformedMessage",
    "Message",
    "MessageSigner",
    "MessageTooLarge",
    "MessageVerifier",
    "Model",
    "Payload",
    "PayloadBounds",
    "Prediction",
    "ProtocolError",
    "ReplayedMessage",
    "SeenMessageIds",
    "SenderMismatch",
    "Sketch",
    "StaleMessage",
    "Status",
    "Task",
    "Topics",
    "UnexpectedKind",
    "UnknownSender",
    "UnsignedMessage",
    "UnsupportedVersion",
    "Update",
    "UpdateMetrics",
    "WrongFleet",
    "decode_message",
    "decode_topic_message",
    "encode_message",
    "offline_status",
    "validate_id",
]
