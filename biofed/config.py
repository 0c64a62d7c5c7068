"""Configuration files of biofed: pydantic models loaded from TOML.

Shared by the device agent and the coordinator (they may import this module and
:mod:`biofed.protocol`, never each other). Every model is frozen and rejects unknown
keys, so a typo in a config file is an error rather than a silently ignored setting.
Relative paths in a file are resolved against the file's directory.

Example device file::

    device_id = "pi-01"
    fleet = "ward7"
    recordings = ["data/subject00_1.edf", "data/subject00_2.edf"]
    store_path = "state/features.sqlite"

    [broker]
    host = "192.168.1.10"
    protocol = "5"

A device of a fleet made by ``biofed provision`` (TLS with a client certificate plus a
user name and password; the broker's ACL lets it touch only its own topics)::

    device_id = "pi-01"
    fleet = "ward7"
    store_path = "features.sqlite"

    [broker]
    host = "192.168.1.10"
    port = 8883
    protocol = "5"
    tls = true
    ca_file = "ca.pem"
    cert_file = "client.pem"
    key_file = "client.key.pem"
    username = "pi-01"
    password_file = "mqtt.password"

Example coordinator file::

    fleet = "ward7"
    rounds = 50
    min_devices = 3
    sampling_rate = 0.5
    state_dir = "state"

    [strategy]
    name = "fedadam"
    params = { eta = 0.01 }

    [dp]
    trust_mode = "central"
    clip_norm = 1.0
    noise_multiplier = 1.1
    basis_noise_multiplier = 10.0   # the one basis round (device standardization, the default)
    basis_clip_norm = 1.0
    epsilon_budget = 8.0
    [dp.adaptive_clipping]
    target_quantile = 0.5

``biofed config init coordinator|device|broker`` prints a template with every setting
and its default; ``biofed config check FILE`` validates a file.

Precedence
----------
The settings in a model's ``OVERRIDABLE`` can also be set from the environment
(``BIOFED_`` + the dotted key in upper case with ``.`` as ``_``, e.g.
``BIOFED_BROKER_HOST``, ``BIOFED_DP_EPSILON_BUDGET``) and from the command line (see
:func:`load_config`'s ``overrides``). One order applies: command line > environment >
file > default.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from biofed.protocol import OPTIMIZERS, STANDARDIZATIONS, TRUST_MODES, validate_id

Id = Annotated[str, AfterValidator(lambda value: validate_id(value, "id"))]
"""A fleet or device id (:func:`biofed.protocol.validate_id`)."""

STRATEGY_NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedprox", "trimmed_mean", "coordinate_median")
"""The aggregation strategies a coordinator config can name (``[strategy] name``)."""


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


ConfigPath = Annotated[Path, AfterValidator(_resolve)]
"""A path; relative ones are taken relative to the config file's directory."""


def _protocol_str(value: object) -> object:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ConfigError(ValueError):
    """A config file is missing, not TOML, or does not match its model."""


class _Section(BaseModel):
    # attribute docstrings become field descriptions: the comments of `biofed config init`
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class BrokerConfig(_Section):
    """How to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Annotated[Literal["auto", "5", "3.1.1"], BeforeValidator(_protocol_str)] = "auto"
    """MQTT version; "auto" tries 5 then 3.1.1. Use "3.1.1" for the embedded amqtt broker."""
    keepalive: int = Field(30, ge=5, le=3600)
    connect_timeout_s: float = Field(10.0, gt=0)
    session_expiry_s: int = Field(86_400, ge=0)
    inbox_size: int = Field(10_000, ge=1)
    inbox_rate_per_s: float | None = Field(50.0, gt=0)
    """Inbound messages per second one sender may sustain; beyond it they are shed (None: no limit)."""
    inbox_burst: float = Field(500.0, ge=1)
    """Messages one sender may send at once above ``inbox_rate_per_s``."""
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Largest accepted protocol message; larger ones are dropped before decoding."""
    tls: bool = False
    """Connect over TLS (1.2 or newer), verifying the broker against ``ca_file``."""
    ca_file: ConfigPath | None = None
    """PEM CA certificate the broker's certificate must chain to (required with ``tls``)."""
    cert_file: ConfigPath | None = None
    """PEM client certificate (mutual TLS; ``biofed provision`` writes one per device)."""
    key_file: ConfigPath | None = None
    """PEM private key of ``cert_file``."""
    username: str | None = None
    """MQTT user name; None sends the client id (the device id)."""
    password: str | None = None
    """MQTT password in the file itself; prefer ``password_file``."""
    password_file: ConfigPath | None = None
    """File whose first line is the MQTT password (keep it mode 0600)."""

    @model_validator(mode="after")
    def _tls_settings(self) -> BrokerConfig:
        if self.tls and self.ca_file is None:
            raise ValueError("tls = true needs ca_file (the CA certificate that signed the broker's certificate)")
        if not self.tls and any(f is not None for f in (self.ca_file, self.cert_file, self.key_file)):
            raise ValueError("ca_file, cert_file and key_file are only used with tls = true; set tls = true")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both (mutual TLS) or neither")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        return self

    def read_password(self) -> str | None:
        """The MQTT password: ``password``, else the first line of ``password_file``, else None.

        Raises
        ------
        ConfigError
            ``password_file`` is missing, unreadable or empty.
        """
        if self.password_file is None:
            return self.password
        try:
            lines = self.password_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"broker.password_file {self.password_file}: cannot read it: {exc}") from None
        if not lines or not lines[0].strip():
            raise ConfigError(f"broker.password_file {self.password_file} is empty; it must hold the MQTT password")
        return lines[0].strip()


