"""The device's answers to federated tasks: pure functions from (task, local data) to payloads.

With ``X`` the device's raw training rows (labels in ``Task.classes``, minus the held-out
windows of :func:`biofed.edge.split.holdout_split`), every statistic and update is clipped to
L2 norm ``Task.clip_norm`` by the ``release`` the caller passes (the device's release gate,
:class:`DeviceRelease`):

``moments``     :func:`sketch_reply`: sketch of ``concat(mean(X, 0), mean(X**2, 0))``.
``covariance``  :func:`sketch_reply`: sketch of ``(Z.T @ Z / n).ravel()``,
                ``Z = (X - stats_mean) / stats_scale``; a task without ``stats_mean`` asks for
                *device standardization*: ``Z = (X - m) / s`` with the mean and scale of the
                device's own training rows (:meth:`LocalData.standardization`; they never
                leave the device).
``statistics``  :func:`statistics_reply`: sketch of the packed class means and within-class
                scatter of the training rows projected onto the basis
                (:func:`biofed.edge.statistics.class_statistics`, each block clipped to the
                task's ``means_clip`` / ``scatter_clip``; :mod:`biofed.protocol.statistics`),
                L2 norm <= 1 = ``clip_norm``.
``train``       :func:`train_reply`: project the training and held-out rows onto the basis,
                measure the balanced accuracy of the incoming model on the held-out rows, train
                locally (``local_training``, FedProx centre = incoming model),
                ``delta = new - model``, release it, and build an
                :class:`~biofed.protocol.Update` with metrics (loss, windows, the device's
                :class:`DeviceUsage`). A distributed-mode delta is not released here: it
                travels only masked (:mod:`biofed.edge.secure_aggregation`), so the update
                carries an empty delta and :attr:`TrainReply.raw_delta` goes to secure
                aggregation.
``evaluate``    :func:`evaluate_reply`: an Update with an empty delta, ``n_examples = 0`` and
                the evaluation metrics (``loss`` is then the held-out cross-entropy; in central
                mode also the held-out accuracy of the device's personal model).

:func:`personal_model` fine-tunes a global model on the device's own training windows
(:func:`biofed.edge.statistics.personalize`). The personal model never leaves the device;
only in central trust mode does its held-out balanced accuracy travel, in the evaluation
metrics, beside the global model's.

Outside ``"central"`` trust mode the coordinator is the adversary: nothing data-dependent
travels in cleartext (``n_examples``, ``clipped``, ``norm_bit`` and every metric are zero or
absent).

A task the device cannot answer raises :class:`TaskRefused`; the caller logs it and sends
nothing. No function here touches the store, the network, a clock or a random generator of
its own: the caller passes the data, the release gate, the local training step and the
resource usage.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import numpy as np

from biofed.edge.split import balanced_accuracy, device_standardization, holdout_split, row_blocks
from biofed.edge.statistics import class_statistics, personalize
from biofed.kernels import clip_l2, dp_sgd, n_params, predict_proba, project, train
from biofed.privacy_mechanism import Charge, ClippedSum, PrivacyMechanism
from biofed.protocol import BASIS_PHASES, Basis, Sketch, Task, Update, UpdateMetrics
from biofed.protocol.statistics import pack_statistics

__all__ = [
    "Admission",
    "DeviceRelease",
    "DeviceUsage",
    "EvaluateReply",
    "HeldOutMetrics",
    "LocalData",
    "LocalTraining",
    "PersonalModel",
    "Release",
    "SketchReply",
    "TaskRefused",
    "TrainReply",
    "admit",
    "check_model_size",
    "evaluate_reply",
    "held_out_metrics",
    "labelled_split",
    "personal_model",
    "project_rows",
    "sketch_reply",
    "statistics_reply",
    "train_locally",
    "train_reply",
    "update_metrics",
]

Release = Callable[[Task, np.ndarray, str], np.ndarray]
"""``release(task, vector, kind)``: ``vector`` clipped to ``task.clip_norm`` (and noised and
charged where the trust mode asks for it); ``kind`` is ``"basis"``, ``"statistics"`` or
``"train"``."""

LocalTraining = Callable[[Task, np.ndarray, np.ndarray], tuple[np.ndarray, float]]
"""``local_training(task, Z, y)``: ``(new params, loss)`` of local training from ``task.model``
on the projected training rows ``Z`` (n, k) with labels ``y`` (n,)."""


class Admission(enum.Enum):
    """What a device does with a task (:func:`admit`)."""

    ANSWER = "answer"
    """Answer it now."""
    EXPIRED = "expired"
    """Its deadline has passed."""
    NOT_SELECTED = "not selected"
    """It lists participants, and this device is not one of them."""
    ANSWERED = "answered"
    """Its round and phase were answered already (a new message id for the same task)."""
    WAIT_FOR_BASIS = "wait for basis"
    """It is for a basis this device does not have yet: keep it until the basis arrives."""
    STALE_BASIS = "stale basis"
    """It is for an older basis than this device's: refused."""


