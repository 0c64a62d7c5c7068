"""Payload schemas: one frozen dataclass per message kind.

Each kind (:class:`Task`, :class:`Update`, :class:`Model`, :class:`Basis`, :class:`Sketch`,
:class:`Status`, :class:`Prediction`; the secure-aggregation steps live in
:mod:`biofed.secure_aggregation.messages`) validates itself on construction, so a decoded
:class:`~biofed.protocol.envelope.Message` always holds a well-formed payload. The
envelope round is the payload's ``round`` field (stored once).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from biofed.protocol.errors import InvalidPayload
from biofed.protocol.schema import (
    check_array,
    check_choice,
    check_float,
    check_int,
    check_strings,
    fields_payload,
    payload_from_fields,
    set_field,
)
from biofed.protocol.statistics import statistics_size
from biofed.protocol.topics import validate_id

TRUST_MODES = ("central", "local", "distributed")
PHASES = ("moments", "covariance", "statistics", "train", "evaluate")
"""Task phases in the order a federation runs them: two basis phases (standardization
moments, then the covariance of standardized features; a fleet with device standardization
skips the moments), the one-shot class statistics (only with ``[training] algorithm =
"one_shot"``), training rounds, one evaluation."""
BASIS_PHASES = ("moments", "covariance")
"""The phases that make the basis (they need none)."""
SKETCH_PHASES = (*BASIS_PHASES, "statistics")
"""The phases a device answers with a :class:`Sketch`."""
STANDARDIZATIONS = ("global", "device")
"""How devices standardize raw feature rows before the basis projection (:attr:`Basis.standardization`)."""
OPTIMIZERS = ("sgd", "adam")
"""The local optimizers a task can ask for: those :mod:`biofed.kernels.training` implements (the
kernels, which import nothing else of biofed, keep the same tuple; a test holds them equal). Not
imported from the kernels so that the protocol, and every command built on it, loads without Numba."""
_STATE_PATTERN = re.compile(r"[a-z_]{1,32}")


@dataclass(frozen=True, eq=False)
class Task:
    """Round task, coordinator -> devices (retained on ``task``).

    ``model`` is the flat parameter vector of :mod:`biofed.kernels.training` (layout fixed
    by ``len(classes)`` and ``hidden``; the input dimension is the basis rank). Devices not
    in ``participants`` skip the round (empty = everybody). ``deadline`` is absolute unix
    time; updates arriving later are dropped.

    DP: ``trust_mode`` ``"central"`` (devices clip, coordinator noises), ``"local"`` (device
    clips and adds Gaussian noise of std ``noise_multiplier * clip_norm`` itself) or
    ``"distributed"`` (each device adds its share of the noise). With
    ``adaptive_clipping`` the device reports ``Update.norm_bit``.

    ``phase`` (one of :data:`PHASES`) says what the devices compute: ``"moments"``,
    ``"covariance"`` and ``"statistics"`` ask for a :class:`Sketch` (``model`` may then be
    empty), ``"train"`` for
    an :class:`Update`, ``"evaluate"`` for an :class:`Update` with an empty delta,
    ``n_examples=0`` and the eval metrics filled. ``stats_mean``/``stats_scale`` ((d,) each,
    scale > 0) are set only in the covariance phase of a fleet with *global*
    standardization: the standardization the devices apply before computing ``Z.T @ Z / n``.
    A covariance task without them asks for *device* standardization: each device z-scores
    its training rows with their own mean and scale (which never leave the device).

    ``secagg_threshold`` (distributed trust mode; 0 otherwise) is the minimum number of
    survivors of the round's secure aggregation (:mod:`biofed.secure_aggregation`): each device adds
    noise of std ``noise_multiplier * clip_norm / sqrt(secagg_threshold)`` and its delta
    travels only masked, in :class:`~biofed.secure_aggregation.messages.SecAggUpload` steps.

    ``means_clip`` and ``scatter_clip`` (statistics phase only, else 0 and not sent) are the
    Frobenius bounds C_m, C_s of the device's class means and within-class scatter in the
    basis space; ``scatter_clip = 0`` leaves the scatter out. The packed vector
    (:mod:`biofed.protocol.statistics`) has L2 norm <= 1, which is ``clip_norm`` then.
    """

    KIND: ClassVar[str] = "task"
    round: int
    model: np.ndarray
    basis_version: int
    classes: tuple[str, ...]
    deadline: float
    hidden: int = 0
    trust_mode: str = "central"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    adaptive_clipping: bool = False
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    optimizer: str = "sgd"
    l2: float = 0.0
    prox_mu: float = 0.0
    participants: tuple[str, ...] = ()
    phase: str = "train"
    stats_mean: np.ndarray | None = None
    stats_scale: np.ndarray | None = None
    secagg_threshold: int = 0
    means_clip: float = 0.0
    scatter_clip: float = 0.0

    _SENT_WHEN_SET: ClassVar[tuple[str, ...]] = ("means_clip", "scatter_clip")
    """Fields sent only when not at their default, so a task of the older phases still
    decodes on a device that does not know them."""

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "Task.round"))
        set_field(self, "model", check_array(self.model, "Task.model", ndim=1))
        set_field(self, "basis_version", check_int(self.basis_version, "Task.basis_version"))
        set_field(self, "classes", check_strings(self.classes, "Task.classes"))
        if len(self.classes) < 2:
            raise InvalidPayload(f"Task.classes needs at least 2 class names, got {self.classes}")
        set_field(self, "deadline", check_float(self.deadline, "Task.deadline", minimum=0.0))
        set_field(self, "hidden", check_int(self.hidden, "Task.hidden"))
        set_field(self, "trust_mode", check_choice(self.trust_mode, "Task.trust_mode", TRUST_MODES))
        set_field(self, "clip_norm", check_float(self.clip_norm, "Task.clip_norm", minimum=0.0))
        if self.clip_norm <= 0:
            raise InvalidPayload(f"Task.clip_norm must be > 0, got {self.clip_norm}")
        set_field(self, "noise_multiplier", check_float(self.noise_multiplier, "Task.noise_multiplier", minimum=0.0))
        if not isinstance(self.adaptive_clipping, bool):
            raise InvalidPayload(f"Task.adaptive_clipping must be a bool, got {self.adaptive_clipping!r}")
        set_field(self, "local_epochs", check_int(self.local_epochs, "Task.local_epochs", minimum=1))
        set_field(self, "lr", check_float(self.lr, "Task.lr", minimum=0.0))
        set_field(self, "batch_size", check_int(self.batch_size, "Task.batch_size", minimum=1))
        set_field(self, "optimizer", check_choice(self.optimizer, "Task.optimizer", OPTIMIZERS))
        set_field(self, "l2", check_float(self.l2, "Task.l2", minimum=0.0))
        set_field(self, "prox_mu", check_float(self.prox_mu, "Task.prox_mu", minimum=0.0))
        set_field(self, "participants", check_strings(self.participants, "Task.participants"))
        for device in self.participants:
            validate_id(device)
        set_field(self, "phase", check_choice(self.phase, "Task.phase", PHASES))
        set_field(self, "secagg_threshold", check_int(self.secagg_threshold, "Task.secagg_threshold"))
        if (self.stats_mean is None) != (self.stats_scale is None):
            raise InvalidPayload("Task.stats_mean and Task.stats_scale must be given together (or neither)")
        if self.stats_mean is not None:
            mean = check_array(self.stats_mean, "Task.stats_mean", ndim=1)
            scale = check_array(self.stats_scale, "Task.stats_scale", ndim=1)
            if scale.shape != mean.shape:
                raise InvalidPayload(
                    f"Task.stats_scale must have shape {mean.shape} like stats_mean, got {scale.shape}"
                )
            if np.any(scale <= 0):
                raise InvalidPayload("Task.stats_scale must be > 0 everywhere")
            set_field(self, "stats_mean", mean)
            set_field(self, "stats_scale", scale)
        set_field(self, "means_clip", check_float(self.means_clip, "Task.means_clip", minimum=0.0))
        set_field(self, "scatter_clip", check_float(self.scatter_clip, "Task.scatter_clip", minimum=0.0))
        if self.phase == "statistics" and self.means_clip <= 0:
            raise InvalidPayload(f"a statistics task needs Task.means_clip > 0, got {self.means_clip}")

    def to_payload(self) -> dict[str, Any]:
        return fields_payload(self, skip=("round",), omit_default=self._SENT_WHEN_SET)

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Task:
        return payload_from_fields(cls, round, payload)


@dataclass(frozen=True, eq=False)
class UpdateMetrics:
    """Device-side measurements sent with every update (all finite, >= 0).

    ``eval_balanced_accuracy`` (in [0, 1], None when not measured) is the balanced accuracy
    of the task's *incoming* model on the device's ``eval_windows`` held-out windows,
    measured before local training.

    ``personal_balanced_accuracy`` (central trust mode, evaluate phase; None otherwise and
    then not sent) is the balanced accuracy, on the same held-out windows, of the device's
    own model: the global model fine-tuned on its training windows, which never leaves it.
    """

    loss: float
    n_windows: int
    rss_bytes: int
    cpu_time_s: float
    bytes_sent: int = 0
    bytes_received: int = 0
    eval_balanced_accuracy: float | None = None
    eval_windows: int = 0
    personal_balanced_accuracy: float | None = None

    def __post_init__(self) -> None:
        for name in ("loss", "cpu_time_s"):
            set_field(self, name, check_float(getattr(self, name), f"UpdateMetrics.{name}", minimum=0.0))
        for name in ("n_windows", "rss_bytes", "bytes_sent", "bytes_received", "eval_windows"):
            set_field(self, name, check_int(getattr(self, name), f"UpdateMetrics.{name}"))
        for name in ("eval_balanced_accuracy", "personal_balanced_accuracy"):
            accuracy = check_float(getattr(self, name), f"UpdateMetrics.{name}", minimum=0.0, allow_none=True)
            if accuracy is not None and accuracy > 1.0:
                raise InvalidPayload(f"UpdateMetrics.{name} must be <= 1, got {accuracy}")
            set_field(self, name, accuracy)


@dataclass(frozen=True, eq=False)
class Update:
    """Model update, device -> coordinator (``update/{device_id}``).

    ``delta`` = local params - task params, already clipped to ``Task.clip_norm``
    (``clipped`` says whether clipping changed it). ``norm_bit`` is 1 when the unclipped
    norm was <= clip norm, 0 otherwise, None unless the task asked for adaptive clipping.
    """

    KIND: ClassVar[str] = "update"
    round: int
    basis_version: int
    delta: np.ndarray
    n_examples: int
    clipped: bool
    metrics: UpdateMetrics
    norm_bit: int | None = None

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "Update.round"))
        set_field(self, "basis_version", check_int(self.basis_version, "Update.basis_version"))
        set_field(self, "delta", check_array(self.delta, "Update.delta", ndim=1))
        set_field(self, "n_examples", check_int(self.n_examples, "Update.n_examples"))
        if not isinstance(self.clipped, bool):
            raise InvalidPayload(f"Update.clipped must be a bool, got {self.clipped!r}")
        if isinstance(self.metrics, Mapping):
            set_field(self, "metrics", _metrics_from(self.metrics))
        elif not isinstance(self.metrics, UpdateMetrics):
            raise InvalidPayload(f"Update.metrics must be UpdateMetrics, got {type(self.metrics).__name__}")
        if self.norm_bit is not None and (isinstance(self.norm_bit, bool) or self.norm_bit not in (0, 1)):
            raise InvalidPayload(f"Update.norm_bit must be 0, 1 or None, got {self.norm_bit!r}")

    def to_payload(self) -> dict[str, Any]:
        payload = fields_payload(self, skip=("round", "metrics"))
        # the personal accuracy only when measured, so updates still decode on older coordinators
        payload["metrics"] = {
            f.name: getattr(self.metrics, f.name)
            for f in fields(UpdateMetrics)
            if not (f.name == "personal_balanced_accuracy" and self.metrics.personal_balanced_accuracy is None)
        }
        return payload

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Update:
        return payload_from_fields(cls, round, payload)


def _metrics_from(value: Mapping[str, Any]) -> UpdateMetrics:
    try:
        return UpdateMetrics(**value)
    except TypeError as exc:
        raise InvalidPayload(f"Update.metrics: {exc}") from None


@dataclass(frozen=True, eq=False)
class Model:
    """Global model after a round, coordinator -> devices (retained on ``model``).

    ``epsilon`` is the privacy spent so far at the configured delta (None without DP).
    ``onnx`` is the serialized ONNX model of the same parameters and basis (uint8 bytes,
    ``features`` input, metadata of :mod:`biofed.model.format`; built by
    :mod:`biofed.coordinator.onnx_export`), empty when the coordinator knows no feature layout.
    """

    KIND: ClassVar[str] = "model"
    round: int
    params: np.ndarray
    basis_version: int
    classes: tuple[str, ...]
    hidden: int = 0
    n_devices: int = 0
    epsilon: float | None = None
    onnx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint8))

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "Model.round"))
        set_field(self, "params", check_array(self.params, "Model.params", ndim=1))
        set_field(self, "basis_version", check_int(self.basis_version, "Model.basis_version"))
        set_field(self, "classes", check_strings(self.classes, "Model.classes"))
        set_field(self, "hidden", check_int(self.hidden, "Model.hidden"))
        set_field(self, "n_devices", check_int(self.n_devices, "Model.n_devices"))
        set_field(self, "epsilon", check_float(self.epsilon, "Model.epsilon", minimum=0.0, allow_none=True))
        set_field(self, "onnx", check_array(self.onnx, "Model.onnx", ndim=1, floating=False))
        if self.onnx.dtype != np.uint8:
            raise InvalidPayload(f"Model.onnx must be a uint8 byte array, got {self.onnx.dtype}")

    def to_payload(self) -> dict[str, Any]:
        return fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Model:
        return payload_from_fields(cls, round, payload)


@dataclass(frozen=True, eq=False)
class Basis:
    """Shared feature basis, coordinator -> devices (retained on ``basis``).

    Devices project standardized features: ``((X - mean) / scale) @ components.T``.
    ``components`` is (k, d); ``mean`` and ``scale`` are (d,), scale > 0.

    ``standardization`` (one of :data:`STANDARDIZATIONS`): ``"global"`` (the default, and
    what a message without the field means) – ``mean``/``scale`` are the fleet's; ``"device"``
    – every device first z-scores its rows with the mean and scale of its own training
    split, and ``mean`` is then all zeros and ``scale`` all ones (checked).
    """

    KIND: ClassVar[str] = "basis"
    round: int
    version: int
    components: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    feature_names: tuple[str, ...] = ()
    standardization: str = "global"

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "Basis.round"))
        set_field(self, "version", check_int(self.version, "Basis.version"))
        set_field(self, "components", check_array(self.components, "Basis.components", ndim=2))
        d = self.components.shape[1]
        for name in ("mean", "scale"):
            value = check_array(getattr(self, name), f"Basis.{name}", ndim=1)
            if value.shape != (d,):
                raise InvalidPayload(f"Basis.{name} must have shape ({d},) to match components, got {value.shape}")
            set_field(self, name, value)
        if np.any(self.scale <= 0):
            raise InvalidPayload("Basis.scale must be > 0 everywhere")
        set_field(self, "feature_names", check_strings(self.feature_names, "Basis.feature_names"))
        if self.feature_names and len(self.feature_names) != d:
            raise InvalidPayload(f"Basis.feature_names has {len(self.feature_names)} names for {d} features")
        set_field(
            self, "standardization", check_choice(self.standardization, "Basis.standardization", STANDARDIZATIONS)
        )
        if self.standardization == "device" and (np.any(self.mean != 0) or np.any(self.scale != 1)):
            raise InvalidPayload(
                'Basis.standardization = "device" needs mean all zeros and scale all ones: '
                "the devices standardize with their own statistics"
            )

    def to_payload(self) -> dict[str, Any]:
        return fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Basis:
        return payload_from_fields(cls, round, payload)


@dataclass(frozen=True, eq=False)
class Sketch:
    """A device's statistic for a basis phase, device -> coordinator (``sketch/{device_id}``).

    ``statistic`` (D,) is clipped to L2 norm ``Task.clip_norm`` (``clipped`` says whether
    clipping changed it); in local trust mode the device has also added N(0, (z*C)^2).
    With X the device's raw (n, d) training feature rows, ``d = n_features``:

    - ``phase="moments"``: ``concat(mean(X, 0), mean(X**2, 0))``, D = 2d;
    - ``phase="covariance"``: ``(Z.T @ Z / n).ravel()`` with
      ``Z = (X - Task.stats_mean) / Task.stats_scale``, D = d*d;
    - ``phase="statistics"``: the packed class means and within-class scatter of the rows
      projected onto the basis (:mod:`biofed.protocol.statistics`), ``n_features`` = k and
      ``n_classes`` = c: D = c*k, or c*k + k*k with the scatter. ``n_classes`` is 0 (and not
      sent) in the basis phases.
    """

    KIND: ClassVar[str] = "sketch"
    round: int
    basis_version: int
    phase: str
    statistic: np.ndarray
    clipped: bool
    n_features: int
    n_classes: int = 0

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "Sketch.round"))
        set_field(self, "basis_version", check_int(self.basis_version, "Sketch.basis_version"))
        set_field(self, "phase", check_choice(self.phase, "Sketch.phase", SKETCH_PHASES))
        set_field(self, "statistic", check_array(self.statistic, "Sketch.statistic", ndim=1))
        if not isinstance(self.clipped, bool):
            raise InvalidPayload(f"Sketch.clipped must be a bool, got {self.clipped!r}")
        set_field(self, "n_features", check_int(self.n_features, "Sketch.n_features", minimum=1))
        set_field(self, "n_classes", check_int(self.n_classes, "Sketch.n_classes"))
        d, c = self.n_features, self.n_classes
        if self.phase == "statistics":
            if c < 2:
                raise InvalidPayload(f"a statistics Sketch needs n_classes >= 2, got {c}")
            allowed = (statistics_size(c, d, False), statistics_size(c, d, True))
        elif c:
            raise InvalidPayload(f"Sketch.n_classes is for the statistics phase only, got {c} in {self.phase!r}")
        else:
            allowed = (2 * d if self.phase == "moments" else d * d,)
        if self.statistic.shape[0] not in allowed:
            expected = " or ".join(f"({n},)" for n in allowed)
            raise InvalidPayload(
                f"Sketch.statistic of phase {self.phase!r} with n_features={d}"
                f"{f', n_classes={c}' if c else ''} must have shape {expected}, got {self.statistic.shape}"
            )

    def to_payload(self) -> dict[str, Any]:
        return fields_payload(self, skip=("round",), omit_default=("n_classes",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Sketch:
        return payload_from_fields(cls, round, payload)


@dataclass(frozen=True, eq=False)
class Status:
    """Device liveness (retained on ``status/{device_id}``).

    ``state`` is a short lowercase word: ``"online"``, ``"offline"`` (the MQTT last will,
    see :func:`offline_status`), ``"idle"``, ``"training"`` ... ``round`` is the last round
    the device saw. ``layout`` is the device's feature layout as JSON
    (:class:`biofed.model.FeatureLayout`; empty until the device has ingested data): the
    coordinator writes it into the exported ONNX model.
    """

    KIND: ClassVar[str] = "status"
    round: int
    state: str
    basis_version: int = 0
    n_rows: int = 0
    detail: str = ""
    layout: str = ""

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "Status.round"))
        if not isinstance(self.state, str) or _STATE_PATTERN.fullmatch(self.state) is None:
            raise InvalidPayload(f"Status.state must be a lowercase word (a-z, '_'), got {self.state!r}")
        set_field(self, "basis_version", check_int(self.basis_version, "Status.basis_version"))
        set_field(self, "n_rows", check_int(self.n_rows, "Status.n_rows"))
        if not isinstance(self.detail, str):
            raise InvalidPayload(f"Status.detail must be a string, got {self.detail!r}")
        if not isinstance(self.layout, str):
            raise InvalidPayload(f"Status.layout must be a JSON string, got {type(self.layout).__name__}")

    def to_payload(self) -> dict[str, Any]:
        return fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Status:
        return payload_from_fields(cls, round, payload)


@dataclass(frozen=True, eq=False)
class Prediction:
    """On-device predictions (``prediction/{device_id}``): class probabilities ``proba``
    (N, len(classes)) of the windows ending at unix times ``t`` (N,), from model ``round``."""

    KIND: ClassVar[str] = "prediction"
    round: int
    t: np.ndarray
    proba: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        set_field(self, "round", check_int(self.round, "Prediction.round"))
        set_field(self, "t", check_array(self.t, "Prediction.t", ndim=1))
        set_field(self, "proba", check_array(self.proba, "Prediction.proba", ndim=2))
        set_field(self, "classes", check_strings(self.classes, "Prediction.classes"))
        expected = (self.t.shape[0], len(self.classes))
        if self.proba.shape != expected:
            raise InvalidPayload(
                f"Prediction.proba must have shape {expected} (len(t), len(classes)), got {self.proba.shape}"
            )

    def to_payload(self) -> dict[str, Any]:
        return fields_payload(self, skip=("round",))

    @classmethod
    def from_payload(cls, round: int, payload: Mapping[str, Any]) -> Prediction:
        return payload_from_fields(cls, round, payload)


__all__ = [
    "BASIS_PHASES",
    "OPTIMIZERS",
    "PHASES",
    "SKETCH_PHASES",
    "STANDARDIZATIONS",
    "TRUST_MODES",
    "Basis",
    "Model",
    "Prediction",
    "Sketch",
    "Status",
    "Task",
    "Update",
    "UpdateMetrics",
]
