"""Fixed-point encoding of floats into Z_{2^64}, the ring secure aggregation sums in.

:class:`FixedPoint` maps a float x to ``round(x * 2^scale_bits)`` as a two's-complement
integer modulo 2^64 (default ``scale_bits = 24``: resolution 6e-8, rounding error at most
2^-25 per coordinate and device). The sum of n encodings decodes exactly when
``|sum of the integers| < 2^63``; encoding refuses values with
``|x| > max_abs = 2^(63 - scale_bits) / max_summands``, which guarantees it for up to
``max_summands`` devices (default 1024: ``max_abs = 2^29 ~ 5.4e8``, many orders of
magnitude above a clipped update, C ~ 1, plus its noise share). 64-bit words cost nothing
extra on the wire: the float64 update they replace is 8 bytes per coordinate too.

Examples
--------
>>> fp = FixedPoint()
>>> words = fp.encode([0.25, -1.5]) + fp.encode([0.5, 1.0])
>>> fp.decode(words).tolist()
[0.75, -0.5]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from biofed.secure_aggregation.errors import SecAggError, require_int


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding of floats into Z_{2^64} (two's complement), see the module docstring.

    Parameters
    ----------
    scale_bits : int
        Fractional bits (default 24: resolution 2^-24 ~ 6e-8).
    max_summands : int
        Largest number of encodings that may be summed without overflow (default 1024).
    """

    scale_bits: int = 24
    max_summands: int = 1024

    def __post_init__(self) -> None:
        require_int(self.scale_bits, "scale_bits", 0)
        require_int(self.max_summands, "max_summands", 1)
        if self.scale_bits + math.ceil(math.log2(self.max_summands)) > 62:
            raise SecAggError(
                f"scale_bits={self.scale_bits} with max_summands={self.max_summands} leaves no integer headroom "
                "in 64 bits; lower one of them"
            )

    @property
    def max_abs(self) -> float:
        """Largest |value| one device may encode: ``2^(63 - scale_bits) / max_summands``."""
        return 2.0 ** (63 - self.scale_bits) / self.max_summands

    @property
    def resolution(self) -> float:
        return 2.0**-self.scale_bits

    def encode(self, values) -> np.ndarray:
        """``round(values * 2^scale_bits)`` modulo 2^64, shape (m,) uint64.

        Raises
        ------
        SecAggError
            Non-finite values or ``|value| > max_abs`` (the sum could overflow).
        """
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise SecAggError(f"values to encode must be 1-D, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise SecAggError(f"values to encode contain {int(np.count_nonzero(~np.isfinite(x)))} NaN/inf")
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > self.max_abs:
            raise SecAggError(
                f"|value| {peak:.3g} exceeds the fixed-point limit {self.max_abs:.3g} "
                f"(scale_bits={self.scale_bits}, max_summands={self.max_summands}); clip the update"
            )
        return np.rint(np.ldexp(x, self.scale_bits)).astype(np.int64).view(np.uint64)

    def encode_counts(self, counts) -> np.ndarray:
        """Integer grid counts (multiples of :attr:`resolution`) modulo 2^64, shape (m,) uint64.

        Raises
        ------
        SecAggError
            ``|count| * resolution > max_abs`` (the sum could overflow).
        """
        c = np.asarray(counts)
        if c.ndim != 1 or c.dtype.kind not in "iu":
            raise SecAggError(f"grid counts must be a 1-D integer array, got {c.dtype} of shape {c.shape}")
        peak = int(np.max(np.abs(c.astype(np.int64)))) if c.size else 0
        if peak * self.resolution > self.max_abs:
            raise SecAggError(
                f"|value| {peak * self.resolution:.3g} exceeds the fixed-point limit {self.max_abs:.3g} "
                f"(scale_bits={self.scale_bits}, max_summands={self.max_summands}); clip the update"
            )
        return c.astype(np.int64).view(np.uint64)

    def decode(self, words) -> np.ndarray:
        """Floats of an encoding or of a sum of encodings, shape (m,) float64."""
        w = np.asarray(words)
        if w.dtype != np.uint64 or w.ndim != 1:
            raise SecAggError(f"fixed-point words must be a 1-D uint64 array, got {w.dtype} of shape {w.shape}")
        return np.ldexp(w.view(np.int64).astype(np.float64), -self.scale_bits)


__all__ = ["FixedPoint"]
