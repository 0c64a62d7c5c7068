"""Server-side aggregation strategies (Flower style: small objects, few hooks).

Every strategy turns one round of device updates into new global parameters::

    new_params, metrics = strategy.aggregate(round, global_params, updates)

with ``global_params`` a flat ``(P,)`` float64 vector (layout of
:mod:`biofed.kernels.training`) and ``updates`` a list of :class:`ClientUpdate`
(``delta = local params - global params``). ``aggregate`` is split in two hooks that
subclasses override:

- ``combine(deltas (n, P), n_examples (n,)) -> (P,)``: the aggregation rule (weighted or
  uniform mean, trimmed mean, coordinate-wise median);
- ``server_update(round, params (P,), aggregate (P,)) -> (P,)``: the server optimizer
  (plain step, momentum, Adam, Yogi).

``client_config()`` returns the fields sent to devices with the task (e.g. FedProx's
``prox_mu``). Strategies are stateless except for server optimizer state, which
``state_dict()`` / ``load_state_dict()`` exchange as plain ``{name: ndarray}`` so the
coordinator can persist it per round.

Bad updates (wrong shape, NaN/inf, duplicate device) raise :class:`AggregationError`
before anything is computed; the coordinator drops the offending device or skips the
round. Under DP that is the fail-closed behaviour: nothing noisy is released.

Differential privacy is added by composition around a strategy, not inside one:
:class:`biofed.coordinator.central_dp.DPAggregator` wraps a mean-based strategy, has every
update clipped, summed and noised by the privacy mechanism, then lets the inner strategy's
server optimizer post-process the noised uniform mean.

References
----------
.. [1] H. B. McMahan et al., "Communication-efficient learning of deep networks from
   decentralized data", AISTATS 2017 (FedAvg).
.. [2] T.-M. H. Hsu, H. Qi, M. Brown, "Measuring the effects of non-identical data
   distribution for federated visual classification", arXiv:1909.06335 (FedAvgM).
.. [3] S. Reddi et al., "Adaptive federated optimization", ICLR 2021 (FedAdam, FedYogi;
   Algorithm 2).
.. [4] T. Li et al., "Federated optimization in heterogeneous networks", MLSys 2020 (FedProx).
.. [5] D. Yin et al., "Byzantine-robust distributed learning: towards optimal statistical
   rates", ICML 2018 (coordinate-wise trimmed mean and median).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "STRATEGIES",
    "AggregationError",
    "ClientUpdate",
    "CoordinateMedian",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Strategy",
    "TrimmedMean",
    "make_strategy",
]


class AggregationError(ValueError):
    """A round's updates cannot be aggregated (the message names the device and the fix)."""


@dataclass(frozen=True)
class ClientUpdate:
    """One device's contribution to a round.

    Attributes
    ----------
    delta : ndarray, shape (P,)
        Local parameters after training minus the global parameters sent.
    n_examples : int
        Training examples used (only FedAvg's ``weighting="examples"`` reads it).
    device_id : str
    """

    delta: np.ndarray
    n_examples: int
    device_id: str


def _check_number(
    value, name: str, *, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got bool {value!r}.")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.") from None
    too_low = out <= low if low_open else out < low
    too_high = out >= high if high_open else out > high
    if math.isnan(out) or too_low or too_high or math.isinf(out):
        lo = "(" if low_open else "["
        hi = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{name} must be a finite number in {lo}{low:g}, {high:g}{hi}, got {value!r}.")
    return out


