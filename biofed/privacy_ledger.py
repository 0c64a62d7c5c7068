"""Privacy ledgers over Google's ``dp_accounting`` (RDP and PLD).

No accountant is written by hand: every epsilon comes from
``dp_accounting.rdp.RdpAccountant`` or ``dp_accounting.pld.PLDAccountant`` composed with
the :class:`~dp_accounting.DpEvent` of every round actually run.

What one "record" is
--------------------
The guarantee is *client-level* (user-level) DP under the add/remove-one neighbouring
relation: a record is one device's whole contribution to a round (its clipped model
update, and its clipped-count bit when clipping is adaptive), not one example. A round
is a Gaussian mechanism on the sum of the sampled devices' clipped updates, with
sensitivity C (the clip norm) and noise multiplier ``z = noise std / C``, preceded by
Poisson sampling of devices with probability ``q``
(``PoissonSampledDpEvent(q, GaussianDpEvent(z))``; ``q = 1`` is ``GaussianDpEvent(z)``).
The amplification by sampling is valid only when each device is selected independently
with probability ``q`` and the selection is hidden from whoever the guarantee is against.
A device's record-level ledger (DP-SGD) uses the same events with one window as the
record: ``q`` is the Poisson rate of a window per step and each step is one event.

Who keeps a ledger
------------------
The coordinator keeps the client-level ledger of the fleet (see
:mod:`biofed.coordinator.server` for what it charges per trust mode: central releases,
local-mode rounds before their task goes out, distributed rounds before the unmask
request; always ``q = 1``, because the cohort is published). Each device keeps its own
client-level ledger of what it released itself (local and distributed modes) and, with
record-level DP-SGD, a record-level ledger whose record is one window. All are charged
only through :class:`biofed.privacy_mechanism.PrivacyMechanism`.

``distributed_noise_multiplier`` gives the noise of a secure-aggregated sum: each device
adds a share of std ``z_target C / sqrt(n_min)``; with ``n_survivors`` shares in the
revealed sum the multiplier is ``z_target sqrt(n_survivors / n_min)``.

The federated basis round (a Gaussian mechanism on the devices' clipped sketches) is its
own event: ``record_round(r, q, z, kind="basis")``.

Tree aggregation (DP-FTRL)
--------------------------
:meth:`PrivacyLedger.record_tree` records one tree of ``T`` noised prefix releases
(Kairouz et al. 2021, arXiv:2103.00039): ``SingleEpochTreeAggregationDpEvent(z, T)``, with
every device contributing to at most one step of the tree; ``n`` trees compose as
``SelfComposedDpEvent(tree, n)`` (a device may return once per tree). dp-accounting
accounts that event only in its RDP accountant and only under the ``REPLACE_SPECIAL``
neighbouring relation (``RdpAccountant._maybe_compose`` refuses it under any other, and
``PLDAccountant`` does not support it at all). So:

* a ledger without trees is accounted under add/remove-one, as above;
* once a ledger holds a tree, its *whole* history is accounted under ``REPLACE_SPECIAL``:
  two histories are neighbours when one device's whole contribution is replaced by the
  zero contribution (the "special" record; arXiv:2103.00039, Definition 1.1, which is how
  dp-accounting's ``NeighboringRelation.REPLACE_SPECIAL`` is documented). For a Gaussian
  round on the sum of contributions clipped to ``C`` the sensitivity under that relation is
  ``C`` (``||x - 0|| <= C``), exactly as under add/remove-one, so the Gaussian rounds keep
  their multiplier ``z = std / C``; dp-accounting's RDP of ``GaussianDpEvent`` and of
  ``PoissonSampledDpEvent`` does not depend on the relation (it accepts both), so a
  Gaussian-only history reports the same epsilon either way. The neighbours then differ
  in what one device contributed, not in whether it took part: the guarantee still covers
  each device's (patient's) whole data, which could as well have contributed zero, while
  participation itself is public (as the published cohort already is);
* a ledger that reports PLD cannot hold a tree: :meth:`PrivacyLedger.record_tree` refuses
  it (and a persisted ledger that would combine them does not load), before anything is
  released. Tree ledgers use ``accountants=("rdp",)``.

A tree is charged in full when it starts (write-ahead, before its first prefix): it
covers rounds ``round .. round + T - 1`` of its kind even if the run stops early.

``z == 0`` (no noise) is a non-private round: epsilon is ``inf`` from then on.

Budget
------
Call :meth:`PrivacyLedger.would_exceed` with the next round's parameters *before* running
it and stop training when it returns True.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

# dp_accounting loads most of SciPy: it is imported by the functions that compute an epsilon,
# so recording (charging) a round, all a device does on its own, needs none of it.
if TYPE_CHECKING:
    import dp_accounting

logger = logging.getLogger(__name__)

__all__ = [
    "ACCOUNTANTS",
    "LedgerEntry",
    "LedgerGroup",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "distributed_noise_multiplier",
    "make_accountant",
    "plan_epsilon",
    "round_event",
    "tree_event",
]

ACCOUNTANTS = ("rdp", "pld")
ROUND_KINDS = ("train", "basis", "statistics")
_LEDGER_FORMAT = 3
_READABLE_FORMATS = (1, 2, _LEDGER_FORMAT)
"""Format 1: one entry per round; 2: groups of identical rounds; 3: groups with ``tree_steps``."""


def check_sampling_rate(sampling_rate) -> float:
    """Return ``sampling_rate`` as a float in (0, 1] or raise a ValueError naming it."""
    q = _as_float(sampling_rate, "sampling_rate")
    if not 0.0 < q <= 1.0:
        raise ValueError(
            f"sampling_rate must be in (0, 1] (the probability that a device takes part in a "
            f"round), got {sampling_rate!r}."
        )
    return q


def check_noise_multiplier(noise_multiplier) -> float:
    """Return ``noise_multiplier`` as a finite float >= 0 or raise a ValueError naming it."""
    z = _as_float(noise_multiplier, "noise_multiplier")
    if not math.isfinite(z) or z < 0:
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0 (noise std / clip norm; 0 = no DP), "
            f"got {noise_multiplier!r}."
        )
    return z


def check_delta(delta) -> float:
    """Return ``delta`` as a float in (0, 1) or raise a ValueError naming it."""
    d = _as_float(delta, "delta")
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must be in (0, 1), typically below 1 / number of devices (e.g. 1e-5), got {delta!r}.")
    return d


def check_rounds(rounds) -> int:
    """Return ``rounds`` as an int >= 1 or raise a ValueError naming it."""
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}.")
    return int(rounds)


def _as_float(value, name: str) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got bool {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.") from None


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}.")
    return name


def make_accountant(name: str, *, tree_aggregation: bool = False) -> dp_accounting.PrivacyAccountant:
    """A fresh ``RdpAccountant()`` (``"rdp"``) or ``PLDAccountant()`` (``"pld"``).

    Both use the library defaults (add/remove-one neighbouring relation; RDP default
    orders; PLD value discretization 1e-4 with pessimistic estimates), so every epsilon in
    biofed can be reproduced by building the accountant directly. With
    ``tree_aggregation`` (a history holding a :func:`tree_event`) it is
    ``RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)``, the only
    dp-accounting accountant of tree aggregation (see the module docstring); ``"pld"`` is
    then refused.
    """
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    name = _check_accountant(name)
    if tree_aggregation:
        if name != "rdp":
            raise ValueError(_PLD_TREE_ERROR)
        return RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    return RdpAccountant() if name == "rdp" else PLDAccountant()


_PLD_TREE_ERROR = (
    "the PLD accountant cannot account tree aggregation: dp-accounting supports "
    "SingleEpochTreeAggregationDpEvent only in its RDP accountant under the REPLACE_SPECIAL neighbouring "
    "relation; keep a DP-FTRL ledger to accountants=('rdp',)."
)


def check_tree_steps(steps) -> int:
    """Return ``steps`` (prefix releases of one tree) as an int >= 1 or raise a ValueError naming it."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"tree steps must be an integer >= 1 (prefix releases of one tree), got {steps!r}.")
    return int(steps)


