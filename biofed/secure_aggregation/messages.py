"""The secure-aggregation step messages and the round rules both sides apply to them.

:class:`SecAggUpload` carries a device's step (``secagg/{device_id}``), :class:`SecAggRelay`
a coordinator's broadcast (``secagg_relay``). They are the one model of the steps: payload
kinds of :mod:`biofed.protocol`, validated on construction like every other payload, and
what :class:`biofed.edge.secure_aggregation.SecAggClient` and
:class:`biofed.coordinator.secure_aggregation.SecAggServer` produce and consume.

The rules of a round that the devices and the coordinator share live here too: the
session label (:func:`session_id`), the majority threshold (:func:`default_threshold`,
:func:`check_threshold`), the checks every device makes on the key list
(:func:`advertised_keys`) and the Shamir x-coordinates (:func:`shamir_xs`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from biofed.protocol.errors import InvalidPayload
from biofed.protocol.schema import (
    check_bytes,
    check_choice,
    check_id_map,
    check_int,
    check_strings,
    fields_payload,
    payload_from_fields,
    set_field,
)
from biofed.protocol.topics import validate_id
from biofed.secure_aggregation.crypto import KEY_BYTES
from biofed.secure_aggregation.errors import SecAggError, require_int
from biofed.secure_aggregation.shamir import FIELD_BYTES

SECAGG_UPLOAD_STEPS = ("advertise", "shares", "masked", "unmask")
"""Device -> coordinator steps of a secure-aggregation round (:mod:`biofed.secure_aggregation`)."""
SECAGG_RELAY_STEPS = ("keys", "shares", "unmask")
"""Coordinator -> devices steps of a secure-aggregation round."""
_PUBLIC_KEYS_BYTES = 2 * KEY_BYTES  # X25519 c_pk | s_pk
COMMITMENT_BYTES = 32
"""Bytes of a self-mask seed's commitment (SHA-256)."""
_MAX_CIPHERTEXT = 1024


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
    return {name: value for name, value in fields_payload(obj, skip=("round",)).items() if not _is_blank(value)}