class PipelineSettings(_Section):
    """Streaming feature pipeline of a device (see ``biofed.edge.pipeline.PipelineConfig``)."""

    window_s: float = Field(2.0, gt=0)
    hop_s: float = Field(1.0, gt=0)
    n_mels: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _hop_within_window(self) -> PipelineSettings:
        if self.hop_s > self.window_s:
            raise ValueError(
                f"hop_s ({self.hop_s}) must not exceed window_s ({self.window_s}): samples would be skipped"
            )
        return self


class TrainingSettings(_Section):
    """Local training settings (defaults on a device; what the coordinator sends in a task)."""

    local_epochs: int = Field(1, ge=1)
    lr: float = Field(0.05, gt=0)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal[OPTIMIZERS] = "sgd"
    l2: float = Field(0.0, ge=0)
    prox_mu: float = Field(0.0, ge=0)


ALGORITHMS = ("fedavg", "one_shot")
"""How the coordinator trains the model on the basis (``[training] algorithm``): ``"fedavg"``,
federated rounds aggregated by ``[strategy]``; ``"one_shot"``, one private release of the
devices' class statistics solved as a ridge LDA (then ``rounds`` optional fine-tuning rounds)."""


class OneShotSettings(_Section):
    """The one-shot class statistics (``[training.one_shot]``; :mod:`biofed.protocol.statistics`)."""

    ridge: float = Field(1.0, gt=0)
    """lambda of the LDA ``(S + lambda I)^-1 m_c``: shrinks toward the nearest-class-mean rule."""
    means_clip: float = Field(1.0, gt=0)
    """C_m: Frobenius bound of a device's (classes, k) class means in the basis space."""
    scatter_clip: float | None = Field(None, gt=0)
    """C_s: Frobenius bound of a device's (k, k) within-class scatter; None leaves the scatter
    out (nearest class mean with ridge: what survives the noise of a small fleet)."""


class CoordinatorTrainingSettings(TrainingSettings):
    """The coordinator's ``[training]``: the local settings it sends, and the algorithm."""

    algorithm: Literal[ALGORITHMS] = "fedavg"
    """"fedavg": federated training rounds aggregated by [strategy]; "one_shot": one private
    release of the devices' class statistics in the basis space, solved as a ridge LDA
    (``biofed demo``'s default), then ``rounds`` fine-tuning rounds. Needs ``hidden = 0``."""
    one_shot: OneShotSettings = OneShotSettings()


class PersonalizationSettings(_Section):
    """On-device personalization (``[personalization]`` of a device config): every global model
    is fine-tuned on the device's own labelled training windows (Adam from the global
    parameters with a FedProx pull toward them). The personal model never leaves the
    device; its held-out balanced accuracy is logged, and reported to a central-mode
    coordinator with the evaluation. Logistic-regression models only (``hidden = 0``)."""

    enabled: bool = True
    epochs: int = Field(30, ge=1)
    lr: float = Field(0.02, gt=0)
    prox_mu: float = Field(0.01, ge=0)
    predict_with_personal: bool = False
    """With ``predict = true``, classify the device's windows with its personal model instead
    of the global one (scored with the Numba kernels: the personal model has no ONNX export)."""


