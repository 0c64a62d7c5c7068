"""Central differential privacy composed once around a mean-based strategy.

The counterpart of Flower's ``DifferentialPrivacyServerSideFixedClipping`` and
``...AdaptiveClipping`` wrappers: the coordinator builds one :class:`DPAggregator` per run
(central trust mode, FedAvg family) and every training round goes through it. A round's
aggregation is split at its one private release, so that both halves are pure functions:

1. :meth:`DPAggregator.release` validates the updates and states the :class:`Release`: the
   ledger charge of the round and the clipped sums to noise (the update sum, plus the
   clipped count of adaptive clipping);
2. the coordinator's :class:`~biofed.privacy_mechanism.PrivacyMechanism` clips, noises and
   durably charges it (:meth:`Release.run`), the only step that draws noise or writes;
3. :meth:`DPAggregator.finish` turns the noised sums into the new parameters (the inner
   strategy's server optimizer applied to the noised uniform mean) and the next clip norm.

Noise and accounting: the mechanism re-clips every update to ``C`` (defensive: devices
clip already), sums them and adds ``N(0, (z C)^2)`` per coordinate (the Gaussian mechanism
with sensitivity ``C``); ``n``, the number of updates aggregated, is public (the cohort is
published), so the round is charged ``Charge(round, "train", q, z)``. With adaptive
clipping the devices' norm bits are released in the same charge, the update noise uses
``z_delta`` (:func:`~biofed.coordinator.clipping.delta_noise_multiplier`) so that update and
count together are one mechanism of multiplier ``z``, and the clip norm moves after the round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from biofed.coordinator.clipping import AdaptiveClipping
from biofed.coordinator.strategies import AggregationError, ClientUpdate, FedAvg, Strategy, validate_updates
from biofed.kernels._validation import check_nonnegative_float, check_positive_float
from biofed.privacy_mechanism import Charge, ClippedSum, PrivacyMechanism

__all__ = ["DPAggregator", "Release"]


@dataclass(frozen=True)
class Release:
    """One charge of the privacy mechanism and the clipped sums it covers.

    Without queries the release is a charge only: a round whose output the adversary of
    the trust mode sees without central noise (a robust strategy in central mode, charged
    with ``z = 0``).
    """

    charge: Charge
    queries: tuple[ClippedSum, ...] = ()

    def run(self, mechanism: PrivacyMechanism) -> tuple[np.ndarray, ...]:
        """Charge durably through ``mechanism`` and return the noised sum of every query."""
        if not self.queries:
            mechanism.charge(self.charge)
            return ()
        return mechanism.release(self.charge, *self.queries)


class DPAggregator:
    """Central DP composed around a mean-based strategy (see the module docstring).

    Parameters
    ----------
    strategy : FedAvg, FedAvgM, FedAdam, FedYogi or FedProx
        A mean-based strategy with ``weighting="uniform"``. Robust rules (trimmed mean,
        median) are refused: their sensitivity is not ``C / n``.
    noise_multiplier : float
        z >= 0 of every round (0: clipping without privacy, epsilon = inf).
    adaptive_clipping : AdaptiveClipping or None
        The clip-norm rule; None keeps the clip norm fixed.

    Raises
    ------
    ValueError
        A robust or example-weighted strategy, a negative ``noise_multiplier``, or a
        ``count_noise_std`` too small for ``noise_multiplier``.
    """

    def __init__(
        self, strategy: Strategy, noise_multiplier: float, *, adaptive_clipping: AdaptiveClipping | None = None
    ) -> None:
        if not isinstance(strategy, FedAvg):
            raise ValueError(
                f"DPAggregator needs a mean-based strategy (FedAvg, FedAvgM, FedAdam, FedYogi, FedProx), "
                f"got {type(strategy).__name__}: its sensitivity to one device is not clip_norm / n."
            )
        if strategy.weighting != "uniform":
            raise ValueError(
                "DPAggregator needs the inner strategy built with weighting='uniform': example counts are "
                "private and example weighting breaks the clip_norm / n sensitivity bound."
            )
        self.strategy = strategy
        self.noise_multiplier = check_nonnegative_float(noise_multiplier, "noise_multiplier")
        self.adaptive_clipping = adaptive_clipping
        # Fails here, not mid-training, when count_noise_std is too small for z.
        self.update_noise_multiplier = (
            adaptive_clipping.delta_noise_multiplier(self.noise_multiplier)
            if adaptive_clipping is not None and self.noise_multiplier > 0
            else self.noise_multiplier
        )

    def release(
        self,
        round: int,
        global_params: np.ndarray,
        updates: Sequence[ClientUpdate],
        clip_norm: float,
        *,
        norm_bits=None,
        sampling_rate: float = 1.0,
    ) -> tuple[np.ndarray, Release]:
        """Validate the updates and state what the mechanism must release; nothing is drawn.

        Parameters
        ----------
        round : int
            The round (its ledger entry).
        global_params : ndarray, shape (P,)
        updates : sequence of ClientUpdate
        clip_norm : float
            The clip norm C > 0 of the round.
        norm_bits : array-like of {0, 1}, shape (n,), or None
            With adaptive clipping (required then): the devices' bits (``norm <= C``
            before their own clipping), in the order of ``updates``.
        sampling_rate : float
            q recorded in the charge.

        Returns
        -------
        params : ndarray, shape (P,)
            ``global_params`` validated, as float64.
        release : Release
            ``Charge(round, "train", sampling_rate, z)`` over the update sum (noise
            ``z_delta C``) and, with adaptive clipping, the centred clipped count.

        Raises
        ------
        AggregationError
            An invalid update or missing/misshaped norm bits: nothing may be released.
        """
        params, deltas, _ = validate_updates(global_params, updates)
        c = check_positive_float(clip_norm, "clip_norm")
        queries = [ClippedSum(deltas, c, self.update_noise_multiplier * c)]
        if self.adaptive_clipping is not None:
            bits = np.asarray(norm_bits) if norm_bits is not None else None
            if bits is None or bits.shape != (deltas.shape[0],):
                raise AggregationError(
                    f"adaptive clipping needs one norm bit per update ({deltas.shape[0]}), got "
                    f"{'none' if bits is None else f'shape {bits.shape}'}."
                )
            queries.append(self.adaptive_clipping.count_query(bits))
        return params, Release(Charge(round, "train", sampling_rate, self.noise_multiplier), tuple(queries))

    def finish(
        self, round: int, params: np.ndarray, released: Sequence[np.ndarray], n_updates: int, clip_norm: float
    ) -> tuple[np.ndarray, float]:
        """Post-process what the mechanism released for :meth:`release`.

        Parameters
        ----------
        round : int
        params : ndarray, shape (P,)
            The validated global parameters :meth:`release` returned.
        released : sequence of ndarray
            The mechanism's output for the release's queries, in order.
        n_updates : int
            Updates in the sum (the denominator of the uniform mean).
        clip_norm : float
            The clip norm the round used.

        Returns
        -------
        new_params : ndarray, shape (P,)
            The inner strategy's server update with the noised uniform mean.
        next_clip_norm : float
            The clip norm of the next round (``clip_norm`` unless clipping is adaptive).
        """
        new_params = self.strategy.server_update(round, params, released[0] / n_updates)
        if self.adaptive_clipping is None:
            return new_params, clip_norm
        return new_params, self.adaptive_clipping.next_clip(clip_norm, float(released[1][0]), n_updates)
