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

DP-FTRL's tree-aggregated prefix sums (:meth:`PrivacyMechanism.open_tree`, Kairouz et al.
2021) follow the same order per tree: the whole tree is charged durably when it is opened,
before its first prefix exists (and stays charged in full if the run stops early); each
step then clips the step's rows, noises the one new tree node it completes and returns
the prefix, i.e. the sum of the noised nodes of its dyadic decomposition (:func:`tree_nodes`).

Mechanisms whose noise another gate drew but whose output reaches this side of the
boundary (the devices' noised updates that the coordinator receives in local mode, the
unmasked secure-aggregation sum) are charged with :meth:`PrivacyMechanism.charge` alone.

No other code in biofed draws privacy noise; ``tests/test_privacy_gate.py`` walks the
package's syntax trees to keep it so.

Floating point
--------------
Mironov (2012) showed that a floating-point Laplace or Gaussian sample added to a value
can betray the value through its low-order bits: the set of floats reachable from
``x + noise`` depends on ``x``, so an adversary who sees the exact bits of a release can
rule inputs out, and the textbook epsilon no longer bounds what it learns. In biofed:

* :meth:`PrivacyMechanism.release` (central mode, local mode, basis sketches) draws
  NumPy's floating-point Gaussian and publishes float64 sums: this is the attack surface.
  Its guarantee holds against an adversary who does not exploit the bit patterns of the
  released floats.
* :meth:`PrivacyMechanism.release_on_grid` (distributed mode, the secure-aggregation
  inputs) removes it: the clipped vector is rounded to the fixed-point grid first and the
  noise is an *exact* discrete Gaussian on that grid (Canonne, Kamath & Steinke 2020,
  sampled with integer arithmetic from the OS CSPRNG), so every value is an integer
  count of grid steps and no floating point touches the noise.

Accounting the discrete Gaussian: one sample of std ``sigma`` (in grid steps) on a
query of L2 sensitivity ``Delta`` satisfies ``Delta^2 / (2 sigma^2)``-zCDP, the same as
the continuous Gaussian (CKS 2020, Thm. 4); the sum of ``n`` devices' shares is within
``tau = 10 sum_{k<n} exp(-2 pi^2 sigma^2 k / (k + 1))`` of a discrete Gaussian of
variance ``n sigma^2`` (Kairouz, Liu & Steinke 2021), and ``tau`` underflows to 0 for the
grid sigmas biofed uses (``sigma`` is millions of steps; :func:`distributed_discrete_tau`
checks it). Rounding a clipped vector to the grid can lengthen it by at most
``sqrt(P) * step / 2``, so the ledger records the multiplier against
:func:`grid_sensitivity` instead of ``C``: ``GaussianDpEvent(z C / grid_sensitivity)``.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from biofed.privacy_ledger import (
    LedgerEntry,
    PrivacyLedger,
    check_noise_multiplier,
    check_sampling_rate,
    check_tree_steps,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Charge",
    "ClippedSum",
    "PrivacyMechanism",
    "TreeAggregation",
    "discrete_gaussian",
    "distributed_discrete_tau",
    "grid_sensitivity",
    "tree_nodes",
]


@dataclass(frozen=True)
class Charge:
    """What one release costs: a ledger entry of ``kind`` for ``round`` with the
    sampling rate and the noise multiplier the adversary's view actually has.

    ``tree_steps``: the charge of a whole DP-FTRL tree of that many prefix releases
    (``sampling_rate`` 1; see :meth:`PrivacyMechanism.open_tree`); None for one Gaussian round.
    """

    round: int
    kind: str
    sampling_rate: float
    noise_multiplier: float
    tree_steps: int | None = None


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


