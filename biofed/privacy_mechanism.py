"""The privacy mechanism: the one gate every data-dependent release passes through.

A :class:`PrivacyMechanism` sits on each trust boundary: on the coordinator in central
mode (it releases the noised aggregate the global model is built from), on the device in
local and distributed modes (it releases the device's noised update, sketch or noise
share). A release is always, in this order:

1. **clip** every row of each :class:`ClippedSum` to its L2 bound and sum the rows;
2. **noise**: add ``N(0, noise_std^2)`` per coordinate, drawn from the mechanism's own
   generator, seeded with 256 bits of OS entropy (:mod:`secrets`) and used for nothing
   else (not for sampling, jitter, shuffles or model initialisation, so no published
   value reveals its state);
3. **charge** the :class:`Charge` to the :class:`~biofed.privacy_ledger.PrivacyLedger`
   and make it durable (the ``persist`` callback returns only once the ledger is on
   disk), *write-ahead*: a crash after this point over-counts, never under-counts;
4. **release**: only now is the noised value returned to the caller that publishes it.

Mechanisms whose noise another gate drew but whose output reaches this side of the
boundary (the devices' noised updates that the coordinator receives in local mode, the
unmasked secure-aggregation sum) are charged with :meth:`PrivacyMechanism.charge` alone.

No other code in biofed draws privacy noise; ``tests/test_privacy_gate.py`` walks the
package's syntax trees to keep it so.

Floating point
--------------
The noise is NumPy's floating-point Gaussian sampler. Mironov (2012) showed that the
low-order bits of a float Laplace/Gaussian sample added to a value can reveal the value,
because not every float is reachable from every input. biofed's releases are the sum of
a noise draw and a clipped value, published as float64 (central and local modes); an
adversary who sees those exact bits is outside the guarantee the ledger states. The
distributed mode sends fixed-point integers, so the released sum lies on the grid of
:class:`biofed.secagg.FixedPoint`, but the noise is still drawn in floating point and
then rounded (rounding is post-processing of the noised value, so it does not widen the
attack surface beyond that of the float draw).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from biofed.privacy_ledger import LedgerEntry, PrivacyLedger, check_noise_multiplier, check_sampling_rate

logger = logging.getLogger(__name__)

__all__ = ["Charge", "ClippedSum", "PrivacyMechanism"]


@dataclass(frozen=True)
class Charge:
    """What one release costs: a ledger entry of ``kind`` for ``round`` with the
    sampling rate and the noise multiplier the adversary's view actually has."""

    round: int
    kind: str
    sampling_rate: float
    noise_multiplier: float


@dataclass(frozen=True, eq=False)
class ClippedSum:
    """One query of a release: ``sum_i clip(rows[i], clip_norm) + N(0, noise_std^2 I)``.

    ``rows`` has shape (n, P) (one row per contributor; a single device passes one row).
    """

    rows: np.ndarray
    clip_norm: float
    noise_std: float

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows, dtype=np.float64)
        if rows.ndim == 1:
            rows = rows[None, :]
        if rows.ndim != 2:
            raise ValueError(f"ClippedSum.rows must be (n, P) or (P,), got shape {rows.shape}.")
        if not np.isfinite(rows).all():
            raise ValueError("ClippedSum.rows contain NaN or inf; drop the offending contribution before release.")
        c, std = float(self.clip_norm), float(self.noise_std)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"ClippedSum.clip_norm must be a finite number > 0, got {self.clip_norm!r}.")
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"ClippedSum.noise_std must be a finite number >= 0, got {self.noise_std!r}.")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "clip_norm", c)
        object.__setattr__(self, "noise_std", std)

    def clipped_total(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sum of the clipped rows (P,), norms before clipping (n,))``."""
        norms = np.linalg.norm(self.rows, axis=1)
        # rows within the bound stay exactly as they are (as in biofed.kernels.clip_l2)
        scale = np.where(norms <= self.clip_norm, 1.0, self.clip_norm / np.maximum(norms, np.finfo(float).tiny))
        return (self.rows * scale[:, None]).sum(axis=0), norms


class PrivacyMechanism:
    """The release gate of one trust boundary (see the module docstring).

    Parameters
    ----------
    ledger : PrivacyLedger
        The ledger every release is charged to.
    persist : callable or None
        Called with the ledger after each charge; must return only once it is durable
        (the coordinator writes its state database, the device its store). None keeps
        the ledger in memory only (planning, tests, one-off aggregations).
    """

    def __init__(self, ledger: PrivacyLedger, persist: Callable[[PrivacyLedger], None] | None = None) -> None:
        if not isinstance(ledger, PrivacyLedger):
            raise TypeError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}.")
        self.ledger = ledger
        self._persist = persist
        self._noise = np.random.Generator(np.random.PCG64(secrets.randbits(256)))

    def __repr__(self) -> str:
        return f"PrivacyMechanism({self.ledger!r}, durable={self._persist is not None})"

    def charge(self, charge: Charge) -> LedgerEntry:
        """Record ``charge`` in the ledger and make it durable before returning."""
        if not isinstance(charge, Charge):
            raise TypeError(f"charge must be a Charge, got {type(charge).__name__}.")
        entry = self.ledger.record_round(
            charge.round, check_sampling_rate(charge.sampling_rate), check_noise_multiplier(charge.noise_multiplier),
            kind=charge.kind,
        )
        if self._persist is not None:
            self._persist(self.ledger)
        return entry

    def release(self, charge: Charge, *queries: ClippedSum) -> tuple[np.ndarray, ...]:
        """Clip, noise, charge (durably), then return the noised sum of every query.

        Parameters
        ----------
        charge : Charge
            The one ledger entry that covers all ``queries`` together (e.g. the update sum
            and the clipped-count of adaptive clipping form one Gaussian mechanism).
        *queries : ClippedSum
            At least one.

        Returns
        -------
        tuple of ndarray
            One (P,) float64 array per query, in order.

        Raises
        ------
        ValueError, TypeError
            Invalid queries or charge; nothing is charged or released.
        """
        if not queries:
            raise ValueError("release needs at least one ClippedSum.")
        for query in queries:
            if not isinstance(query, ClippedSum):
                raise TypeError(f"queries must be ClippedSum, got {type(query).__name__}.")
        noised = []
        for query in queries:
            total, _ = query.clipped_total()
            if query.noise_std > 0:
                total = total + self._noise.normal(0.0, query.noise_std, size=total.shape)
            noised.append(total)
        self.charge(charge)
        return tuple(noised)
