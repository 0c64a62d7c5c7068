"""Checks that payload dataclasses run in ``__post_init__``, and their map conversion.

Each raises :class:`~biofed.protocol.errors.InvalidPayload` naming the field and what was
wrong; :mod:`biofed.protocol.payloads` and :mod:`biofed.secure_aggregation.messages` build
their schemas from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from types import MappingProxyType
from typing import Any

import numpy as np

from biofed.protocol.errors import InvalidPayload, InvalidTopic
from biofed.protocol.topics import validate_id


def check_int(value: Any, name: str, *, minimum: int | None = 0) -> int:
    """``value`` as an int (NumPy integers included, bools and floats refused), at least ``minimum``."""
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise InvalidPayload(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidPayload(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(value: Any, name: str, *, minimum: float | None = None, allow_none: bool = False) -> float | None:
    """``value`` as a finite float of at least ``minimum``; None passes only with ``allow_none``."""
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


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise InvalidPayload(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_strings(value: Any, name: str) -> tuple[str, ...]:
    """``value`` (a list or tuple of str) as a tuple."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidPayload(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)


def check_array(value: Any, name: str, *, ndim: int, floating: bool = True, finite: bool = True) -> np.ndarray:
    """``value`` if it is an ``ndim``-D typed array: floating point and free of NaN/inf unless told otherwise."""
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


def set_field(obj: Any, name: str, value: Any) -> None:
    """Set ``name`` on a frozen dataclass from its ``__post_init__`` (the checked, normalized value)."""
    object.__setattr__(obj, name, value)


def check_bytes(value: Any, name: str, *, size: int | None = None, max_size: int | None = None) -> np.ndarray:
    """``value`` if it is a 1-D uint8 array (a byte string on the wire) of ``size`` or at most ``max_size`` bytes."""
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        got = getattr(value, "dtype", type(value).__name__)
        raise InvalidPayload(f"{name} must be a 1-D uint8 array (bytes), got {got}")
    if size is not None and value.size != size:
        raise InvalidPayload(f"{name} must hold {size} bytes, got {value.size}")
    if max_size is not None and value.size > max_size:
        raise InvalidPayload(f"{name} holds {value.size} bytes, at most {max_size} are allowed")
    return value


def check_id_map(value: Any, name: str, check) -> Mapping[str, Any]:
    """``value`` as a read-only map of valid device ids to ``check(item, path)`` of each item."""
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


def fields_payload(obj: Any, skip: Sequence[str], omit_default: Sequence[str] = ()) -> dict[str, Any]:
    """The payload map of dataclass ``obj``: its fields but ``skip``, and but those of
    ``omit_default`` that hold their default (optional fields added to a kind later: a
    message that does not use them stays readable by receivers that predate them)."""
    return {
        f.name: getattr(obj, f.name)
        for f in fields(obj)
        if f.name not in skip and not (f.name in omit_default and getattr(obj, f.name) == f.default)
    }


def payload_from_fields(cls: type, round: int, payload: Mapping[str, Any]) -> Any:
    """``cls(round=round, **payload)`` after checking that the payload has every required field of
    ``cls`` and no unknown one."""
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


__all__ = [
    "check_array",
    "check_bytes",
    "check_choice",
    "check_float",
    "check_id_map",
    "check_int",
    "check_strings",
    "fields_payload",
    "payload_from_fields",
    "set_field",
]
