"""The one-shot statistics phase of a live federation, without a broker: the packed wire
layout, the device's handler, the coordinator's phase function (against a plain NumPy LDA),
its charges in every trust mode, the configuration switch and on-device personalization."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from biofed.config import ConfigError, CoordinatorConfig, DeviceConfig, load_config
from biofed.coordinator.ingest import OpenRound
from biofed.coordinator.phases import (
    PhaseSettings,
    basis_phase,
    charge_before_task,
    compose_rounds,
    make_task,
    planned_epsilons,
    planned_releases,
    statistics_phase,
)
from biofed.coordinator.state import Snapshot
from biofed.edge.tasks import (
    DeviceRelease,
    DeviceUsage,
    LocalData,
    TaskRefused,
    evaluate_reply,
    labelled_split,
    personal_model,
    project_rows,
    statistics_reply,
)
from biofed.kernels import init_params, predict_proba
from biofed.model import fit_basis
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import PrivacyMechanism
from biofed.protocol import (
    Basis,
    InvalidPayload,
    Sketch,
    Task,
    Topics,
    Update,
    UpdateMetrics,
    decode_topic_message,
    encode_message,
)
from biofed.protocol.statistics import pack_statistics, statistics_size, unpack_statistics

CLASSES = ("rest", "task")
D, K = 6, 3


def _device(seed: int, shift: float = 2.0, n: int = 30) -> LocalData:
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(size=(n, D)), rng.normal(loc=shift, size=(n, D))])
    labels = np.array([CLASSES[0]] * n + [CLASSES[1]] * n)
    order = rng.permutation(2 * n)
    return labelled_split(X[order], labels[order], np.arange(2 * n, dtype=np.float64), CLASSES)


def _basis(devices: list[LocalData]) -> Basis:
    pooled = np.vstack([(d.X[d.train] - d.standardization()[0]) / d.standardization()[1] for d in devices])
    return Basis(
        round=1,
        version=1,
        components=fit_basis(pooled, K).components,
        mean=np.zeros(D),
        scale=np.ones(D),
        standardization="device",
    )


def _task(trust_mode="central", scatter_clip=0.0, z=0.0, **overrides) -> Task:
    fields = dict(
        round=5,
        model=np.empty(0),
        basis_version=1,
        classes=CLASSES,
        deadline=0.0,
        phase="statistics",
        clip_norm=1.0,
        trust_mode=trust_mode,
        noise_multiplier=z,
        means_clip=2.0,
        scatter_clip=scatter_clip,
    )
    fields.update(overrides)
    return Task(**fields)


def _settings(trust_mode="central", scatter_clip=None, z=0.0, ridge=0.5) -> PhaseSettings:
    return PhaseSettings(
        trust_mode=trust_mode,
        noise_multiplier=1.0,
        basis_noise_multiplier=10.0,
        basis_clip_norm=1.0,
        secagg_threshold=2,
        basis_k=K,
        classes=CLASSES,
        hidden=0,
        sampling_rate="all",
        algorithm="one_shot",
        statistics_noise_multiplier=z,
        means_clip=2.0,
        scatter_clip=scatter_clip,
        ridge=ridge,
    )


def _state(basis: Basis) -> Snapshot:
    return Snapshot(
        next_round=6,
        phase="statistics",
        basis_version=1,
        n_features=D,
        basis_components=basis.components,
        basis_mean=basis.mean,
        basis_scale=basis.scale,
        params=init_params(K, 2, 0),
    )


def _gate() -> PrivacyMechanism:
    return PrivacyMechanism(PrivacyLedger(1e-5))


def _naive_lda(devices: list[LocalData], basis: Basis, means_clip: float, scatter_clip, ridge: float) -> np.ndarray:
    """The same LDA written out with plain NumPy: per-device clipped class means and scatter of
    the projected training rows, averaged; W = (S + ridge I)^-1 M^T, b = -1/2 diag(M W)."""
    means_all, scatters = [], []
    for data in devices:
        mean, scale = data.standardization()
        Z = ((data.X[data.train] - mean) / scale) @ basis.components.T
        y = data.y[data.train]
        M = np.stack([Z[y == c].mean(axis=0) for c in range(2)])
        M = M * min(1.0, means_clip / np.linalg.norm(M))
        means_all.append(M)
        if scatter_clip is not None:
            R = Z - M_unclipped(Z, y)[y]
            S = R.T @ R / Z.shape[0]
            scatters.append(S * min(1.0, scatter_clip / np.linalg.norm(S)))
    M = np.mean(means_all, axis=0)
    S = np.zeros((K, K)) if scatter_clip is None else np.mean(scatters, axis=0)
    W = np.linalg.inv(S + ridge * np.eye(K)) @ M.T
    b = -0.5 * np.array([M[c] @ W[:, c] for c in range(2)])
    return np.concatenate([W.ravel(), b])


def M_unclipped(Z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([Z[y == c].mean(axis=0) for c in range(2)])


# ----------------------------------------------------------------------------- wire layout
def test_packed_statistics_have_norm_at_most_one_and_unpack_to_the_blocks():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(2, K))
    means *= 2.0 / np.linalg.norm(means)  # at its bound
    scatter = rng.normal(size=(K, K))
    scatter *= 0.5 / np.linalg.norm(scatter)
    vector = pack_statistics(means, scatter, 2.0, 3.0)
    assert vector.shape == (statistics_size(2, K, True),) and np.linalg.norm(vector) <= 1 + 1e-12
    back_means, back_scatter = unpack_statistics(vector, 2, K, 2.0, 3.0)
    np.testing.assert_allclose(back_means, means)
    np.testing.assert_allclose(back_scatter, scatter)
    only_means = pack_statistics(means, None, 2.0, None)
    assert np.linalg.norm(only_means) == pytest.approx(1.0)
    np.testing.assert_allclose(unpack_statistics(only_means, 2, K, 2.0, None)[0], means)
    with pytest.raises(ValueError, match=r"has 6 entries, got shape \(15,\)"):
        unpack_statistics(vector, 2, K, 2.0, None)


def test_statistics_sketch_is_validated_and_round_trips_over_the_wire():
    topics = Topics("ward7")
    sketch = Sketch(
        round=5, basis_version=1, phase="statistics", statistic=np.ones(6), clipped=False, n_features=K, n_classes=2
    )
    data = encode_message(sketch, fleet="ward7", sender="pi-01")
    decoded = decode_topic_message(topics, topics.sketch("pi-01"), data).payload
    assert decoded.n_classes == 2 and decoded.statistic.shape == (6,)
    with pytest.raises(InvalidPayload, match=r"must have shape \(6,\) or \(15,\), got \(7,\)"):
        Sketch(
            round=5, basis_version=1, phase="statistics", statistic=np.ones(7), clipped=False, n_features=K, n_classes=2
        )
    with pytest.raises(InvalidPayload, match="needs n_classes >= 2"):
        Sketch(round=5, basis_version=1, phase="statistics", statistic=np.ones(6), clipped=False, n_features=K)
    with pytest.raises(InvalidPayload, match="must be finite|NaN|finite"):
        Sketch(
            round=5,
            basis_version=1,
            phase="statistics",
            statistic=np.array([np.nan] * 6),
            clipped=False,
            n_features=K,
            n_classes=2,
        )
    with pytest.raises(InvalidPayload, match="needs Task.means_clip > 0"):
        _task(means_clip=0.0)
    # the basis phases' messages do not carry the new fields: older receivers still decode them
    basis_sketch = Sketch(round=1, basis_version=0, phase="moments", statistic=np.ones(4), clipped=False, n_features=2)
    assert "n_classes" not in basis_sketch.to_payload()
    train_task = Task(round=1, model=np.ones(3), basis_version=1, classes=CLASSES, deadline=0.0)
    assert not {"means_clip", "scatter_clip"} & set(train_task.to_payload())
    metrics = UpdateMetrics(loss=0.1, n_windows=1, rss_bytes=0, cpu_time_s=0.0)
    update = Update(round=1, basis_version=1, delta=np.ones(3), n_examples=1, clipped=False, metrics=metrics)
    assert "personal_balanced_accuracy" not in update.to_payload()["metrics"]


def test_ingest_drops_statistics_of_the_wrong_length():
    rnd = OpenRound(round=5, phase="statistics", participants=frozenset({"a"}), deadline=1e12, basis_version=1)
    rnd.n_features, rnd.statistic_size = K, 6
    assert rnd.kind == "sketch"
    wrong = Sketch(
        round=5, basis_version=1, phase="statistics", statistic=np.ones(15), clipped=False, n_features=K, n_classes=2
    )
    from biofed.coordinator.ingest import Ingest

    assert "expects 6" in Ingest._check_payload(rnd, wrong)


# ----------------------------------------------------------------------------- the device
@pytest.mark.parametrize("scatter_clip", [0.0, 5.0])
def test_statistics_reply_is_the_packed_clipped_statistics_of_the_projected_rows(scatter_clip):
    data = _device(0)
    basis = _basis([data])
    reply = statistics_reply(_task(scatter_clip=scatter_clip), data, basis, DeviceRelease(_gate()))
    sketch = reply.sketch
    assert sketch.phase == "statistics" and sketch.n_features == K and sketch.n_classes == 2
    Z = project_rows(data.X[data.train], basis, data)
    y = data.y[data.train]
    M = M_unclipped(Z, y)
    M = M * min(1.0, 2.0 / np.linalg.norm(M))
    means, scatter = unpack_statistics(sketch.statistic, 2, K, 2.0, scatter_clip or None)
    np.testing.assert_allclose(means, M, atol=1e-12)
    if scatter_clip:
        R = Z - M_unclipped(Z, y)[y]
        S = R.T @ R / Z.shape[0]
        np.testing.assert_allclose(scatter, S * min(1.0, scatter_clip / np.linalg.norm(S)), atol=1e-12)
    else:
        assert scatter is None
    assert np.linalg.norm(sketch.statistic) <= 1 + 1e-12 and reply.n_windows == int(data.train.sum())


def test_local_statistics_are_noised_and_charged_once_on_the_device():
    data = _device(1)
    basis = _basis([data])
    gate = _gate()
    plain = statistics_reply(_task(), data, basis, DeviceRelease(_gate())).sketch.statistic
    noised = statistics_reply(_task("local", z=0.8), data, basis, DeviceRelease(gate)).sketch
    assert not np.allclose(noised.statistic, plain) and noised.clipped is False
    assert [(g.kind, g.noise_multiplier, g.count) for g in gate.ledger.groups] == [("statistics", 0.8, 1)]


def test_a_device_missing_a_class_refuses_the_statistics_task():
    data = _device(2)
    only_rest = LocalData(data.X, data.y, data.train & (data.y == 0), data.held_out)
    with pytest.raises(TaskRefused, match=r"class\(es\) \[1\] have no training window"):
        statistics_reply(_task(), only_rest, _basis([data]), DeviceRelease(_gate()))
    empty = LocalData(data.X, data.y, np.zeros_like(data.train), data.held_out)
    with pytest.raises(TaskRefused, match="no training windows"):
        statistics_reply(_task(), empty, _basis([data]), DeviceRelease(_gate()))


# ----------------------------------------------------------------------------- the coordinator
@pytest.mark.parametrize("scatter_clip", [None, 5.0])
def test_statistics_phase_solves_the_same_lda_as_plain_numpy(scatter_clip):
    devices = [_device(seed, shift=1.0 + 0.3 * seed) for seed in range(4)]
    basis = _basis(devices)
    task = _task(scatter_clip=scatter_clip or 0.0)
    sketches = [statistics_reply(task, d, basis, DeviceRelease(_gate())).sketch for d in devices]
    settings = _settings(scatter_clip=scatter_clip)
    gate = _gate()
    pending = statistics_phase(settings, _state(basis), 6, sketches)
    outcome = pending.close(pending.release.run(gate))  # z_s = 0: a non-private release, exact
    expected = _naive_lda(devices, basis, 2.0, scatter_clip, 0.5)
    np.testing.assert_allclose(outcome.state.params, expected, atol=1e-10)
    np.testing.assert_allclose(outcome.payload.params, expected, atol=1e-10)
    assert outcome.state.phase == "train" and outcome.payload.hidden == 0 and outcome.payload.n_devices == 4
    assert outcome.event.kind == "statistics"
    assert [(g.kind, g.count) for g in gate.ledger.groups] == [("statistics", 1)]
    # the model separates the devices' held-out windows
    for data in devices:
        Z = project_rows(data.X[data.held_out], basis, data)
        accuracy = (predict_proba(expected, Z, 2, 0).argmax(axis=1) == data.y[data.held_out]).mean()
        assert accuracy > 0.8


def test_central_statistics_release_is_one_gaussian_charge_of_z_s():
    devices = [_device(seed) for seed in range(3)]
    basis = _basis(devices)
    sketches = [statistics_reply(_task(), d, basis, DeviceRelease(_gate())).sketch for d in devices]
    settings = _settings(z=0.9)
    gate = _gate()
    pending = statistics_phase(settings, _state(basis), 6, sketches)
    released = pending.release.run(gate)
    exact = np.sum([s.statistic for s in sketches], axis=0)
    assert not np.allclose(released[0], exact)
    assert pending.release.charge.noise_multiplier == 0.9
    assert [(g.kind, g.noise_multiplier, g.count) for g in gate.ledger.groups] == [("statistics", 0.9, 1)]
    expected = RdpAccountant().compose(dp_accounting.GaussianDpEvent(0.9)).get_epsilon(1e-5)
    assert gate.ledger.epsilon("rdp") == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_device_noised_statistics_are_charged_before_the_task_and_averaged(mode):
    settings = _settings(mode, z=0.7)
    charge = charge_before_task(settings, 6, "statistics")
    assert (charge.kind, charge.noise_multiplier, charge.round) == ("statistics", 0.7, 6)
    devices = [_device(seed) for seed in range(3)]
    basis = _basis(devices)
    sketches = [statistics_reply(_task(mode, z=0.7), d, basis, DeviceRelease(_gate())).sketch for d in devices]
    pending = statistics_phase(settings, _state(basis), 6, sketches)
    assert pending.release is None  # post-processing of what the devices released
    outcome = pending.close(())
    means, _ = unpack_statistics(np.mean([s.statistic for s in sketches], axis=0), 2, K, 2.0, None)
    np.testing.assert_allclose(outcome.payload.params[: K * 2], (means.T / 0.5).ravel())
    assert outcome.event is None
    assert charge_before_task(_settings("central", z=0.7), 6, "statistics") is None


def test_statistics_phase_refuses_vectors_of_the_wrong_length():
    basis = _basis([_device(0)])
    wrong = Sketch(
        round=6, basis_version=1, phase="statistics", statistic=np.ones(15), clipped=False, n_features=K, n_classes=2
    )
    with pytest.raises(ValueError, match=r"expected \(6,\)"):
        statistics_phase(_settings(), _state(basis), 6, [wrong])
    with pytest.raises(ValueError, match="no device statistics"):
        statistics_phase(_settings(), _state(basis), 6, [])


def test_statistics_task_carries_z_s_and_the_block_bounds():
    basis = _basis([_device(0)])
    task = make_task(_settings(scatter_clip=4.0, z=0.6), _state(basis), 6, "statistics", ["a", "b"], 100.0)
    assert (task.phase, task.clip_norm, task.noise_multiplier, task.means_clip, task.scatter_clip) == (
        "statistics",
        1.0,
        0.6,
        2.0,
        4.0,
    )
    assert task.model.size == 0


def test_after_the_basis_a_one_shot_run_goes_to_the_statistics_phase():
    settings = _settings()
    state = Snapshot(next_round=1, phase="covariance")
    rng = np.random.default_rng(0)
    correlations = np.eye(D).ravel()
    sketch = Sketch(round=1, basis_version=0, phase="covariance", statistic=correlations, clipped=False, n_features=D)
    pending = basis_phase(settings, state, 1, "covariance", [sketch, sketch], rng)
    outcome = pending.close(pending.release.run(_gate()))
    assert outcome.state.phase == "statistics"


# ----------------------------------------------------------------------------- configuration
COORDINATOR = """
fleet = "ward7"
rounds = 0
state_dir = "state"

