"""The exceptions of secure aggregation, and the integer check its modules share."""

from __future__ import annotations

import numpy as np


class SecAggError(ValueError):
    """A secure-aggregation step cannot proceed (bad message, wrong step, failed check)."""


class NotEnoughSurvivors(SecAggError):
    """Fewer than ``threshold`` devices are left at some step: the round must be abandoned."""


def require_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else :class:`SecAggError`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SecAggError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


__all__ = ["NotEnoughSurvivors", "SecAggError", "require_int"]