class MetricsSettings(_Section):
    """Prometheus metrics endpoint (``http://HOST:PORT/metrics``) of a long-running process."""

    port: int | None = Field(None, ge=0, le=65535)
    """TCP port of the metrics endpoint; None: no endpoint (0: any free port)."""
    host: str = "127.0.0.1"
    """Address the endpoint listens on; "0.0.0.0" exposes it to the network (for a Prometheus server).
    An agent's endpoint shows how much data its device holds: keep it on the device's own network."""


class _SigningFields(_Section):
    """Signed envelopes (:mod:`biofed.signing`); all optional, off by default."""

    signing_key_file: ConfigPath | None = None
    """Ed25519 private key (PEM) this process signs every message with, e.g.
    ``DIR/devices/{id}/signing.key.pem`` from ``biofed provision``. None: unsigned."""
    keys_dir: ConfigPath | None = None
    """Directory of ``{id}.pub.pem`` public keys (and ``revoked.txt``). When set, only
    messages with a valid signature of a known, unrevoked sender are accepted."""
    max_clock_skew_s: float = Field(300.0, gt=0)
    """Largest accepted |created - now| of a verified message (retained kinds exempt from the age limit)."""

    @model_validator(mode="after")
    def _verify_needs_key(self):
        if self.keys_dir is not None and self.signing_key_file is None:
            raise ValueError(
                "keys_dir is set but signing_key_file is not: receivers that verify signatures refuse unsigned "
                "messages, so this process must sign its own (set signing_key_file)"
            )
        return self


class SourceConfig(_Section):
    """One input of a device (``[[sources]]``), the same as ``biofed replay FILE`` / ``--lsl NAME``.

    ``kind = "file"``: ``path`` is a recording file, or a folder whose recordings are all
    ingested (and, with ``watch = true``, new files in it as they appear, without a restart).
    ``kind = "lsl"``: ``name`` is the LSL stream name, name prefix (``pi-01`` for ``pi-01-eeg``,
    ``pi-01-markers``...) or source id of the device's live streams.
    """

    kind: Literal["file", "lsl"]
    path: ConfigPath | None = None
    watch: bool = False
    name: str | None = Field(None, min_length=1)
    resolve_timeout_s: float = Field(5.0, gt=0)
    """lsl: how long one look for the streams lasts (retried until they appear)."""
    gap_tolerance_s: float = Field(0.1, gt=0)
    """lsl: a larger deviation of a sample's timestamp from its expected time is a gap."""

    @model_validator(mode="after")
    def _fields_of_kind(self) -> SourceConfig:
        if self.kind == "file":
            if self.path is None:
                raise ValueError('a kind = "file" source needs path = "recording file or folder"')
            if self.name is not None:
                raise ValueError('name belongs to kind = "lsl" sources; a file source has a path')
            if self.watch and self.path.exists() and not self.path.is_dir():
                raise ValueError(f"watch = true needs a folder, but {self.path} is a file")
        else:
            if self.name is None:
                raise ValueError('a kind = "lsl" source needs name = "LSL stream name or source id"')
            if self.path is not None or self.watch:
                raise ValueError('path and watch belong to kind = "file" sources; an lsl source has a name')
        return self


class DeviceDPConfig(_Section):
    """The device's own privacy (``[dp]`` of a device config).

    Two guarantees, reported side by side and never mixed: *client-level* (one record = the
    device's whole contribution; its own ledger charges what it releases in local and
    distributed trust modes) and, with ``record_noise_multiplier`` set, *record-level*
    (one record = one window of one person: for a device that holds several people's data,
    e.g. a ward device) from DP-SGD in local training.
    """

    delta: float = Field(1e-5, gt=0, lt=1)
    """Delta at which the device reports the epsilons of its own ledgers."""
    record_noise_multiplier: float | None = Field(None, ge=0)
    """z_r of record-level DP-SGD (noise std / record_clip_norm on each step's gradient sum).
    None: local training without record-level DP."""
    record_clip_norm: float = Field(1.0, gt=0)
    """L2 bound of one window's gradient in DP-SGD."""
    record_sampling_rate: float = Field(0.05, gt=0, le=1)
    """Probability that each training window is in a DP-SGD step's batch (Poisson sampling);
    a round runs ``ceil(local_epochs / record_sampling_rate)`` steps."""