def admit(
    task: Task, *, device_id: str, now: float, answered: Container[tuple[int, str]], basis_version: int | None
) -> Admission:
    """Whether device ``device_id`` answers ``task`` at Unix time ``now``, having answered the
    ``(round, phase)`` pairs in ``answered`` and holding basis ``basis_version`` (None: none).

    The basis phases (``moments``, ``covariance``) need no basis; ``train`` and ``evaluate``
    need the task's.

    Examples
    --------
    >>> import numpy as np
    >>> task = Task(round=3, model=np.empty(0), basis_version=2, classes=("a", "b"), deadline=100.0)
    >>> admit(task, device_id="pi-01", now=50.0, answered=set(), basis_version=1)
    <Admission.WAIT_FOR_BASIS: 'wait for basis'>
    >>> admit(task, device_id="pi-01", now=150.0, answered=set(), basis_version=2)
    <Admission.EXPIRED: 'expired'>
    """
    if task.deadline <= now:
        return Admission.EXPIRED
    if task.participants and device_id not in task.participants:
        return Admission.NOT_SELECTED
    if (task.round, task.phase) in answered:
        return Admission.ANSWERED
    if task.phase in BASIS_PHASES or basis_version == task.basis_version:
        return Admission.ANSWER
    if basis_version is None or task.basis_version > basis_version:
        return Admission.WAIT_FOR_BASIS
    return Admission.STALE_BASIS


def train_locally(
    task: Task,
    Z: np.ndarray,
    y: np.ndarray,
    *,
    random_state: np.random.Generator,
    record_dp=None,
    record_gate: PrivacyMechanism | None = None,
) -> tuple[np.ndarray, float]:
    """``(new params, loss)`` of local training from ``task.model`` on projected rows ``Z`` (n, k)
    with labels ``y`` (n,): minibatch SGD/Adam with the task's settings (FedProx centre = the
    incoming model), or, with ``record_dp`` (a device's ``[dp]`` section whose
    ``record_noise_multiplier`` is set), record-level DP-SGD of ``ceil(local_epochs / q)``
    Poisson-sampled steps, each noised gradient sum released and charged by ``record_gate``.
    ``random_state`` drives the minibatch shuffles and the sampling only."""
    common = dict(
        lr=task.lr,
        optimizer=task.optimizer,
        l2=task.l2,
        prox_mu=task.prox_mu,
        prox_center=task.model if task.prox_mu > 0 else None,
        random_state=random_state,
    )
    if record_dp is None or record_dp.record_noise_multiplier is None:
        return train(
            task.model,
            Z,
            y,
            len(task.classes),
            task.hidden,
            epochs=task.local_epochs,
            batch_size=task.batch_size,
            **common,
        )
    z, clip, q = record_dp.record_noise_multiplier, record_dp.record_clip_norm, record_dp.record_sampling_rate

    def release(grads: np.ndarray) -> np.ndarray:
        return record_gate.release(Charge(len(record_gate.ledger), "train", q, z), ClippedSum(grads, clip, z * clip))[0]

    params, loss = dp_sgd(
        task.model,
        Z,
        y,
        len(task.classes),
        task.hidden,
        steps=math.ceil(task.local_epochs / q),
        sampling_rate=q,
        release=release,
        **common,
    )
    return params, 0.0 if math.isnan(loss) else loss


