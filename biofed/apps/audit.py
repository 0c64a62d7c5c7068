"""``biofed audit``: an empirical privacy audit of a real federation with canary clients.

What it does
------------
For each trust mode (``central``, ``local``, ``distributed``) and each run:

1. The synthetic demo fleet (:func:`biofed.apps.federation.write_synthetic_devices`, the configs of
   :func:`biofed.apps.demo.write_configs`, the broker of the demo) runs for real: one edge agent
   process per device (``biofed edge``), the coordinator (:class:`biofed.coordinator.server.Coordinator`,
   in this process so the audit can read what it received), over MQTT.
2. ``n`` canary clients join it: :class:`CanaryAgent`, an :class:`biofed.edge.agent.EdgeAgent`
   whose local training returns ``model + C * c`` for its secret unit direction ``c`` (Andrew et
   al. 2023, "One-shot empirical privacy estimation for federated learning"). Everything else
   is the agent's: clipping, its own DP noise (local mode), secure aggregation (distributed
   mode), signed envelopes, statuses. Canaries take part in every round. Their directions and
   ``m - n`` held-out directions are orthonormal and lie where honest updates have no component
   (:mod:`biofed.apps.audit_stats`), so one run carries many independent canaries.
3. The adversaries of the mode score every canary (``AuditTap``):

   ``observer`` (every mode)
       sees every released model (the first training task's model and every ``Model``); score
       of a direction ``c`` = ``sum_t (n_t / C) <params_t - params_(t-1), c>`` with ``n_t`` the
       published device count of round ``t``.
   ``coordinator`` (local and distributed)
       local: every update it receives (subscribed to ``update/+`` as the coordinator is); score
       of canary ``i`` = ``sum_t <delta_(i,t), c_i> / C`` over every round it sent, held-out
       scores the same projections onto the held-out directions. Distributed: every sum it
       unmasks (tapped from its secure-aggregation rounds, the discarded ones included); score
       ``sum_t (n_t / C) <mean_t, c>`` with ``n_t`` the survivors.

4. The scores of all runs give an epsilon lower bound at ``--confidence``
   (:func:`biofed.apps.audit_stats.gaussian_epsilon_lower_bound`, the distribution-free
   :func:`~biofed.apps.audit_stats.threshold_epsilon_lower_bound` beside it), printed next to the
   ledger's epsilon (:func:`ledger_epsilons`) with a verdict: ``consistent`` when the lower
   bound is at most the ledger's smallest epsilon, ``VIOLATION`` otherwise.

The report folder gets ``audit.json`` (every bound, ledger epsilon, verdict, wall time and the
scores) and one folder per mode and run with its configs, logs and coordinator state.

Why the audit is tight
----------------------
With a canary in every round and every intermediate model visible, the score of an inserted
direction is ``N(T, T z^2)`` and of a held-out one ``N(0, T z^2)`` (in units of ``C``; the DP
noise is isotropic and honest updates have no component along the directions), so the fitted
``mu`` estimates ``sqrt(T) / z``: the composed Gaussian mechanism's own GDP parameter. Only
the basis phase (a few percent of the ledger's epsilon at the demo's ``z_b``) and the
accountant's slack separate the audit's estimate from the ledger. The lower bound's gap to the
estimate shrinks like ``1 / sqrt(canaries)``: add runs (``--runs``) to tighten it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click
import numpy as np

from biofed.apps.audit_stats import (
    EpsilonBound,
    canary_directions,
    gaussian_epsilon_lower_bound,
    softmax_invariant_basis,
    threshold_epsilon_lower_bound,
)
from biofed.apps.demo import FLEET, DemoSettings, write_configs
from biofed.apps.federation import Listener, spawn, start_broker, tails, terminate, write_synthetic_devices
from biofed.cli_options import examples, logging_options
from biofed.config import CoordinatorConfig, DeviceConfig, ModelSettings, load_config
from biofed.coordinator.server import Coordinator, RunState
from biofed.edge.agent import EdgeAgent
from biofed.edge.tasks import LocalData
from biofed.model import FeatureLayout
from biofed.protocol import TRUST_MODES, Model, ProtocolError, Status, Task, Topics, Update, decode_topic_message

logger = logging.getLogger(__name__)

__all__ = [
    "AuditError",
    "AuditSettings",
    "AuditTap",
    "CanaryAgent",
    "ModeAudit",
    "audit_command",
    "ledger_epsilons",
    "run_audit",
    "run_mode",
]

CANARY_PREFIX = "canary"
ADVERSARIES = {
    "central": ("observer",),
    "local": ("observer", "coordinator"),
    "distributed": ("observer", "coordinator"),
}
"""Who each trust mode's guarantee is against: the readers of released models always; the
coordinator too where it is not trusted."""
_CANARY_ROWS = 256


class AuditError(RuntimeError):
    """The audit could not run (the message says which part failed and why)."""


@dataclass(frozen=True)
class AuditSettings:
    """Everything an audit depends on (written to ``audit.json``)."""

    out: Path
    trust_modes: tuple[str, ...] = TRUST_MODES
    devices: int = 10
    canaries: int | None = None
    """Inserted canaries per run; None: half the canary subspace (the rest is held out)."""
    runs: int = 4
    """Federations per trust mode, pooled: with the demo fleet four runs put the lower bound above half
    the ledger's epsilon with high probability (the estimate's standard error falls like 1 / sqrt(runs))."""
    rounds: int = 10
    noise_multiplier: float = 2.0
    clip: float = 0.25
    delta: float = 1e-5
    confidence: float = 0.95
    synthetic_seconds: float = 60.0
    round_deadline_s: float = 60.0
    timeout_s: float = 900.0
    seed: int = 0
    """Seed of the synthetic data; the canary directions come from OS entropy (they are the secret)."""
    sign: bool = False


# ----------------------------------------------------------------------------- ledger seam
def ledger_epsilons(state_dir: Path) -> dict[str, float]:
    """The ledger's epsilon per accountant after a run, as the coordinator published it: the
    ``epsilon_<accountant>`` fields of the last committed round in ``state_dir/rounds.json``
    (``inf`` for a round without noise). The one place the audit reads the ledger from."""
    path = Path(state_dir) / "rounds.json"
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(f"cannot read the coordinator's ledger epsilon from {path}: {exc}") from None
    if not records:
        raise AuditError(f"{path} has no committed round: nothing was accounted")
    last = records[-1]
    epsilons = {}
    for key, value in last.items():
        if key.startswith("epsilon_") and value is not None:
            epsilons[key.removeprefix("epsilon_")] = float(value)
    if not epsilons:
        raise AuditError(f"the last round of {path} carries no epsilon")
    return epsilons


# ----------------------------------------------------------------------------- canary client
class CanaryAgent(EdgeAgent):
    """A device whose local training returns ``model + C * direction`` (``C`` = the task's
    clip norm, ``direction`` a unit vector the length of the model).

    It holds no recordings: its rows are standard-normal draws of the fleet's feature width,
    so its device-standardized correlation sketch is close to the identity, which leaves the
    eigenvectors of the fleet's averaged statistic (the basis) as they are.
    """

    def __init__(
        self, config: DeviceConfig, direction: np.ndarray, n_features: int, *, random_state: np.random.Generator
    ) -> None:
        super().__init__(config)
        direction = np.asarray(direction, dtype=np.float64)
        if direction.ndim != 1 or not math.isclose(float(np.linalg.norm(direction)), 1.0, rel_tol=1e-9):
            raise ValueError("a canary direction must be a 1-d unit vector")
        self.direction = direction
        self._rows = random_state.standard_normal((_CANARY_ROWS, n_features))

    def local_data(self, classes: Sequence[str]) -> LocalData:
        y = np.arange(_CANARY_ROWS) % len(classes)
        held_out = np.arange(_CANARY_ROWS) >= _CANARY_ROWS * 3 // 4  # so it answers the evaluation round too
        return LocalData(self._rows, y, ~held_out, held_out)

    def _local_training(self, task: Task, Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        if task.model.shape != self.direction.shape:
            raise ValueError(
                f"round {task.round}: the model has {task.model.size} parameters, the canary "
                f"direction {self.direction.size}"
            )
        return task.model + task.clip_norm * self.direction, 0.0


# ----------------------------------------------------------------------------- adversaries' view
@dataclass
class AuditTap:
    """What the adversaries saw in one run.

    ``task_models`` round -> model of each training task; ``models`` round -> (params,
    n_devices) of each released :class:`Model`; ``updates`` (device, round) -> delta of every
    non-empty canary :class:`Update` (what a local-mode coordinator receives);
    ``unmasked`` round -> (mean, survivors) of every sum a distributed-mode coordinator
    unmasked; ``statuses`` device -> latest :class:`Status`.
    """

    task_models: dict[int, np.ndarray] = field(default_factory=dict)
    models: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)
    updates: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    unmasked: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)
    statuses: dict[str, Status] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, topics: Topics, topic: str, payload: bytes) -> None:
        try:
            message = decode_topic_message(topics, topic, payload)
        except ProtocolError as exc:
            logger.warning("audit tap dropped a message on %s: %s", topic, exc)
            return
        body = message.payload
        with self.lock:
            if isinstance(body, Status):
                self.statuses[message.sender] = body
            elif isinstance(body, Task) and body.phase == "train":
                self.task_models[body.round] = np.array(body.model)
            elif isinstance(body, Model):
                self.models[body.round] = (np.array(body.params), body.n_devices)
            elif isinstance(body, Update) and body.delta.size and message.sender.startswith(CANARY_PREFIX):
                self.updates[(message.sender, message.round)] = np.array(body.delta)

    def released(self) -> list[tuple[np.ndarray, int]]:
        """``(params_t - params_(t-1), n_t)`` of every released training round, in order."""
        with self.lock:
            if not self.models:
                return []
            first = min(self.models)
            starts = [r for r in self.task_models if r <= first]
            if not starts:
                raise AuditError("the observer saw a released model but no training task before it")
            previous = self.task_models[max(starts)]
            steps = []
            for round_ in sorted(self.models):
                params, n = self.models[round_]
                steps.append((params - previous, n))
                previous = params
            return steps


def _tap_class(base: type[Coordinator], tap: AuditTap) -> type[Coordinator]:
    """``base`` with every unmasked secure-aggregation sum copied into ``tap.unmasked``,
    whether or not its round is then committed (what a distributed-mode coordinator learns)."""

    class TappedCoordinator(base):
        def _gather_secure(self, round_, participants, attempts):
            collected = super()._gather_secure(round_, participants, attempts)
            if collected is not None and collected.secure is not None:
                secure = collected.secure
                with tap.lock:
                    tap.unmasked[collected.round] = (np.array(secure.mean_update()), len(secure.result.survivors))
            return collected

    return TappedCoordinator


def _tap_listener(host: str, port: int, protocol: str, topics: Topics, tap: AuditTap) -> Listener:
    """An MQTT subscriber feeding ``tap`` from a thread."""
    from biofed.mqtt import MqttClient

    client = MqttClient(host, port, "audit-tap", protocol=protocol, clean=True)
    return Listener(
        client,
        (topics.task, topics.model, topics.all_devices("status"), topics.all_devices("update")),
        lambda inbound: tap.record(topics, inbound.topic, inbound.payload),
        name="audit-tap",
    )


# ----------------------------------------------------------------------------- scores
@dataclass(frozen=True)
class RunScores:
    """Canary scores of one run per adversary: ``{adversary: (inserted, held_out)}``."""

    scores: dict[str, tuple[np.ndarray, np.ndarray]]
    rounds_seen: dict[str, int]
    ledger: dict[str, float]
    wall_s: float


def _aggregate_scores(
    steps: Sequence[tuple[np.ndarray, int]], inserted: np.ndarray, held_out: np.ndarray, clip: float
) -> tuple[np.ndarray, np.ndarray]:
    total_in, total_out = np.zeros(inserted.shape[0]), np.zeros(held_out.shape[0])
    for change, n in steps:
        total_in += inserted @ change * (n / clip)
        total_out += held_out @ change * (n / clip)
    return total_in, total_out


def _update_scores(
    tap: AuditTap, canaries: Mapping[str, np.ndarray], held_out: np.ndarray, clip: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores of the canaries' own updates as the coordinator received them; the held-out
    scores project every canary's updates onto every held-out direction."""
    inserted, out = [], []
    rounds = 0
    for device, direction in canaries.items():
        deltas = [delta for (sender, _), delta in sorted(tap.updates.items()) if sender == device]
        if not deltas:
            raise AuditError(f"the coordinator received no update from canary {device}")
        rounds = max(rounds, len(deltas))
        stacked = np.vstack(deltas) / clip
        inserted.append(float((stacked @ direction).sum()))
        out.extend((stacked @ held_out.T).sum(axis=0))
    return np.array(inserted), np.array(out), rounds