class DeviceConfig(_SigningFields):
    """One edge device (``biofed edge``)."""

    device_id: Id
    fleet: Id
    broker: BrokerConfig = BrokerConfig()
    recordings: tuple[ConfigPath, ...] = ()
    """Recording files replayed as the device's sensor stream."""
    sources: tuple[SourceConfig, ...] = ()
    """Inputs: recording files or folders (``kind = "file"``) and live LSL streams (``kind = "lsl"``)."""
    warmup: bool = True
    """Compile (or load from the cache) every kernel before reporting "online" (``biofed warmup``)."""
    replay_speed: float = Field(0.0, ge=0)
    """0 = as fast as possible, 1 = real time."""
    store_path: ConfigPath
    store_max_rows: int = Field(100_000, ge=1)
    pipeline: PipelineSettings = PipelineSettings()
    training: TrainingSettings = TrainingSettings()
    personalization: PersonalizationSettings = PersonalizationSettings()
    predict: bool = False
    """Publish on-device predictions of the current global model."""
    dp: DeviceDPConfig = DeviceDPConfig()
    wait_for_sources: bool = False
    """With no usable recording, wait for one (a service started before its data) instead of
    exiting with an error."""
    metrics: MetricsSettings = MetricsSettings()

    OVERRIDABLE: ClassVar[tuple[str, ...]] = (
        "device_id",
        "fleet",
        "store_path",
        "replay_speed",
        "broker.host",
        "broker.port",
        "broker.protocol",
        "broker.username",
        "broker.password_file",
        "metrics.port",
        "metrics.host",
    )
    """Settings that ``BIOFED_*`` variables and ``biofed edge`` options override."""


class AdaptiveClippingConfig(_Section):
    """Adaptive clipping to a norm quantile (Andrew et al. 2021)."""

    target_quantile: float = Field(0.5, gt=0, lt=1)
    """gamma: fraction of updates that should be unclipped."""
    learning_rate: float = Field(0.2, gt=0)
    """eta: geometric update step of the clip norm."""
    bit_noise_std: float = Field(10.0, ge=0)
    """sigma_b: std of the Gaussian noise on the sum of clip bits."""


class DPConfig(_Section):
    """Differential privacy of the coordinator."""

    trust_mode: Literal[TRUST_MODES] = "central"
    secagg_threshold: int | None = Field(None, ge=1)
    """distributed mode: minimum devices that must survive a secure-aggregation round (the
    Shamir threshold, raised to a majority of the round's devices) and the ``n_min`` each
    device calibrates its noise share for. Never below ``min_devices`` (the coordinator
    refuses it): a sum unmasked with fewer survivors would reach the coordinator and then be
    discarded. None: ``min_devices``."""
    secagg_step_timeout_s: float = Field(10.0, gt=0)
    """distributed mode: how long each secure-aggregation step after the keys waits for the
    devices (they only compute; training happens before, within ``round_deadline_s``)."""
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, ge=0)
    statistics_noise_multiplier: float | None = Field(None, ge=0)
    """z_s of the one-shot statistics release (``[training] algorithm = "one_shot"``; one
    Gaussian event, ``kind="statistics"`` in the ledger); None: ``noise_multiplier``."""
    basis_noise_multiplier: float | None = Field(None, ge=0)
    """Noise multiplier z_b of the basis phase(s) (one Gaussian event each, ``kind="basis"``
    in the ledger); None: the training ``noise_multiplier``. With device standardization the
    basis statistic is a correlation matrix (entries in [-1, 1]), so the basis tolerates far
    more noise than the model: a larger z_b buys epsilon back for the training rounds."""
    basis_clip_norm: float | None = Field(None, gt=0)
    """L2 clip norm C_b of each device's basis statistic; None: ``clip_norm``. Clipping a
    statistic only rescales it (the basis is the eigenvectors of the average), and the
    signal-to-noise ratio of the averaged statistic is ``n / (z_b ||s_i||)`` whatever C_b
    below the norms, so C_b = 1 is a sound choice in device standardization mode; global
    mode sends raw-feature moments, whose norm is the feature scale (``biofed coordinator
    --basis-clip-norm`` overrides this value)."""
    adaptive_clipping: AdaptiveClippingConfig | None = None
    delta: float = Field(1e-5, gt=0, lt=1)
    epsilon_budget: float | None = Field(None, gt=0)
    """Stop training before spending more than this epsilon (None: no limit)."""
    accountant: Literal["rdp", "pld"] = "rdp"