def tree_event(noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of one DP-FTRL tree: ``steps`` prefix releases, each tree node noised with
    std ``z C`` and every device in at most one step
    (``SingleEpochTreeAggregationDpEvent(z, steps)``)."""
    import dp_accounting

    return dp_accounting.SingleEpochTreeAggregationDpEvent(
        check_noise_multiplier(noise_multiplier), check_tree_steps(steps)
    )


def _mechanism_event(sampling_rate: float, noise_multiplier: float, tree_steps: int | None) -> dp_accounting.DpEvent:
    if tree_steps is None:
        return round_event(sampling_rate, noise_multiplier)
    return tree_event(noise_multiplier, tree_steps)


def round_event(sampling_rate: float, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The DpEvent of one federated round (client-level: one record = one device).

    Parameters
    ----------
    sampling_rate : float
        q in (0, 1]: probability that each device is (Poisson-)sampled into the round.
    noise_multiplier : float
        z >= 0: Gaussian noise std on the sum of clipped updates divided by the clip norm.

    Returns
    -------
    dp_accounting.DpEvent
        ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, or ``GaussianDpEvent(z)`` when
        ``q == 1``.
    """
    import dp_accounting

    q = check_sampling_rate(sampling_rate)
    gaussian = dp_accounting.GaussianDpEvent(check_noise_multiplier(noise_multiplier))
    return gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def distributed_noise_multiplier(z_target: float, n_min: int, n_survivors: int) -> float:
    """Effective noise multiplier of a distributed-DP round.

    Each device adds Gaussian noise of std ``z_target * C / sqrt(n_min)`` so that ``n_min``
    shares sum to std ``z_target * C``. With ``n_survivors`` shares present the sum carries
    std ``z_target * C * sqrt(n_survivors / n_min)``; every surviving share is counted.

    Parameters
    ----------
    z_target : float
        The multiplier planned for ``n_min`` survivors (>= 0).
    n_min : int
        The survivor count each share was scaled for (>= 1).
    n_survivors : int
        Devices whose shares are actually in the revealed sum (>= 1).

    Returns
    -------
    float
        ``z_target * sqrt(n_survivors / n_min)``: below ``z_target`` when fewer than
        ``n_min`` devices survived, which the ledger must record.
    """
    z = check_noise_multiplier(z_target)
    for value, name in ((n_min, "n_min"), (n_survivors, "n_survivors")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    if n_survivors < n_min:
        logger.warning(
            "distributed DP: %d survivors < n_min=%d, effective noise multiplier drops to %.4g",
            n_survivors,
            n_min,
            z * math.sqrt(n_survivors / n_min),
        )
    return z * math.sqrt(int(n_survivors) / int(n_min))


def plan_epsilon(rounds: int, sampling_rate: float, noise_multiplier: float, delta: float) -> dict[str, float]:
    """Epsilon after ``rounds`` identical rounds, from both accountants, without training.

    Returns
    -------
    dict
        ``{"rdp": eps, "pld": eps}`` (``inf`` when ``noise_multiplier == 0``).
    """
    t = check_rounds(rounds)
    event = round_event(sampling_rate, noise_multiplier)
    d = check_delta(delta)
    return {name: float(make_accountant(name).compose(event, t).get_epsilon(d)) for name in ACCOUNTANTS}


def calibrate_noise_multiplier(
    target_epsilon: float,
    rounds: int,
    sampling_rate: float,
    delta: float,
    *,
    accountant: str = "rdp",
    tol: float = 1e-4,
) -> float:
    """Smallest noise multiplier meeting ``target_epsilon`` after ``rounds`` rounds.

    Uses ``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` (Brent's method;
    the returned z never exceeds the target epsilon, within ``tol`` of the optimum).
    PLD calibration takes several seconds; RDP well under one.
    """
    import dp_accounting

    eps = _as_float(target_epsilon, "target_epsilon")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}.")
    t = check_rounds(rounds)
    q = check_sampling_rate(sampling_rate)
    d = check_delta(delta)
    name = _check_accountant(accountant)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant(name),
            lambda z: dp_accounting.SelfComposedDpEvent(round_event(q, z), t),
            eps,
            d,
            tol=tol,
        )
    )


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded mechanism: the parameters actually used in a round (``tree_steps``: a
    tree of that many prefix releases starting at ``round``; None: one Gaussian round)."""

    round: int
    kind: str
    sampling_rate: float
    noise_multiplier: float
    tree_steps: int | None = None

    @property
    def event(self) -> dp_accounting.DpEvent:
        """The entry's :func:`round_event` or :func:`tree_event`."""
        return _mechanism_event(self.sampling_rate, self.noise_multiplier, self.tree_steps)


