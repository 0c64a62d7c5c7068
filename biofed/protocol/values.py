"""Payload values: what a payload map may hold, checked on encode and on decode.

``p`` maps str to None, bool, int, float, str, a list of those, a nested map of the same
(depth <= 3) or a typed array (:mod:`biofed.protocol.arrays`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from biofed.protocol.arrays import encode_array
from biofed.protocol.errors import InvalidPayload

_MAX_DEPTH = 3
# Limits handed to msgpack.unpackb so no length prefix can make it allocate more than the
# message itself could hold (lists such as Task.participants are the longest containers).
MAX_STR_LEN = 64 * 1024
MAX_ARRAY_LEN = 100_000
MAX_MAP_LEN = 256


@dataclass(frozen=True)
class PayloadBounds:
    """The bounds every payload value obeys, checked on encode and on decode before any
    schema sees the value: map nesting, container lengths, string sizes, integer range.
    They restate the unpacker's length limits so a value built in Python is held to the
    same rules as one read off the wire."""

    max_depth: int = _MAX_DEPTH
    max_string_chars: int = MAX_STR_LEN
    max_list_items: int = MAX_ARRAY_LEN
    max_map_items: int = MAX_MAP_LEN
    int_range: tuple[int, int] = (-(2**63), 2**64 - 1)  # what msgpack can carry

    def check_scalar(self, value: Any, path: str) -> None:
        if isinstance(value, str) and len(value) > self.max_string_chars:
            raise InvalidPayload(f"{path} is a string of {len(value)} characters, at most {self.max_string_chars}")
        low, high = self.int_range
        if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= high:
            raise InvalidPayload(f"{path} = {value} is outside the 64-bit integer range")


PAYLOAD_BOUNDS = PayloadBounds()


def check_value(value: Any, path: str, depth: int = 0) -> Any:
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
            out[key] = check_value(item, f"{path}.{key}", depth + 1)
        return MappingProxyType(out)
    raise InvalidPayload(f"{path} is a {type(value).__name__}, which the protocol cannot carry")


def to_wire(value: Any) -> Any:
    """``value`` with arrays as ExtTypes and NumPy scalars as Python ones, ready for msgpack."""
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {key: to_wire(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(item) for item in value]
    return value


__all__ = ["MAX_ARRAY_LEN", "MAX_MAP_LEN", "MAX_STR_LEN", "PAYLOAD_BOUNDS", "PayloadBounds", "check_value", "to_wire"]
