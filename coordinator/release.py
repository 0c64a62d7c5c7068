"""Simulated private releases of summed device contributions, for ``biofed evaluate``.

The offline evaluation holds every recording in one process and estimates what the
one-shot statistics and DP-FTRL algorithms would achieve at a given epsilon; nothing it
computes crosses a trust boundary. A live federation releases through
:mod:`biofed.privacy_mechanism` alone (``tests/test_privacy_gate.py`` checks that only the
evaluation imports this module).

Every privacy-noise draw of the one-shot statistics and DP-FTRL algorithms goes through
this module, one function per release kind, each taking the *clipped* sum, the Gaussian
noise standard deviation and the :class:`dp_accounting.DpEvent` the release costs:

- :func:`release_statistics` — a one-shot Gaussian release of summed, clipped device
  statistics (class sums, scatter, basis statistics, model updates);
- :class:`TreePrefixRelease` — DP-FTRL's tree-aggregated prefix sums (Kairouz et al.
  2021), whose whole epoch is one ``SingleEpochTreeAggregationDpEvent`` charged before the
  first prefix is released.

The ledger is charged *before* any noised value exists, and the noise comes from a
generator seeded by the operating system (never from a caller's seed), so a released value
cannot be reproduced or denoised by anyone who knows the run's seed.

Accounting
----------
:class:`ReleaseLedger` composes every charged event in a ``dp_accounting`` RDP accountant
with the ``REPLACE_SPECIAL`` neighbouring relation (one device's whole contribution is
replaced by the zero contribution), the relation dp-accounting requires for tree
aggregation; for Gaussian sums of contributions clipped to norm ``C`` the sensitivity is
``C`` under it, as under add/remove-one. A record is one device: the guarantee is per
patient.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant

__all__ = ["ReleaseLedger", "TreePrefixRelease", "release_statistics", "tree_nodes"]


class ReleaseLedger:
    """Composition of every release's DpEvent; epsilon from dp-accounting's RDP accountant."""

    def __init__(self) -> None:
        self._events: list[dp_accounting.DpEvent] = []

    @property
    def events(self) -> tuple[dp_accounting.DpEvent, ...]:
        return tuple(self._events)

    def charge(self, event: dp_accounting.DpEvent) -> None:
        """Record ``event`` (raises ``TypeError`` for a non-DpEvent: nothing is released then)."""
        if not isinstance(event, dp_accounting.DpEvent):
            raise TypeError(f"a release must be charged with a dp_accounting.DpEvent, got {event!r}")
        self._events.append(event)

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything charged (0 before any release, inf after a noiseless one)."""
        if not self._events:
            return 0.0
        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
        accountant.compose(dp_accounting.ComposedDpEvent(list(self._events)))
        return float(accountant.get_epsilon(delta))


def _os_seeded_normal(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Gaussian privacy noise from a fresh OS-entropy generator (never a caller's seed)."""
    return np.random.default_rng().normal(0.0, std, size=shape)


def _check_release(clipped_sum, noise_std) -> tuple[np.ndarray, float]:
    values = np.asarray(clipped_sum, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("the clipped sum contains NaN/inf; drop the offending contribution before release")
    std = float(noise_std)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    return values, std


def release_statistics(
    clipped_sum, noise_std: float, event: dp_accounting.DpEvent, ledger: ReleaseLedger
) -> np.ndarray:
    """Release ``clipped_sum + N(0, noise_std^2 I)`` after charging ``event`` to ``ledger``.

    ``clipped_sum`` is the sum over devices of contributions each clipped to norm ``C``;
    ``event`` is normally ``GaussianDpEvent(noise_std / C)``.
    """
    values, std = _check_release(clipped_sum, noise_std)
    ledger.charge(event)
    if std == 0:
        return values.copy()
    return values + _os_seeded_normal(values.shape, std)


def tree_nodes(step: int) -> list[tuple[int, int]]:
    """Dyadic nodes ``(level, index)`` whose sums add up to the prefix ``1..step`` (step >= 1).

    Node ``(level, j)`` covers steps ``j * 2**level + 1 .. (j + 1) * 2**level``; a prefix
    uses one node per set bit of ``step``, so every step's value sits in at most
    ``ceil(log2(T)) + 1`` released nodes.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step!r}")
    nodes = []
    start = 0
    for level in range(int(step).bit_length() - 1, -1, -1):
        if step & (1 << level):
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


class TreePrefixRelease:
    """Noised prefix sums of a stream of clipped sums by binary-tree aggregation (DP-FTRL).

    Construction charges ``event`` (``SingleEpochTreeAggregationDpEvent(z, steps)`` for the
    whole planned run, charged in full even if the run stops early) to ``ledger``; each
    :meth:`release_prefix` then adds one step's clipped sum and returns the running sum plus
    the noise of the tree nodes covering it (each node's ``N(0, noise_std^2 I)`` drawn once).
    """

    def __init__(self, steps: int, noise_std: float, event: dp_accounting.DpEvent, ledger: ReleaseLedger) -> None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        _, self._std = _check_release(0.0, noise_std)
        ledger.charge(event)
        self.steps = int(steps)
        self._step = 0
        self._prefix: np.ndarray | None = None
        self._node_noise: dict[tuple[int, int], np.ndarray] = {}

    def release_prefix(self, clipped_sum) -> np.ndarray:
        """Add this step's clipped sum; return the noised sum of every step so far."""
        values, _ = _check_release(clipped_sum, self._std)
        if self._step >= self.steps:
            raise RuntimeError(f"the tree was charged for {self.steps} steps; all are released")
        if self._prefix is not None and values.shape != self._prefix.shape:
            raise ValueError(f"step sums must keep one shape, got {values.shape} after {self._prefix.shape}")
        self._step += 1
        self._prefix = values.copy() if self._prefix is None else self._prefix + values
        noise = np.zeros_like(values)
        if self._std > 0:
            for node in tree_nodes(self._step):
                if node not in self._node_noise:
                    self._node_noise[node] = _os_seeded_normal(values.shape, self._std)
                noise += self._node_noise[node]
        return self._prefix + noise
