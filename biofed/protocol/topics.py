"""MQTT topics of a fleet, and the one rule for fleet and device ids.

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

Fleet and device ids match :data:`ID_PATTERN`, ``[A-Za-z0-9_-]{1,64}`` (no MQTT wildcards,
no ``/``); :func:`validate_id` is the one check of that rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from biofed.protocol.errors import InvalidTopic

TOPIC_ROOT = "biofed"
BROADCAST_KINDS = ("task", "model", "basis", "secagg_relay")
"""Kinds the coordinator publishes on one topic of the fleet."""
DEVICE_KINDS = ("update", "status", "sketch", "prediction", "secagg")
"""Kinds each device publishes on a topic of its own (``{kind}/{device_id}``)."""
KINDS = BROADCAST_KINDS + DEVICE_KINDS
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_id(value: object, what: str = "device id") -> str:
    """Return ``value`` if it is a valid fleet or device id, else raise :class:`InvalidTopic`.

    The one check of the id rule, wherever an id enters biofed (topics, envelopes, config
    files, allow lists, key files, secure aggregation); ``what`` names the id in the error.

    Examples
    --------
    >>> validate_id("pi-01")
    'pi-01'
    >>> validate_id("ward/7", "fleet")
    Traceback (most recent call last):
    ...
    biofed.protocol.errors.InvalidTopic: invalid fleet 'ward/7': use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'
    """
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise InvalidTopic(f"invalid {what} {value!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'")
    return value


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
        if kind not in DEVICE_KINDS:
            raise InvalidTopic(f"kind {kind!r} has no per-device topic; use one of {DEVICE_KINDS}")
        return f"{self.base}/{kind}/+"

    def parse(self, topic: str) -> tuple[str, str | None]:
        """Split a topic of this fleet into ``(kind, device_id)``; device_id is None for
        the broadcast topics (model, task, basis). Raises :class:`InvalidTopic`."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != TOPIC_ROOT or parts[1] != self.fleet:
            raise InvalidTopic(f"topic {topic!r} is not under {self.base}/")
        kind = parts[2]
        if kind in BROADCAST_KINDS and len(parts) == 3:
            return kind, None
        if kind in DEVICE_KINDS and len(parts) == 4:
            return kind, validate_id(parts[3])
        raise InvalidTopic(
            f"topic {topic!r} is not a biofed topic: expected {self.base}/({'|'.join(BROADCAST_KINDS)}) "
            f"or {self.base}/({'|'.join(DEVICE_KINDS)})/<device_id>"
        )

    def device_id(self, topic: str, kind: str) -> str:
        """The device id of a per-device topic of ``kind``; raises :class:`InvalidTopic`."""
        found, device = self.parse(topic)
        if found != kind or device is None:
            raise InvalidTopic(f"topic {topic!r} is not a {kind} topic of fleet {self.fleet!r}")
        return device


__all__ = ["BROADCAST_KINDS", "DEVICE_KINDS", "ID_PATTERN", "KINDS", "TOPIC_ROOT", "Topics", "validate_id"]