[training]
algorithm = "one_shot"
[training.one_shot]
ridge = 2.0
means_clip = 0.5
scatter_clip = 3.0

[dp]
noise_multiplier = 1.0
statistics_noise_multiplier = 0.7
basis_noise_multiplier = 10.0
"""


def _load(tmp_path: Path, text: str) -> CoordinatorConfig:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return load_config(path, CoordinatorConfig)


def test_one_shot_config_and_its_plan_count_every_release(tmp_path):
    config = _load(tmp_path, COORDINATOR)
    assert config.training.algorithm == "one_shot" and config.rounds == 0
    settings = compose_rounds(config).settings
    assert (settings.ridge, settings.means_clip, settings.scatter_clip, settings.statistics_noise_multiplier) == (
        2.0,
        0.5,
        3.0,
        0.7,
    )
    assert planned_releases(config, settings) == [("basis", 10.0), ("statistics", 0.7)]
    planned = planned_epsilons(config, settings)
    rdp = RdpAccountant().compose(dp_accounting.GaussianDpEvent(10.0)).compose(dp_accounting.GaussianDpEvent(0.7))
    assert planned["rdp"] == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-6)
    pld = PLDAccountant().compose(dp_accounting.GaussianDpEvent(10.0)).compose(dp_accounting.GaussianDpEvent(0.7))
    assert planned["pld"] == pytest.approx(pld.get_epsilon(1e-5), rel=2e-3)
    with_rounds = _load(tmp_path, COORDINATOR.replace("rounds = 0", "rounds = 2"))
    assert planned_releases(with_rounds, compose_rounds(with_rounds).settings)[-2:] == [("train", 1.0)] * 2
    non_private = _load(
        tmp_path, COORDINATOR.replace("statistics_noise_multiplier = 0.7", "statistics_noise_multiplier = 0")
    )
    assert math.isinf(planned_epsilons(non_private, compose_rounds(non_private).settings)["rdp"])


@pytest.mark.parametrize(
    "change, match",
    [
        (("[model]\nhidden = 8\n", ""), r'algorithm = "one_shot" solves a linear model.*hidden = 8'),
        (
            ('algorithm = "one_shot"', 'algorithm = "lda"'),
            r"training.algorithm: Input should be 'fedavg' or 'one_shot'",
        ),
        (("ridge = 2.0", "ridge = 0"), r"training.one_shot.ridge: Input should be greater than 0"),
        (("means_clip = 0.5", "means_clip = -1"), r"training.one_shot.means_clip: Input should be greater than 0"),
        (("scatter_clip = 3.0", "scatter_clip = 0"), r"training.one_shot.scatter_clip: Input should be greater than 0"),
        (("statistics_noise_multiplier = 0.7", "statistics_noise_multiplier = -1"), "statistics_noise_multiplier"),
        (('algorithm = "one_shot"', 'algorithm = "fedavg"'), r"rounds must be >= 1 with \[training\] algorithm"),
        (("rounds = 0", "rounds = -1"), r"rounds: Input should be greater than or equal to 0"),
    ],
)
def test_bad_one_shot_settings_are_clear_config_errors(tmp_path, change, match):
    old, new = change
    text = COORDINATOR + old if not new and old.startswith("[model]") else COORDINATOR.replace(old, new)
    with pytest.raises(ConfigError, match=match):
        _load(tmp_path, text)


def test_device_personalization_settings_are_validated(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text('device_id = "pi-01"\nfleet = "ward7"\nstore_path = "s.sqlite"\n[personalization]\nepochs = 0\n')
    with pytest.raises(ConfigError, match="personalization.epochs: Input should be greater than or equal to 1"):
        load_config(path, DeviceConfig)
    path.write_text('device_id = "pi-01"\nfleet = "ward7"\nstore_path = "s.sqlite"\n')
    assert load_config(path, DeviceConfig).personalization.enabled


# ----------------------------------------------------------------------------- personalization
def test_personal_model_fits_the_device_and_is_reported_only_in_central_mode():
    devices = [_device(0, shift=1.5), _device(1, shift=-1.5)]  # the second device's classes lie the other way
    basis = _basis(devices)
    task = _task()
    sketches = [statistics_reply(task, d, basis, DeviceRelease(_gate())).sketch for d in devices]
    pending = statistics_phase(_settings(), _state(basis), 6, sketches)
    global_params = pending.close(pending.release.run(_gate())).state.params
    data = devices[1]
    personal = personal_model(
        global_params, 2, data, basis, epochs=30, lr=0.05, prox_mu=0.0, random_state=np.random.default_rng(0)
    )
    assert personal.held_out.accuracy > personal.global_held_out.accuracy
    assert personal.held_out.windows == int(data.held_out.sum())
    np.testing.assert_array_equal(personal.source, global_params)
    evaluate = Task(round=9, model=global_params, basis_version=1, classes=CLASSES, deadline=0.0, phase="evaluate")
    central = evaluate_reply(evaluate, data, basis, DeviceUsage, personal.held_out).update
    assert central.metrics.personal_balanced_accuracy == pytest.approx(personal.held_out.accuracy)
    local = Task(
        round=9,
        model=global_params,
        basis_version=1,
        classes=CLASSES,
        deadline=0.0,
        phase="evaluate",
        trust_mode="local",
    )
    assert (
        evaluate_reply(local, data, basis, DeviceUsage, personal.held_out).update.metrics.personal_balanced_accuracy
        is None
    )
    with pytest.raises(TaskRefused, match="logistic-regression model"):
        personal_model(np.ones(5), 2, data, basis, epochs=1, lr=0.1, prox_mu=0.0, random_state=np.random.default_rng(0))


def test_statistics_release_is_charged_durably_before_anything_is_released():
    devices = [_device(seed) for seed in range(2)]
    basis = _basis(devices)
    sketches = [statistics_reply(_task(), d, basis, DeviceRelease(_gate())).sketch for d in devices]
    pending = statistics_phase(_settings(z=1.0), _state(basis), 6, sketches)
    persisted = []

    def full_disk(ledger: PrivacyLedger) -> None:
        persisted.append(ledger.count("statistics"))
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        pending.release.run(PrivacyMechanism(PrivacyLedger(1e-5), persist=full_disk))
    assert persisted == [1]  # the charge was being written when the release stopped: nothing came out
    durable = []
    gate = PrivacyMechanism(PrivacyLedger(1e-5), persist=lambda ledger: durable.append(ledger.to_json()))
    pending.close(pending.release.run(gate))
    assert len(durable) == 1 and PrivacyLedger.from_json(durable[0]).count("statistics") == 1


def test_privacy_command_plans_every_release_of_a_config(tmp_path):
    from click.testing import CliRunner

    from biofed.coordinator.privacy_cli import privacy_command

    path = tmp_path / "coordinator.toml"
    path.write_text(COORDINATOR)
    result = CliRunner().invoke(privacy_command, ["--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 x basis release, noise multiplier 10" in result.output
    assert "1 x statistics release, noise multiplier 0.7" in result.output
    expected = RdpAccountant().compose(dp_accounting.GaussianDpEvent(10.0)).compose(dp_accounting.GaussianDpEvent(0.7))
    assert f"client-level epsilon (RDP): {expected.get_epsilon(1e-5):.6f}" in result.output
    path.write_text(COORDINATOR + "\n[model]\nhidden = 4\n")
    refused = CliRunner().invoke(privacy_command, ["--config", str(path)])
    assert refused.exit_code == 1 and "solves a linear model" in refused.output
    assert "give --rounds" in CliRunner().invoke(privacy_command, ["-z", "1"]).output


def test_a_one_shot_run_over_its_budget_aborts_before_releasing_anything(tmp_path, caplog):
    from biofed.coordinator.server import Coordinator, RunState

    config = _load(
        tmp_path,
        COORDINATOR.replace("basis_noise_multiplier = 10.0", "basis_noise_multiplier = 10.0\nepsilon_budget = 2.0"),
    )
    coordinator = Coordinator(config, discovery_timeout_s=1.0)
    assert coordinator.run() is RunState.ABORTED  # before it connects: no broker is needed to refuse
    assert len(coordinator.ledger) == 0 and coordinator.history() == []
    assert "the basis and the one-shot statistics releases alone spend epsilon" in caplog.text
