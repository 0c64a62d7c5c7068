"""``biofed demo``: a whole federation on one machine, with a report.

What it does
------------
1. Devices: one per eegmat subject found in ``--data`` (``SubjectNN_1.edf`` rest +
   ``SubjectNN_2.edf`` arithmetic), or, without ``--data``, ``--devices`` synthetic devices
   (:func:`biofed.datasets.synthetic.make_federation`) written to files the agents replay:
   ``.fif`` with EEG + ECG/PPG (the label as an annotation spanning the recording) and the
   ``.wav`` phonocardiogram recorded with it.
2. An MQTT broker on a free loopback port: the embedded amqtt broker (MQTT 3.1.1) or, with
   ``--mosquitto``, Mosquitto (MQTT 5). With ``--secure`` the fleet is provisioned first
   (:mod:`biofed.apps.provision`, in ``fleet/``: CA, TLS certificates, passwords, per-device ACLs,
   Ed25519 signing keys) and Mosquitto runs with its config: every process connects over
   TLS with its own certificate and password, may touch only its own topics, and signs
   every message (the observer uses read-only credentials).
3. ``coordinator.toml`` and one ``devices/<id>/device.toml`` per device in the report folder;
   the coordinator (``biofed coordinator``) and one agent per device (``biofed edge``) run as
   separate processes (``sys.executable -m biofed``); above ``IN_PROCESS_FLEET`` devices the
   agents run inside the demo's process instead (:class:`biofed.apps.simulate.SimulatedFleet`: real
   agents with their own MQTT sessions and stores, sharing the kernels and a thread pool).
   Their logs go to ``logs/`` (in-process agents: ``logs/devices.log``; the fleet's one kernel
   compilation: ``logs/warmup.log``); the coordinator's
   per-round lines are echoed as they come.
4. An observer subscribed to the fleet's ``update/+`` topic keeps every device's held-out
   balanced accuracy (devices report the accuracy of the model they received, measured
   before training), so the table can show the mean *and the minimum* over devices; in the
   evaluation round (central trust mode) also the accuracy of each device's *personal*
   model (the global model fine-tuned on the device's own training windows, never sent).
5. When the coordinator finishes (or the global ``--timeout`` expires: every child is
   killed and the failing ones' log tails are printed), the report folder gets:

   ``rounds.csv`` / ``rounds.json``
       one row per training round, and row 0 for the initial model: devices, mean local
       training loss, held-out balanced accuracy of the model *after* the round (mean and
       min over devices; measured by the devices at the start of the next round, or in the
       final evaluation: the coordinator's live round line shows the same number), epsilon
       (RDP and PLD, at ``--delta``).
   ``rounds.png`` / ``rounds.svg``
       accuracy (mean and worst device, federated and centralized, chance) and epsilon (RDP,
       PLD, the budget) vs round, with the settings as a caption.
   ``model_final.npz``
       the coordinator's final model and basis.
   ``model_final.onnx``
       the same model exported as ONNX (:mod:`biofed.coordinator.onnx_export`: raw feature
       rows in, class probabilities out, layout and privacy guarantee in its metadata); the
       demo runs it with onnxruntime on every device's held-out windows and reports its
       largest difference from the Numba path (``summary.json`` ``onnx``). Try it with
       ``biofed predict --model model_final.onnx FILE``.
   ``summary.json``
       federated vs centralized accuracy, epsilon, settings.
   ``evaluation/``
       with ``--data`` (or ``--evaluate``): :mod:`biofed.apps.evaluation` run on the same
       recordings after the federation — the personalized and new-patient views, every
       private method (DP-FTRL, one-shot LDA, DP-FedAvg, centralized DP) and baseline at
       epsilon 1, 2, 4, 8 and inf, with the spread over ``--repeats`` privacy-noise draws;
       its tables are printed and ``epsilon_accuracy.png`` plots the trade-off.

Algorithm and privacy defaults
------------------------------
``biofed demo`` trains with the one-shot algorithm (``--algorithm one_shot``,
``[training] algorithm`` of the coordinator): after the basis, every device sends its class
means in the basis space, clipped to C_m = 1 (``--means-clip``; ``--scatter-clip`` adds the
within-class scatter), the coordinator releases their sum once with noise multiplier
z_s = 0.65 (``--statistics-noise-multiplier``) and solves a ridge LDA (``--ridge`` 1); then
``--rounds`` DP-FedAvg fine-tuning rounds (default 0). Every device fine-tunes the global
model on its own training windows (personalization at no privacy cost). With the basis
release (z_b = 10) that is epsilon 7.84 (RDP) at delta = 1e-5, every release counted. These
settings are the best private method of ``biofed evaluate`` at epsilon <= 8 (its module
docstring has the leave-subjects-out tuning). ``--algorithm fedavg`` runs the DP-FedAvg
rounds instead, with these privacy defaults (client-level differential privacy, trust mode
``central``: devices clip, the coordinator clips again and adds the Gaussian noise):

- training: noise multiplier z = 2.0 on updates clipped to C = 0.25, 10 rounds, every device
  in every round (q = 1);
- basis: device standardization (each device z-scores its rows with its own training
  statistics, so the one basis statistic is a correlation matrix with entries in [-1, 1]),
  z_b = 10 on statistics clipped to C_b = 1 (clipping only rescales a device's matrix: the
  signal-to-noise ratio of the average is ``n / (z_b ||R_i||)`` whatever C_b);
- epsilon 8.10 (RDP) / 7.53 (PLD) at delta = 1e-5 after the 10 rounds (the basis event alone
  costs 0.38), under a budget of 10 that stops training before it would be exceeded (so
  ``--noise-multiplier 1.5`` stops after the round that would cross it).

Why these values: with few devices the noise on the averaged update is ``z C / n`` per
coordinate, so small C and few local epochs serve best, and 10 rounds at z = 2 vary least
between runs. The accuracies these defaults reach, and the sweeps behind them, are in
``docs/measurements.md`` with the commands that produced them. A noised basis
is little better than a random projection of the standardized features at this fleet size
(z_b from 2 to 10 gave the same accuracy), so z_b = 10 spends almost no epsilon on it and
leaves the budget to training. Epsilon 8-10 at delta 1e-5 is the range production federated
systems report for user-level guarantees. A lower z under the same budget runs fewer rounds
(``--noise-multiplier 1``: 3 rounds, epsilon 9.03; ``0.5``: no round fits, the model stays
at its initialization). Change the guarantee with ``--noise-multiplier`` /
``--epsilon-budget``, or pass ``--noise-multiplier 0`` for a non-private run (no noise
anywhere, no budget).

Centralized baseline
--------------------
:func:`centralized_baseline` pools the training windows of every device (the same rows and
held-out split the devices use: :func:`biofed.edge.tasks.labelled_split` on each device's
feature store; under device standardization each device's rows z-scored with its own training
statistics, as the agents do), projects them onto the federation's final basis, trains the same logistic
regression centrally (:func:`biofed.kernels.training.train`, no privacy) and scores it on
each device's held-out windows. The federated model is scored the same way here too, as a
check of the devices' own reports.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from biofed.apps.federation import Child, Listener, spawn, start_broker, tails, terminate, write_synthetic_devices
from biofed.cli_options import examples, logging_options
from biofed.config import OneShotSettings
from biofed.protocol import STANDARDIZATIONS, TRUST_MODES

logger = logging.getLogger(__name__)

__all__ = [
    "BaselineResult",
    "DemoError",
    "DemoSettings",
    "RoundRow",
    "centralized_baseline",
    "demo_command",
    "eegmat_devices",
    "run_demo",
]

FLEET = "demo"
ALGORITHM_ROUNDS = {"one_shot": 0, "fedavg": 10}
"""Training rounds of each ``--algorithm`` without ``--rounds`` (after one-shot: fine-tuning)."""
DEMO_ALGORITHM = "one_shot"
"""What ``biofed demo`` trains with: the best private algorithm at epsilon <= 8 (see
"Algorithm and privacy defaults")."""
SYNTHETIC_DEVICES = 10
"""Synthetic devices without ``--devices``: client-level DP noise on the mean update is
``z C / n``, so a private federation needs a fleet (``docs/measurements.md`` compares 5 and 10)."""
CLASSES = ("rest", "arithmetic")
IN_PROCESS_FLEET = 8
"""Above this many devices the demo runs them in its own process (:mod:`biofed.apps.simulate`:
one agent per device, shared kernels and threads) instead of one process each."""


class DemoError(RuntimeError):
    """The demo could not run to the end (the message says which part failed and why)."""


# ----------------------------------------------------------------------------- settings
_ONE_SHOT = OneShotSettings()


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on (written to ``summary.json``).

    The defaults run *with* client-level DP (see "Algorithm and privacy defaults" in the module
    docstring). ``algorithm`` defaults to ``"fedavg"`` here: these settings are also the harness
    of ``biofed simulate``, ``biofed audit`` and the benchmarks, which exercise training rounds;
    ``biofed demo`` passes :data:`DEMO_ALGORITHM`.
    """

    out: Path
    data: Path | None = None
    devices: int | None = None
    rounds: int | None = None
    """None: :data:`ALGORITHM_ROUNDS` of ``algorithm``."""
    algorithm: str = "fedavg"
    statistics_noise_multiplier: float = 0.65
    means_clip: float = _ONE_SHOT.means_clip
    scatter_clip: float | None = _ONE_SHOT.scatter_clip
    ridge: float = _ONE_SHOT.ridge
    noise_multiplier: float = 2.0
    clip: float = 0.25
    epsilon_budget: float | None = 10.0
    delta: float = 1e-5
    mosquitto: bool = False
    trust_mode: str = "central"
    sign: bool = False
    secure: bool = False
    synthetic_seconds: float = 60.0
    local_epochs: int = 2
    lr: float = 0.05
    batch_size: int = 32
    basis_clip: float = 1.0
    basis_noise_multiplier: float | None = 10.0
    standardization: str = "device"
    round_deadline_s: float = 60.0
    min_devices: int | None = None
    sampling_rate: float | str = "all"
    timeout_s: float = 900.0
    seed: int = 0
    agent_keepalive_s: int = 30
    evaluate: bool | None = None
    evaluation_repeats: int = 3