# ----------------------------------------------------------------------------- one run
def _wait(condition, timeout_s: float, what: str, children=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AuditError(f"{what} within {timeout_s:g} s\n" + tails(list(children)))
        time.sleep(0.2)


def run_mode(
    settings: AuditSettings,
    mode: str,
    run: int,
    devices: Mapping[str, Sequence[Path]],
    *,
    coordinator_class: type[Coordinator] = Coordinator,
) -> RunScores:
    """One real federation of ``mode`` with canaries; the adversaries' canary scores.

    ``coordinator_class`` builds the coordinator (tests pass a subclass that leaks).
    """
    started = time.monotonic()
    out = (settings.out / mode / f"run{run}").resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    demo = DemoSettings(
        out=out,
        devices=len(devices),
        rounds=settings.rounds,
        trust_mode=mode,
        noise_multiplier=settings.noise_multiplier,
        clip=settings.clip,
        delta=settings.delta,
        epsilon_budget=None,
        min_devices=len(devices),
        round_deadline_s=settings.round_deadline_s,
        sign=settings.sign,
        timeout_s=settings.timeout_s,
        seed=settings.seed,
    )
    model = ModelSettings()  # the model the demo fleet trains
    n_canaries = settings.canaries
    if n_canaries is None:
        n_canaries = canary_capacity(model.basis_k, model.hidden) // 2
    canary_ids = [f"{CANARY_PREFIX}{i:02d}" for i in range(n_canaries)]
    broker, protocol, _ = start_broker(demo.out, FLEET, devices, secure=demo.secure, mosquitto=demo.mosquitto)
    topics = Topics(FLEET)
    tap = AuditTap()
    children, canary_threads = [], []
    stop_canaries = threading.Event()
    listener = None
    try:
        # the canaries get device configs (and signing keys) like the devices, without recordings
        coordinator_toml, device_tomls = write_configs(
            demo, {**devices, **{c: [] for c in canary_ids}}, broker.host, broker.port, protocol
        )
        listener = _tap_listener(broker.host, broker.port, protocol, topics, tap).start()
        for device in devices:
            children.append(
                spawn(device, ["edge", "--config", str(device_tomls[device])], out / "logs" / f"{device}.log")
            )

        def online(ids) -> bool:
            with tap.lock:
                return all(i in tap.statuses and tap.statuses[i].state != "offline" for i in ids)

        def reported_layout() -> bool:
            with tap.lock:
                return all(i in tap.statuses and tap.statuses[i].layout for i in devices)

        _wait(reported_layout, settings.timeout_s, "the devices did not come online", children)
        with tap.lock:
            layout = FeatureLayout.from_json(tap.statuses[sorted(devices)[0]].layout)
        config = load_config(coordinator_toml, CoordinatorConfig)
        k = min(config.model.basis_k, layout.n_features)
        subspace = softmax_invariant_basis(k, len(config.model.classes), config.model.hidden)
        if not 1 <= n_canaries < subspace.shape[1]:
            raise AuditError(
                f"{n_canaries} canaries do not fit: the canary subspace of this model has "
                f"{subspace.shape[1]} directions and at least one must be held out"
            )
        directions = canary_directions(subspace, subspace.shape[1], np.random.default_rng())
        inserted, held_out = directions[:n_canaries], directions[n_canaries:]
        canaries = dict(zip(canary_ids, inserted))
        for device, direction in canaries.items():
            agent = CanaryAgent(
                load_config(device_tomls[device], DeviceConfig),
                direction,
                layout.n_features,
                random_state=np.random.default_rng(),
            )
            thread = threading.Thread(target=_run_agent, args=(agent, stop_canaries), name=device, daemon=True)
            thread.start()
            canary_threads.append(thread)
        _wait(lambda: online(canary_ids), 60.0, "the canary clients did not come online", children)
        coordinator = _tap_class(coordinator_class, tap)(
            config, discovery_timeout_s=settings.timeout_s, accountants=("rdp", "pld")
        )
        result: list[RunState] = []
        runner = threading.Thread(target=lambda: result.append(coordinator.run()), name="coordinator", daemon=True)
        runner.start()
        runner.join(settings.timeout_s)
        if runner.is_alive():
            coordinator.stop()
            runner.join(30.0)
            raise AuditError(
                f"the {mode} federation did not finish within {settings.timeout_s:g} s\n" + tails(children)
            )
        if result != [RunState.DONE]:
            raise AuditError(f"the {mode} coordinator ended in state {result}; see {out / 'logs'}\n" + tails(children))
        released = [r.round for r in coordinator.history() if r.phase == "train"]

        def tapped_last_model() -> bool:
            with tap.lock:
                return not released or released[-1] in tap.models

        _wait(tapped_last_model, 30.0, "the observer did not receive the last released model", children)
    finally:
        stop_canaries.set()
        for thread in canary_threads:
            thread.join(timeout=15.0)
        terminate(children)
        if listener is not None:
            listener.stop()
        broker.stop()
    scores, rounds_seen = {}, {}
    steps = tap.released()
    if not steps:
        raise AuditError(f"the {mode} federation released no model")
    scores["observer"] = _aggregate_scores(steps, inserted, held_out, settings.clip)
    rounds_seen["observer"] = len(steps)
    if mode == "local":
        ins, outs, rounds_seen["coordinator"] = _update_scores(tap, canaries, held_out, settings.clip)
        scores["coordinator"] = (ins, outs)
    elif mode == "distributed":
        unmasked = [(mean, n) for _, (mean, n) in sorted(tap.unmasked.items())]
        if not unmasked:
            raise AuditError("the distributed coordinator unmasked no sum")
        scores["coordinator"] = _aggregate_scores(unmasked, inserted, held_out, settings.clip)
        rounds_seen["coordinator"] = len(unmasked)
    return RunScores(scores, rounds_seen, ledger_epsilons(out / "state"), time.monotonic() - started)


def canary_capacity(basis_k: int, hidden: int) -> int:
    """Directions in the canary subspace of a model on a rank-``basis_k`` basis (inserted plus
    held out): the rows of its output layer plus its bias."""
    return (basis_k if hidden == 0 else hidden) + 1


def _run_agent(agent: EdgeAgent, stop: threading.Event) -> None:
    try:
        agent.run(stop)
    finally:
        agent.close()


# ----------------------------------------------------------------------------- whole audit
@dataclass(frozen=True)
class ModeAudit:
    """The verdict for one adversary of one trust mode over all runs."""

    trust_mode: str
    adversary: str
    gaussian: EpsilonBound
    threshold: EpsilonBound
    ledger: dict[str, float]
    rounds_seen: int
    runs: int
    wall_s: float
    inserted: np.ndarray
    """Scores of the inserted canaries (all runs), in units of C."""
    held_out: np.ndarray
    """Scores of the held-out directions."""

    @property
    def ledger_epsilon(self) -> float:
        """The smallest epsilon the ledger reported (the strictest claim it made)."""
        return min(self.ledger.values())

    @property
    def lower_bound(self) -> float:
        return max(self.gaussian.lower, self.threshold.lower)

    @property
    def consistent(self) -> bool:
        return self.lower_bound <= self.ledger_epsilon

    @property
    def verdict(self) -> str:
        return "consistent" if self.consistent else "VIOLATION"


def audit_mode(
    settings: AuditSettings,
    mode: str,
    devices: Mapping[str, Sequence[Path]],
    *,
    coordinator_class: type[Coordinator] = Coordinator,
) -> list[ModeAudit]:
    """``settings.runs`` federations of ``mode``; one :class:`ModeAudit` per adversary."""
    runs = [
        run_mode(settings, mode, r, devices, coordinator_class=coordinator_class) for r in range(1, settings.runs + 1)
    ]
    ledger = {name: min(r.ledger[name] for r in runs) for name in runs[0].ledger}
    audits = []
    for adversary in ADVERSARIES[mode]:
        inserted = np.concatenate([r.scores[adversary][0] for r in runs])
        held_out = np.concatenate([r.scores[adversary][1] for r in runs])
        audits.append(
            ModeAudit(
                trust_mode=mode,
                adversary=adversary,
                gaussian=gaussian_epsilon_lower_bound(inserted, held_out, settings.delta, settings.confidence),
                threshold=threshold_epsilon_lower_bound(inserted, held_out, settings.delta, settings.confidence),
                ledger=ledger,
                rounds_seen=max(r.rounds_seen[adversary] for r in runs),
                runs=len(runs),
                wall_s=sum(r.wall_s for r in runs),
                inserted=inserted,
                held_out=held_out,
            )
        )
    return audits


def format_audits(audits: Sequence[ModeAudit], confidence: float, delta: float) -> str:
    lines = [
        f"{'mode':<12} {'adversary':<12} {'rounds':>6} {'canaries':>8} {'mu':>6} "
        f"{'eps lower':>9} {'eps est.':>8} {'threshold':>9} {'ledger eps':>10}  verdict",
        f"{'':<12} {'':<12} {'':>6} {'in/out':>8} {'':>6} {f'({100 * confidence:g}%)':>9} {'':>8} "
        f"{f'({100 * confidence:g}%)':>9} {'(min)':>10}",
    ]
    for a in audits:
        g = a.gaussian
        lines.append(
            f"{a.trust_mode:<12} {a.adversary:<12} {a.rounds_seen:>6} {f'{g.n_inserted}/{g.n_held_out}':>8} "
            f"{g.mu:>6.2f} {g.lower:>9.3f} {g.estimate:>8.3f} {a.threshold.lower:>9.3f} {a.ledger_epsilon:>10.3f}  "
            f"{a.verdict}"
        )
    lines.append(
        f"epsilon at delta = {delta:g}; 'eps lower' is the Gaussian-fit lower bound (Andrew et al. 2023) at "
        f"{100 * confidence:g}% confidence, 'threshold' the distribution-free Clopper-Pearson one; the verdict "
        "compares the larger of the two with the ledger's smallest epsilon (RDP, PLD)"
    )
    return "\n".join(lines)


def _bound_dict(bound: EpsilonBound) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(bound).items()}