class DeviceRelease:
    """The device's release gate, a :data:`Release`.

    In ``"local"`` and ``"distributed"`` trust modes the coordinator is the adversary: a
    vector is clipped to ``task.clip_norm``, noised with ``N(0, (z C)^2)`` and charged to the
    ledger of ``mechanism`` (durably, when the mechanism persists it) before it is returned.
    In ``"central"`` mode the device only clips: the coordinator's mechanism noises and charges.

    Examples
    --------
    >>> import numpy as np
    >>> from biofed.privacy_ledger import PrivacyLedger
    >>> release = DeviceRelease(PrivacyMechanism(PrivacyLedger(1e-5, ("rdp",))))
    >>> task = Task(round=1, model=np.empty(0), basis_version=0, classes=("a", "b"), deadline=0.0,
    ...             phase="moments", clip_norm=1.0)
    >>> release(task, np.array([0.0, 2.0]), "basis").tolist()  # central mode: clipped only
    [0.0, 1.0]
    """

    def __init__(self, mechanism: PrivacyMechanism) -> None:
        self.mechanism = mechanism

    def __call__(self, task: Task, vector: np.ndarray, kind: str) -> np.ndarray:
        if task.trust_mode == "central":
            return clip_l2(vector, task.clip_norm)[0]
        (noised,) = self.mechanism.release(
            self.charge(task, kind), ClippedSum(vector, task.clip_norm, task.noise_multiplier * task.clip_norm)
        )
        return noised

    def charge(self, task: Task, kind: str) -> Charge:
        """The ledger entry of a release answering ``task``. Entries are numbered by the
        device's own release count (a new coordinator state restarts the task round numbers;
        the device's ledger spans every coordinator it ever answered)."""
        return Charge(len(self.mechanism.ledger), kind, 1.0, task.noise_multiplier)


class TaskRefused(Exception):
    """A task the device cannot answer; the message says why and ``level`` how loudly to log it."""

    def __init__(self, message: str, level: int = logging.WARNING) -> None:
        super().__init__(message)
        self.level = level