# ----------------------------------------------------------------------------- devices
def eegmat_devices(data: Path, limit: int | None = None) -> dict[str, list[Path]]:
    """``{"SubjectNN": [SubjectNN_1.edf, SubjectNN_2.edf]}`` for every complete subject in ``data``."""
    devices = {}
    for rest in sorted(data.glob("Subject*_1.edf")):
        match = re.fullmatch(r"(Subject\d+)_1", rest.stem)
        task = rest.with_name(f"{rest.stem[:-2]}_2.edf")
        if match and task.is_file():
            devices[match[1]] = [rest.resolve(), task.resolve()]
    if limit is not None:
        devices = dict(list(devices.items())[:limit])
    return devices


# ----------------------------------------------------------------------------- config files
def _write_toml(path: Path, top: Mapping, sections: Mapping[str, Mapping]) -> Path:
    from biofed.config import toml_document

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_document(top, sections))
    return path


def _broker_section(host: str, port: int, protocol: str, keepalive: int = 30) -> dict:
    return {"host": host, "port": port, "protocol": protocol, "keepalive": keepalive}


def write_configs(
    settings: DemoSettings,
    devices: Mapping[str, Sequence[Path]],
    host: str,
    port: int,
    protocol: str,
    fleet=None,
    broker_extra: Mapping | None = None,
) -> tuple[Path, dict[str, Path]]:
    """Write ``coordinator.toml`` and ``devices/<id>/device.toml`` under ``settings.out``;
    with a provisioned ``fleet`` (:class:`biofed.apps.provision.ProvisionedFleet`) each identity
    gets its TLS credentials and signing key from it. ``broker_extra`` (e.g. a user name and
    password every identity shares) goes into every ``[broker]`` section."""
    out = settings.out
    private = settings.noise_multiplier > 0  # z = 0: a non-private run (no basis noise, no budget either)
    dp = {
        "trust_mode": settings.trust_mode,
        "clip_norm": settings.clip,
        "noise_multiplier": settings.noise_multiplier,
        "statistics_noise_multiplier": settings.statistics_noise_multiplier if private else 0.0,
        "delta": settings.delta,
        "epsilon_budget": settings.epsilon_budget if private else None,
        "basis_noise_multiplier": settings.basis_noise_multiplier if private else 0.0,
        "basis_clip_norm": settings.basis_clip,
    }
    if fleet is not None:
        signing = {identity: fleet.signing_settings(identity) for identity in ("coordinator", *devices)}
    else:
        signing = _write_signing_keys(out, devices) if settings.sign else {}

    def broker(identity: str, keepalive: int = 30) -> dict:
        if fleet is None:
            return {**_broker_section(host, port, protocol, keepalive), **(broker_extra or {})}
        return {**fleet.broker_settings(identity), "keepalive": keepalive}

    coordinator = _write_toml(
        out / "coordinator.toml",
        {
            "fleet": FLEET,
            "rounds": _rounds(settings),
            "min_devices": settings.min_devices or len(devices),
            "sampling_rate": settings.sampling_rate,
            "round_deadline_s": settings.round_deadline_s,
            "state_dir": "state",
            **({"allowed_devices_file": str(fleet.layout.allowed_devices)} if fleet is not None else {}),
            **signing.get("coordinator", {}),
        },
        {
            "broker": broker("coordinator"),
            "training": {
                "local_epochs": settings.local_epochs,
                "lr": settings.lr,
                "batch_size": settings.batch_size,
                "algorithm": settings.algorithm,
                "one_shot": {
                    "ridge": settings.ridge,
                    "means_clip": settings.means_clip,
                    **({} if settings.scatter_clip is None else {"scatter_clip": settings.scatter_clip}),
                },
            },
            "model": {"classes": list(CLASSES), "standardization": settings.standardization},
            "strategy": {"name": "fedavg"},
            "dp": dp,
        },
    )
    device_files = {}
    for device, recordings in devices.items():
        device_files[device] = _write_toml(
            out / "devices" / device / "device.toml",
            {
                "device_id": device,
                "fleet": FLEET,
                "recordings": [str(p) for p in recordings],
                "store_path": "features.sqlite",
                "replay_speed": 0.0,
                **signing.get(device, {}),
            },
            {"broker": broker(device, settings.agent_keepalive_s)},
        )
    return coordinator, device_files