def run_audit(settings: AuditSettings, *, coordinator_class: type[Coordinator] = Coordinator) -> list[ModeAudit]:
    """Audit every trust mode of ``settings``; prints the table and writes ``audit.json``."""
    out = settings.out.resolve()
    settings = replace(settings, out=out)
    out.mkdir(parents=True, exist_ok=True)
    click.echo(
        f"writing {settings.devices} synthetic devices ({settings.synthetic_seconds:g} s per class) to {out / 'data'}"
    )
    devices = write_synthetic_devices(
        out / "data", settings.devices, duration_s=settings.synthetic_seconds, random_state=settings.seed
    )
    audits: list[ModeAudit] = []
    for mode in settings.trust_modes:
        click.echo(
            f"auditing trust mode {mode}: {settings.runs} run(s) of {settings.rounds} rounds, "
            f"{len(devices)} devices + canaries"
        )
        mode_audits = audit_mode(settings, mode, devices, coordinator_class=coordinator_class)
        audits.extend(mode_audits)
        for a in mode_audits:
            click.echo(
                f"  {mode} / {a.adversary}: epsilon lower bound {a.gaussian.lower:.3f} "
                f"(mu {a.gaussian.mu:.2f}), ledger {a.ledger_epsilon:.3f}: {a.verdict} ({a.wall_s:.0f} s)"
            )
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "audits": [
            {
                "trust_mode": a.trust_mode,
                "adversary": a.adversary,
                "verdict": a.verdict,
                "lower_bound": a.lower_bound,
                "ledger_epsilon": a.ledger_epsilon,
                "ledger": a.ledger,
                "gaussian": _bound_dict(a.gaussian),
                "threshold": _bound_dict(a.threshold),
                "rounds_seen": a.rounds_seen,
                "runs": a.runs,
                "wall_s": round(a.wall_s, 1),
                "scores": {"inserted": a.inserted.tolist(), "held_out": a.held_out.tolist()},
            }
            for a in audits
        ],
    }
    (out / "audit.json").write_text(json.dumps(summary, indent=1))
    click.echo("")
    click.echo(format_audits(audits, settings.confidence, settings.delta))
    click.echo(f"report: {out / 'audit.json'}")
    return audits