def validate_updates(global_params, updates: Sequence[ClientUpdate]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check a round's inputs and stack them.

    Returns
    -------
    params : ndarray, shape (P,) float64
    deltas : ndarray, shape (n, P) float64
    n_examples : ndarray, shape (n,) float64

    Raises
    ------
    AggregationError
        Empty round, non-finite or non-1-D global parameters, an update that is not a
        ClientUpdate, has the wrong shape, non-finite values, a negative example count,
        or a device reporting twice.
    """
    params = np.asarray(global_params)
    if params.ndim != 1 or params.size == 0 or params.dtype.kind not in "fiu":
        raise AggregationError(
            f"global_params must be a non-empty 1-D real vector (P,), got dtype {params.dtype} shape {params.shape}."
        )
    params = params.astype(np.float64)
    if not np.isfinite(params).all():
        raise AggregationError("global_params contain NaN or inf; restore the last good model before aggregating.")
    if len(updates) == 0:
        raise AggregationError("no updates to aggregate; keep the previous model for this round.")
    deltas = np.empty((len(updates), params.size))
    counts = np.empty(len(updates))
    seen: set[str] = set()
    for i, u in enumerate(updates):
        if not isinstance(u, ClientUpdate):
            raise AggregationError(f"updates[{i}] must be a ClientUpdate, got {type(u).__name__}.")
        if u.device_id in seen:
            raise AggregationError(
                f"device {u.device_id!r} reported twice in one round; keep one update per device "
                "(a device counted twice breaks both weighting and DP sensitivity)."
            )
        seen.add(u.device_id)
        d = np.asarray(u.delta)
        if d.shape != params.shape or d.dtype.kind not in "fiu":
            raise AggregationError(
                f"update from device {u.device_id!r} has dtype {d.dtype} shape {d.shape}, expected a real vector "
                f"of shape {params.shape} like the global parameters; drop it (stale model or wrong architecture)."
            )
        if not np.isfinite(d).all():
            raise AggregationError(f"update from device {u.device_id!r} contains NaN or inf; drop it.")
        n = u.n_examples
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise AggregationError(
                f"update from device {u.device_id!r} has n_examples={n!r}; expected an integer >= 0."
            )
        deltas[i] = d
        counts[i] = n
    return params, deltas, counts


class Strategy:
    """Base strategy: ``aggregate = server_update(combine(...))``.

    Subclasses implement :meth:`combine`; the default :meth:`server_update` adds the
    aggregate to the global parameters and keeps no state.
    """

    name = "strategy"

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def _params(self) -> dict:
        return {k: getattr(self, k) for k in inspect.signature(type(self)).parameters}

    def client_config(self) -> dict:
        """Fields sent to the devices with the training task (none by default)."""
        return {}

    def combine(self, deltas: np.ndarray, n_examples: np.ndarray) -> np.ndarray:
        """Aggregate ``deltas`` (n, P) into one (P,) update."""
        raise NotImplementedError(f"{type(self).__name__} must implement combine()")

    def server_update(self, round: int, params: np.ndarray, aggregate: np.ndarray) -> np.ndarray:
        """Apply the aggregated update: ``params + aggregate``."""
        return params + aggregate

    def aggregate(
        self, round: int, global_params: np.ndarray, updates: Sequence[ClientUpdate]
    ) -> tuple[np.ndarray, dict]:
        """New global parameters (P,) and round metrics from the devices' updates.

        Raises
        ------
        AggregationError
            On any invalid update (see :func:`validate_updates`); nothing is changed then.
        """
        params, deltas, counts = validate_updates(global_params, updates)
        aggregate = self.combine(deltas, counts)
        new_params = self.server_update(round, params, aggregate)
        return new_params, {"n_updates": len(updates), "aggregate_norm": float(np.linalg.norm(aggregate))}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Server optimizer state as ``{name: ndarray}`` copies (empty: stateless)."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output (an empty mapping resets the state)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no server state, got keys {sorted(state)}.")


class FedAvg(Strategy):
    """Federated averaging [1]_: weighted mean of the updates.

    Parameters
    ----------
    weighting : {"examples", "uniform"}
        ``"examples"`` weights each update by its ``n_examples``; ``"uniform"`` gives each
        device the same weight. Under DP use ``"uniform"``: example counts are private
        and unbounded weights break the sensitivity bound.
    """

    name = "fedavg"

    def __init__(self, weighting: str = "examples") -> None:
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}.")
        self.weighting = weighting

    def combine(self, deltas: np.ndarray, n_examples: np.ndarray) -> np.ndarray:
        if self.weighting == "uniform":
            return deltas.mean(axis=0)
        total = n_examples.sum()
        if total <= 0:
            raise AggregationError(
                "every update reports n_examples=0, so example weighting is undefined; "
                "use weighting='uniform' or drop empty updates."
            )
        return (n_examples / total) @ deltas


class _StatefulFedAvg(FedAvg):
    """FedAvg mean followed by a stateful server optimizer; state arrays live in ``_state``."""

    _state_keys: tuple[str, ...] = ()

    def __init__(self, weighting: str = "examples") -> None:
        super().__init__(weighting)
        self._state: dict[str, np.ndarray] = {}

    def _init_state(self, size: int) -> dict[str, np.ndarray]:
        return {k: np.zeros(size) for k in self._state_keys}

    def _current_state(self, size: int) -> dict[str, np.ndarray]:
        if not self._state:
            self._state = self._init_state(size)
        first = self._state[self._state_keys[0]]
        if first.shape != (size,):
            raise AggregationError(
                f"{type(self).__name__} server state has {first.size} parameters but the model has {size}; "
                "reset it with load_state_dict({}) after changing the model."
            )
        return self._state

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if not state:
            self._state = {}
            return
        if set(state) != set(self._state_keys):
            raise ValueError(
                f"{type(self).__name__} state must have keys {sorted(self._state_keys)}, got {sorted(state)}."
            )
        arrays = {k: np.array(state[k], dtype=np.float64) for k in self._state_keys}
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1 or arrays[self._state_keys[0]].ndim != 1:
            raise ValueError(f"{type(self).__name__} state arrays must be 1-D of one shape, got shapes {shapes}.")
        if not all(np.isfinite(a).all() for a in arrays.values()):
            raise ValueError(f"{type(self).__name__} state contains NaN or inf.")
        self._state = arrays


class FedAvgM(_StatefulFedAvg):
    """FedAvg with server momentum [2]_: ``v <- beta v + mean; params <- params + lr v``.

    Parameters
    ----------
    server_learning_rate : float
        Server step size > 0.
    momentum : float
        beta in [0, 1).
    weighting : {"examples", "uniform"}
    """

    name = "fedavgm"
    _state_keys = ("momentum",)

    def __init__(self, server_learning_rate: float = 1.0, momentum: float = 0.9, weighting: str = "examples") -> None:
        super().__init__(weighting)
        self.server_learning_rate = _check_number(server_learning_rate, "server_learning_rate", low=0, low_open=True)
        self.momentum = _check_number(momentum, "momentum", low=0, high=1, high_open=True)

    def server_update(self, round: int, params: np.ndarray, aggregate: np.ndarray) -> np.ndarray:
        state = self._current_state(params.size)
        velocity = self.momentum * state["momentum"] + aggregate
        state["momentum"] = velocity
        return params + self.server_learning_rate * velocity


class FedAdam(_StatefulFedAvg):
    """Adaptive server optimizer FedAdam (Reddi et al. 2021 [3]_, Algorithm 2).

    With the mean update ``d``::

        m <- beta1 m + (1 - beta1) d
        v <- beta2 v + (1 - beta2) d^2
        params <- params + eta m / (sqrt(v) + tau)

    starting from ``m = 0`` and ``v = tau^2`` (the paper's ``v_{-1} >= tau^2``), without
    bias correction, as in the paper.

    Parameters
    ----------
    eta : float
        Server learning rate > 0.
    beta1, beta2 : float
        Moment decay rates in [0, 1).
    tau : float
        Adaptivity degree > 0 (the paper finds 1e-3 a good default).
    weighting : {"examples", "uniform"}
    """

    name = "fedadam"
    _state_keys = ("m", "v")

    def __init__(
        self, eta: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, weighting: str = "examples"
    ) -> None:
        super().__init__(weighting)
        self.eta = _check_number(eta, "eta", low=0, low_open=True)
        self.beta1 = _check_number(beta1, "beta1", low=0, high=1, high_open=True)
        self.beta2 = _check_number(beta2, "beta2", low=0, high=1, high_open=True)
        self.tau = _check_number(tau, "tau", low=0, low_open=True)

    def _init_state(self, size: int) -> dict[str, np.ndarray]:
        return {"m": np.zeros(size), "v": np.full(size, self.tau**2)}

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * d2

    def server_update(self, round: int, params: np.ndarray, aggregate: np.ndarray) -> np.ndarray:
        state = self._current_state(params.size)
        state["m"] = self.beta1 * state["m"] + (1.0 - self.beta1) * aggregate
        state["v"] = self._second_moment(state["v"], aggregate**2)
        return params + self.eta * state["m"] / (np.sqrt(state["v"]) + self.tau)


class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021 [3]_): FedAdam with the additive second-moment update

        v <- v - (1 - beta2) d^2 sign(v - d^2)

    which grows ``v`` only as fast as the squared update requires.
    """

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)


class FedProx(FedAvg):
    """FedProx [4]_: FedAvg on the server; devices add ``(mu/2) ||w - w_global||^2`` locally.

    Parameters
    ----------
    proximal_mu : float
        mu >= 0, sent to devices as ``client_config()["prox_mu"]``.
    weighting : {"examples", "uniform"}
    """

    name = "fedprox"

    def __init__(self, proximal_mu: float = 0.01, weighting: str = "examples") -> None:
        super().__init__(weighting)
        self.proximal_mu = _check_number(proximal_mu, "proximal_mu", low=0)

    def client_config(self) -> dict:
        return {"prox_mu": self.proximal_mu}


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean [5]_: per coordinate, drop the ``floor(beta n)`` largest
    and smallest values and average the rest (unweighted).

    Parameters
    ----------
    beta : float
        Fraction trimmed on each side, in [0, 0.5). With ``n`` updates, up to
        ``floor(beta n)`` arbitrary (Byzantine) updates per side cannot move a coordinate
        outside the range of the honest ones.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = _check_number(beta, "beta", low=0, high=0.5, high_open=True)

    def combine(self, deltas: np.ndarray, n_examples: np.ndarray) -> np.ndarray:
        n = deltas.shape[0]
        k = int(math.floor(self.beta * n))
        return np.sort(deltas, axis=0)[k : n - k].mean(axis=0)


class CoordinateMedian(Strategy):
    """Coordinate-wise median of the updates [5]_ (unweighted)."""

    name = "coordinate_median"

    def combine(self, deltas: np.ndarray, n_examples: np.ndarray) -> np.ndarray:
        return np.median(deltas, axis=0)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedProx, TrimmedMean, CoordinateMedian)
}


def make_strategy(name: str, **params) -> Strategy:
    """Build a strategy by name (case-insensitive) with its keyword parameters.

    Names: ``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedprox``,
    ``trimmed_mean``, ``coordinate_median`` (:data:`biofed.config.STRATEGY_NAMES`).

    Raises
    ------
    ValueError
        Unknown name, a parameter the strategy does not take, or an invalid value.
    """
    key = str(name).lower().replace("-", "_")
    cls = STRATEGIES.get(key)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}.")
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"strategy {key!r} does not take parameter(s) {', '.join(unknown)}; "
            f"it accepts {', '.join(accepted) if accepted else 'no parameters'}."
        )
    return cls(**params)