def tree_nodes(step: int) -> list[tuple[int, int]]:
    """Dyadic nodes ``(level, index)`` whose sums add up to the prefix ``1..step`` (step >= 1).

    Node ``(level, j)`` covers steps ``j * 2**level + 1 .. (j + 1) * 2**level``; a prefix
    uses one node per set bit of ``step``, highest level first, so every step's value sits in
    at most ``ceil(log2(T + 1))`` released nodes of a tree of ``T`` steps. The last node is
    the only one that ends at ``step``.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step!r}.")
    nodes = []
    start = 0
    for level in range(int(step).bit_length() - 1, -1, -1):
        if step & (1 << level):
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


def grid_sensitivity(clip_norm: float, size: int, grid_step: float) -> float:
    """L2 bound of a vector clipped to ``clip_norm`` and then rounded to the grid
    ``k * grid_step`` (rounding moves each of the ``size`` coordinates by at most half a step)."""
    return float(clip_norm) + math.sqrt(int(size)) * float(grid_step) / 2.0


def distributed_discrete_tau(sigma_steps: float, n: int) -> float:
    """Kairouz, Liu & Steinke (2021)'s distance ``tau`` between the sum of ``n`` discrete
    Gaussians of std ``sigma_steps`` and one discrete Gaussian of variance ``n sigma^2``."""
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * sigma_steps**2 * k / (k + 1)) for k in range(1, int(n)))


def _bernoulli_exp(gamma: Fraction, source: random.SystemRandom) -> bool:
    """Exact Bernoulli(exp(-gamma)) for a rational gamma >= 0 (CKS 2020, Algorithm 1)."""
    while gamma > 1:
        if not _bernoulli_exp(Fraction(1), source):
            return False
        gamma -= 1
    k = 1
    while source.randrange(gamma.denominator * k) < gamma.numerator:  # Bernoulli(gamma / k)
        k += 1
    return k % 2 == 1


def _discrete_laplace(t: int, source: random.SystemRandom) -> int:
    """Exact discrete Laplace of scale ``t`` (integer >= 1), P(y) ∝ exp(-|y| / t) (CKS 2020, Algorithm 2)."""
    while True:
        u = source.randrange(t)
        if not _bernoulli_exp(Fraction(u, t), source):
            continue
        v = 0
        while _bernoulli_exp(Fraction(1), source):
            v += 1
        y = u + t * v
        negative = source.randrange(2)
        if negative and y == 0:
            continue
        return -y if negative else y


def discrete_gaussian(sigma: float, size: int, source: random.SystemRandom) -> np.ndarray:
    """``size`` exact samples of the discrete Gaussian ``P(y) ∝ exp(-y^2 / (2 sigma^2))`` on
    the integers (CKS 2020, Algorithm 3), with integer arithmetic only.

    Parameters
    ----------
    sigma : float
        > 0 (the float's exact rational value is used).
    size : int
    source : random.SystemRandom
        The OS CSPRNG.

    Returns
    -------
    ndarray, shape (size,), int64
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}.")
    sigma2 = Fraction(sigma) ** 2
    t = math.floor(sigma) + 1
    out = np.empty(int(size), dtype=np.int64)
    for i in range(out.shape[0]):
        while True:
            y = _discrete_laplace(t, source)
            if _bernoulli_exp((abs(y) - sigma2 / t) ** 2 / (2 * sigma2), source):
                out[i] = y
                break
    return out


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
        self._grid_noise = random.SystemRandom()  # the OS CSPRNG itself, for the exact discrete sampler

    def __repr__(self) -> str:
        return f"PrivacyMechanism({self.ledger!r}, durable={self._persist is not None})"

    def _gaussian(self, std: float, shape: tuple[int, ...]) -> np.ndarray:
        """``N(0, std^2)`` privacy noise of ``shape`` from the mechanism's own generator."""
        return self._noise.normal(0.0, std, size=shape)

    def charge(self, charge: Charge) -> LedgerEntry:
        """Record ``charge`` in the ledger and make it durable before returning."""
        if not isinstance(charge, Charge):
            raise TypeError(f"charge must be a Charge, got {type(charge).__name__}.")
        if charge.tree_steps is None:
            entry = self.ledger.record_round(
                charge.round,
                check_sampling_rate(charge.sampling_rate),
                check_noise_multiplier(charge.noise_multiplier),
                kind=charge.kind,
            )
        else:
            if check_sampling_rate(charge.sampling_rate) != 1.0:
                raise ValueError(
                    f"a tree aggregation samples no devices: its Charge.sampling_rate must be 1, "
                    f"got {charge.sampling_rate!r}."
                )
            entry = self.ledger.record_tree(charge.round, charge.noise_multiplier, charge.tree_steps, kind=charge.kind)
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
                total = total + self._gaussian(query.noise_std, total.shape)
            noised.append(total)
        self.charge(charge)
        return tuple(noised)

    def release_on_grid(self, charge: Charge, query: ClippedSum, grid_step: float) -> np.ndarray:
        """Clip, round to the grid ``k * grid_step``, add an exact discrete Gaussian of std
        ``query.noise_std`` (``noise_std / grid_step`` steps), charge durably, then return
        the integer grid counts: no floating point touches the noise (see the module
        docstring). The caller states the charge against :func:`grid_sensitivity`.

        Returns
        -------
        ndarray, shape (P,), int64
            ``round(clipped_sum / grid_step) + noise`` in grid steps.
        """
        if not isinstance(query, ClippedSum):
            raise TypeError(f"query must be a ClippedSum, got {type(query).__name__}.")
        step = float(grid_step)
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"grid_step must be a finite number > 0, got {grid_step!r}.")
        total, _ = query.clipped_total()
        counts = np.rint(total / step).astype(np.int64)
        if query.noise_std > 0:
            counts = counts + discrete_gaussian(query.noise_std / step, counts.shape[0], self._grid_noise)
        self.charge(charge)
        return counts

    def open_tree(self, charge: Charge, clip_norm: float) -> TreeAggregation:
        """Charge a whole DP-FTRL tree durably, then return the object that releases its prefixes.

        Parameters
        ----------
        charge : Charge
            ``Charge(round, kind, 1.0, z, tree_steps=T)``: the tree's ``T`` prefix releases,
            each tree node noised with std ``z * clip_norm``. Recorded (and persisted) here,
            before any prefix exists, and never refunded: a run that stops early has spent it.
        clip_norm : float
            L2 bound C of each contributor's row at every step.

        Raises
        ------
        ValueError, TypeError
            A bad charge or clip norm, or a ledger that cannot account trees (PLD); nothing
            is charged then.
        """
        if not isinstance(charge, Charge):
            raise TypeError(f"charge must be a Charge, got {type(charge).__name__}.")
        if charge.tree_steps is None:
            raise ValueError("open_tree needs a Charge with tree_steps (the number of prefix releases of the tree).")
        steps = check_tree_steps(charge.tree_steps)
        z = check_noise_multiplier(charge.noise_multiplier)
        c = float(clip_norm)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}.")
        self.charge(charge)
        return TreeAggregation(self, steps, c, z * c)