class StrategyConfig(_Section):
    """Server-side aggregation strategy and its keyword parameters."""

    name: Literal[STRATEGY_NAMES] = "fedavg"
    params: dict[str, float | int | str | bool] = {}


class ModelSettings(_Section):
    """The federated model and its feature basis."""

    classes: tuple[str, ...] = ("rest", "arithmetic")
    hidden: int = Field(0, ge=0)
    """0: logistic regression; > 0: MLP with this many hidden units."""
    basis_k: int = Field(32, ge=1)
    standardization: Literal[STANDARDIZATIONS] = "device"
    """How raw feature rows are standardized before the basis projection. "device": each
    device z-scores its rows with the mean and scale of its *own* training split (a
    per-subject calibration that never leaves the device; held-out and live windows use the
    training split's statistics); the only basis phase is the covariance (a correlation
    matrix of bounded scale) and :class:`biofed.protocol.Basis` carries mean 0, scale 1.
    "global": a federated moments phase first agrees on one mean and scale for the fleet
    (raw-feature moments: their norm is the feature scale, so DP noise on them needs a
    large basis clip norm and a large fleet)."""

    @model_validator(mode="after")
    def _two_classes(self) -> ModelSettings:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be at least 2 distinct names, got {list(self.classes)}")
        return self


class CoordinatorConfig(_SigningFields):
    """The coordinator (``biofed coordinator``)."""

    fleet: Id
    broker: BrokerConfig = BrokerConfig()
    rounds: int = Field(ge=0)
    """Training rounds (>= 1 with ``algorithm = "fedavg"``); after a one-shot model, the
    federated fine-tuning rounds (0: none)."""
    min_devices: int = Field(1, ge=1)
    sampling_rate: float | Literal["all"] = "all"
    """Poisson sampling probability q per round, or "all" devices."""
    round_deadline_s: float = Field(60.0, gt=0)
    strategy: StrategyConfig = StrategyConfig()
    training: CoordinatorTrainingSettings = CoordinatorTrainingSettings()
    model: ModelSettings = ModelSettings()
    dp: DPConfig = DPConfig()
    state_dir: ConfigPath
    allowed_devices_file: ConfigPath | None = None
    """Allow list (``coordinator/allowed_devices.json`` from ``biofed provision``). When set,
    every message of a device not on it is dropped; the file is re-read when it changes, so
    ``biofed provision revoke`` takes effect in a running coordinator. None: any device."""
    metrics: MetricsSettings = MetricsSettings()
    status_broker: BrokerConfig | None = None
    """How ``biofed status`` reaches the broker: read-only credentials (``biofed provision``
    writes the observer's here), so it never takes over the coordinator's session. None:
    ``[broker]``."""

    OVERRIDABLE: ClassVar[tuple[str, ...]] = (
        "fleet",
        "rounds",
        "min_devices",
        "sampling_rate",
        "round_deadline_s",
        "state_dir",
        "broker.host",
        "broker.port",
        "broker.protocol",
        "broker.username",
        "broker.password_file",
        "dp.trust_mode",
        "dp.noise_multiplier",
        "dp.statistics_noise_multiplier",
        "dp.clip_norm",
        "dp.basis_noise_multiplier",
        "dp.basis_clip_norm",
        "dp.epsilon_budget",
        "dp.delta",
        "metrics.port",
        "metrics.host",
    )
    """Settings that ``BIOFED_*`` variables and ``biofed coordinator`` options override."""

    @model_validator(mode="after")
    def _sampling_in_range(self) -> CoordinatorConfig:
        if self.sampling_rate != "all" and not 0 < self.sampling_rate <= 1:
            raise ValueError(f'sampling_rate must be in (0, 1] or "all", got {self.sampling_rate}')
        if self.training.algorithm == "fedavg" and self.rounds < 1:
            raise ValueError('rounds must be >= 1 with [training] algorithm = "fedavg" (0 only after "one_shot")')
        if self.training.algorithm == "one_shot" and self.model.hidden > 0:
            raise ValueError(
                f'[training] algorithm = "one_shot" solves a linear model (LDA), but [model] hidden = '
                f'{self.model.hidden}; set hidden = 0 or algorithm = "fedavg"'
            )
        return self