def _rounds(settings: DemoSettings) -> int:
    return ALGORITHM_ROUNDS[settings.algorithm] if settings.rounds is None else settings.rounds


def _write_signing_keys(out: Path, devices: Iterable[str]) -> dict[str, dict[str, str]]:
    """Fresh Ed25519 keys in the provisioning layout (``keys/{id}.pub.pem``, private keys
    ``coordinator/signing.key.pem`` and ``devices/{id}/signing.key.pem``); the config keys
    (``signing_key_file``, ``keys_dir``) of each identity, as absolute paths."""
    from biofed.signing import Signer

    keys_dir = out / "keys"
    shutil.rmtree(keys_dir, ignore_errors=True)
    keys_dir.mkdir(parents=True)
    entries = {}
    for identity in ("coordinator", *devices):
        signer = Signer.generate(identity)
        folder = out / "coordinator" if identity == "coordinator" else out / "devices" / identity
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "signing.key.pem"
        key_file.write_bytes(signer.private_pem())
        key_file.chmod(0o600)
        (keys_dir / f"{identity}.pub.pem").write_bytes(signer.public_pem())
        entries[identity] = {"signing_key_file": str(key_file.resolve()), "keys_dir": str(keys_dir.resolve())}
    return entries


# ----------------------------------------------------------------------------- observer
class UpdateObserver:
    """Subscribes to ``update/+`` and keeps each device's eval metrics per task round."""

    def __init__(self, host: str, port: int, protocol: str, broker_config=None) -> None:
        from biofed.mqtt import MqttClient
        from biofed.protocol import Topics

        self.topics = Topics(FLEET)
        if broker_config is None:
            self.client = MqttClient(host, port, "demo-observer", protocol=protocol, clean=True)
        else:  # a provisioned fleet's read-only observer credentials
            self.client = MqttClient.from_config(broker_config, "demo-observer", clean=True)
        self.accuracy: dict[int, dict[str, tuple[float, int]]] = defaultdict(dict)
        self.personal: dict[int, dict[str, float]] = defaultdict(dict)
        """Per task round, each device's reported accuracy of its personal model (central mode)."""
        self._listener = Listener(self.client, [self.topics.all_devices("update")], self._record, name="observer")

    def start(self) -> UpdateObserver:
        self._listener.start()
        return self

    def _record(self, inbound) -> None:
        from biofed.protocol import ProtocolError, decode_topic_message

        try:
            message = decode_topic_message(self.topics, inbound.topic, inbound.payload)
            metrics = message.payload.metrics
            if metrics.eval_balanced_accuracy is not None:
                self.accuracy[message.round][message.sender] = (metrics.eval_balanced_accuracy, metrics.eval_windows)
            if metrics.personal_balanced_accuracy is not None:
                self.personal[message.round][message.sender] = metrics.personal_balanced_accuracy
        except ProtocolError as exc:
            logger.warning("observer dropped a message on %s: %s", inbound.topic, exc)
        except Exception:  # noqa: BLE001 - one message never stops the observer
            logger.exception("observer dropped a message on %s: internal error", inbound.topic)

    def stop(self) -> None:
        self._listener.stop()


def _relay(stream, prefix: str, sink: list[str]) -> None:
    for line in stream:
        line = line.rstrip("\n")
        sink.append(line)
        click.echo(f"{prefix}{line}")


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RoundRow:
    """One line of the report table: the model after training round ``round`` (0: the
    initial model), as the devices measured it in task round ``task_round``."""

    round: int
    task_round: int
    devices: int
    loss: float | None
    accuracy_mean: float | None
    accuracy_min: float | None
    epsilon: float | None
    epsilon_pld: float | None = None


@dataclass(frozen=True)
class BaselineResult:
    """Held-out balanced accuracy per device of the centralized and federated models."""

    centralized: dict[str, float]
    federated: dict[str, float]
    n_train: int
    n_held_out: int

    @staticmethod
    def _summary(values: Mapping[str, float]) -> tuple[float, float]:
        array = np.array(list(values.values()))
        return float(array.mean()), float(array.min())

    @property
    def centralized_mean_min(self) -> tuple[float, float]:
        return self._summary(self.centralized)

    @property
    def federated_mean_min(self) -> tuple[float, float]:
        return self._summary(self.federated)


