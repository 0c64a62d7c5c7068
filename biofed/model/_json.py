"""Bounded parsing of the JSON a model or a device carries (untrusted text)."""

from __future__ import annotations

import json
import math

__all__ = ["MAX_LAYOUT_JSON_CHARS", "ModelFormatError"]


class ModelFormatError(ValueError):
    """A model's metadata or layout is missing, malformed or of another format version."""


MAX_LAYOUT_JSON_CHARS = 64 * 1024
"""Longest layout JSON read (a device's :class:`biofed.protocol.Status` carries it)."""
_MAX_JSON_DEPTH = 4  # layout -> modalities -> modality -> names
_MAX_JSON_INT_DIGITS = 19


def number(value, what: str) -> float:
    """``value`` as a float when it is a finite JSON number, else :class:`ModelFormatError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ModelFormatError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def names(value, what: str) -> tuple[str, ...]:
    """``value`` as a tuple when it is a list of strings, else :class:`ModelFormatError`."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ModelFormatError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


def _json_depth(text: str) -> int:
    """Deepest bracket nesting of ``text`` outside JSON strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer with {len(digits)} digits")
    return int(digits)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def load_bounded_json(text: object, what: str):
    """``json.loads`` of untrusted text with bounded size, nesting and integers: any input
    gives the parsed value or a :class:`ModelFormatError`."""
    if not isinstance(text, str):
        raise ModelFormatError(f"{what} must be JSON text, got {type(text).__name__}")
    if len(text) > MAX_LAYOUT_JSON_CHARS:
        raise ModelFormatError(f"{what} is {len(text)} characters long, at most {MAX_LAYOUT_JSON_CHARS}")
    if _json_depth(text) > _MAX_JSON_DEPTH:
        raise ModelFormatError(f"{what} nests deeper than {_MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_reject_constant)
    except (ValueError, RecursionError, OverflowError) as exc:
        raise ModelFormatError(f"{what} is not valid JSON: {exc}") from None