class BrokerServiceConfig(_Section):
    """The MQTT broker ``biofed broker`` runs (not how clients reach it: that is ``[broker]``)."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(1883, ge=0, le=65535)
    """TCP port (0: any free port)."""
    mosquitto: bool = False
    """Run Mosquitto (MQTT 5) instead of the embedded amqtt broker (MQTT 3.1.1)."""
    data_dir: ConfigPath | None = None
    """Mosquitto's config, persistence and log directory; None: a temporary directory."""
    mosquitto_conf: ConfigPath | None = None
    """Run Mosquitto with this ready mosquitto.conf (e.g. ``DIR/broker/mosquitto.conf`` from
    ``biofed provision``); host, port and data_dir are then taken from that file."""

    OVERRIDABLE: ClassVar[tuple[str, ...]] = ("host", "port", "mosquitto", "data_dir", "mosquitto_conf")
    """Settings that ``BIOFED_*`` variables and ``biofed broker`` options override."""


RECOMMENDED_PRIVACY: dict[str, float] = {
    "noise_multiplier": 2.0,
    "clip_norm": 0.25,
    "basis_noise_multiplier": 10.0,
    "basis_clip_norm": 1.0,
    "epsilon_budget": 10.0,
    "delta": 1e-5,
}
"""The ``[dp]`` settings ``biofed demo`` runs with and ``biofed provision`` and
``biofed config init`` write: client-level DP at epsilon <= 10 (delta 1e-5) for about 10
rounds of a small fleet (the demo module docstring has the reasoning)."""
RECOMMENDED_ROUNDS = 10
"""Training rounds of the recommended settings (what :data:`RECOMMENDED_PRIVACY` is sized for)."""

ModelT = TypeVar("ModelT", bound=BaseModel)
ENV_PREFIX = "BIOFED_"


def toml_literal(value: object) -> str:
    """``value`` (bool, int, float, str, path, list, tuple or dict of those) as a TOML literal.

    Examples
    --------
    >>> toml_literal({"eta": 0.01, "names": ("rest", "arithmetic"), "on": True})
    '{eta = 0.01, names = ["rest", "arithmetic"], on = true}'
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else "inf" if value > 0 else "-inf")
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_document(
    top: Mapping[str, object], tables: Mapping[str, Mapping[str, object]] | None = None, *, header: str = ""
) -> str:
    """A TOML document: ``header`` as comment lines, the ``top`` keys, then one ``[name]``
    table per entry of ``tables``. None values are left out (the setting keeps its default).

    Examples
    --------
    >>> print(toml_document({"fleet": "ward7", "rounds": 3, "sampling_rate": None},
    ...                     {"broker": {"host": "127.0.0.1", "port": 1883}}, header="a fleet"), end="")
    # a fleet
    fleet = "ward7"
    rounds = 3
    <BLANKLINE>
    [broker]
    host = "127.0.0.1"
    port = 1883
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{key} = {toml_literal(value)}" for key, value in top.items() if value is not None]
    for name, table in (tables or {}).items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {toml_literal(value)}" for key, value in table.items() if value is not None]
    return "\n".join(lines) + "\n"


def env_name(key: str) -> str:
    """The environment variable of a dotted setting: ``"broker.host"`` -> ``"BIOFED_BROKER_HOST"``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def _set_dotted(data: dict, key: str, value: object) -> None:
    *sections, leaf = key.split(".")
    for section in sections:
        child = data.get(section)
        if not isinstance(child, dict):
            child = data[section] = {}
        data = child
    data[leaf] = value


def _field_model(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model that holds the field at ``loc[-1]`` (None when ``loc`` leaves the models)."""
    for part in loc[:-1]:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None:
            return None
        nested = [
            t
            for t in (info.annotation, *getattr(info.annotation, "__args__", ()))
            if isinstance(t, type) and issubclass(t, BaseModel)
        ]
        if not nested:
            return None
        model = nested[0]
    return model


