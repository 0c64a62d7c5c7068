"""``biofed evaluate``: how useful is the model, at which per-patient guarantee, for whom.

Every method runs in one process on the same rows and the same split: each device's
feature rows (:func:`biofed.edge.pipeline.extract_features` of its recordings), split by
:func:`biofed.edge.tasks.labelled_split` (the last 20 % of each class held out, as the
agents do), each device z-scoring its rows with its own training statistics.

Two views
---------
personalized
    Every device participates; each is scored on its own held-out windows.
new patient
    Leave-one-subject-out: the model is trained without the device, which then z-scores
    *all* its rows with its own statistics (unlabeled calibration, no label used) and is
    scored on all of them.

Methods
-------
``local``           each device alone on its own training rows (personalized view only).
``central``         every training row pooled, no privacy.
``central-dp``      a trusted curator pooling the rows, user-level DP-SGD: each step every
                    patient's full-batch gradient clipped, summed and noised (one Gaussian
                    release per step), at the same epsilon.
``fedavg``          federated averaging, no privacy.
``fedavg-dp``       DP-FedAvg as the coordinator runs it (clipped deltas, Gaussian noise per round).
``dp-ftrl``         DP-FTRL with tree aggregation (:mod:`biofed.coordinator.dp_ftrl`).
``one-shot``        clipped class means + within-class scatter released once, ridge LDA
                    (:mod:`biofed.coordinator.one_shot`).
``plain``           MNE + SciPy + scikit-learn on the raw recordings: log10 Welch band powers
                    of the EEG channels, pooled StandardScaler + LogisticRegression.
``biofed-features+sklearn`` the same scikit-learn model on biofed's feature rows: the
                    feature comparison (same model, same rows, only the features differ).
``+personal``       a private method's global model fine-tuned on each device's own
                    training rows (:func:`biofed.edge.statistics.personalize`); it never
                    leaves the device, costs no privacy and is reported apart.

Privacy: one record is one device (patient). Each simulated run of a private method has
its own :class:`~biofed.privacy_mechanism.PrivacyMechanism` over an in-memory
:class:`~biofed.privacy_ledger.PrivacyLedger` (RDP; ``persist=None``): every noised value
is released, and charged, by that gate, as in a live federation. The noise multiplier of
each private method is calibrated with dp-accounting so that the composition of *all* its
releases (the projection basis included when one is used) meets the target epsilon at
``delta``; the table prints that ledger's epsilon after the run. Privacy noise comes from
the mechanism's OS-seeded generator, so private rows are repeated ``repeats`` times and
their spread printed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import dp_accounting
import numpy as np

from biofed.cli_options import examples
from biofed.config import OneShotSettings, PersonalizationSettings
from biofed.coordinator.dp_ftrl import DPFTRL, dp_ftrl_event
from biofed.coordinator.lda import lda_from_statistics
from biofed.coordinator.one_shot import release_class_statistics
from biofed.edge.split import balanced_accuracy, device_standardization
from biofed.edge.statistics import class_statistics, personalize
from biofed.kernels.spectral import shared_nperseg
from biofed.kernels.training import init_params, predict_proba, train
from biofed.privacy_ledger import PrivacyLedger, make_accountant
from biofed.privacy_mechanism import Charge, ClippedSum, PrivacyMechanism

__all__ = [
    "Defaults",
    "DeviceRows",
    "EPSILONS",
    "Evaluation",
    "evaluate_command",
    "load_devices",
    "plain_pipeline_rows",
    "run_evaluation",
]

EPSILONS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, math.inf)
CLASSES = ("rest", "arithmetic")
PRIVATE_METHODS = ("one-shot", "dp-ftrl", "fedavg-dp", "central-dp")
DEFAULT_METHOD = "one-shot"
"""The best private method at epsilon <= 8 by leave-subjects-out CV on eegmat's training windows
(tied with DP-FTRL within the spread of the noise draws; one release instead of a run of rounds)."""


_ONE_SHOT = OneShotSettings()
_PERSONAL = PersonalizationSettings()


@dataclass(frozen=True)
class Defaults:
    """Hyper-parameters of every method.

    The private methods' settings (``dp_*``, ``ftrl_*``, ``central_steps/clip/lr``,
    ``scatter_clip``, ``ridge``) were chosen with :func:`tune` (leave-one-subject-out CV on
    eegmat's training windows at epsilon 8); the local training and personalization
    settings are fixed.
    """

    rounds: int = 20
    local_epochs: int = 2
    local_lr: float = 0.05
    server_lr: float = 1.0
    dp_rounds: int = 10
    dp_clip: float = 0.25
    dp_server_lr: float = 2.0
    central_clip: float = 1.0
    ftrl_devices_per_round: int = 4
    ftrl_epochs: int = 2
    ftrl_clip: float = 0.5
    ftrl_lr: float = 1.0
    ftrl_momentum: float = 0.9
    central_steps: int = 20
    central_lr: float = 0.5
    central_epochs: int = 60
    l2: float = 1e-3
    means_clip: float = _ONE_SHOT.means_clip
    scatter_clip: float | None = _ONE_SHOT.scatter_clip
    ridge: float = _ONE_SHOT.ridge
    basis_clip: float = 25.0
    personal_epochs: int = _PERSONAL.epochs
    personal_lr: float = _PERSONAL.lr
    personal_prox: float = _PERSONAL.prox_mu


@dataclass
class DeviceRows:
    """One device: raw rows ``X`` (N, d), classes ``y`` (N,), ``train`` / ``held_out`` masks."""

    name: str
    X: np.ndarray
    y: np.ndarray
    train: np.ndarray
    held_out: np.ndarray

    def personal_view(self) -> tuple[np.ndarray, np.ndarray]:
        """Training-standardized rows (train and held-out standardized with train statistics)."""
        mean, scale = device_standardization(self.X[self.train])
        return (self.X - mean) / scale, self.y

    def new_patient_view(self) -> np.ndarray:
        """Every row standardized with the statistics of every row (unlabeled calibration)."""
        mean, scale = device_standardization(self.X)
        return (self.X - mean) / scale


# ----------------------------------------------------------------------------- data
def _recording_rows(paths: Sequence[Path]):
    from biofed.datasets.readers import read_recording
    from biofed.edge.pipeline import extract_features

    Xs, labels, ts = [], [], []
    offset = 0.0
    for path in paths:
        if Path(path).suffix.lower() == ".wav":
            continue  # the synthetic phonocardiogram: merged with its FIF by the agent, not used here
        X, lab, t = extract_features(read_recording(path))
        Xs.append(X)
        labels.append(lab)
        ts.append(t + offset)
        offset = (ts[-1].max() + 1.0) if t.size else offset
    return np.vstack(Xs), np.concatenate(labels), np.concatenate(ts)


def load_devices(
    files: Mapping[str, Sequence[Path]], classes: Sequence[str] = CLASSES, rows: Callable | None = None
) -> list[DeviceRows]:
    """Each device's labelled, split rows; ``rows(paths) -> (X, labels, t)`` defaults to biofed's features."""
    from biofed.edge.tasks import labelled_split

    devices = []
    for name, paths in files.items():
        X, labels, t = (rows or _recording_rows)(paths)
        split = labelled_split(X, labels, t, classes)
        if not split.train.any() or len(np.unique(split.y[split.train])) < len(classes):
            raise click.ClickException(f"device {name}: needs training windows of every class {list(classes)}")
        devices.append(DeviceRows(name, split.X, split.y, split.train, split.held_out))
    return devices


def plain_pipeline_rows(
    paths: Sequence[Path],
    bands=((1, 4), (4, 8), (8, 13), (13, 30), (30, 45)),
    window_s: float = 2.0,
    hop_s: float = 1.0,
):
    """The plain MNE/SciPy pipeline's rows: log10 Welch band powers of the EEG channels.

    ``mne.io.read_raw`` + ``scipy.signal.welch`` (Hann, segments of about 1 s, 50 % overlap) on
    2 s windows every 1 s, with the segment length biofed's layout uses
    (:func:`biofed.kernels.shared_nperseg`); the label of a file is its eegmat name (``_1``
    rest, ``_2`` arithmetic) or the description of its first annotation. Returns ``(X, labels, t)``.
    """
    import mne
    from scipy.signal import welch

    Xs, labels, ts = [], [], []
    offset = 0.0
    for path in paths:
        path = Path(path)
        if path.suffix.lower() == ".wav":
            continue
        raw = mne.io.read_raw(path, preload=True, verbose="error")
        picks = [
            n
            for n, kind in zip(raw.ch_names, raw.get_channel_types())
            if kind == "eeg" and not re.search(r"\bA2-A1\b|ECG", n)
        ]
        x = raw.get_data(picks=picks)
        fs = raw.info["sfreq"]
        win, hop = int(round(window_s * fs)), int(round(hop_s * fs))
        starts = np.arange(0, x.shape[1] - win + 1, hop)
        windows = np.stack([x[:, s : s + win] for s in starts])
        nperseg = shared_nperseg(hop, win, min(win, 1 << int(math.ceil(math.log2(fs)))))
        freqs, psd = welch(windows, fs, nperseg=nperseg)
        power = np.stack(
            [psd[..., (freqs >= lo) & (freqs < hi)].sum(-1) * (freqs[1] - freqs[0]) for lo, hi in bands], -1
        )
        Xs.append(np.log10(power + np.finfo(float).tiny).reshape(len(starts), -1))
        match = re.search(r"_(\d)$", path.stem)
        label = {"1": "rest", "2": "arithmetic"}.get(match[1]) if match and path.suffix.lower() == ".edf" else None
        if label is None:
            label = raw.annotations.description[0] if len(raw.annotations) else ""
        labels.append(np.full(len(starts), label))
        t = starts / fs + offset
        ts.append(t)
        offset = t.max() + 1.0
    return np.vstack(Xs), np.concatenate(labels), np.concatenate(ts)


# ----------------------------------------------------------------------------- accounting
def _ftrl_rounds_per_epoch(n_devices: int, d: Defaults) -> int:
    return math.ceil(n_devices / min(d.ftrl_devices_per_round, n_devices))


def _method_event(method: str, z: float, d: Defaults, basis: str = "none", n_devices: int = 1) -> dp_accounting.DpEvent:
    """All releases of ``method`` at noise multiplier ``z`` (every multiplier equal), with
    those of the ``basis`` projection kind (``none``, ``pca``: one release, ``class``: two)."""
    if method == "one-shot":
        events = [dp_accounting.GaussianDpEvent(z)]  # both blocks packed in one release
    elif method == "dp-ftrl":
        events = [dp_ftrl_event(z, _ftrl_rounds_per_epoch(n_devices, d), d.ftrl_epochs)]
    elif method == "fedavg-dp":
        events = [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), d.dp_rounds)]
    elif method == "central-dp":
        events = [dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), d.central_steps)]
    else:
        raise ValueError(f"{method!r} is not a private method")
    events += [dp_accounting.GaussianDpEvent(z)] * {"none": 0, "pca": 1, "class": 2}[basis]
    return dp_accounting.ComposedDpEvent(events)


def noise_multiplier_for(
    method: str, epsilon: float, delta: float, d: Defaults, basis: str = "none", n_devices: int = 1
) -> float:
    """Smallest z with epsilon(all releases of ``method``) <= ``epsilon`` at ``delta`` (0 for inf)."""
    if math.isinf(epsilon):
        return 0.0
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant("rdp", tree_aggregation=method == "dp-ftrl"),
            lambda z: _method_event(method, z, d, basis, n_devices),
            epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(0.05, 200.0),
            tol=1e-3,
        )
    )


# ----------------------------------------------------------------------------- projection
def _projection(train_sets, k: int | None, kind: str, z: float, mechanism: PrivacyMechanism | None, d: Defaults):
    """``None`` (no projection) or a (d, k) basis from the devices' training rows.

    ``pca``: top-k eigenvectors of the summed per-device correlations ``Z^T Z / n``, each
    clipped to Frobenius norm ``d.basis_clip`` and the sum released once (basis round 0,
    when ``mechanism``). ``class`` (class-aware): the summed per-device class-mean
    differences (each clipped to norm 1, released once more as basis round 1) as the first
    direction, then the top k-1 PCA directions orthogonal to it.
    """
    if kind == "none" or k is None:
        return None
    dim = train_sets[0][0].shape[1]
    gram_rows = np.stack([(X.T @ X / X.shape[0]).ravel() for X, _ in train_sets])
    if mechanism is None:
        grams = ClippedSum(gram_rows, d.basis_clip, 0.0).clipped_total()[0]
    else:
        (grams,) = mechanism.release(Charge(0, "basis", 1.0, z), ClippedSum(gram_rows, d.basis_clip, z * d.basis_clip))
    G = grams.reshape(dim, dim)
    vals, vecs = np.linalg.eigh(0.5 * (G + G.T))
    pcs = vecs[:, np.argsort(vals)[::-1]]
    if kind == "pca":
        return pcs[:, :k]
    diff_rows = np.stack([X[y == 1].mean(0) - X[y == 0].mean(0) for X, y in train_sets])
    if mechanism is None:
        diff = ClippedSum(diff_rows, 1.0, 0.0).clipped_total()[0]
    else:
        (diff,) = mechanism.release(Charge(1, "basis", 1.0, z), ClippedSum(diff_rows, 1.0, z))
    direction = diff / (np.linalg.norm(diff) + 1e-12)
    rest = pcs - np.outer(direction, direction @ pcs)
    q, _ = np.linalg.qr(np.column_stack([direction, rest[:, : k - 1]]))
    return q


# ----------------------------------------------------------------------------- methods
def _train_central(train_sets, d: Defaults, seed: int) -> np.ndarray:
    X = np.vstack([X for X, _ in train_sets])
    y = np.concatenate([y for _, y in train_sets])
    params = init_params(X.shape[1], 2)
    params, _ = train(
        params, X, y, 2, epochs=d.central_epochs, lr=0.01, optimizer="adam", l2=d.l2, batch_size=64, random_state=seed
    )
    return params


def _local_update(params, X, y, d: Defaults, rng) -> np.ndarray:
    local, _ = train(params, X, y, 2, epochs=d.local_epochs, lr=d.local_lr, batch_size=32, l2=d.l2, random_state=rng)
    return local


def _fedavg(train_sets, d: Defaults, z: float | None, mechanism: PrivacyMechanism | None, seed: int) -> np.ndarray:
    """FedAvg; with a ``mechanism`` DP-FedAvg (deltas clipped to ``dp_clip``, one Gaussian release per round)."""
    rng = np.random.default_rng(seed)
    params = init_params(train_sets[0][0].shape[1], 2)
    rounds, server_lr = (d.rounds, d.server_lr) if mechanism is None else (d.dp_rounds, d.dp_server_lr)
    for r in range(rounds):
        deltas = [_local_update(params, X, y, d, rng) - params for X, y in train_sets]
        if mechanism is None:
            total = np.sum(deltas, axis=0)
        else:
            (total,) = mechanism.release(
                Charge(r, "train", 1.0, z), ClippedSum(np.stack(deltas), d.dp_clip, z * d.dp_clip)
            )
        params = params + server_lr * total / len(train_sets)
    return params


def _dp_ftrl(train_sets, d: Defaults, z: float, mechanism: PrivacyMechanism, seed: int) -> np.ndarray:
    """DP-FTRL over a public cyclic schedule: each epoch, disjoint groups of
    ``ftrl_devices_per_round`` devices take one round each (every device once per tree)."""
    rng = np.random.default_rng(seed)
    n = len(train_sets)
    group = min(d.ftrl_devices_per_round, n)
    rounds = _ftrl_rounds_per_epoch(n, d)
    server = DPFTRL(
        init_params(train_sets[0][0].shape[1], 2),
        rounds,
        d.ftrl_epochs,
        clip=d.ftrl_clip,
        noise_multiplier=z,
        lr=d.ftrl_lr * (1.0 - d.ftrl_momentum),
        momentum=d.ftrl_momentum,
        mechanism=mechanism,
    )
    params = server.theta
    for _ in range(d.ftrl_epochs):
        for r in range(rounds):
            members = range(r * group, min((r + 1) * group, n))
            params = server.step({str(i): params - _local_update(params, *train_sets[i], d, rng) for i in members})
    return params


def _central_dp(train_sets, d: Defaults, z: float, mechanism: PrivacyMechanism) -> np.ndarray:
    from biofed.kernels.training import loss_and_grad

    params = init_params(train_sets[0][0].shape[1], 2)
    for step in range(d.central_steps):
        grads = np.stack([loss_and_grad(params, X, y, 2, l2=0.0)[1] for X, y in train_sets])
        (total,) = mechanism.release(
            Charge(step, "train", 1.0, z), ClippedSum(grads, d.central_clip, z * d.central_clip)
        )
        params = params - d.central_lr * total / len(train_sets)
    return params


def _one_shot(train_sets, d: Defaults, z: float, mechanism: PrivacyMechanism) -> np.ndarray:
    stats = [class_statistics(X, y, 2, means_clip=d.means_clip, scatter_clip=d.scatter_clip) for X, y in train_sets]
    means, scatter = release_class_statistics(
        stats, 2, means_clip=d.means_clip, scatter_clip=d.scatter_clip, noise_multiplier=z, mechanism=mechanism
    )
    return lda_from_statistics(means, scatter, d.ridge)


def fit_global(
    method: str,
    train_sets,
    d: Defaults,
    epsilon: float,
    delta: float,
    *,
    projection: str = "none",
    k: int = 32,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Train ``method`` on ``train_sets`` [(X, y) per device]; returns ``(params, basis, epsilon spent)``.

    A private method gets a fresh :class:`PrivacyMechanism` with an in-memory ledger at
    ``delta`` (a simulated run); the epsilon spent is that ledger's. At ``epsilon = inf`` it
    releases through the gate without noise (``z = 0``, epsilon spent ``inf``).
    """
    private = method in PRIVATE_METHODS and not math.isinf(epsilon)
    z = noise_multiplier_for(method, epsilon, delta, d, basis=projection, n_devices=len(train_sets)) if private else 0.0
    mechanism = PrivacyMechanism(PrivacyLedger(delta, ("rdp",))) if method in PRIVATE_METHODS else None
    with _noiseless_releases_expected() if method in PRIVATE_METHODS and not private else contextlib.nullcontext():
        basis = _projection(train_sets, k, projection, z, mechanism if private else None, d)
        sets = train_sets if basis is None else [(X @ basis, y) for X, y in train_sets]
        if method == "central":
            params = _train_central(sets, d, seed)
        elif method == "fedavg":
            params = _fedavg(sets, d, None, None, seed)
        elif method == "fedavg-dp":
            params = _fedavg(sets, d, z, mechanism, seed)
        elif method == "dp-ftrl":
            params = _dp_ftrl(sets, d, z, mechanism, seed)
        elif method == "central-dp":
            params = _central_dp(sets, d, z, mechanism)
        elif method == "one-shot":
            params = _one_shot(sets, d, z, mechanism)
        else:
            raise ValueError(f"unknown method {method!r}")
    spent = mechanism.ledger.epsilon() if mechanism is not None else math.inf
    return params, basis, spent


@contextlib.contextmanager
def _noiseless_releases_expected():
    """Silence the ledger's "ran without noise" warning: the no-DP cells of the private
    methods release with ``z = 0`` on purpose, and their epsilon is reported as inf."""

    def drop(record: logging.LogRecord) -> bool:
        return "ran without noise" not in record.getMessage()

    ledger_logger = logging.getLogger(PrivacyLedger.__module__)
    ledger_logger.addFilter(drop)
    try:
        yield
    finally:
        ledger_logger.removeFilter(drop)


def _score(params, basis, X, y) -> float:
    Xp = X if basis is None else X @ basis
    return balanced_accuracy(y, np.argmax(predict_proba(params, Xp, 2), axis=1))


# ----------------------------------------------------------------------------- report
@dataclass
class Row:
    """One table row: per-device accuracies of every repeat ``(repeats, devices)``."""

    view: str
    method: str
    epsilon: float
    variant: str
    accuracies: np.ndarray
    spent: float = math.inf
    devices: tuple[str, ...] = ()

    def summary(self, rng=None) -> dict:
        per_device = self.accuracies.mean(axis=0)
        means = self.accuracies.mean(axis=1)
        worst = self.accuracies.min(axis=1)
        rng = np.random.default_rng(0) if rng is None else rng
        boot = per_device[rng.integers(0, per_device.size, size=(2000, per_device.size))].mean(axis=1)
        return {
            "view": self.view,
            "method": self.method,
            "variant": self.variant,
            "epsilon_target": self.epsilon,
            "epsilon_spent": self.spent,
            "mean": float(per_device.mean()),
            "worst": float(per_device.min()),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "repeats": int(self.accuracies.shape[0]),
            "spread_mean_sd": float(means.std(ddof=1)) if means.size > 1 else 0.0,
            "spread_mean_range": [float(means.min()), float(means.max())],
            "spread_worst_range": [float(worst.min()), float(worst.max())],
            "per_device": dict(zip(self.devices, map(float, per_device))),
        }


@dataclass
class Evaluation:
    """Every row of one run, with the settings."""

    rows: list[Row] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def summaries(self) -> list[dict]:
        return [r.summary() for r in self.rows]

    def find(self, view: str, method: str, epsilon: float, variant: str = "none") -> dict | None:
        for r in self.rows:
            if (r.view, r.method, r.variant) == (view, method, variant) and (r.epsilon == epsilon):
                return r.summary()
        return None

    def format_table(self) -> str:
        lines = [
            f"{'view':12s} {'method':24s} {'proj':9s} {'eps':>5s} {'spent':>6s} {'mean':>6s} {'worst':>6s} "
            f"{'95% CI':>13s}  spread over repeats"
        ]
        for s in self.summaries():
            eps = "inf" if math.isinf(s["epsilon_target"]) else f"{s['epsilon_target']:g}"
            spent = "inf" if math.isinf(s["epsilon_spent"]) else f"{s['epsilon_spent']:.2f}"
            if s["repeats"] > 1:
                lo, hi = s["spread_mean_range"]
                spread = f"mean sd {s['spread_mean_sd']:.3f} [{lo:.3f}-{hi:.3f}] (n={s['repeats']})"
            else:
                spread = (
                    "single draw"
                    if s["method"].split("+")[0] in PRIVATE_METHODS and s["epsilon_spent"] != math.inf
                    else "deterministic"
                )
            lines.append(
                f"{s['view']:12s} {s['method']:24s} {s['variant']:9s} {eps:>5s} {spent:>6s} {s['mean']:6.3f} "
                f"{s['worst']:6.3f} [{s['ci95'][0]:.3f},{s['ci95'][1]:.3f}]  {spread}"
            )
        return "\n".join(lines)

    def format_tradeoff(self) -> str:
        """Accuracy against epsilon: one line per (view, private method), ``mean/worst`` per epsilon."""
        epsilons = self.settings.get("epsilons", list(EPSILONS))
        head = "".join(f"{'eps ' + ('inf' if math.isinf(e) else f'{e:g}'):>14s}" for e in epsilons)
        delta = self.settings.get("delta", 1e-5)
        lines = [
            f"privacy-utility trade-off (balanced accuracy mean/worst device, delta {delta:g}, "
            f"{self.settings.get('repeats', 1)} noise draws per private cell)",
            f"{'view':12s} {'method':24s}{head}",
        ]
        keys = []
        for r in self.rows:
            if r.method.split("+")[0] in PRIVATE_METHODS and r.variant == "none" and (r.view, r.method) not in keys:
                keys.append((r.view, r.method))
        for view, method in keys:
            cells = []
            for e in epsilons:
                s = self.find(view, method, e)
                cells.append(f"{s['mean']:.3f}/{s['worst']:.3f}" if s else "-")
            lines.append(f"{view:12s} {method:24s}" + "".join(f"{c:>14s}" for c in cells))
        return "\n".join(lines)

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(
            json.dumps({"settings": self.settings, "rows": self.summaries()}, indent=2, default=str)
        )
        (out / "evaluation.txt").write_text(self.format_table() + "\n")
        self.plot(out / "epsilon_accuracy.png")

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epsilons = self.settings.get("epsilons", list(EPSILONS))
        xs = list(range(len(epsilons)))
        colours = dict(zip(PRIVATE_METHODS, ("tab:red", "tab:orange", "tab:green", "tab:blue")))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, view in zip(axes, ("personalized", "new patient")):
            for base in PRIVATE_METHODS:
                for method, style in ((base, "-"), (f"{base}+personal", "--")):
                    ys = [(self.find(view, method, e) or {}).get("mean", np.nan) for e in epsilons]
                    if not np.all(np.isnan(ys)):
                        ax.plot(xs, ys, style, marker="o", color=colours[base], label=method)
            for method, colour, style in (("central", "k", "--"), ("plain", "k", ":"), ("local", "g", "-.")):
                s = self.find(view, method, math.inf)
                if s:
                    ax.axhline(s["mean"], color=colour, linestyle=style, label=f"{method} (no DP)")
            ax.set_xticks(xs, ["inf" if math.isinf(e) else f"{e:g}" for e in epsilons])
            ax.set_xlabel(f"per-patient epsilon (delta = {self.settings.get('delta', 1e-5):g})")
            ax.set_title(
                f"{view} (dashed: fine-tuned on the device, no privacy cost)" if view == "personalized" else view,
                fontsize=9,
            )
            ax.axhline(0.5, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="lower right")
        axes[0].set_ylabel("balanced accuracy (mean over devices)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _sklearn_rows(plain_devices: list[DeviceRows], method: str = "plain") -> tuple[Row, Row]:
    """Personalized and new-patient rows of the plain scikit-learn model (pooled
    StandardScaler + LogisticRegression) on ``plain_devices``' raw rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names = tuple(dev.name for dev in plain_devices)
    X = np.vstack([dev.X[dev.train] for dev in plain_devices])
    y = np.concatenate([dev.y[dev.train] for dev in plain_devices])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(X, y)
    personal = [balanced_accuracy(dev.y[dev.held_out], model.predict(dev.X[dev.held_out])) for dev in plain_devices]
    loso = []
    for i, dev in enumerate(plain_devices):
        others = [o for j, o in enumerate(plain_devices) if j != i]
        Xo = np.vstack([o.X[o.train] for o in others])
        yo = np.concatenate([o.y[o.train] for o in others])
        m = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(Xo, yo)
        loso.append(balanced_accuracy(dev.y, m.predict(dev.X)))
    return (
        Row("personalized", method, math.inf, "none", np.array([personal]), devices=names),
        Row("new patient", method, math.inf, "none", np.array([loso]), devices=names),
    )


def run_evaluation(
    devices: list[DeviceRows],
    *,
    plain_devices: list[DeviceRows] | None = None,
    epsilons: Sequence[float] = EPSILONS,
    delta: float = 1e-5,
    repeats: int = 3,
    methods: Sequence[str] = ("one-shot", "dp-ftrl", "fedavg-dp", "central-dp"),
    variants: Sequence[tuple[str, int]] = (("none", 0),),
    private_variants: Sequence[tuple[str, int]] = (("none", 0),),
    defaults: Defaults = Defaults(),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Every method, both views, on ``devices``; private rows repeated ``repeats`` times.

    ``variants`` are the projections (``(kind, k)``, kind ``none``/``pca``/``class``) the
    centralized non-private model is run with; ``private_variants`` those of every private
    method (their basis releases are charged and counted in the epsilon).
    """
    if len(devices) < 2:
        raise click.ClickException("the evaluation needs at least 2 devices (the new-patient view leaves one out)")
    say = progress or (lambda _msg: None)
    names = tuple(dev.name for dev in devices)
    personal = [dev.personal_view() for dev in devices]
    train_sets = [(X[dev.train], y[dev.train]) for dev, (X, y) in zip(devices, personal)]
    unseen = [dev.new_patient_view() for dev in devices]
    evaluation = Evaluation(
        settings={
            "epsilons": list(epsilons),
            "delta": delta,
            "repeats": repeats,
            "devices": list(names),
            "defaults": defaults.__dict__,
            "variants": [list(v) for v in variants],
            "private_variants": [list(v) for v in private_variants],
        }
    )
    rows = evaluation.rows

    # local-only: each device alone
    local = []
    for dev, (X, y) in zip(devices, personal):
        params = _train_central([(X[dev.train], y[dev.train])], defaults, seed)
        local.append(_score(params, None, X[dev.held_out], y[dev.held_out]))
    rows.append(Row("personalized", "local", math.inf, "none", np.array([local]), devices=names))

    def run(method: str, epsilon: float, variant: str, k: int, n_repeats: int, with_personal: bool) -> None:
        say(f"{method} eps={epsilon} projection={variant}{k or ''}")
        acc_p, acc_pp, acc_n, spent = [], [], [], math.inf
        for r in range(n_repeats):
            params, basis, spent = fit_global(
                method, train_sets, defaults, epsilon, delta, projection=variant, k=k, seed=seed + r
            )
            acc_p.append(
                [_score(params, basis, X[dev.held_out], y[dev.held_out]) for dev, (X, y) in zip(devices, personal)]
            )
            if with_personal:
                row = []
                for i, (dev, (X, y)) in enumerate(zip(devices, personal)):
                    Xp = X if basis is None else X @ basis
                    own = personalize(
                        params,
                        Xp[dev.train],
                        y[dev.train],
                        2,
                        epochs=defaults.personal_epochs,
                        lr=defaults.personal_lr,
                        prox_mu=defaults.personal_prox,
                        random_state=seed + r + i,
                    )
                    row.append(_score(own, None, Xp[dev.held_out], y[dev.held_out]))
                acc_pp.append(row)
            fold = []
            for i, dev in enumerate(devices):
                others = train_sets[:i] + train_sets[i + 1 :]
                p_i, b_i, _ = fit_global(
                    method, others, defaults, epsilon, delta, projection=variant, k=k, seed=seed + r
                )
                fold.append(_score(p_i, b_i, unseen[i], dev.y))
            acc_n.append(fold)
        label = variant if variant == "none" else f"{variant}{k}"
        rows.append(Row("personalized", method, epsilon, label, np.array(acc_p), spent, names))
        if with_personal:
            rows.append(Row("personalized", f"{method}+personal", epsilon, label, np.array(acc_pp), spent, names))
        rows.append(Row("new patient", method, epsilon, label, np.array(acc_n), spent, names))

    for variant, k in variants:
        run("central", math.inf, variant, k, 1, False)
    run("fedavg", math.inf, "none", 0, 1, False)
    for method in methods:
        for variant, k in private_variants:
            for epsilon in epsilons:
                run(method, epsilon, variant, k, 1 if math.isinf(epsilon) else repeats, True)
    if plain_devices is not None:
        rows.extend(_sklearn_rows(plain_devices, "plain"))
        rows.extend(_sklearn_rows(devices, "biofed-features+sklearn"))
    return evaluation


def tune(
    devices: list[DeviceRows],
    method: str,
    grid: Mapping[str, Sequence],
    *,
    epsilon: float = 8.0,
    delta: float = 1e-5,
    repeats: int = 3,
    base: Defaults = Defaults(),
    seed: int = 0,
) -> list[tuple[dict, float]]:
    """Leave-one-subject-out CV of ``method`` over every combination of ``grid`` (Defaults
    fields, plus ``projection`` and ``k`` as :func:`fit_global` takes them).

    Only training windows are used: each fold trains on the other devices' training rows and
    scores the left-out device's training rows, z-scored with their own statistics. The
    held-out windows of the evaluation are never seen. Returns ``(settings, mean balanced
    accuracy over folds and repeats)`` sorted best first.
    """
    import dataclasses
    import itertools

    personal = [dev.personal_view() for dev in devices]
    train_sets = [(X[dev.train], y[dev.train]) for dev, (X, y) in zip(devices, personal)]
    calibrated = [device_standardization(dev.X[dev.train]) for dev in devices]
    unseen = [((dev.X[dev.train] - m) / sc, dev.y[dev.train]) for dev, (m, sc) in zip(devices, calibrated)]
    keys = list(grid)
    results = []
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = dict(zip(keys, values))
        fields = {key: value for key, value in settings.items() if key not in ("projection", "k")}
        projection, k = settings.get("projection", "none"), settings.get("k", 32)
        d = dataclasses.replace(base, **fields)
        scores = []
        for r in range(repeats if method in PRIVATE_METHODS and not math.isinf(epsilon) else 1):
            for i in range(len(devices)):
                params, basis, _ = fit_global(
                    method,
                    train_sets[:i] + train_sets[i + 1 :],
                    d,
                    epsilon,
                    delta,
                    projection=projection,
                    k=k,
                    seed=seed + r,
                )
                scores.append(_score(params, basis, *unseen[i]))
        results.append((settings, float(np.mean(scores))))
    return sorted(results, key=lambda item: -item[1])


def targets(evaluation: Evaluation, method: str, epsilon: float = 8.0) -> list[tuple[str, float, str, float]]:
    """The utility targets as ``(name, measured, op, threshold)`` for ``method`` at ``epsilon``."""
    out = []
    pers = evaluation.find("personalized", f"{method}+personal", epsilon)
    if pers:
        out.append((f"personalized mean ({method}+personal, eps {epsilon:g})", pers["mean"], ">=", 0.77))
        out.append((f"personalized worst device ({method}+personal, eps {epsilon:g})", pers["worst"], ">=", 0.60))
    new = evaluation.find("new patient", method, epsilon)
    central_new = evaluation.find("new patient", "central", math.inf)
    if new and central_new:
        out.append(
            (f"new patient ({method}, eps {epsilon:g}) / central no-DP", new["mean"] / central_new["mean"], ">=", 0.90)
        )
    fed, central = (
        evaluation.find("personalized", "fedavg", math.inf),
        evaluation.find("personalized", "central", math.inf),
    )
    if fed and central:
        out.append(("no DP: fedavg / central (personalized)", fed["mean"] / central["mean"], ">=", 0.98))
    plain = evaluation.find("personalized", "plain", math.inf)
    ours = evaluation.find("personalized", "biofed-features+sklearn", math.inf)
    if plain and ours:
        out.append(
            (
                "features: |biofed features - plain pipeline features|, same sklearn model (personalized)",
                abs(ours["mean"] - plain["mean"]),
                "<=",
                0.02,
            )
        )
    return out


def format_targets(rows) -> str:
    lines = []
    for name, measured, op, threshold in rows:
        ok = measured >= threshold if op == ">=" else measured <= threshold
        lines.append(f"  [{'met' if ok else 'MISSED'}] {name}: {measured:.3f} (goal {op} {threshold:g})")
    return "\n".join(lines)


def devices_from_data(data: Path) -> dict[str, list[Path]]:
    from biofed.apps.demo import eegmat_devices

    files = eegmat_devices(data)
    if len(files) < 2:
        raise click.ClickException(
            f"{data}: needs eegmat SubjectNN_1.edf / SubjectNN_2.edf pairs of at least 2 subjects"
        )
    return files


def _parse_epsilons(text: str) -> tuple[float, ...]:
    try:
        values = tuple(math.inf if v.strip().lower() in ("inf", "infinity") else float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers or 'inf', got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise click.BadParameter(f"every epsilon must be > 0, got {text!r}")
    return values


@click.command(
    "evaluate",
    epilog=examples(
        "biofed evaluate --data /work/shared/datasets/eegmat",
        "biofed evaluate --data eegmat --epsilons 1,8,inf --repeats 5 --out eval-eegmat",
    ),
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Folder of eegmat recordings (SubjectNN_1.edf rest, SubjectNN_2.edf arithmetic); one device per subject.",
)
@click.option("--epsilons", default="1,2,4,8,inf", show_default=True, help="Per-patient epsilons to evaluate.")
@click.option(
    "--delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=1e-5, show_default=True
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Independent privacy-noise draws per private row (the spread is printed).",
)
@click.option("--methods", default=",".join(PRIVATE_METHODS), show_default=True, help="Private methods to run.")
@click.option(
    "--projections",
    default="none,pca32,class32,pca64",
    show_default=True,
    help="Projection variants of the centralized non-private model (none, pcaK, classK).",
)
@click.option(
    "--private-projections",
    default="none",
    show_default=True,
    help="Projection variants of every private method (their basis releases are charged).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("biofed-evaluation"),
    show_default=True,
    help="Report folder (evaluation.json, epsilon_accuracy.png).",
)
@click.option(
    "--tune",
    "tune_grid",
    default=None,
    metavar="JSON",
    help="Instead of evaluating, tune each of --methods at the first of --epsilons by leave-one-subject-out "
    "CV on training windows only, over a grid of Defaults fields (plus projection, k), e.g. "
    '\'{"ridge": [1, 10], "scatter_clip": [null, 10]}\'.',
)
def evaluate_command(data, epsilons, delta, repeats, methods, projections, private_projections, out, tune_grid):
    """Evaluate every method and baseline on the same rows: both views, mean, worst device, CI, spread."""
    methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    _check_methods(methods)
    if tune_grid is not None:
        try:
            grid = json.loads(tune_grid)
            fields = set(Defaults.__dataclass_fields__) | {"projection", "k"}
            if (
                not isinstance(grid, dict)
                or not grid
                or set(grid) - fields
                or not all(isinstance(v, list) and v for v in grid.values())
            ):
                raise ValueError
        except ValueError:
            raise click.BadParameter(
                f"--tune needs a JSON object of non-empty lists keyed by {sorted(fields)}, got {tune_grid!r}"
            ) from None
        devices = load_devices(devices_from_data(data))
        epsilon = _parse_epsilons(epsilons)[0]
        for method in methods:
            click.echo(
                f"{method}: leave-one-subject-out CV on training windows at epsilon {epsilon:g}, {repeats} draws"
            )
            for settings, score in tune(devices, method, grid, epsilon=epsilon, delta=delta, repeats=repeats):
                click.echo(f"  {score:.3f}  {json.dumps(settings)}")
        return None
    result = evaluate_folder(
        data,
        epsilons=_parse_epsilons(epsilons),
        delta=delta,
        repeats=repeats,
        methods=methods,
        variants=_parse_variants(projections),
        private_variants=_parse_variants(private_projections),
        out=out,
        echo=click.echo,
    )
    click.echo(f"written: {out / 'evaluation.json'}, {out / 'epsilon_accuracy.png'}")
    return result


def _parse_variants(text: str) -> tuple[tuple[str, int], ...]:
    variants = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        match = re.fullmatch(r"(none|pca|class)(\d*)", item)
        if not match or (match[1] != "none" and not match[2]):
            raise click.BadParameter(f"projection variants are none, pcaK or classK (e.g. pca32), got {item!r}")
        variants.append((match[1], int(match[2] or 0)))
    return tuple(variants)


def _check_methods(methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in PRIVATE_METHODS]
    if unknown or not methods:
        raise click.BadParameter(f"unknown method(s) {unknown or methods}; choose from {list(PRIVATE_METHODS)}")


def evaluate_folder(data: Path, **kwargs) -> Evaluation:
    """:func:`evaluate_files` on the eegmat subjects of ``data``."""
    return evaluate_files(devices_from_data(data), **kwargs)


def evaluate_files(
    files: Mapping[str, Sequence[Path]],
    *,
    epsilons=EPSILONS,
    delta: float = 1e-5,
    repeats: int = 3,
    methods: Sequence[str] = PRIVATE_METHODS,
    variants=(("none", 0),),
    private_variants=(("none", 0),),
    out: Path | None = None,
    echo: Callable[[str], None] = print,
) -> Evaluation:
    """Load every device's recordings, run :func:`run_evaluation`, print the tables and the
    targets, and write ``evaluation.json``, ``evaluation.txt`` and ``epsilon_accuracy.png`` to ``out``."""
    _check_methods(methods)
    echo(f"evaluation: {len(files)} devices; extracting features (biofed and the plain MNE/SciPy pipeline) ...")
    devices = load_devices(files)
    plain = load_devices(files, rows=plain_pipeline_rows)
    evaluation = run_evaluation(
        devices,
        plain_devices=plain,
        epsilons=epsilons,
        delta=delta,
        repeats=repeats,
        methods=methods,
        variants=variants,
        private_variants=private_variants,
    )
    echo(evaluation.format_table())
    echo("")
    echo(evaluation.format_tradeoff())
    if DEFAULT_METHOD in methods and 8.0 in epsilons:
        echo(f"targets (default method {DEFAULT_METHOD}):\n" + format_targets(targets(evaluation, DEFAULT_METHOD, 8.0)))
    if out is not None:
        evaluation.write(out)
    return evaluation