@dataclass(frozen=True)
class LocalData:
    """The device's labelled windows of the task's classes, split for training and evaluation.

    ``X`` (N, d) raw rows, ``y`` (N,) class indices into ``Task.classes``, ``train`` and
    ``held_out`` (N,) disjoint boolean masks. The tasks read the training and held-out rows
    through the masks, block by block (:func:`~biofed.edge.split.row_blocks`), so ``X`` is the
    only (N, d) array a task holds.
    """

    X: np.ndarray
    y: np.ndarray
    train: np.ndarray
    held_out: np.ndarray

    def standardization(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, scale)`` of the training rows (:func:`biofed.edge.split.device_standardization`):
        what a device of a ``standardization = "device"`` fleet z-scores every row with."""
        return device_standardization(self.X, self.train)


def labelled_split(X: np.ndarray, labels: np.ndarray, t: np.ndarray, classes: Sequence[str]) -> LocalData:
    """Keep the rows labelled with one of ``classes`` and split them with :func:`holdout_split`.

    ``X`` (N, d), ``labels`` (N,) str and ``t`` (N,) as :meth:`FeatureStore.read
    <biofed.edge.store.FeatureStore.read>` returns them. The one place where a device's stored
    rows become training and held-out sets (the demo's centralized baseline calls it on each
    device's store too). When every row is of the classes (a store read of those classes),
    ``LocalData.X`` is ``X`` itself, not a copy.

    Examples
    --------
    >>> import numpy as np
    >>> data = labelled_split(np.arange(12.0).reshape(6, 2), np.array(["a", "b", "", "a", "b", "a"]),
    ...                       np.arange(6.0), ("a", "b"))
    >>> data.y.tolist(), data.held_out.tolist()
    ([0, 1, 0, 1, 0], [False, False, False, True, True])
    """
    index = {name: i for i, name in enumerate(classes)}
    keep = np.array([label in index for label in labels], dtype=bool)
    if not keep.all():
        X, labels, t = X[keep], labels[keep], t[keep]
    y = np.array([index[label] for label in labels], dtype=np.int64)
    train_mask, held_out = holdout_split(labels, t)
    return LocalData(X, y, train_mask, held_out)


@dataclass(frozen=True)
class DeviceUsage:
    """Resources the device reports with a central-mode update: resident memory, CPU seconds
    of the task, MQTT payload bytes sent and received so far."""

    rss_bytes: int = 0
    cpu_time_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class HeldOutMetrics:
    """The incoming model on the held-out rows: balanced accuracy and mean cross-entropy
    (None without held-out rows) and the number of held-out windows."""

    accuracy: float | None = None
    windows: int = 0
    loss: float | None = None


@dataclass(frozen=True)
class SketchReply:
    """What :func:`sketch_reply` computed: the ``sketch`` to publish, the L2 ``norm`` of the
    unreleased statistic and the number of training windows it summarizes."""

    sketch: Sketch
    norm: float
    n_windows: int


@dataclass(frozen=True)
class TrainReply:
    """What :func:`train_reply` computed: the ``update`` to publish, the unreleased
    ``raw_delta`` and its L2 ``norm``, the training ``loss``, the number of training windows
    and the held-out metrics of the incoming model."""

    update: Update
    raw_delta: np.ndarray
    norm: float
    loss: float
    n_windows: int
    held_out: HeldOutMetrics


@dataclass(frozen=True)
class EvaluateReply:
    """What :func:`evaluate_reply` computed: the ``update`` to publish and the held-out metrics."""

    update: Update
    held_out: HeldOutMetrics


def _central(task: Task) -> bool:
    return task.trust_mode == "central"


def sketch_reply(task: Task, data: LocalData, release: Release) -> SketchReply:
    """The ``moments`` or ``covariance`` :class:`~biofed.protocol.Sketch` of the training rows.

    Raises
    ------
    TaskRefused
        No training windows of the task's classes, or a ``stats_mean`` whose width is not the
        device's.
    """
    n = int(np.count_nonzero(data.train))
    if n == 0:
        raise TaskRefused(
            f"no training windows of classes {task.classes}; cannot answer the {task.phase} phase of round {task.round}"
        )
    d = data.X.shape[1]
    if task.phase == "moments":
        sums = np.zeros(2 * d)
        for X in row_blocks(data.X, data.train):
            sums[:d] += X.sum(axis=0)
            sums[d:] += np.einsum("ij,ij->j", X, X)
        statistic = sums / n
    else:
        if task.stats_mean is None:  # device standardization: this device's own statistics
            mean, scale = data.standardization()
        elif task.stats_mean.shape != (d,):
            raise TaskRefused(
                f"covariance task of round {task.round} has stats_mean of shape {task.stats_mean.shape}, "
                f"this device has {d} features; refused",
                logging.ERROR,
            )
        else:
            mean, scale = task.stats_mean, task.stats_scale
        scatter = np.zeros((d, d))
        for X in row_blocks(data.X, data.train):
            Z = X - mean
            Z /= scale
            scatter += Z.T @ Z
        statistic = (scatter / n).ravel()
    norm = float(np.linalg.norm(statistic))
    released = release(task, statistic, "basis")
    sketch = Sketch(
        round=task.round,
        basis_version=task.basis_version,
        phase=task.phase,
        statistic=released,
        clipped=_central(task) and norm > task.clip_norm,
        n_features=d,
    )
    return SketchReply(sketch, norm, n)


def project_rows(X: np.ndarray, basis: Basis, data: LocalData | None, rows: np.ndarray | None = None) -> np.ndarray:
    """Standardize raw rows ``X`` (N, d) and project them onto ``basis``: (n, k).

    With a ``standardization="device"`` basis (mean 0, scale 1) the rows are z-scored with the
    statistics of ``data``'s training rows (the same for training, held-out and live rows).
    ``rows`` (N,) bool selects the rows to project (n of them; all when None), block by block
    without copying them.
    """
    if basis.standardization == "device":
        mean, scale = data.standardization()
    else:
        mean, scale = basis.mean, basis.scale
    if rows is None:
        return project(X, basis.components, mean=mean, scale=scale)
    dtype = np.float32 if X.dtype == np.float32 else np.float64  # project's output dtype
    Z = np.empty((int(np.count_nonzero(rows)), basis.components.shape[0]), dtype=dtype)
    start = 0
    for block in row_blocks(X, rows):
        if block.shape[0]:
            Z[start : start + block.shape[0]] = project(block, basis.components, mean=mean, scale=scale)
            start += block.shape[0]
    return Z


def check_model_size(task: Task, basis: Basis) -> None:
    """Raise :class:`TaskRefused` unless ``task.model`` has the parameter count of the task's
    architecture on ``basis``."""
    k = basis.components.shape[0]
    expected = n_params(k, len(task.classes), task.hidden)
    if task.model.shape[0] != expected:
        raise TaskRefused(
            f"round {task.round} model has {task.model.shape[0]} parameters, expected {expected} for "
            f"k={k}, {len(task.classes)} classes, hidden={task.hidden}; refused",
            logging.ERROR,
        )


def held_out_metrics(task: Task, basis: Basis, data: LocalData) -> HeldOutMetrics:
    """Balanced accuracy, windows and mean cross-entropy of ``task.model`` on the held-out rows."""
    return _held_out_metrics(task.model, len(task.classes), task.hidden, basis, data)


def _held_out_metrics(params: np.ndarray, n_classes: int, hidden: int, basis: Basis, data: LocalData) -> HeldOutMetrics:
    if not data.held_out.any():
        return HeldOutMetrics()
    Z = project_rows(data.X, basis, data, data.held_out)
    y = data.y[data.held_out]
    proba = predict_proba(params, Z, n_classes, hidden)
    accuracy = balanced_accuracy(y, proba.argmax(axis=1))
    loss = float(-np.mean(np.log(np.maximum(proba[np.arange(y.size), y], 1e-300))))
    return HeldOutMetrics(accuracy, int(y.size), loss)


def update_metrics(
    task: Task,
    loss: float,
    n_windows: int,
    held_out: HeldOutMetrics,
    usage: Callable[[], DeviceUsage],
    personal: HeldOutMetrics | None = None,
) -> UpdateMetrics:
    """The metrics of an update: all zero outside central mode (data-dependent cleartext must
    not reach the coordinator there, so ``usage`` is not even measured). ``personal``: the
    held-out metrics of the device's personal model (sent in central mode only)."""
    if not _central(task):
        return UpdateMetrics(loss=0.0, n_windows=0, rss_bytes=0, cpu_time_s=0.0)
    measured = usage()
    return UpdateMetrics(
        loss=loss,
        n_windows=n_windows,
        rss_bytes=measured.rss_bytes,
        cpu_time_s=measured.cpu_time_s,
        bytes_sent=measured.bytes_sent,
        bytes_received=measured.bytes_received,
        eval_balanced_accuracy=held_out.accuracy,
        eval_windows=held_out.windows,
        personal_balanced_accuracy=None if personal is None else personal.accuracy,
    )


def train_reply(
    task: Task,
    data: LocalData,
    basis: Basis,
    *,
    local_training: LocalTraining,
    release: Release,
    usage: Callable[[], DeviceUsage],
) -> TrainReply:
    """Evaluate the incoming model on the held-out rows, train locally, release the delta.

    ``basis`` must be the task's (``basis.version == task.basis_version``). In distributed
    trust mode the update's delta is empty and ``release`` is not called: the caller
    secure-aggregates :attr:`TrainReply.raw_delta`.

    Raises
    ------
    TaskRefused
        A model of the wrong size, or no training windows of the task's classes.
    """
    check_model_size(task, basis)
    if not data.train.any():
        raise TaskRefused(f"no training windows of classes {task.classes} for round {task.round}")
    held_out = held_out_metrics(task, basis, data)
    Z = project_rows(data.X, basis, data, data.train)
    y = data.y[data.train]
    params, loss = local_training(task, Z, y)
    raw_delta = params - task.model
    norm = float(np.linalg.norm(raw_delta))
    central = _central(task)
    if task.trust_mode == "distributed":
        delta = np.empty(0, dtype=np.float64)
    else:
        delta = release(task, raw_delta, "train")
    update = Update(
        round=task.round,
        basis_version=task.basis_version,
        delta=delta,
        n_examples=int(y.size) if central else 0,
        clipped=central and norm > task.clip_norm,
        norm_bit=int(norm <= task.clip_norm) if task.adaptive_clipping and central else None,
        metrics=update_metrics(task, loss, int(y.size), held_out, usage),
    )
    return TrainReply(update, raw_delta, norm, loss, int(y.size), held_out)


def evaluate_reply(
    task: Task,
    data: LocalData,
    basis: Basis,
    usage: Callable[[], DeviceUsage],
    personal: HeldOutMetrics | None = None,
) -> EvaluateReply:
    """The evaluate-phase :class:`~biofed.protocol.Update`: no delta, the held-out metrics
    (with ``personal``, the personal model's too: central mode only, as every metric).

    Raises
    ------
    TaskRefused
        A model of the wrong size, or no held-out windows.
    """
    check_model_size(task, basis)
    held_out = held_out_metrics(task, basis, data)
    if held_out.accuracy is None:
        raise TaskRefused(f"no held-out windows to evaluate round {task.round} on")
    update = Update(
        round=task.round,
        basis_version=task.basis_version,
        delta=np.empty(0, dtype=np.float64),
        n_examples=0,
        clipped=False,
        metrics=update_metrics(task, held_out.loss, held_out.windows, held_out, usage, personal),
    )
    return EvaluateReply(update, held_out)


def statistics_reply(task: Task, data: LocalData, basis: Basis, release: Release) -> SketchReply:
    """The ``statistics`` :class:`~biofed.protocol.Sketch`: this device's class means and
    (with ``task.scatter_clip > 0``) within-class scatter of its training rows projected onto
    ``basis``, each clipped to its bound, packed into one vector of L2 norm <= 1
    (:mod:`biofed.protocol.statistics`) and released through ``release`` (kind
    ``"statistics"``). ``SketchReply.norm`` is the packed norm before release.

    Raises
    ------
    TaskRefused
        No training windows, or a class of the task without any training window here (the
        device cannot contribute its class means).
    """
    if not data.train.any():
        raise TaskRefused(f"no training windows of classes {task.classes} for the statistics of round {task.round}")
    Z = project_rows(data.X, basis, data, data.train)
    y = data.y[data.train]
    scatter_clip = task.scatter_clip or None
    try:
        stats = class_statistics(Z, y, len(task.classes), means_clip=task.means_clip, scatter_clip=scatter_clip)
    except ValueError as exc:
        raise TaskRefused(f"cannot answer the statistics phase of round {task.round}: {exc}") from None
    vector = pack_statistics(stats.means, stats.scatter, task.means_clip, scatter_clip)
    blocks = [np.linalg.norm(stats.means) / task.means_clip]
    if scatter_clip is not None:
        blocks.append(np.linalg.norm(stats.scatter) / scatter_clip)
    sketch = Sketch(
        round=task.round,
        basis_version=task.basis_version,
        phase="statistics",
        statistic=release(task, vector, "statistics"),
        clipped=bool(_central(task) and max(blocks) >= 1.0 - 1e-9),  # a block at its bound was clipped
        n_features=basis.components.shape[0],
        n_classes=len(task.classes),
    )
    return SketchReply(sketch, float(np.linalg.norm(vector)), int(y.size))


@dataclass(frozen=True)
class PersonalModel:
    """A global model fine-tuned on this device's own training windows: its ``params``, the
    global ``source`` parameters it started from, the ``basis_version`` both take rows of,
    and the held-out metrics of each (``held_out`` the personal model's, ``global_held_out``
    the global one's)."""

    params: np.ndarray
    source: np.ndarray
    basis_version: int
    held_out: HeldOutMetrics
    global_held_out: HeldOutMetrics


def personal_model(
    params: np.ndarray,
    n_classes: int,
    data: LocalData,
    basis: Basis,
    *,
    epochs: int,
    lr: float,
    prox_mu: float,
    random_state: np.random.Generator,
) -> PersonalModel:
    """Fine-tune the global logistic-regression ``params`` on the device's projected training
    rows (:func:`biofed.edge.statistics.personalize`) and measure both models on the held-out
    rows. Nothing of the result is released.

    Raises
    ------
    TaskRefused
        No training windows, or ``params`` not a logistic regression on ``basis``.
    """
    k = basis.components.shape[0]
    if params.shape != (n_params(k, n_classes, 0),):
        raise TaskRefused(
            f"personalization needs a logistic-regression model of {n_params(k, n_classes, 0)} parameters on the "
            f"basis (k={k}, {n_classes} classes), got {params.shape[0]}"
        )
    if not data.train.any():
        raise TaskRefused("no training windows to personalize the global model on")
    Z = project_rows(data.X, basis, data, data.train)
    own = personalize(
        params, Z, data.y[data.train], n_classes, epochs=epochs, lr=lr, prox_mu=prox_mu, random_state=random_state
    )
    return PersonalModel(
        own,
        params,
        basis.version,
        _held_out_metrics(own, n_classes, 0, basis, data),
        _held_out_metrics(params, n_classes, 0, basis, data),
    )