class TreeAggregation:
    """One charged DP-FTRL tree of :meth:`PrivacyMechanism.open_tree`: ``steps`` noised prefix sums.

    Step ``t`` clips its rows to ``clip_norm``, sums them, and completes exactly one dyadic
    node, the last of :func:`tree_nodes` ``(t)``, covering steps ``t - 2**level + 1 .. t``:
    that node's sum (this step's plus the nodes it absorbs) gets ``N(0, noise_std^2 I)``
    from the mechanism's generator, once. The released prefix is the sum of the noised
    nodes of ``tree_nodes(t)``, so it carries the noise of ``popcount(t)`` nodes and shares
    the noise of its common nodes with other prefixes. Only the nodes of the current
    decomposition are kept (at most ``log2(T) + 1``).

    The accounting assumes every contributor is in at most one step of the tree: a step
    naming a contributor already seen, or a step beyond the ``steps`` charged, is refused
    and releases nothing.
    """

    def __init__(self, mechanism: PrivacyMechanism, steps: int, clip_norm: float, noise_std: float) -> None:
        self._mechanism = mechanism
        self.steps = steps
        self.clip_norm = clip_norm
        self.noise_std = noise_std
        self._step = 0
        self._seen: set[Hashable] = set()
        self._nodes: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # node: (exact sum, noised sum)
        self._size: int | None = None

    def __repr__(self) -> str:
        return (
            f"TreeAggregation(step {self._step} of {self.steps}, "
            f"clip_norm={self.clip_norm:g}, noise_std={self.noise_std:g})"
        )

    @property
    def released(self) -> int:
        """Prefixes released so far."""
        return self._step

    def release_prefix(self, rows, contributors: Iterable[Hashable]) -> np.ndarray:
        """Add one step's rows (one per contributor) and return the noised prefix sum.

        Parameters
        ----------
        rows : array-like, shape (n, P) or (P,)
            The step's contributions; each is clipped to ``clip_norm`` here.
        contributors : iterable of hashable
            One distinct id per row, none seen in an earlier step of this tree.

        Returns
        -------
        ndarray, shape (P,)
            ``sum over steps 1..t of the clipped sums`` plus the noise of ``tree_nodes(t)``.

        Raises
        ------
        ValueError
            Bad rows, ids that repeat or do not match the rows, a changed ``P``, or every
            charged step already released. Nothing is released and the tree is unchanged.
        """
        if self._step >= self.steps:
            raise ValueError(
                f"the tree was charged for {self.steps} steps and all are released; open (and charge) a new tree."
            )
        query = ClippedSum(rows, self.clip_norm, self.noise_std)
        ids = list(contributors)
        if len(ids) != query.rows.shape[0]:
            raise ValueError(f"contributors must name one id per row: {len(ids)} ids for {query.rows.shape[0]} rows.")
        if not ids:
            raise ValueError("a tree step needs at least one contributor's row.")
        if len(set(ids)) != len(ids):
            raise ValueError(f"contributors repeat within the step: {sorted(map(repr, ids))}.")
        again = sorted(repr(i) for i in set(ids) & self._seen)
        if again:
            raise ValueError(
                f"contributor(s) {', '.join(again)} already contributed to this tree; its accounting "
                "(SingleEpochTreeAggregationDpEvent) allows each contributor in at most one step: "
                "schedule disjoint groups, or open a new tree."
            )
        if self._size is not None and query.rows.shape[1] != self._size:
            raise ValueError(f"tree steps must keep one size P: got {query.rows.shape[1]} after {self._size}.")
        total, _ = query.clipped_total()
        step = self._step + 1
        nodes = tree_nodes(step)
        absorbed = [node for node in self._nodes if node not in nodes]
        exact = total + sum((self._nodes.pop(node)[0] for node in absorbed), np.zeros_like(total))
        noised = exact
        if self.noise_std > 0:
            noised = exact + self._mechanism._gaussian(self.noise_std, exact.shape)
        self._nodes[nodes[-1]] = (exact, noised)
        self._step = step
        self._size = query.rows.shape[1]
        self._seen.update(ids)
        return np.sum([self._nodes[node][1] for node in nodes], axis=0)