def _float_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def build_table(records: Sequence[Mapping], accuracy: Mapping[int, Mapping[str, tuple[float, int]]]) -> list[RoundRow]:
    """Rows per training round from the coordinator's ``rounds.json`` records and the observed
    eval metrics: the accuracy of the model after training round i is what the devices
    measured at the start of the next training round (or in the evaluation round). Row 0 is
    the initial model, measured at the start of the first training round, with the epsilon
    the basis phase spent (one-shot: the model of the statistics phase, measured at the start
    of the first fine-tuning round or in the evaluation, with the epsilon after its release);
    the coordinator's live round line reports the same numbers."""
    train = [r for r in records if r["phase"] == "train"]
    after = [r for r in records if r["phase"] in ("train", "evaluate")]
    one_shot = next((r for r in records if r["phase"] == "statistics"), None)

    def measured(record: Mapping | None) -> tuple[float | None, float | None]:
        if record is None:
            return None, None
        observed = [acc for acc, _ in accuracy.get(record["round"], {}).values()]
        if observed:
            return float(np.mean(observed)), float(np.min(observed))
        return _float_or_none(record.get("balanced_accuracy")), None

    def epsilon(record: Mapping | None, key: str) -> float | None:
        value = None if record is None else record.get(key)
        return None if value in (None, "inf", "nan") else _float_or_none(value)

    rows = []
    if one_shot is not None:
        mean, minimum = measured(after[0] if after else None)
        rows.append(
            RoundRow(
                round=0,
                task_round=int(one_shot["round"]),
                devices=int(one_shot["n_devices"]),
                loss=None,
                accuracy_mean=mean,
                accuracy_min=minimum,
                epsilon=epsilon(one_shot, "epsilon_rdp"),
                epsilon_pld=epsilon(one_shot, "epsilon_pld"),
            )
        )
    elif train:
        first = train[0]
        basis = [r for r in records if r["round"] < first["round"] and r["phase"] not in ("train", "evaluate")]
        mean, minimum = measured(first)
        last_basis = basis[-1] if basis else None
        rows.append(
            RoundRow(
                round=0,
                task_round=int(first["round"]),
                devices=int(first["n_devices"]),
                loss=None,
                accuracy_mean=mean,
                accuracy_min=minimum,
                epsilon=epsilon(last_basis, "epsilon_rdp"),
                epsilon_pld=epsilon(last_basis, "epsilon_pld"),
            )
        )
    for record in train:
        position = after.index(record)
        mean, minimum = measured(after[position + 1] if position + 1 < len(after) else None)
        rows.append(
            RoundRow(
                round=int(record["train_round"]),
                task_round=int(record["round"]),
                devices=int(record["n_devices"]),
                loss=_float_or_none(record.get("mean_loss")),
                accuracy_mean=mean,
                accuracy_min=minimum,
                epsilon=epsilon(record, "epsilon_rdp"),
                epsilon_pld=epsilon(record, "epsilon_pld"),
            )
        )
    return rows


def _device_split(store_path: Path, classes: Sequence[str]):
    from biofed.edge.store import FeatureStore
    from biofed.edge.tasks import labelled_split

    with FeatureStore(store_path) as store:
        data = labelled_split(*store.read(), classes)
    return data.X, data.y, data.train, data.held_out