# ----------------------------------------------------------------------------- command
@click.command(
    "audit",
    epilog=examples(
        "biofed audit",
        "biofed audit --trust-mode local --runs 3 --out audit-local",
        "biofed audit --trust-mode central --devices 3 --rounds 5 --seconds 10 --sign",
        exit_codes="Exit codes: 0 consistent; 1 a VIOLATION or a runtime error; 2 usage error.",
    ),
)
@click.option(
    "--trust-mode",
    "trust_modes",
    type=click.Choice(TRUST_MODES),
    multiple=True,
    help="Trust mode to audit (repeatable); default: every mode (central, local, distributed).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("biofed-audit"),
    show_default=True,
    help="Report folder: audit.json, and per mode and run the configs, logs and coordinator state.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=AuditSettings.runs,
    show_default=True,
    help="Federations per trust mode; their canaries are pooled (more runs: a tighter lower bound).",
)
@click.option(
    "--canaries",
    type=click.IntRange(min=1),
    default=None,
    help="Canary clients per run (default: half the model's canary subspace, 16 for the demo's logistic "
    "regression; the other directions are held out).",
)
@click.option(
    "--devices",
    type=click.IntRange(min=1),
    default=AuditSettings.devices,
    show_default=True,
    help="Synthetic devices of the fleet (besides the canaries).",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=AuditSettings.rounds,
    show_default=True,
    help="Training rounds per federation (a canary takes part in every one).",
)
@click.option(
    "--noise-multiplier",
    type=click.FloatRange(min=0),
    default=AuditSettings.noise_multiplier,
    show_default=True,
    help="DP noise multiplier z of the training rounds.",
)
@click.option(
    "--clip-norm",
    "--clip",
    "clip",
    type=click.FloatRange(min=0, min_open=True),
    default=AuditSettings.clip,
    show_default=True,
    help="L2 clip norm C of each device's update (--clip: older spelling).",
)
@click.option(
    "--delta",
    type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
    default=AuditSettings.delta,
    show_default=True,
    help="DP delta of the ledger and of the bound.",
)
@click.option(
    "--confidence",
    type=click.FloatRange(min=0.5, max=1, max_open=True),
    default=AuditSettings.confidence,
    show_default=True,
    help="Confidence of the epsilon lower bound.",
)
@click.option(
    "--seconds",
    "synthetic_seconds",
    type=click.FloatRange(min=5),
    default=AuditSettings.synthetic_seconds,
    show_default=True,
    help="Synthetic recording length per class and device.",
)
@click.option("--sign", is_flag=True, help="Every message signed with fresh Ed25519 keys (canaries included).")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=AuditSettings.timeout_s,
    show_default=True,
    help="Timeout (s) of each federation; its processes are killed after it.",
)
@click.option(
    "--seed",
    type=int,
    default=AuditSettings.seed,
    show_default=True,
    help="Seed of the synthetic data (the canary directions always come from OS entropy).",
)
@logging_options(default_level="warning")
def audit_command(
    trust_modes,
    out,
    runs,
    canaries,
    devices,
    rounds,
    noise_multiplier,
    clip,
    delta,
    confidence,
    synthetic_seconds,
    sign,
    timeout_s,
    seed,
) -> None:
    """Empirical privacy audit: an epsilon lower bound from canary clients beside the ledger's epsilon.

    Runs the synthetic demo fleet for real (broker, coordinator, one edge agent process per
    device) with canary clients whose update is a secret random direction of norm C (Andrew et
    al. 2023). The adversaries of each trust mode (whoever reads the released models; the
    coordinator too in local and distributed modes) score the canaries, and a Gaussian fit of
    the scores gives an epsilon lower bound at --confidence, printed next to the ledger's
    epsilon with a verdict: "consistent" (lower bound <= ledger epsilon) or "VIOLATION"
    (the federation leaks more than it accounts; exit code 1).
    """
    settings = AuditSettings(
        out=out,
        trust_modes=tuple(trust_modes) or TRUST_MODES,
        devices=devices,
        canaries=canaries,
        runs=runs,
        rounds=rounds,
        noise_multiplier=noise_multiplier,
        clip=clip,
        delta=delta,
        confidence=confidence,
        synthetic_seconds=synthetic_seconds,
        timeout_s=timeout_s,
        seed=seed,
        sign=sign,
    )
    try:
        audits = run_audit(settings)
    except AuditError as exc:
        raise click.ClickException(str(exc)) from None
    if not all(a.consistent for a in audits):
        raise SystemExit(1)
