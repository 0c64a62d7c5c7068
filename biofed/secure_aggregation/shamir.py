"""Shamir secret sharing over the Mersenne prime field GF(2^521 - 1).

A 32-byte secret (an X25519 private key, a mask seed) is one field element; a smaller
prime such as 2^127 - 1 would need three 15-byte limbs per secret. Coefficients come from
the OS CSPRNG (``secrets``) by rejection sampling, so they are uniform.

Examples
--------
>>> shares = shamir_split(42, 2, [1, 2, 3])
>>> shamir_combine({x: shares[x] for x in (1, 3)}, 2)
42
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from biofed.secure_aggregation.crypto import RandomBytes
from biofed.secure_aggregation.errors import NotEnoughSurvivors, SecAggError, require_int

FIELD_PRIME = 2**521 - 1
"""Mersenne prime of the Shamir field; any 32-byte secret is one element."""
FIELD_BYTES = 66
"""Bytes of one field element on the wire (big-endian)."""


def _random_field_element(random_bytes: RandomBytes) -> int:
    while True:  # 521-bit draws; only 2^521 - 1 itself is rejected
        value = int.from_bytes(random_bytes(FIELD_BYTES), "big") & ((1 << 521) - 1)
        if value < FIELD_PRIME:
            return value


def shamir_split(
    secret: int, threshold: int, xs: Sequence[int], *, random_bytes: RandomBytes = secrets.token_bytes
) -> dict[int, int]:
    """t-of-n Shamir shares of ``secret`` over GF(2^521 - 1).

    Parameters
    ----------
    secret : int
        In [0, 2^521 - 1).
    threshold : int
        t: any t shares reconstruct, fewer reveal nothing.
    xs : sequence of int
        Distinct nonzero x-coordinates, one per share holder (at least t).
    random_bytes : callable
        Source of the polynomial's random coefficients (OS CSPRNG by default).

    Returns
    -------
    dict
        ``{x: f(x)}`` with f a random polynomial of degree t-1 and f(0) = secret.
    """
    if isinstance(secret, bool) or not isinstance(secret, int) or not 0 <= secret < FIELD_PRIME:
        raise SecAggError("secret must be an integer in [0, 2^521 - 1)")
    t = require_int(threshold, "threshold", 1)
    points = [require_int(x, "x-coordinate", 1) for x in xs]
    if len(set(points)) != len(points) or max(points, default=0) >= FIELD_PRIME:
        raise SecAggError("x-coordinates must be distinct and below the field prime")
    if len(points) < t:
        raise SecAggError(f"{len(points)} shares cannot meet threshold {t}")
    coefficients = [secret] + [_random_field_element(random_bytes) for _ in range(t - 1)]
    shares = {}
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % FIELD_PRIME
        shares[x] = y
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """The weights w_i with f(0) = sum_i w_i f(x_i) for any polynomial f of degree < len(xs)."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % FIELD_PRIME
                den = den * (xj - xi) % FIELD_PRIME
        weights.append(num * pow(den, -1, FIELD_PRIME) % FIELD_PRIME)
    return weights


def shamir_combine(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from at least ``threshold`` shares ``{x: y}`` (the first t by x are used)."""
    t = require_int(threshold, "threshold", 1)
    if len(shares) < t:
        raise NotEnoughSurvivors(f"{len(shares)} shares cannot reconstruct a {t}-of-n secret")
    xs = sorted(shares)[:t]
    return sum(w * shares[x] for w, x in zip(lagrange_at_zero(xs), xs)) % FIELD_PRIME


def to_field_bytes(value: int) -> bytes:
    """A field element as :data:`FIELD_BYTES` big-endian bytes."""
    return value.to_bytes(FIELD_BYTES, "big")


def from_field_bytes(data: bytes, what: str) -> int:
    """The field element of :data:`FIELD_BYTES` bytes; :class:`SecAggError` names ``what`` otherwise."""
    if not isinstance(data, bytes) or len(data) != FIELD_BYTES:
        raise SecAggError(f"{what} must be {FIELD_BYTES} bytes")
    value = int.from_bytes(data, "big")
    if value >= FIELD_PRIME:
        raise SecAggError(f"{what} is not a field element")
    return value


__all__ = [
    "FIELD_BYTES",
    "FIELD_PRIME",
    "from_field_bytes",
    "lagrange_at_zero",
    "shamir_combine",
    "shamir_split",
    "to_field_bytes",
]