@dataclass(frozen=True)
class LedgerGroup:
    """All recorded mechanisms of one kind with identical parameters, as a count.

    ``first_round`` and ``last_round`` bound the rounds recorded in the group (a tree covers
    ``tree_steps`` rounds from the one it was charged at). ``tree_steps`` None: Gaussian
    rounds; otherwise ``count`` trees of that many steps.
    """

    kind: str
    sampling_rate: float
    noise_multiplier: float
    count: int
    first_round: int
    last_round: int
    tree_steps: int | None = None

    @property
    def event(self) -> dp_accounting.DpEvent:
        """``SelfComposedDpEvent(round_event(q, z) or tree_event(z, tree_steps), count)``."""
        import dp_accounting

        return dp_accounting.SelfComposedDpEvent(
            _mechanism_event(self.sampling_rate, self.noise_multiplier, self.tree_steps), self.count
        )

    @property
    def key(self) -> tuple[str, float, float, int | None]:
        return (self.kind, self.sampling_rate, self.noise_multiplier, self.tree_steps)


_Mechanism = tuple[float, float, "int | None"]
"""``(q, z, tree_steps)``: one distinct mechanism."""


def _merge_unsampled_gaussians(counts: dict[_Mechanism, int]) -> dict[_Mechanism, int]:
    """``counts`` with every unsampled (q = 1) Gaussian round folded into one Gaussian of
    ``1 / z^2 = sum_i count_i / z_i^2``.

    Exact: the privacy loss of a Gaussian mechanism of sensitivity 1 and std ``z`` is
    ``N(mu^2 / 2, mu^2)`` with ``mu = 1 / z``, and composing Gaussian mechanisms adds their
    ``mu^2``. It keeps the PLD accountant's cost and memory independent of the number of
    rounds, where ``SelfComposedDpEvent`` convolves ever wider loss distributions.
    """
    merged = {key: count for key, count in counts.items() if key[0] != 1.0 or key[2] is not None}
    unsampled = [(z, count) for (q, z, steps), count in counts.items() if q == 1.0 and steps is None]
    if unsampled:
        if any(z == 0.0 for z, _ in unsampled):
            merged[(1.0, 0.0, None)] = 1
        else:
            merged[(1.0, math.sqrt(1.0 / sum(count / z**2 for z, count in unsampled)), None)] = 1
    return merged