def _row_standardization(
    X: np.ndarray, train_mask: np.ndarray, standardization: str, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The (mean, scale) a device z-scores its rows with: its own training rows' statistics
    under device standardization (what the agent does), else the basis's."""
    if standardization == "device" and train_mask.any():
        from biofed.edge.split import device_standardization

        return device_standardization(X[train_mask])
    return mean, scale


def centralized_baseline(
    stores: Mapping[str, Path],
    model_path: Path,
    *,
    epochs: int = 100,
    lr: float = 0.05,
    batch_size: int = 32,
    random_state=0,
) -> BaselineResult:
    """Train the model centrally on the pooled training windows of every device.

    Parameters
    ----------
    stores : mapping device -> feature store path
        The devices' stores (raw feature rows), split with
        :func:`biofed.edge.tasks.labelled_split` as the devices split them.
    model_path : Path
        The coordinator's ``model_final.npz``: the basis to project onto, the classes, the
        hidden size and the federated parameters (scored here as well).
    epochs, lr, batch_size, random_state
        Centralized SGD settings (:func:`biofed.kernels.training.train`).

    Returns
    -------
    BaselineResult
        Balanced accuracy per device of the centralized and the federated model.
    """
    from biofed.edge.split import balanced_accuracy
    from biofed.kernels import init_params, predict_proba, project, train
    from biofed.model import ModelFile

    final = ModelFile.load(model_path)
    classes, hidden, federated_params, standardization = (
        final.classes,
        final.hidden,
        final.params,
        final.standardization,
    )
    components, mean, scale = final.basis
    splits = {}
    for device, path in stores.items():
        X, y, train_mask, held_out = _device_split(path, classes)
        m, s = _row_standardization(X, train_mask, standardization, mean, scale)
        Z = project(X, components, mean=m, scale=s) if X.shape[0] else np.empty((0, components.shape[0]))
        splits[device] = (Z, y, train_mask, held_out)
    Z_train = np.vstack([Z[m] for Z, _, m, _ in splits.values()])
    y_train = np.concatenate([y[m] for _, y, m, _ in splits.values()])
    if Z_train.shape[0] == 0:
        raise DemoError("no training windows in any device store: nothing to train the centralized baseline on")
    c = len(classes)
    params = init_params(Z_train.shape[1], c, hidden, random_state=random_state)
    params, _ = train(
        params, Z_train, y_train, c, hidden, epochs=epochs, batch_size=batch_size, lr=lr, random_state=random_state
    )
    centralized, federated = {}, {}
    n_held_out = 0
    for device, (Z, y, _, held_out) in splits.items():
        if not held_out.any():
            continue
        n_held_out += int(held_out.sum())
        for params_, out in ((params, centralized), (federated_params, federated)):
            proba = predict_proba(params_, Z[held_out], c, hidden)
            out[device] = balanced_accuracy(y[held_out], proba.argmax(axis=1))
    return BaselineResult(centralized, federated, int(Z_train.shape[0]), n_held_out)


def onnx_check(stores: Mapping[str, Path], onnx_path: Path, model_path: Path) -> dict | None:
    """Run the exported ONNX model on every device's held-out windows (onnxruntime) and compare
    its probabilities with the Numba path on the same rows (``model_path``: ``model_final.npz``).

    Returns None when the coordinator wrote no ONNX model (no device reported its layout).
    """
    from biofed.edge.inference import OnnxModel
    from biofed.kernels import predict_proba, project
    from biofed.model import ModelFile

    if not onnx_path.is_file():
        return None
    model = OnnxModel(onnx_path)
    final = ModelFile.load(model_path)
    params, hidden, standardization = final.params, final.hidden, final.standardization
    components, mean, scale = final.basis
    n_windows, max_diff = 0, 0.0
    for path in stores.values():
        X, _, train_mask, held_out = _device_split(path, model.classes)
        if not held_out.any():
            continue
        m, s = _row_standardization(X, train_mask, standardization, mean, scale)
        rows = X[held_out] if standardization == "global" else (X[held_out] - m) / s  # as the agent feeds it
        onnx_proba = model.predict_features(rows)
        numba_proba = predict_proba(
            params, project(X[held_out], components, mean=m, scale=s), len(model.classes), hidden
        )
        max_diff = max(max_diff, float(np.abs(onnx_proba - numba_proba).max()))
        n_windows += int(held_out.sum())
    meta = model.metadata
    return {
        "file": onnx_path.name,
        "bytes": onnx_path.stat().st_size,
        "round": meta.round,
        "train_rounds": meta.train_round,
        "epsilon": meta.privacy.epsilon,
        "held_out_windows": n_windows,
        "max_abs_diff_vs_numba": max_diff,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[RoundRow]) -> str:
    lines = [f"{'round':>5}  {'devices':>7}  {'loss':>7}  {'bal.acc mean':>12}  {'min':>6}  {'epsilon':>8}"]
    for row in rows:
        lines.append(
            f"{row.round:>5}  {row.devices:>7}  {_fmt(row.loss, '.4f'):>7}  "
            f"{_fmt(row.accuracy_mean, '.3f'):>12}  {_fmt(row.accuracy_min, '.3f'):>6}  "
            f"{_fmt(row.epsilon, '.3f'):>8}"
        )
    return "\n".join(lines)


def write_report(out: Path, rows: Sequence[RoundRow], baseline: BaselineResult | None, summary: dict) -> None:
    """rounds.csv, rounds.json, rounds.png, rounds.svg and summary.json in ``out``."""
    fields = list(RoundRow.__dataclass_fields__)
    with (out / "rounds.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    (out / "rounds.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _plot(out / "rounds", rows, baseline, summary)


def _caption(summary: Mapping) -> str:
    """The settings a reader needs to judge the plot: data, devices, DP parameters."""
    settings = summary.get("settings", {})
    z, budget, z_basis = (settings.get(k) for k in ("noise_multiplier", "epsilon_budget", "basis_noise_multiplier"))
    one_shot = settings.get("algorithm") == "one_shot"
    statistics = f"z_s = {settings.get('statistics_noise_multiplier'):g}, " if one_shot else ""
    privacy = (
        f"trust {settings.get('trust_mode')}, {statistics}z = {z:g}, C = {settings.get('clip'):g}, "
        f"z_b = {z if z_basis is None else z_basis:g}, delta = {settings.get('delta'):g}, "
        f"{'no budget' if budget is None else f'budget {budget:g}'}"
        if z
        else "no DP noise (epsilon infinite)"
    )
    return (
        f"{summary.get('source', '')}; {len(summary.get('devices', []))} devices; "
        f"{'one-shot LDA + ' if one_shot else ''}{settings.get('rounds')} rounds; {privacy}; "
        f"{settings.get('local_epochs')} local epochs, lr {settings.get('lr'):g}"
    )


def _plot(stem: Path, rows: Sequence[RoundRow], baseline: BaselineResult | None, summary: Mapping) -> None:
    """``stem``.png and ``stem``.svg: accuracy per round (mean and worst device, the
    personalized models' on the final round, the centralized baseline's mean and worst device,
    chance) over epsilon (RDP, PLD, budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in rows]
    nan = float("nan")
    fig, (ax_acc, ax_eps) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    ax_acc.plot(
        rounds,
        [nan if r.accuracy_mean is None else r.accuracy_mean for r in rows],
        "o-",
        color="tab:blue",
        label="federated, mean over devices",
    )
    ax_acc.plot(
        rounds,
        [nan if r.accuracy_min is None else r.accuracy_min for r in rows],
        "s--",
        color="tab:blue",
        alpha=0.6,
        label="federated, worst device",
    )
    personal = summary.get("personalized") or {}
    if personal.get("mean") is not None:  # measured once, on the final model
        ax_acc.plot(rounds[-1:], [personal["mean"]], "*", color="tab:green", markersize=12, label="personalized, mean")
        ax_acc.plot(
            rounds[-1:], [personal["min"]], "P", color="tab:green", alpha=0.6, label="personalized, worst device"
        )
    if baseline is not None and baseline.centralized:
        mean, worst = baseline.centralized_mean_min
        ax_acc.axhline(mean, color="k", linestyle=":", label="centralized, mean")
        ax_acc.axhline(worst, color="0.5", linestyle="-.", label="centralized, worst device")
    ax_acc.axhline(1.0 / len(CLASSES), color="tab:gray", linewidth=0.8, label=f"chance ({1.0 / len(CLASSES):.2f})")
    ax_acc.set_ylabel("held-out balanced accuracy")
    ax_acc.set_ylim(0.0, 1.02)
    ax_acc.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: covers no curve
    ax_acc.grid(alpha=0.3)
    rdp = [nan if r.epsilon is None else r.epsilon for r in rows]
    pld = [nan if r.epsilon_pld is None else r.epsilon_pld for r in rows]
    ax_eps.plot(rounds, rdp, "o-", color="tab:red", label="epsilon (RDP)")
    if not all(math.isnan(e) for e in pld):
        ax_eps.plot(rounds, pld, "^--", color="tab:orange", label="epsilon (PLD)")
    budget = summary.get("settings", {}).get("epsilon_budget")
    private = not all(math.isnan(e) for e in rdp)
    if private and budget is not None:
        ax_eps.axhline(budget, color="k", linestyle=":", label=f"budget ({budget:g})")
    ax_eps.set_ylabel(f"epsilon at delta = {summary.get('delta', 0):g}")
    ax_eps.set_xlabel(
        "fine-tuning round (0: the one-shot model)"
        if summary.get("settings", {}).get("algorithm") == "one_shot"
        else "training round (0: the initial model)"
    )
    ax_eps.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds:
        ax_eps.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
        if len(rounds) == 1:  # one model (one-shot, no fine-tuning): one tick
            ax_eps.set_xticks(rounds)
    ax_eps.grid(alpha=0.3)
    if private:
        ax_eps.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax_eps.set_yticks([])
        ax_eps.text(
            0.5,
            0.5,
            "no DP noise: epsilon is infinite (no privacy guarantee)",
            transform=ax_eps.transAxes,
            ha="center",
            va="center",
        )
    fig.text(0.01, 0.01, _caption(summary), fontsize="small", wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    for suffix in (".png", ".svg"):
        fig.savefig(stem.with_suffix(suffix), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- run
def run_demo(settings: DemoSettings) -> dict:
    """Run the whole demo (see the module docstring); returns the summary dict.

    Raises
    ------
    DemoError
        No devices, a child process failed, or the global timeout expired; the message
        carries the failing processes' log tails.
    """
    from biofed.apps.broker import BrokerError
    from biofed.apps.provision import ProvisionError
    from biofed.model import ModelFile

    out = settings.out.resolve()
    if settings.algorithm not in ALGORITHM_ROUNDS:
        raise DemoError(f"unknown algorithm {settings.algorithm!r}; use one of {sorted(ALGORITHM_ROUNDS)}")
    settings = DemoSettings(**{**asdict(settings), "out": out, "rounds": _rounds(settings)})
    if settings.algorithm == "fedavg" and settings.rounds < 1:
        raise DemoError("--algorithm fedavg needs --rounds >= 1 (0 rounds only after one_shot)")
    if out.exists() and (out / "state").exists():
        shutil.rmtree(out / "state")  # a fresh federation every run (the coordinator would resume)
    shutil.rmtree(out / "devices", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    if settings.data is not None:
        devices = eegmat_devices(Path(settings.data), settings.devices)
        if not devices:
            raise DemoError(f"no eegmat subjects (SubjectNN_1.edf + SubjectNN_2.edf) found in {settings.data}")
        source = f"eegmat ({settings.data})"
    else:
        n = settings.devices or SYNTHETIC_DEVICES
        click.echo(f"writing {n} synthetic devices ({settings.synthetic_seconds:g} s per class) to {out / 'data'}")
        devices = write_synthetic_devices(
            out / "data", n, duration_s=settings.synthetic_seconds, random_state=settings.seed
        )
        source = "synthetic"
    if settings.noise_multiplier > 0 and settings.standardization == "global":
        z_basis = (
            settings.basis_noise_multiplier
            if settings.basis_noise_multiplier is not None
            else settings.noise_multiplier
        )
        click.echo(
            f"note: with --standardization global the basis noise multiplier {z_basis:g} also noises the raw-feature "
            f"moments: the averaged statistic gets N(0, (z_b * {settings.basis_clip:g} / {len(devices)})^2) per "
            "entry (--basis-clip), which swamps them unless the fleet is large",
            err=True,
        )
    try:
        broker, protocol, fleet = start_broker(
            out, FLEET, devices, secure=settings.secure, mosquitto=settings.mosquitto
        )
    except (BrokerError, ProvisionError) as exc:
        raise DemoError(f"cannot start the MQTT broker: {exc}") from None
    children: list[Child] = []
    observer = in_process = None
    started = time.monotonic()
    try:
        coordinator_toml, device_tomls = write_configs(settings, devices, broker.host, broker.port, protocol, fleet)
        kind = (
            "mosquitto (TLS, provisioned in fleet/)"
            if fleet is not None
            else "mosquitto"
            if settings.mosquitto
            else "amqtt"
        )
        click.echo(f"{len(devices)} devices ({source}), broker {kind} on {broker.host}:{broker.port}, report in {out}")
        observer = UpdateObserver(
            broker.host, broker.port, protocol, None if fleet is None else fleet.broker_config("observer")
        ).start()
        # One compilation for the whole fleet (a cold cache takes minutes): every device then loads
        # the kernels from the cache before it reports online, so no round waits on the compiler.
        warm = spawn("warmup", ["warmup"], out / "logs" / "warmup.log")
        if warm.process.wait() != 0:
            raise DemoError("biofed warmup failed:\n" + tails([warm]))
        coordinator_lines: list[str] = []
        coordinator = spawn(
            "coordinator",
            ["coordinator", "--config", str(coordinator_toml), "--discovery-timeout", repr(settings.timeout_s)],
            out / "logs" / "coordinator.log",
            stdout=subprocess.PIPE,
        )
        children.append(coordinator)
        relay = threading.Thread(target=_relay, args=(coordinator.process.stdout, "  ", coordinator_lines), daemon=True)
        relay.start()
        if len(devices) > IN_PROCESS_FLEET:
            in_process, fleet_log = _launch_in_process(device_tomls.values(), out / "logs" / "devices.log")
        else:
            for device, toml in device_tomls.items():
                children.append(spawn(device, ["edge", "--config", str(toml)], out / "logs" / f"{device}.log"))
        reported_dead: set[str] = set()
        while coordinator.process.poll() is None:
            if time.monotonic() - started > settings.timeout_s:
                raise DemoError(
                    f"the federation did not finish within {settings.timeout_s:g} s (--timeout)\n"
                    + tails([coordinator] + [c for c in children[1:] if c.process.poll() is not None])
                )
            for child in children[1:]:
                if child.process.poll() not in (None, 0) and child.name not in reported_dead:
                    reported_dead.add(child.name)
                    click.echo(
                        f"device {child.name} exited with code {child.process.returncode}:\n{child.tail(10)}", err=True
                    )
            time.sleep(0.2)
        relay.join(timeout=5.0)
        if coordinator.process.returncode != 0:
            raise DemoError(f"the coordinator exited with code {coordinator.process.returncode}\n" + tails(children))
        elapsed = time.monotonic() - started
    finally:
        terminate(children)
        if in_process is not None:
            in_process.close()
            logging.getLogger("biofed.edge").removeHandler(fleet_log)
            fleet_log.close()
        if observer is not None:
            observer.stop()
        broker.stop()
    state = out / "state"
    records = json.loads((state / "rounds.json").read_text())
    shutil.copyfile(state / "model_final.npz", out / "model_final.npz")
    if (state / "model_final.onnx").is_file():
        shutil.copyfile(state / "model_final.onnx", out / "model_final.onnx")
    rows = build_table(records, observer.accuracy if observer is not None else {})
    stores = {device: toml.parent / "features.sqlite" for device, toml in device_tomls.items()}
    baseline = centralized_baseline(stores, out / "model_final.npz", random_state=settings.seed)
    fed_mean, fed_min = baseline.federated_mean_min
    cen_mean, cen_min = baseline.centralized_mean_min
    # everything the coordinator accounted (the basis round included), from its last committed round
    final_eps = _float_or_none(records[-1].get("epsilon_rdp")) if records else None
    final_eps_pld = _float_or_none(records[-1].get("epsilon_pld")) if records else None
    stop_reason = ModelFile.load(out / "model_final.npz").stop_reason
    evaluation = next((r for r in records if r["phase"] == "evaluate"), None)
    personal = {} if evaluation is None or observer is None else observer.personal.get(evaluation["round"], {})
    onnx_summary = onnx_check(stores, out / "model_final.onnx", out / "model_final.npz")
    summary = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        "source": source,
        "devices": sorted(devices),
        "wall_s": round(elapsed, 1),
        "federated": {
            "mean": fed_mean,
            "min": fed_min,
            "per_device": baseline.federated,
            "reported_by_devices": None if evaluation is None else evaluation.get("balanced_accuracy"),
        },
        "personalized": {
            "mean": float(np.mean(list(personal.values()))) if personal else None,
            "min": float(np.min(list(personal.values()))) if personal else None,
            "per_device": dict(sorted(personal.items())),
        },
        "centralized": {
            "mean": cen_mean,
            "min": cen_min,
            "per_device": baseline.centralized,
            "train_windows": baseline.n_train,
            "held_out_windows": baseline.n_held_out,
        },
        "epsilon": final_eps,
        "epsilon_pld": final_eps_pld,
        "delta": settings.delta,
        "stop_reason": stop_reason,
        "rounds": [asdict(r) for r in rows],
        "onnx": onnx_summary,
    }
    write_report(out, rows, baseline, summary)
    click.echo("")
    click.echo(format_table(rows))
    click.echo("")
    evaluating = settings.evaluate if settings.evaluate is not None else settings.data is not None
    epsilon_text = (
        "inf (no noise)"
        if final_eps is None
        else f"{final_eps:.3f} (RDP)" + ("" if final_eps_pld is None else f" / {final_eps_pld:.3f} (PLD)")
    )
    click.echo(
        f"final federated model:  balanced accuracy mean {fed_mean:.3f}, min {fed_min:.3f} "
        f"(held-out windows of {len(baseline.federated)} devices, "
        f"{'one-shot LDA + ' if settings.algorithm == 'one_shot' else ''}"
        f"{sum(r.round > 0 for r in rows)} training rounds), epsilon "
        f"{epsilon_text} at delta {settings.delta:g}"
        + ("" if final_eps is None else "; one draw of the privacy noise")
        + (" (the evaluation below gives the spread over draws)" if final_eps is not None and evaluating else "")
    )
    if personal:
        click.echo(
            f"personalized on device: balanced accuracy mean {np.mean(list(personal.values())):.3f}, min "
            f"{np.min(list(personal.values())):.3f} (the global model fine-tuned on each device's own training "
            "windows; never sent, no privacy cost; reported by the devices)"
        )
    elif settings.trust_mode != "central":
        click.echo(
            f"personalized on device: not reported in {settings.trust_mode} trust mode (nothing data-dependent "
            "leaves a device); each device logs its own"
        )
    if stop_reason and stop_reason != "all training rounds done":
        click.echo(f"training stopped early: {stop_reason}")
    click.echo(
        f"centralized baseline:   balanced accuracy mean {cen_mean:.3f}, min {cen_min:.3f} "
        f"(logistic regression on {baseline.n_train} pooled training windows, same basis and split)"
    )
    if onnx_summary is None:
        click.echo("ONNX model: not exported (no device reported its feature layout)")
    else:
        click.echo(
            f"ONNX model:             {onnx_summary['file']} ({onnx_summary['bytes'] / 1024:.1f} KiB, round "
            f"{onnx_summary['round']}); onnxruntime vs Numba on {onnx_summary['held_out_windows']} held-out "
            f"windows: max |diff| {onnx_summary['max_abs_diff_vs_numba']:.1e}"
        )
    click.echo(
        f"report: {out} (rounds.csv, rounds.json, rounds.png, rounds.svg, model_final.npz, "
        f"model_final.onnx, summary.json) in {elapsed:.0f} s"
    )
    if evaluating:
        from biofed.apps.evaluation import evaluate_files

        click.echo("")
        evaluate_files(
            devices, delta=settings.delta, repeats=settings.evaluation_repeats, out=out / "evaluation", echo=click.echo
        )
        summary["evaluation"] = str(out / "evaluation" / "evaluation.json")
        click.echo(f"evaluation: {out / 'evaluation'} (evaluation.json, evaluation.txt, epsilon_accuracy.png)")
    return summary


def _launch_in_process(tomls: Iterable[Path], log: Path):
    """Run the devices as one in-process :class:`biofed.apps.simulate.SimulatedFleet` (real agents
    sharing the kernels and a thread pool) with their log lines in ``log``; returns the fleet
    and the log handler to remove after it."""
    from biofed.apps.simulate import SimulatedFleet

    log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    handler.setLevel(logging.INFO)
    edge_logger = logging.getLogger("biofed.edge")
    edge_logger.addHandler(handler)
    edge_logger.setLevel(logging.INFO)
    fleet = SimulatedFleet.from_configs(tomls)
    fleet.launch()
    return fleet, handler


def federation_options(*, seed_help: str) -> Callable:
    """The options ``biofed demo`` and ``biofed simulate`` share, each defaulting to
    :class:`DemoSettings`: the DP settings of the basis, the one-shot statistics and the
    training rounds, the trust mode, signing, the broker and the synthetic data."""
    options = [
        click.option(
            "--statistics-noise-multiplier",
            type=click.FloatRange(min=0),
            default=DemoSettings.statistics_noise_multiplier,
            show_default=True,
            help="one_shot: DP noise multiplier z_s of the one release of the class statistics (ignored when "
            "--noise-multiplier is 0).",
        ),
        click.option(
            "--means-clip",
            type=click.FloatRange(min=0, min_open=True),
            default=DemoSettings.means_clip,
            show_default=True,
            help="one_shot: Frobenius bound C_m of a device's class means in the basis space.",
        ),
        click.option(
            "--scatter-clip",
            type=click.FloatRange(min=0, min_open=True),
            default=DemoSettings.scatter_clip,
            help="one_shot: Frobenius bound C_s of a device's within-class scatter (default: no scatter, "
            "nearest class mean with ridge).",
        ),
        click.option(
            "--ridge",
            type=click.FloatRange(min=0, min_open=True),
            default=DemoSettings.ridge,
            show_default=True,
            help="one_shot: ridge lambda of the LDA.",
        ),
        click.option(
            "--noise-multiplier",
            type=click.FloatRange(min=0),
            default=DemoSettings.noise_multiplier,
            show_default=True,
            help="DP noise multiplier z of the training rounds (0: a non-private run: no noise "
            "anywhere, no budget, epsilon infinite).",
        ),
        click.option(
            "--clip-norm",
            "--clip",
            "clip",
            type=click.FloatRange(min=0, min_open=True),
            default=DemoSettings.clip,
            show_default=True,
            help="L2 clip norm C of each device's model update (--clip: older spelling).",
        ),
        click.option(
            "--basis-noise-multiplier",
            type=click.FloatRange(min=0),
            default=DemoSettings.basis_noise_multiplier,
            show_default=True,
            help="DP noise multiplier z_b of the basis round (ignored when --noise-multiplier is 0).",
        ),
        click.option(
            "--epsilon-budget",
            type=click.FloatRange(min=0, min_open=True),
            default=DemoSettings.epsilon_budget,
            show_default=True,
            help="Stop training before epsilon (RDP) would exceed this (not with z = 0).",
        ),
        click.option(
            "--delta",
            type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
            default=DemoSettings.delta,
            show_default=True,
            help="DP delta.",
        ),
        click.option(
            "--trust-mode",
            type=click.Choice(TRUST_MODES),
            default=DemoSettings.trust_mode,
            show_default=True,
            help="Who adds the DP noise: the coordinator (central), each device (local), or each device a "
            "share with the coordinator seeing only the securely aggregated sum (distributed).",
        ),
        click.option("--sign", is_flag=True, help="Every device signs with its own fresh Ed25519 key; all verify."),
        click.option("--mosquitto", is_flag=True, help="Use Mosquitto (MQTT 5) instead of the embedded amqtt broker."),
        click.option(
            "--seconds",
            "synthetic_seconds",
            type=click.FloatRange(min=5),
            default=DemoSettings.synthetic_seconds,
            show_default=True,
            help="Synthetic recording length per class and source.",
        ),
        click.option("--seed", type=int, default=DemoSettings.seed, show_default=True, help=seed_help),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.command(
    "demo",
    epilog=examples(
        "biofed demo",
        "biofed demo --data /work/shared/datasets/eegmat --no-evaluate",
        "biofed demo --algorithm fedavg --noise-multiplier 1.0",
        "biofed demo --trust-mode distributed --sign --noise-multiplier 1.0",
        "biofed demo --secure --trust-mode distributed --out secure-demo",
    ),
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="eegmat folder (SubjectNN_1.edf + SubjectNN_2.edf per device); default: synthetic devices.",
)
@click.option(
    "--devices",
    type=click.IntRange(min=1),
    default=None,
    help=f"Number of devices (synthetic: default {SYNTHETIC_DEVICES}; eegmat: first N subjects, default all).",
)
@click.option(
    "--algorithm",
    type=click.Choice(sorted(ALGORITHM_ROUNDS)),
    default=DEMO_ALGORITHM,
    show_default=True,
    help="one_shot: one private release of the devices' class statistics, solved as a ridge LDA (then "
    "--rounds fine-tuning rounds); fedavg: DP-FedAvg training rounds.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=0),
    default=None,
    help="Training rounds (after one_shot: DP-FedAvg fine-tuning rounds). Default: "
    + ", ".join(f"{name} {n}" for name, n in ALGORITHM_ROUNDS.items())
    + ".",
)
@click.option(
    "--basis-clip-norm",
    "--basis-clip",
    "basis_clip",
    type=click.FloatRange(min=0, min_open=True),
    default=DemoSettings.basis_clip,
    show_default=True,
    help="L2 clip norm C_b of the devices' basis statistics (--basis-clip: older spelling).",
)
@click.option(
    "--standardization",
    type=click.Choice(STANDARDIZATIONS),
    default=DemoSettings.standardization,
    show_default=True,
    help="device: each device z-scores its rows with its own training statistics; "
    "global: a federated moments phase fixes one standardization.",
)
@click.option(
    "--secure",
    is_flag=True,
    help="Provision the fleet (biofed provision: TLS certificates, passwords, per-device ACLs, signing keys) "
    "and run it over Mosquitto with TLS, every message signed (implies --mosquitto and --sign).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("biofed-demo"),
    show_default=True,
    help="Report folder (configs, logs, device stores and results go here).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=900.0,
    show_default=True,
    help="Global timeout (s); every process is killed after it.",
)
@click.option(
    "--evaluate/--no-evaluate",
    default=None,
    help="After the federation, run `biofed evaluate` on the same recordings (both views, baselines, "
    "epsilon 1-inf, spread over noise draws). Default: with --data only.",
)
@click.option(
    "--repeats",
    "evaluation_repeats",
    type=click.IntRange(min=1),
    default=DemoSettings.evaluation_repeats,
    show_default=True,
    help="Privacy-noise draws per private cell of the evaluation.",
)
@federation_options(seed_help="Seed of the synthetic data and the baseline.")
@logging_options(default_level="warning")
def demo_command(**options) -> None:
    """Run a whole federation on this machine and report accuracy and privacy per round.

    Starts a broker, a coordinator and one edge agent per device (separate processes),
    prints one line per round and, at the end, the table of rounds (devices, loss,
    held-out balanced accuracy mean and min over devices, epsilon) next to a centralized
    baseline.
    """
    settings = DemoSettings(**options)
    try:
        run_demo(settings)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