def _unknown_key_message(model: type[BaseModel], loc: tuple) -> str:
    holder = _field_model(model, loc)
    known = sorted(holder.model_fields) if holder is not None else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return "unknown key (known: " + ", ".join(known) + ")" if known else "unknown key (check the spelling)"


def load_config(
    path: str | Path | None,
    model: type[ModelT],
    *,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelT:
    """Read the TOML file ``path`` into ``model`` (e.g. :class:`DeviceConfig`).

    Parameters
    ----------
    path : str, Path or None
        The TOML file; relative paths in it are resolved against its directory. None:
        no file (defaults, environment and ``overrides`` only).
    model : type
        :class:`DeviceConfig`, :class:`CoordinatorConfig` or :class:`BrokerServiceConfig`.
    overrides : mapping, optional
        ``{dotted key: value}`` from the command line; None values are ignored. Relative
        paths are taken relative to the working directory.
    environ : mapping, optional
        Where ``BIOFED_*`` variables of the model's ``OVERRIDABLE`` settings are read;
        default ``os.environ``. Command line > environment > file > default.

    Raises
    ------
    ConfigError
        One message naming the file and, for each problem, the dotted field, what was
        wrong and the offending value.
    """
    if path is None:  # no file: defaults, environment and command line
        return _validate({}, model, Path("(no config file)"), Path.cwd(), overrides, environ)
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return _validate(data, model, path, path.resolve().parent, overrides, environ)


def _validate(
    data: dict,
    model: type[ModelT],
    path: Path,
    base_dir: Path,
    overrides: Mapping[str, object] | None,
    environ: Mapping[str, str] | None,
) -> ModelT:
    environ = os.environ if environ is None else environ
    source: dict[str, str] = {}
    for key in getattr(model, "OVERRIDABLE", ()):
        for origin, value in (
            (env_name(key), environ.get(env_name(key))),
            ("the command line", (overrides or {}).get(key)),
        ):
            if value is None or value == "":
                continue
            if isinstance(value, Path) or (key.endswith(("_dir", "_path", "_file")) and origin != "the command line"):
                value = str(Path(value).absolute())  # relative to the working directory, not the file
            _set_dotted(data, key, value)
            source[key] = origin
    try:
        return model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "(top level)"
            if error["type"] == "extra_forbidden":
                message = _unknown_key_message(model, error["loc"])
            else:
                message = error["msg"]
            got = "" if error["type"] in ("missing", "extra_forbidden") else f" (got {error['input']!r})"
            origin = f" [set by {source[where]}]" if where in source else ""
            problems.append(f"  {where}: {message}{got}{origin}")
        raise ConfigError(f"{path}: invalid {model.__name__}:\n" + "\n".join(problems)) from None


def load_allowed_devices(path: str | Path) -> frozenset[str]:
    """The device ids of an allow list written by ``biofed provision``
    (``coordinator/allowed_devices.json``: ``{"fleet": ..., "devices": [...]}``).

    Raises
    ------
    ConfigError
        The file is missing, not JSON of that shape, or lists an invalid device id.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: allow list not found (biofed provision writes coordinator/allowed_devices.json)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the allow list: {exc}") from None
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, list):
        raise ConfigError(f'{path}: expected {{"fleet": ..., "devices": [device ids]}}, got {type(data).__name__}')
    problems = []
    for device in devices:
        try:
            validate_id(device)
        except ValueError as exc:
            problems.append((device, str(exc)))
    if problems:
        bad = [device for device, _ in problems]
        raise ConfigError(f"{path}: invalid device ids {bad[:5]!r} ({problems[0][1]})")
    return frozenset(devices)


__all__ = [
    "AdaptiveClippingConfig",
    "BrokerConfig",
    "BrokerServiceConfig",
    "ConfigError",
    "CoordinatorConfig",
    "DPConfig",
    "DeviceConfig",
    "ENV_PREFIX",
    "MetricsSettings",
    "ModelSettings",
    "PipelineSettings",
    "RECOMMENDED_PRIVACY",
    "RECOMMENDED_ROUNDS",
    "STRATEGY_NAMES",
    "SourceConfig",
    "StrategyConfig",
    "TrainingSettings",
    "ALGORITHMS",
    "CoordinatorTrainingSettings",
    "OneShotSettings",
    "PersonalizationSettings",
    "env_name",
    "load_allowed_devices",
    "load_config",
    "toml_document",
    "toml_literal",
]