class PrivacyLedger:
    """Append-only record of the DP mechanisms run, with epsilon from dp_accounting.

    Bounded: the ledger keeps one :class:`LedgerGroup` (a count) per distinct
    ``(kind, q, z, tree_steps)``, never a list of rounds, so its memory and the time of
    :meth:`epsilon` and :meth:`would_exceed` depend on the number of *distinct* mechanisms,
    not on the number of rounds. Epsilon composes ``SelfComposedDpEvent(event, count)`` of
    every distinct ``(q, z, tree_steps)`` into a fresh accountant (under ``REPLACE_SPECIAL``
    once a tree is recorded, see the module docstring), which is exactly what dp_accounting
    reports for the full history (composition is commutative in both accountants); the
    result is cached until the next record. For PLD, every unsampled (q = 1) Gaussian round
    folds into one Gaussian first (:func:`_merge_unsampled_gaussians`, exact), so its cost does
    not grow with the rounds either. RDP takes milliseconds; PLD up to about a second per
    distinct sampled ``(q, z)`` pair.

    Parameters
    ----------
    delta : float
        Target delta in (0, 1).
    accountants : sequence of {"rdp", "pld"}
        The accountants reported by :meth:`epsilons`. The first one is the *budget
        accountant* used by :meth:`would_exceed` (RDP by default: fast, and never below
        the PLD estimate in practice).
    epsilon_budget : float or None
        Training stops once the next round would push epsilon above it. None: no budget.
    """

    def __init__(
        self, delta: float, accountants: Sequence[str] = ("rdp", "pld"), epsilon_budget: float | None = None
    ) -> None:
        self.delta = check_delta(delta)
        if isinstance(accountants, str):
            accountants = (accountants,)
        self.accountants = tuple(_check_accountant(a) for a in accountants)
        if not self.accountants or len(set(self.accountants)) != len(self.accountants):
            raise ValueError(f"accountants must name each of {ACCOUNTANTS} at most once, got {accountants!r}.")
        if epsilon_budget is not None:
            budget = _as_float(epsilon_budget, "epsilon_budget")
            if not budget > 0:  # also refuses NaN
                raise ValueError(f"epsilon_budget must be > 0 (or None for no budget), got {epsilon_budget!r}.")
            epsilon_budget = budget
        self.epsilon_budget = epsilon_budget
        self._groups: dict[tuple[str, float, float, int | None], LedgerGroup] = {}
        self._last_round: dict[str, int] = {}
        self._count = 0
        self._cache: dict[str, float] = {}

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(delta={self.delta:g}, accountants={self.accountants}, "
            f"epsilon_budget={self.epsilon_budget}, entries={self._count}, groups={len(self._groups)})"
        )

    @property
    def groups(self) -> tuple[LedgerGroup, ...]:
        """Everything recorded, one group per distinct ``(kind, q, z, tree_steps)`` in order of first use."""
        return tuple(self._groups.values())

    @property
    def has_trees(self) -> bool:
        """True once a tree is recorded: the whole history is then accounted under ``REPLACE_SPECIAL``."""
        return any(g.tree_steps is not None for g in self._groups.values())

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
        """The relation every epsilon of this ledger is stated under (see the module docstring)."""
        import dp_accounting

        relation = dp_accounting.NeighboringRelation
        return relation.REPLACE_SPECIAL if self.has_trees else relation.ADD_OR_REMOVE_ONE

    def make_accountant(self, name: str | None = None) -> dp_accounting.PrivacyAccountant:
        """A fresh dp-accounting accountant (``name`` or :attr:`budget_accountant`) under
        :attr:`neighboring_relation`: composing :attr:`groups`' events into it gives :meth:`epsilon`."""
        name = self.budget_accountant if name is None else name
        return make_accountant(name, tree_aggregation=self.has_trees)

    def count(self, kind: str | None = None) -> int:
        """Mechanisms recorded (of ``kind``, or all); a tree counts once."""
        return sum(g.count for g in self._groups.values() if kind is None or g.kind == kind)

    def last_round(self, kind: str) -> int | None:
        """The latest round recorded for ``kind`` (None: none)."""
        return self._last_round.get(kind)

    @property
    def budget_accountant(self) -> str:
        """The accountant :meth:`would_exceed` checks the budget with."""
        return self.accountants[0]

    def record_round(
        self, round: int, sampling_rate: float, noise_multiplier: float, *, kind: str = "train"
    ) -> LedgerEntry:
        """Record one mechanism that was actually run.

        Parameters
        ----------
        round : int
            Round number (>= 0), strictly above every round already recorded for ``kind``
            (round numbers only grow, so a round is recorded once).
        sampling_rate : float
            q in (0, 1] actually used.
        noise_multiplier : float
            Effective z actually present (see the module docstring per DP mode).
        kind : {"train", "basis"}
            A training round or the federated basis (sketch) round.
        """
        return self._record(
            round, kind, check_sampling_rate(sampling_rate), check_noise_multiplier(noise_multiplier), None
        )

    def record_tree(self, round: int, noise_multiplier: float, steps: int, *, kind: str = "train") -> LedgerEntry:
        """Record one DP-FTRL tree of ``steps`` prefix releases, in full, when it starts.

        The tree covers rounds ``round .. round + steps - 1`` of ``kind``; each device may
        contribute to at most one of its steps (:class:`biofed.privacy_mechanism.TreeAggregation`
        enforces it). From now on the ledger is accounted under ``REPLACE_SPECIAL`` (see the
        module docstring).

        Raises
        ------
        ValueError
            Bad parameters, a round not after the latest of ``kind``, or a ledger that
            reports the PLD accountant (which cannot account trees). Nothing is recorded.
        """
        z, steps = check_noise_multiplier(noise_multiplier), check_tree_steps(steps)
        if "pld" in self.accountants:
            raise ValueError(f"this ledger reports {self.accountants}: {_PLD_TREE_ERROR}")
        return self._record(round, kind, 1.0, z, steps)

    def _record(self, round, kind: str, q: float, z: float, tree_steps: int | None) -> LedgerEntry:
        if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}.")
        if kind not in ROUND_KINDS:
            raise ValueError(f"kind must be one of {ROUND_KINDS}, got {kind!r}.")
        entry = LedgerEntry(int(round), kind, q, z, tree_steps)
        last = self._last_round.get(kind)
        if last is not None and entry.round <= last:
            raise ValueError(
                f"round {round} ({kind}) is not after round {last}, the latest {kind} round in the privacy ledger; "
                "a round is recorded once, with the parameters it actually used."
            )
        if entry.noise_multiplier == 0:
            logger.warning("round %d (%s) ran without noise: epsilon is now infinite", round, kind)
        end = entry.round + (tree_steps or 1) - 1
        key = (kind, q, z, tree_steps)
        group = self._groups.get(key)
        self._groups[key] = (
            LedgerGroup(kind, q, z, 1, entry.round, end, tree_steps)
            if group is None
            else replace(group, count=group.count + 1, last_round=end)
        )
        self._last_round[kind] = end
        self._count += 1
        self._cache.clear()
        return entry

    def extend(self, other: PrivacyLedger) -> None:
        """Add everything ``other`` recorded (a persisted ledger restored under this
        ledger's accountants and budget); its rounds must follow this ledger's."""
        if other.has_trees and "pld" in self.accountants:
            raise ValueError(f"cannot extend a ledger reporting {self.accountants} with trees: {_PLD_TREE_ERROR}")
        for group in other.groups:
            last = self._last_round.get(group.kind)
            if last is not None and group.first_round <= last:
                raise ValueError(f"cannot extend: {group.kind} round {group.first_round} is not after round {last}.")
        for group in other.groups:
            key = group.key
            mine = self._groups.get(key)
            self._groups[key] = (
                group
                if mine is None
                else replace(mine, count=mine.count + group.count, last_round=max(mine.last_round, group.last_round))
            )
            self._last_round[group.kind] = max(self._last_round.get(group.kind, -1), group.last_round)
            self._count += group.count
        self._cache.clear()

    def _counts(self, extra: _Mechanism | None = None) -> dict[_Mechanism, int]:
        counts: dict[_Mechanism, int] = {}
        for g in self._groups.values():  # dicts keep first-appearance order: deterministic
            mechanism = (g.sampling_rate, g.noise_multiplier, g.tree_steps)
            counts[mechanism] = counts.get(mechanism, 0) + g.count
        if extra is not None:
            counts[extra] = counts.get(extra, 0) + 1
        return counts

    @staticmethod
    def _compose(name: str, counts: dict[_Mechanism, int]) -> dp_accounting.PrivacyAccountant:
        accountant = make_accountant(name, tree_aggregation=any(steps is not None for _, _, steps in counts))
        if name == "pld":
            counts = _merge_unsampled_gaussians(counts)
        for (q, z, steps), count in counts.items():
            accountant.compose(_mechanism_event(q, z, steps), count)
        return accountant

    def epsilon(self, accountant: str | None = None) -> float:
        """Epsilon at ``self.delta`` spent so far (0.0 before any round, ``inf`` after a z=0 round).

        Parameters
        ----------
        accountant : {"rdp", "pld"} or None
            None uses :attr:`budget_accountant`.
        """
        name = self.budget_accountant if accountant is None else _check_accountant(accountant)
        if name not in self._cache:
            self._cache[name] = self._epsilon_of(name, self._counts())
        return self._cache[name]

    def _epsilon_of(self, name: str, counts: dict[tuple[float, float], int]) -> float:
        if not counts:
            return 0.0
        return float(self._compose(name, counts).get_epsilon(self.delta))

    def epsilons(self) -> dict[str, float]:
        """``{accountant: epsilon}`` for every configured accountant."""
        return {name: self.epsilon(name) for name in self.accountants}

    def epsilon_after(
        self,
        sampling_rate: float,
        noise_multiplier: float,
        accountant: str | None = None,
        *,
        tree_steps: int | None = None,
    ) -> float:
        """Epsilon if one more mechanism with these parameters were recorded (``tree_steps``:
        a tree of that many steps, whose ``sampling_rate`` must be 1)."""
        name = self.budget_accountant if accountant is None else _check_accountant(accountant)
        return self._epsilon_of(name, self._counts(self._mechanism(sampling_rate, noise_multiplier, tree_steps)))

    @staticmethod
    def _mechanism(sampling_rate, noise_multiplier, tree_steps) -> _Mechanism:
        q, z = check_sampling_rate(sampling_rate), check_noise_multiplier(noise_multiplier)
        if tree_steps is None:
            return (q, z, None)
        if q != 1.0:
            raise ValueError(f"a tree aggregation has no sampling: sampling_rate must be 1, got {sampling_rate!r}.")
        return (q, z, check_tree_steps(tree_steps))

    def would_exceed(self, sampling_rate: float, noise_multiplier: float, *, tree_steps: int | None = None) -> bool:
        """True when one more round (or, with ``tree_steps``, one more tree) with these
        parameters would exceed ``epsilon_budget``.

        Always False without a budget. Checked with :attr:`budget_accountant`.
        """
        if self.epsilon_budget is None:
            self._mechanism(sampling_rate, noise_multiplier, tree_steps)
            return False
        eps = self.epsilon_after(sampling_rate, noise_multiplier, tree_steps=tree_steps)
        exceeded = eps > self.epsilon_budget
        if exceeded:
            logger.info(
                "privacy budget: next round would reach epsilon=%.4g > budget %.4g (%s)",
                eps,
                self.epsilon_budget,
                self.budget_accountant,
            )
        return exceeded

    @property
    def dp_event(self) -> dp_accounting.DpEvent:
        """Everything recorded as one composed DpEvent (the accountant's ``ledger``)."""
        return self._compose(self.budget_accountant, self._counts()).ledger

    def to_dict(self) -> dict:
        """Plain-data form (format 3): settings and the groups with their ``tree_steps``
        (JSON-serialisable)."""
        return {
            "format": _LEDGER_FORMAT,
            "delta": self.delta,
            "accountants": list(self.accountants),
            "epsilon_budget": self.epsilon_budget,
            "groups": [asdict(g) for g in self._groups.values()],
        }

    def to_json(self) -> str:
        """Serialise the ledger (groups with their parameters and counts) to a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_dict` output (format 3), the groups of format 2
        (which had no trees) or the per-round list of format 1, re-validating every group."""
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt not in _READABLE_FORMATS:
            raise ValueError(
                f"not a biofed privacy ledger of format {', '.join(map(str, _READABLE_FORMATS))}: "
                f"got {type(data).__name__} with format {fmt!r}."
            )
        try:
            ledger = cls(data["delta"], tuple(data["accountants"]), data["epsilon_budget"])
            if fmt == 1:
                for e in data["entries"]:
                    ledger.record_round(e["round"], e["sampling_rate"], e["noise_multiplier"], kind=e["kind"])
                return ledger
            for g in data["groups"]:
                steps = g["tree_steps"] if fmt >= 3 else None
                group = LedgerGroup(
                    str(g["kind"]),
                    check_sampling_rate(g["sampling_rate"]),
                    check_noise_multiplier(g["noise_multiplier"]),
                    int(g["count"]),
                    int(g["first_round"]),
                    int(g["last_round"]),
                    None if steps is None else check_tree_steps(steps),
                )
                if (
                    group.kind not in ROUND_KINDS
                    or group.count < 1
                    or not 0 <= group.first_round <= group.last_round
                    or (group.tree_steps is not None and group.sampling_rate != 1.0)
                ):
                    raise ValueError(f"malformed privacy ledger group {g!r}.")
                if group.tree_steps is not None and "pld" in ledger.accountants:
                    raise ValueError(f"privacy ledger reports {ledger.accountants} and holds a tree: {_PLD_TREE_ERROR}")
                key = group.key
                if key in ledger._groups:
                    raise ValueError(f"malformed privacy ledger: group {key} appears twice.")
                ledger._groups[key] = group
                ledger._last_round[group.kind] = max(ledger._last_round.get(group.kind, -1), group.last_round)
                ledger._count += group.count
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed privacy ledger: missing or invalid field {err}.") from err
        return ledger

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"privacy ledger is not valid JSON: {err}.") from err
        return cls.from_dict(data)