@dataclass(frozen=True, eq=False)
class SecAggUpload:
    """One device's secure-aggregation step, device -> coordinator (``secagg/{device_id}``).

    Byte strings travel as uint8 arrays. Per ``step`` (see :mod:`biofed.secure_aggregation`):

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

    _STEP_FIELDS: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType(
        {
            "advertise": ("public_keys",),
            "shares": ("ciphertexts", "commitment"),
            "masked": ("masked",),
            "unmask": ("b_shares",),
        }
    )

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "SecAggUpload.round"))
        set_field(self, "step", check_choice(self.step, "SecAggUpload.step", SECAGG_UPLOAD_STEPS))
        if self.public_keys is not None:
            check_bytes(self.public_keys, "SecAggUpload.public_keys", size=_PUBLIC_KEYS_BYTES)
        set_field(
            self,
            "ciphertexts",
            check_id_map(
                self.ciphertexts, "SecAggUpload.ciphertexts", lambda v, n: check_bytes(v, n, max_size=_MAX_CIPHERTEXT)
            ),
        )
        if self.commitment is not None:
            check_bytes(self.commitment, "SecAggUpload.commitment", size=COMMITMENT_BYTES)
        if self.masked is not None:
            masked = self.masked
            if not isinstance(masked, np.ndarray) or masked.dtype != np.int64 or masked.ndim != 1 or not masked.size:
                raise InvalidPayload("SecAggUpload.masked must be a non-empty 1-D int64 array (the uint64 words' bits)")
        for name in ("b_shares", "key_shares"):
            set_field(
                self,
                name,
                check_id_map(
                    getattr(self, name), f"SecAggUpload.{name}", lambda v, n: check_bytes(v, n, size=FIELD_BYTES)
                ),
            )
        # key shares are empty when nobody dropped out
        _step_fields(self, self._STEP_FIELDS[self.step], ("key_shares",) if self.step == "unmask" else ())
        if set(self.b_shares) & set(self.key_shares):
            raise InvalidPayload("SecAggUpload reveals both shares of one device")

    def to_payload(self) -> dict[str, Any]:
        return _nonblank_payload(self)

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> SecAggUpload:
        return payload_from_fields(cls, round, payload)


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

    _STEP_FIELDS: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType(
        {
            "keys": ("threshold", "public_keys"),
            "shares": ("ciphertexts",),
            "unmask": ("survivors",),
        }
    )

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "SecAggRelay.round"))
        set_field(self, "step", check_choice(self.step, "SecAggRelay.step", SECAGG_RELAY_STEPS))
        set_field(self, "threshold", check_int(self.threshold, "SecAggRelay.threshold"))
        set_field(
            self,
            "public_keys",
            check_id_map(
                self.public_keys, "SecAggRelay.public_keys", lambda v, n: check_bytes(v, n, size=_PUBLIC_KEYS_BYTES)
            ),
        )
        set_field(
            self,
            "ciphertexts",
            check_id_map(
                self.ciphertexts,
                "SecAggRelay.ciphertexts",
                lambda inner, n: check_id_map(inner, n, lambda v, m: check_bytes(v, m, max_size=_MAX_CIPHERTEXT)),
            ),
        )
        for name in ("survivors", "dropped"):
            values = check_strings(getattr(self, name), f"SecAggRelay.{name}")
            for device in values:
                validate_id(device)
            set_field(self, name, values)
        if set(self.survivors) & set(self.dropped):
            raise InvalidPayload("SecAggRelay names a device both as survivor and as dropped")
        _step_fields(self, self._STEP_FIELDS[self.step], ("dropped",) if self.step == "unmask" else ())

    def to_payload(self) -> dict[str, Any]:
        return _nonblank_payload(self)

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> SecAggRelay:
        return payload_from_fields(cls, round, payload)


def as_bytes_array(data: bytes) -> np.ndarray:
    """``data`` as the 1-D uint8 array a message carries."""
    return np.frombuffer(data, dtype=np.uint8)


def session_id(fleet: str, round: int) -> bytes:
    """The session label binding keys and ciphertexts to one round of one fleet.

    Examples
    --------
    >>> session_id("ward7", 3)
    b'ward7/3'
    """
    validate_id(fleet, "fleet")
    return f"{fleet}/{require_int(round, 'round', 0)}".encode()


def default_threshold(n_devices: int) -> int:
    """``n // 2 + 1``: the smallest majority, tolerating ``n - n // 2 - 1`` dropouts.

    Examples
    --------
    >>> default_threshold(7)
    4
    """
    return require_int(n_devices, "n_devices", 1) // 2 + 1


def check_threshold(threshold: int, n: int) -> int:
    """``threshold`` if it is a majority of ``n`` devices (``n/2 < threshold <= n``), else
    :class:`SecAggError`: with a smaller one, a coordinator could collect both kinds of
    shares of one device from two groups and unmask its individual input."""
    t = require_int(threshold, "threshold", 1)
    if not (n / 2 < t <= n):
        raise SecAggError(
            f"threshold {t} is not a majority of the {n} devices: need n/2 < threshold <= n "
            f"(e.g. {default_threshold(n)}) so no individual input can be unmasked"
        )
    return t


def public_key_pair(public_keys: np.ndarray) -> tuple[bytes, bytes]:
    """The ``(c_pk, s_pk)`` of an advertised ``public_keys`` array; :class:`SecAggError`
    when the two keys are the same."""
    data = public_keys.tobytes()
    c_pk, s_pk = data[:KEY_BYTES], data[KEY_BYTES:]
    if c_pk == s_pk:
        raise SecAggError("advertised c_pk and s_pk must be different keys")
    return c_pk, s_pk


def advertised_keys(relay: SecAggRelay) -> dict[str, tuple[bytes, bytes]]:
    """U1 of a ``keys`` relay: ``{device id: (c_pk, s_pk)}`` in id order.

    Raises
    ------
    SecAggError
        The relay is not a ``keys`` step, its threshold is not a majority of U1
        (:func:`check_threshold`), or a public key repeats (every device needs fresh keys
        each round).
    """
    if relay.step != "keys":
        raise SecAggError(f"expected the 'keys' relay, got the {relay.step!r} relay")
    keys = {}
    for device in sorted(relay.public_keys):
        try:
            keys[device] = public_key_pair(relay.public_keys[device])
        except SecAggError as exc:
            raise SecAggError(f"key list entry {device!r}: {exc}") from None
    check_threshold(relay.threshold, len(keys))
    public = [key for pair in keys.values() for key in pair]
    if len(set(public)) != len(public):
        raise SecAggError("key list repeats a public key: every device needs fresh keys each round")
    return keys


def shamir_xs(devices: Sequence[str]) -> dict[str, int]:
    """The Shamir x-coordinate of each device of U1: 1 + its index in id order."""
    return {device: x for x, device in enumerate(sorted(devices), start=1)}


__all__ = [
    "COMMITMENT_BYTES",
    "SECAGG_RELAY_STEPS",
    "SECAGG_UPLOAD_STEPS",
    "SecAggRelay",
    "SecAggUpload",
    "advertised_keys",
    "as_bytes_array",
    "check_threshold",
    "default_threshold",
    "public_key_pair",
    "session_id",
    "shamir_xs",
]
