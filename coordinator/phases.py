"""The coordinator's round phases as pure functions of (state, replies).

Each phase closes one round: from the coordinator's :class:`~biofed.coordinator.state.Snapshot`
and the replies :class:`~biofed.coordinator.ingest.Ingest` accepted it computes the new
state, the DP event the round is charged (a :class:`~biofed.privacy_mechanism.Charge`) and
the payload to publish (:class:`~biofed.protocol.Basis` after the covariance phase,
:class:`~biofed.protocol.Model` after the one-shot statistics phase and after a training
round). Nothing here touches a broker, a
clock, a file or the ledger. The one step that is not a function, the release (clip, draw
privacy noise, charge durably), is returned as data, a
:class:`~biofed.coordinator.central_dp.Release`, for the loop to run through its privacy
mechanism; a phase is therefore split at its release::

    pending = train_phase(settings, state, round_, updates, strategy=strategy, central_dp=dp)
    released = () if pending.release is None else pending.release.run(mechanism)
    outcome = pending.close(released)  # PhaseOutcome(state, event, payload)

What each trust mode charges, and when (see :mod:`biofed.coordinator.server`):

- central: the phase's own release (basis statistics with ``z_b``, the one-shot class
  statistics with ``z_s``, training updates with ``z``; a robust strategy is charged
  ``z = 0``, a non-private release);
- local: :func:`charge_before_task`, before the task goes out, for every round;
- distributed: basis and statistics phases as in local mode (each device noises its own
  sketch); training rounds :func:`unmask_charge`, before the unmask request goes out.

:func:`planned_releases` lists, before a run, every release it will make, and
:func:`planned_epsilons` their epsilon, known (and checked against the budget) before
anything is released.

The phases also build the task of a round (:func:`make_task`), select its participants
(:func:`select_participants`) and summarize it (:func:`round_record`); :func:`compose_rounds`
checks a configuration and composes, once per run, what every round is built with.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from biofed.config import CoordinatorConfig
from biofed.coordinator.basis import aggregate_statistics, basis_from_covariance, standardization_from_moments
from biofed.coordinator.central_dp import DPAggregator, Release
from biofed.coordinator.clipping import AdaptiveClipping
from biofed.coordinator.lda import lda_from_statistics
from biofed.coordinator.state import RoundRecord, Snapshot
from biofed.coordinator.strategies import STRATEGIES, ClientUpdate, FedAvg, Strategy, make_strategy
from biofed.kernels.training import init_params
from biofed.privacy_ledger import ACCOUNTANTS, distributed_noise_multiplier, make_accountant, round_event
from biofed.privacy_mechanism import Charge, ClippedSum, grid_sensitivity
from biofed.protocol import BASIS_PHASES, SKETCH_PHASES, Basis, Model, Sketch, Task, Update
from biofed.protocol.statistics import STATISTICS_CLIP_NORM, statistics_size, unpack_statistics

logger = logging.getLogger(__name__)

__all__ = [
    "Composition",
    "PendingPhase",
    "PhaseOutcome",
    "PhaseSettings",
    "basis_phase",
    "charge_before_task",
    "compose_rounds",
    "evaluate_phase",
    "make_task",
    "planned_epsilons",
    "planned_releases",
    "round_record",
    "select_participants",
    "standardization",
    "statistics_phase",
    "train_phase",
    "unmask_charge",
]

_PUBLIC_COHORT_Q = 1.0
"""The sampling rate of every charge: the cohort is public (``Task.participants``), so no
amplification by sampling is claimed."""


@dataclass(frozen=True)
class PhaseSettings:
    """The fixed parameters of every round of one run.

    ``client_config`` holds the training fields of the task (``local_epochs``, ``lr``,
    ``batch_size``, ``optimizer``, ``l2``, ``prox_mu`` and the strategy's own).
    """

    trust_mode: str
    noise_multiplier: float
    """z of the training rounds."""
    basis_noise_multiplier: float
    """z_b of the basis phases."""
    basis_clip_norm: float
    """C_b of the basis statistics."""
    secagg_threshold: int
    """n_min of a distributed-mode round (``dp.secagg_threshold`` or ``min_devices``)."""
    basis_k: int
    classes: tuple[str, ...]
    hidden: int
    sampling_rate: float | str
    """Per-device selection probability of a training round, or ``"all"``."""
    adaptive_clipping: bool = False
    client_config: Mapping[str, object] = field(default_factory=dict)
    algorithm: str = "fedavg"
    """``"fedavg"`` (basis, then training rounds) or ``"one_shot"`` (basis, the statistics
    phase, then the optional fine-tuning rounds)."""
    statistics_noise_multiplier: float = 0.0
    """z_s of the one-shot statistics release."""
    means_clip: float = 1.0
    """C_m of the devices' class means."""
    scatter_clip: float | None = None
    """C_s of the devices' within-class scatter (None: no scatter)."""
    ridge: float = 1.0
    """lambda of the ridge LDA."""

    @classmethod
    def from_config(
        cls,
        config: CoordinatorConfig,
        *,
        basis_clip_norm: float,
        basis_noise_multiplier: float,
        secagg_threshold: int,
        strategy_config: Mapping[str, object],
    ) -> PhaseSettings:
        """The settings of ``config`` with the coordinator's resolved basis DP parameters,
        secure-aggregation threshold and the strategy's :meth:`~Strategy.client_config`."""
        training = config.training
        one_shot = training.one_shot
        client = {
            "local_epochs": training.local_epochs,
            "lr": training.lr,
            "batch_size": training.batch_size,
            "optimizer": training.optimizer,
            "l2": training.l2,
            "prox_mu": training.prox_mu,
            **strategy_config,
        }
        return cls(
            trust_mode=config.dp.trust_mode,
            noise_multiplier=config.dp.noise_multiplier,
            basis_noise_multiplier=basis_noise_multiplier,
            basis_clip_norm=basis_clip_norm,
            secagg_threshold=secagg_threshold,
            basis_k=config.model.basis_k,
            classes=tuple(config.model.classes),
            hidden=config.model.hidden,
            sampling_rate=config.sampling_rate,
            adaptive_clipping=config.dp.adaptive_clipping is not None,
            client_config=client,
            algorithm=training.algorithm,
            statistics_noise_multiplier=float(
                config.dp.noise_multiplier
                if config.dp.statistics_noise_multiplier is None
                else config.dp.statistics_noise_multiplier
            ),
            means_clip=one_shot.means_clip,
            scatter_clip=one_shot.scatter_clip,
            ridge=one_shot.ridge,
        )

    def noise_multiplier_of(self, phase: str) -> float | None:
        """z charged for a round of ``phase`` (None: evaluation, which releases nothing)."""
        if phase == "evaluate":
            return None
        if phase == "statistics":
            return self.statistics_noise_multiplier
        return self.basis_noise_multiplier if phase in BASIS_PHASES else self.noise_multiplier

    @property
    def phase_after_basis(self) -> str:
        """Where a run goes once the basis is made."""
        return "statistics" if self.algorithm == "one_shot" else "train"

    def statistics_size(self, k: int) -> int:
        """Length of a device's packed statistics on a basis of ``k`` components."""
        return statistics_size(len(self.classes), k, self.scatter_clip is not None)


@dataclass(frozen=True)
class PhaseOutcome:
    """A closed round: the new state, the DP event it was charged in its close (None:
    charged before, by :func:`charge_before_task` or :func:`unmask_charge`, or nothing
    released) and the payload to publish (None: nothing)."""

    state: Snapshot
    event: Charge | None
    payload: Basis | Model | None


@dataclass(frozen=True)
class PendingPhase:
    """A phase split at its release: run ``release`` through the privacy mechanism (when
    not None), then call ``close`` with what it returned (``()`` without a release)."""

    release: Release | None
    close: Callable[[tuple[np.ndarray, ...]], PhaseOutcome]


@dataclass(frozen=True)
class Composition:
    """What a run's rounds are built with, composed once from its configuration."""

    settings: PhaseSettings
    strategy: Strategy
    central_dp: DPAggregator | None
    """The central-DP composition around ``strategy`` (central mode, FedAvg family), else None."""


def compose_rounds(config: CoordinatorConfig, *, basis_clip_norm: float | None = None) -> Composition:
    """Check that the strategy, the trust mode and the DP settings of ``config`` go together,
    and compose the strategy, its central DP and the :class:`PhaseSettings`.

    Parameters
    ----------
    config : CoordinatorConfig
    basis_clip_norm : float or None
        C_b overriding ``config.dp.basis_clip_norm`` (None: that, else ``config.dp.clip_norm``).

    Raises
    ------
    ValueError
        A combination that would break the privacy guarantee or cannot run, with what to change.
    """
    dp = config.dp
    if dp.adaptive_clipping is not None and dp.trust_mode != "central":
        raise ValueError(
            'dp.adaptive_clipping needs trust_mode = "central": in local mode the devices\' clipped-count '
            "bits would reach the coordinator without noise; remove [dp.adaptive_clipping]"
        )
    if basis_clip_norm is None:
        basis_clip_norm = dp.basis_clip_norm if dp.basis_clip_norm is not None else dp.clip_norm
    if not float(basis_clip_norm) > 0:
        raise ValueError(f"basis_clip_norm must be > 0, got {basis_clip_norm}")
    strategy = _make_strategy(config)
    if dp.trust_mode == "distributed" and not isinstance(strategy, FedAvg):
        raise ValueError(
            f"strategy {config.strategy.name!r} needs the individual updates, but distributed trust mode reveals "
            "only their sum (secure aggregation); use fedavg, fedavgm, fedadam, fedyogi or fedprox"
        )
    if dp.secagg_threshold is not None and dp.secagg_threshold < config.min_devices:
        raise ValueError(
            f"dp.secagg_threshold = {dp.secagg_threshold} is below min_devices = {config.min_devices}: a sum "
            "unmasked with fewer survivors would reach the coordinator and then be discarded; raise it to at "
            "least min_devices or leave it unset"
        )
    adaptive = None
    if dp.adaptive_clipping is not None:
        adaptive = AdaptiveClipping(
            dp.adaptive_clipping.target_quantile, dp.adaptive_clipping.learning_rate, dp.adaptive_clipping.bit_noise_std
        )
        if dp.noise_multiplier > 0:
            try:
                adaptive.delta_noise_multiplier(dp.noise_multiplier)
            except ValueError as exc:
                raise ValueError(f"[dp.adaptive_clipping] {exc}") from None
    central_dp = None
    if dp.trust_mode == "central" and isinstance(strategy, FedAvg):
        try:
            central_dp = DPAggregator(strategy, dp.noise_multiplier, adaptive_clipping=adaptive)
        except ValueError as exc:
            raise ValueError(f"[strategy] {config.strategy.name}: {exc}") from None
    settings = PhaseSettings.from_config(
        config,
        basis_clip_norm=float(basis_clip_norm),
        basis_noise_multiplier=float(
            dp.basis_noise_multiplier if dp.basis_noise_multiplier is not None else dp.noise_multiplier
        ),
        secagg_threshold=dp.secagg_threshold or config.min_devices,
        strategy_config=strategy.client_config(),
    )
    return Composition(settings, strategy, central_dp)


def _make_strategy(config: CoordinatorConfig) -> Strategy:
    cfg = config.strategy
    name = cfg.name
    params = dict(cfg.params)
    if issubclass(STRATEGIES[name], FedAvg):
        params.setdefault("weighting", "uniform")
    try:
        strategy = make_strategy(name, **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[strategy] {cfg.name}: {exc}") from None
    robust = not isinstance(strategy, FedAvg)
    if config.dp.noise_multiplier > 0:
        if robust and config.dp.trust_mode == "central":
            raise ValueError(
                f"strategy {cfg.name!r} cannot be combined with central DP noise: its sensitivity to one "
                "device is not clip_norm / n; use fedavg, fedavgm, fedadam, fedyogi or fedprox"
            )
        if not robust and strategy.weighting != "uniform":
            raise ValueError(
                'with DP noise the strategy must use weighting = "uniform": example counts are private '
                "and example weighting breaks the sensitivity bound"
            )
    return strategy


def standardization(state: Snapshot) -> str:
    """``"global"`` when a moments phase fixed the fleet's standardization, else ``"device"``.

    Read from the state (not the config), so a resumed run describes the basis it made.
    """
    return "device" if state.stats_mean is None else "global"


# ----------------------------------------------------------------------------- before the replies
def select_participants(
    online: Sequence[str], phase: str, sampling_rate: float | str, rng: np.random.Generator
) -> list[str]:
    """The devices asked to reply: every online device, or for a training round with a
    numeric ``sampling_rate`` q each one independently with probability q (``rng`` draws)."""
    online = sorted(online)
    if phase != "train" or sampling_rate == "all":
        return online
    q = float(sampling_rate)
    return [device for device, draw in zip(online, rng.random(len(online)), strict=True) if draw < q]


def make_task(
    settings: PhaseSettings, state: Snapshot, round_: int, phase: str, participants: Sequence[str], deadline: float
) -> Task:
    """The task of a round: a basis phase carries no model, the clip norm C_b and z_b (and
    the fleet's moments in a covariance phase under global standardization); the statistics
    phase no model, z_s and the block bounds C_m, C_s (its packed vector's bound is 1); a
    training or evaluation round carries the model, the current clip norm and the training
    settings."""
    common = dict(
        round=round_,
        basis_version=state.basis_version,
        classes=settings.classes,
        deadline=deadline,
        hidden=settings.hidden,
        trust_mode=settings.trust_mode,
        noise_multiplier=settings.noise_multiplier,
        participants=tuple(participants),
        phase=phase,
    )
    if phase in BASIS_PHASES:
        extra = {}
        if phase == "covariance" and state.stats_mean is not None:  # global standardization
            extra = dict(stats_mean=state.stats_mean, stats_scale=state.stats_scale)
        common["noise_multiplier"] = settings.basis_noise_multiplier
        return Task(model=np.empty(0), clip_norm=settings.basis_clip_norm, **common, **extra)
    if phase == "statistics":
        common["noise_multiplier"] = settings.statistics_noise_multiplier
        return Task(
            model=np.empty(0),
            clip_norm=STATISTICS_CLIP_NORM,
            means_clip=settings.means_clip,
            scatter_clip=settings.scatter_clip or 0.0,
            **common,
        )
    secure = settings.trust_mode == "distributed" and phase == "train"
    return Task(
        model=state.params,
        clip_norm=state.clip_norm,
        adaptive_clipping=settings.adaptive_clipping,
        secagg_threshold=settings.secagg_threshold if secure else 0,
        **common,
        **settings.client_config,
    )


def charge_before_task(settings: PhaseSettings, round_: int, phase: str) -> Charge | None:
    """The write-ahead charge of a round whose replies the coordinator itself sees: every
    noised update or sketch in local mode, the noised sketches of the basis and statistics
    phases in distributed mode. The coordinator is the adversary there, so the round is
    charged before its task goes out, whether or not it is then completed, retried or
    abandoned. None: central rounds are charged by their release, distributed training
    rounds by :func:`unmask_charge`, evaluation rounds release nothing."""
    mode = settings.trust_mode
    if phase == "evaluate" or mode == "central" or (mode == "distributed" and phase not in SKETCH_PHASES):
        return None
    return Charge(round_, _ledger_kind(phase), _PUBLIC_COHORT_Q, settings.noise_multiplier_of(phase))


def _ledger_kind(phase: str) -> str:
    return "basis" if phase in BASIS_PHASES else phase


def planned_releases(config: CoordinatorConfig, settings: PhaseSettings) -> list[tuple[str, float]]:
    """``(ledger kind, z)`` of every release a run of ``config`` makes if no round is retried:
    the basis phase(s), the one-shot statistics, the training rounds (distributed rounds at
    their target multiplier, every device surviving). Retries and dropouts only add to it."""
    phases = ["moments", "covariance"] if config.model.standardization == "global" else ["covariance"]
    if settings.algorithm == "one_shot":
        phases.append("statistics")
    phases += ["train"] * config.rounds
    return [(_ledger_kind(phase), settings.noise_multiplier_of(phase)) for phase in phases]


def planned_epsilons(config: CoordinatorConfig, settings: PhaseSettings) -> dict[str, float]:
    """``{"rdp": eps, "pld": eps}`` at ``config.dp.delta`` of :func:`planned_releases`, from
    dp-accounting. Every release is an unsampled Gaussian (q = 1), and Gaussians compose
    exactly into one of multiplier ``(sum z_i^-2)^-1/2``, which each accountant then states."""
    multipliers = [z for _, z in planned_releases(config, settings)]
    if not multipliers:
        return dict.fromkeys(ACCOUNTANTS, 0.0)
    if min(multipliers) == 0:
        return dict.fromkeys(ACCOUNTANTS, math.inf)
    z = sum(m**-2 for m in multipliers) ** -0.5
    return {
        name: float(make_accountant(name).compose(round_event(1.0, z)).get_epsilon(config.dp.delta))
        for name in ACCOUNTANTS
    }


def unmask_charge(
    settings: PhaseSettings, round_: int, clip_norm: float, n_params: int, grid_step: float, n_survivors: int
) -> Charge:
    """The charge of a distributed-mode training round, due before its unmask request goes
    out: the survivors' noise shares (exact discrete Gaussians on the fixed-point grid) add
    up to multiplier :func:`~biofed.privacy_ledger.distributed_noise_multiplier` of C, stated
    against the grid's sensitivity (:func:`~biofed.privacy_mechanism.grid_sensitivity`)."""
    z = distributed_noise_multiplier(settings.noise_multiplier, settings.secagg_threshold, n_survivors)
    return Charge(round_, "train", _PUBLIC_COHORT_Q, z * clip_norm / grid_sensitivity(clip_norm, n_params, grid_step))


# ----------------------------------------------------------------------------- closing a round
def basis_phase(
    settings: PhaseSettings,
    state: Snapshot,
    round_: int,
    phase: str,
    sketches: Sequence[Sketch],
    init_rng: np.random.Generator,
) -> PendingPhase:
    """Close a basis phase from the accepted sketches.

    The uniform mean of the clipped statistics (C_b) is released with noise ``z_b C_b`` in
    central mode; in local and distributed modes the devices noised their statistics and
    the mean is post-processing. The moments phase fixes the fleet's standardization; the
    covariance phase makes the basis (``basis_k`` components), starts the model from
    ``init_rng`` and resets the server optimizer, and its payload is the :class:`Basis`.
    """
    statistics = np.vstack([s.statistic for s in sketches])
    mean, n_clipped = aggregate_statistics(statistics, settings.basis_clip_norm)  # also validates
    if n_clipped:
        logger.warning(
            "round %d (%s): %d statistics exceeded the clip norm %g and were clipped here",
            round_,
            phase,
            n_clipped,
            settings.basis_clip_norm,
        )
    release = None
    if settings.trust_mode == "central":
        c, z = settings.basis_clip_norm, settings.basis_noise_multiplier
        release = Release(Charge(round_, "basis", _PUBLIC_COHORT_Q, z), (ClippedSum(statistics, c, z * c),))
    return PendingPhase(
        release,
        partial(
            _close_basis,
            settings,
            state,
            round_,
            phase,
            sketches[0].n_features,
            None if release is not None else mean,
            len(sketches),
            init_rng,
            release,
        ),
    )


def _close_basis(
    settings: PhaseSettings,
    state: Snapshot,
    round_: int,
    phase: str,
    n_features: int,
    mean: np.ndarray | None,
    n_devices: int,
    init_rng: np.random.Generator,
    release: Release | None,
    released: tuple[np.ndarray, ...],
) -> PhaseOutcome:
    statistic = released[0] / n_devices if mean is None else mean
    event = None if release is None else release.charge
    if phase == "moments":
        stats_mean, stats_scale = standardization_from_moments(statistic)
        return PhaseOutcome(
            replace(state, stats_mean=stats_mean, stats_scale=stats_scale, n_features=n_features, phase="covariance"),
            event,
            None,
        )
    components, eigenvalues = basis_from_covariance(statistic, settings.basis_k)
    if state.stats_mean is None:  # device standardization: the devices z-score their own rows
        basis_mean, basis_scale = np.zeros(components.shape[1]), np.ones(components.shape[1])
    else:
        n_features, basis_mean, basis_scale = state.n_features, state.stats_mean, state.stats_scale
    new_state = replace(
        state,
        basis_version=state.basis_version + 1,
        basis_components=components,
        n_features=n_features,
        basis_mean=basis_mean,
        basis_scale=basis_scale,
        strategy_state={},
        phase=settings.phase_after_basis,
        params=init_params(components.shape[0], len(settings.classes), settings.hidden, random_state=init_rng),
    )
    logger.info(
        "basis version %d: %d components of %d features, leading eigenvalues %s",
        new_state.basis_version,
        components.shape[0],
        components.shape[1],
        np.round(eigenvalues[:4], 3),
    )
    payload = Basis(
        round=round_,
        version=new_state.basis_version,
        components=components,
        mean=basis_mean,
        scale=basis_scale,
        standardization=standardization(new_state),
    )
    return PhaseOutcome(new_state, event, payload)


def statistics_phase(settings: PhaseSettings, state: Snapshot, round_: int, sketches: Sequence[Sketch]) -> PendingPhase:
    """Close the one-shot statistics phase: the devices' packed class statistics
    (:mod:`biofed.protocol.statistics`, each of L2 norm <= 1) are averaged, de-scaled into
    class means (c, k) and within-class scatter (k, k), and solved as the ridge LDA of
    :func:`~biofed.coordinator.lda.lda_from_statistics`: the model's initial (or final,
    with ``rounds = 0``) logistic-regression parameters.

    Central mode: the sum of the sketches, each clipped to 1, is released once with noise
    ``z_s`` (one ``kind="statistics"`` charge; the device count is public). Local and
    distributed modes: every device noised its own sketch (charged before the task), the
    mean is post-processing.

    Raises
    ------
    ValueError
        No sketch, or one of the wrong length for this basis and ``scatter_clip`` (the
        ingest drops such replies, so this is a caller's error).
    """
    if not sketches:
        raise ValueError(f"round {round_} (statistics): no device statistics to close the phase with")
    k = state.basis_components.shape[0]
    size = settings.statistics_size(k)
    wrong = [s.statistic.shape for s in sketches if s.statistic.shape != (size,)]
    if wrong:
        raise ValueError(
            f"round {round_} (statistics): statistics of shapes {wrong} for {len(settings.classes)} classes, k={k}"
            f"{' with the scatter' if settings.scatter_clip is not None else ''}: expected ({size},)"
        )
    statistics = np.vstack([s.statistic for s in sketches])
    release = None
    if settings.trust_mode == "central":
        z = settings.statistics_noise_multiplier
        release = Release(
            Charge(round_, "statistics", _PUBLIC_COHORT_Q, z),
            (ClippedSum(statistics, STATISTICS_CLIP_NORM, z * STATISTICS_CLIP_NORM),),
        )
    return PendingPhase(
        release,
        partial(_close_statistics, settings, state, round_, statistics.mean(axis=0), len(sketches), release),
    )


def _close_statistics(
    settings: PhaseSettings,
    state: Snapshot,
    round_: int,
    mean: np.ndarray,
    n_devices: int,
    release: Release | None,
    released: tuple[np.ndarray, ...],
) -> PhaseOutcome:
    statistic = mean if release is None else released[0] / n_devices
    k = state.basis_components.shape[0]
    means, scatter = unpack_statistics(statistic, len(settings.classes), k, settings.means_clip, settings.scatter_clip)
    params = lda_from_statistics(means, scatter, settings.ridge)
    logger.info(
        "round %d: one-shot LDA from %d devices' class statistics (k=%d, ridge %g%s)",
        round_,
        n_devices,
        k,
        settings.ridge,
        "" if scatter is None else ", with the within-class scatter",
    )
    new_state = replace(state, params=params, strategy_state={}, phase="train")
    return _model_outcome(settings, new_state, round_, n_devices, release)


def _model_outcome(
    settings: PhaseSettings, new_state: Snapshot, round_: int, n_devices: int, release: Release | None
) -> PhaseOutcome:
    """A round that made a new global model (``new_state.params``): its :class:`Model` payload."""
    payload = Model(
        round=round_,
        params=new_state.params,
        basis_version=new_state.basis_version,
        classes=settings.classes,
        hidden=settings.hidden,
        n_devices=n_devices,
    )
    return PhaseOutcome(new_state, None if release is None else release.charge, payload)


def train_phase(
    settings: PhaseSettings,
    state: Snapshot,
    round_: int,
    updates: Mapping[str, Update],
    *,
    strategy: Strategy,
    central_dp: DPAggregator | None = None,
    secure_mean: np.ndarray | None = None,
) -> PendingPhase:
    """Close a training round from the accepted updates (device id -> :class:`Update`).

    - ``secure_mean`` given (distributed mode): the mean of the survivors' noised updates,
      unmasked by secure aggregation (charged by :func:`unmask_charge`); the server
      optimizer steps with it.
    - central mode with ``central_dp``: the noised clipped uniform mean, released as
      :meth:`DPAggregator.release` states; with adaptive clipping the devices' norm bits
      move the clip norm.
    - central mode with a robust strategy: charged ``z = 0`` (a non-private release), then
      aggregated as in local mode.
    - local mode: the devices noised their updates; ``strategy.aggregate`` is post-processing.

    The server optimizer's state is loaded from ``state.strategy_state`` when the round
    closes and returned in the new state, so the outcome depends on the arguments alone.
    The payload is the round's :class:`Model` without ``epsilon`` and ``onnx``, which the
    loop fills in after the commit.

    Raises
    ------
    AggregationError
        An invalid update: nothing is released.
    ValueError
        ``central_dp`` wraps another strategy than ``strategy``.
    """
    if central_dp is not None and central_dp.strategy is not strategy:
        raise ValueError("central_dp must be the DP composition around strategy (DPAggregator(strategy, ...))")
    ordered = sorted(updates.items())
    client_updates = [
        ClientUpdate(np.asarray(u.delta, dtype=np.float64), u.n_examples, device) for device, u in ordered
    ]
    clip = state.clip_norm
    central = settings.trust_mode == "central"
    if central:
        oversized = [u.device_id for u in client_updates if np.linalg.norm(u.delta) > clip * (1 + 1e-9)]
        if oversized:
            logger.warning(
                "round %d: updates of %s exceed the clip norm %g (the devices did not clip): clipped here",
                round_,
                ", ".join(oversized),
                clip,
            )
    if secure_mean is not None:
        release, close = None, partial(_step_with_mean, strategy, round_, state.params, secure_mean)
    elif central and central_dp is not None:
        bits = [u.norm_bit for _, u in ordered]
        if central_dp.adaptive_clipping is None or None in bits:
            bits = None
        params, release = central_dp.release(
            round_, state.params, client_updates, clip, norm_bits=bits, sampling_rate=_PUBLIC_COHORT_Q
        )
        close = partial(_finish_central, central_dp, round_, params, len(client_updates), clip)
    else:
        release = Release(Charge(round_, "train", _PUBLIC_COHORT_Q, 0.0)) if central else None
        close = partial(_aggregate, strategy, round_, state.params, client_updates)
    return PendingPhase(
        release, partial(_close_train, settings, state, round_, len(client_updates), strategy, release, close)
    )


def _step_with_mean(
    strategy: Strategy, round_: int, params: np.ndarray, mean: np.ndarray, released: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, float | None]:
    return strategy.server_update(round_, params, mean), None


def _finish_central(
    central_dp: DPAggregator,
    round_: int,
    params: np.ndarray,
    n_updates: int,
    clip: float,
    released: tuple[np.ndarray, ...],
) -> tuple[np.ndarray, float | None]:
    return central_dp.finish(round_, params, released, n_updates, clip)


def _aggregate(
    strategy: Strategy, round_: int, params: np.ndarray, updates: list[ClientUpdate], released: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, float | None]:
    return strategy.aggregate(round_, params, updates)[0], None


def _close_train(
    settings: PhaseSettings,
    state: Snapshot,
    round_: int,
    n_devices: int,
    strategy: Strategy,
    release: Release | None,
    step: Callable[[tuple[np.ndarray, ...]], tuple[np.ndarray, float | None]],
    released: tuple[np.ndarray, ...],
) -> PhaseOutcome:
    strategy.load_state_dict(state.strategy_state)
    params, next_clip = step(released)
    new_state = replace(
        state,
        params=params,
        clip_norm=state.clip_norm if next_clip is None else next_clip,
        train_rounds_done=state.train_rounds_done + 1,
        strategy_state=strategy.state_dict(),
    )
    return _model_outcome(settings, new_state, round_, n_devices, release)


def evaluate_phase(state: Snapshot) -> PhaseOutcome:
    """Close the evaluation round: the run is done. Evaluation replies are not released
    (their metrics enter only the coordinator's own :func:`round_record`)."""
    return PhaseOutcome(replace(state, phase="done"), None, None)


# ----------------------------------------------------------------------------- the record
def round_record(
    settings: PhaseSettings,
    state: Snapshot,
    round_: int,
    phase: str,
    replies: Sequence[Update | Sketch],
    *,
    n_selected: int,
    attempts: int,
    epsilons: Mapping[str, float],
    sampling_rate: float | None,
    clip_norm: float | None,
    finished: float,
) -> RoundRecord:
    """The row of a closed round in the state database: the state after the round, its
    replies (device metrics: mean training loss, mean balanced accuracy, evaluation
    windows), the epsilons spent so far and when it was committed (``finished``, Unix time)."""
    metrics = [u.metrics for u in replies if isinstance(u, Update)]
    accuracies = [m.eval_balanced_accuracy for m in metrics if m.eval_balanced_accuracy is not None]
    return RoundRecord(
        round=round_,
        phase=phase,
        train_round=state.train_rounds_done if phase == "train" else None,
        n_selected=n_selected,
        n_devices=len(replies),
        mean_loss=float(np.mean([m.loss for m in metrics])) if metrics and phase == "train" else None,
        balanced_accuracy=float(np.mean(accuracies)) if accuracies else None,
        eval_windows=int(sum(m.eval_windows for m in metrics)),
        epsilon_rdp=epsilons.get("rdp"),
        epsilon_pld=epsilons.get("pld"),
        sampling_rate=sampling_rate,
        noise_multiplier=settings.noise_multiplier_of(phase),
        clip_norm=clip_norm,
        attempts=attempts,
        finished=finished,
    )
