"""The secure-aggregation step messages, as they travel on the wire.

:class:`SecAggUpload` carries a device's step (``secagg/{device_id}``), :class:`SecAggRelay`
a coordinator's broadcast (``secagg_relay``); both are payload kinds of
:mod:`biofed.protocol`, validated on construction like every other payload.
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

SECAGG_UPLOAD_STEPS = ("advertise", "shares", "masked", "unmask")
"""Device -> coordinator steps of a secure-aggregation round (:mod:`biofed.secagg`)."""
SECAGG_RELAY_STEPS = ("keys", "shares", "unmask")
"""Coordinator -> devices steps of a secure-aggregation round."""
_SECAGG_PUBLIC_KEYS_BYTES = 64  # X25519 c_pk | s_pk
_SECAGG_SHARE_BYTES = 66  # one element of GF(2^521 - 1)
_SECAGG_MAX_CIPHERTEXT = 1024


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
        set_field(self, "round", check_int(self.round, "SecAggUpload.round"))
        set_field(self, "step", check_choice(self.step, "SecAggUpload.step", SECAGG_UPLOAD_STEPS))
        if self.public_keys is not None:
            check_bytes(self.public_keys, "SecAggUpload.public_keys", size=_SECAGG_PUBLIC_KEYS_BYTES)
        set_field(self, "ciphertexts", check_id_map(self.ciphertexts, "SecAggUpload.ciphertexts",
                                          lambda v, n: check_bytes(v, n, max_size=_SECAGG_MAX_CIPHERTEXT)))
        if self.commitment is not None:
            check_bytes(self.commitment, "SecAggUpload.commitment", size=32)
        if self.masked is not None:
            masked = self.masked
            if not isinstance(masked, np.ndarray) or masked.dtype != np.int64 or masked.ndim != 1 or masked.size == 0:
                raise InvalidPayload("SecAggUpload.masked must be a non-empty 1-D int64 array (the uint64 words' bits)")
        for name in ("b_shares", "key_shares"):
            set_field(self, name, check_id_map(getattr(self, name), f"SecAggUpload.{name}",
                                     lambda v, n: check_bytes(v, n, size=_SECAGG_SHARE_BYTES)))
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

    _STEP_FIELDS: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({
        "keys": ("threshold", "public_keys"), "shares": ("ciphertexts",), "unmask": ("survivors",),
    })

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "SecAggRelay.round"))
        set_field(self, "step", check_choice(self.step, "SecAggRelay.step", SECAGG_RELAY_STEPS))
        set_field(self, "threshold", check_int(self.threshold, "SecAggRelay.threshold"))
        set_field(self, "public_keys", check_id_map(self.public_keys, "SecAggRelay.public_keys",
                                          lambda v, n: check_bytes(v, n, size=_SECAGG_PUBLIC_KEYS_BYTES)))
        set_field(self, "ciphertexts", check_id_map(
            self.ciphertexts, "SecAggRelay.ciphertexts",
            lambda inner, n: check_id_map(inner, n, lambda v, m: check_bytes(v, m, max_size=_SECAGG_MAX_CIPHERTEXT))))
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


__all__ = ["SECAGG_RELAY_STEPS", "SECAGG_UPLOAD_STEPS", "SecAggRelay", "SecAggUpload"]
