"""edge.tasks: the task handlers as pure functions of (task, local data), without a store or a broker.

The agent-level tests (tests/test_edge_agent.py) check the same answers through encoded MQTT
messages on an ingested store; these check each rule of the handlers on small synthetic rows.
"""

from __future__ import annotations

import logging

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from biofed.config import DeviceDPConfig
from biofed.edge.split import balanced_accuracy, device_standardization
from biofed.edge.tasks import (
    Admission,
    DeviceRelease,
    DeviceUsage,
    LocalData,
    TaskRefused,
    admit,
    evaluate_reply,
    held_out_metrics,
    labelled_split,
    project_rows,
    sketch_reply,
    train_locally,
    train_reply,
)
from biofed.kernels import clip_l2, init_params, n_params, predict_proba, project, train
from biofed.model import fit_basis
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import PrivacyMechanism
from biofed.protocol import Basis, Task

CLASSES = ("rest", "arithmetic")
D, K = 6, 3
USAGE = DeviceUsage(rss_bytes=123_456, cpu_time_s=0.25, bytes_sent=10, bytes_received=20)


def local_data(n_per_class: int = 10, seed: int = 0) -> LocalData:
    """Two classes of ``n_per_class`` rows (separable means), unlabelled and foreign rows mixed in."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for i, label in enumerate(CLASSES + ("", "other")):
        rows.append(rng.normal(loc=3.0 * i, size=(n_per_class, D)))
        labels += [label] * n_per_class
    X = np.concatenate(rows)
    order = rng.permutation(X.shape[0])
    return labelled_split(X[order], np.array(labels)[order], np.arange(X.shape[0], dtype=np.float64), CLASSES)


def task(phase: str = "train", **overrides) -> Task:
    fields = dict(
        round=7, model=np.empty(0), basis_version=1, classes=CLASSES, deadline=0.0, phase=phase, clip_norm=1e6
    )
    fields.update(overrides)
    return Task(**fields)


def basis_for(data: LocalData, standardization: str = "global") -> Basis:
    if standardization == "device":
        mean, scale = data.standardization()
        components = fit_basis((data.X[data.train] - mean) / scale, K).components
        return Basis(
            round=3, version=1, components=components, mean=np.zeros(D), scale=np.ones(D), standardization="device"
        )
    fitted = fit_basis(data.X[data.train], K)
    return Basis(round=3, version=1, components=fitted.components, mean=fitted.mean, scale=fitted.scale)


def gate() -> DeviceRelease:
    return DeviceRelease(PrivacyMechanism(PrivacyLedger(1e-5, ("rdp",))))


def seeded_training(task: Task, Z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    return train(
        task.model,
        Z,
        y,
        len(task.classes),
        task.hidden,
        epochs=task.local_epochs,
        lr=task.lr,
        batch_size=task.batch_size,
        random_state=np.random.default_rng(0),
    )


def never_measured() -> DeviceUsage:
    raise AssertionError("usage must not be measured outside central mode")


# ----------------------------------------------------------------------------- admission
@pytest.mark.parametrize(
    "overrides, now, answered, have, expected",
    [
        ({}, 50.0, set(), 1, Admission.ANSWER),
        ({}, 100.0, set(), 1, Admission.EXPIRED),  # the deadline itself is too late
        ({"participants": ("pi-02",)}, 50.0, set(), 1, Admission.NOT_SELECTED),
        ({"participants": ("pi-02", "pi-01")}, 50.0, set(), 1, Admission.ANSWER),
        ({}, 50.0, {(7, "train")}, 1, Admission.ANSWERED),
        ({"phase": "evaluate"}, 50.0, {(7, "train")}, 1, Admission.ANSWER),
        ({}, 50.0, set(), None, Admission.WAIT_FOR_BASIS),
        ({"basis_version": 2}, 50.0, set(), 1, Admission.WAIT_FOR_BASIS),
        ({}, 50.0, set(), 2, Admission.STALE_BASIS),
        ({"phase": "moments", "basis_version": 0}, 50.0, set(), None, Admission.ANSWER),  # no basis needed
        ({"phase": "covariance"}, 50.0, set(), 3, Admission.ANSWER),
    ],
)
def test_admission_rules(overrides, now, answered, have, expected):
    t = task(**{"deadline": 100.0, **overrides})
    assert admit(t, device_id="pi-01", now=now, answered=answered, basis_version=have) is expected


# ----------------------------------------------------------------------------- local data
def test_labelled_split_keeps_the_task_classes_and_holds_out_the_last_fifth_of_each():
    data = local_data()
    assert data.X.shape == (20, D) and set(data.y) == {0, 1}
    assert not (data.train & data.held_out).any() and (data.train | data.held_out).all()
    assert [int(data.held_out[data.y == c].sum()) for c in (0, 1)] == [2, 2]


# ----------------------------------------------------------------------------- sketches
def test_moments_sketch_is_the_clipped_statistic_of_the_training_rows():
    data = local_data()
    X = data.X[data.train]
    expected = np.concatenate([X.mean(0), (X * X).mean(0)])
    reply = sketch_reply(task("moments", basis_version=0), data, gate())
    np.testing.assert_allclose(reply.sketch.statistic, expected, rtol=1e-12)
    assert reply.n_windows == X.shape[0] and reply.norm == pytest.approx(np.linalg.norm(expected))
    assert reply.sketch.n_features == D and not reply.sketch.clipped and reply.sketch.phase == "moments"
    clipped = sketch_reply(task("moments", clip_norm=1.0), data, gate()).sketch
    assert clipped.clipped and np.linalg.norm(clipped.statistic) == pytest.approx(1.0)


def test_covariance_uses_the_task_statistics_or_the_devices_own():
    data = local_data()
    X = data.X[data.train]
    mean, scale = X.mean(0) + 0.1, X.std(0) + 0.5
    sketch = sketch_reply(task("covariance", stats_mean=mean, stats_scale=scale), data, gate()).sketch
    Z = (X - mean) / scale
    np.testing.assert_allclose(sketch.statistic, (Z.T @ Z / len(Z)).ravel(), rtol=1e-12)
    own = sketch_reply(task("covariance"), data, gate()).sketch
    m, s = device_standardization(X)
    Z = (X - m) / s
    np.testing.assert_allclose(own.statistic, (Z.T @ Z / len(Z)).ravel(), rtol=1e-12)
    np.testing.assert_allclose(np.diag(own.statistic.reshape(D, D)), 1.0)  # a correlation matrix


@pytest.mark.parametrize("standardization", ["global", "device"])
def test_statistics_over_several_blocks_of_rows_are_those_of_the_selected_rows(standardization):
    """Sketches and projections read the training rows through the mask, block by block; over
    thousands of rows (several blocks) they equal the statistics of a copy of those rows."""
    data = local_data(n_per_class=2500, seed=5)
    X = data.X[data.train]
    assert X.shape[0] > 3000
    moments = sketch_reply(task("moments", basis_version=0), data, gate())
    np.testing.assert_allclose(moments.sketch.statistic, np.concatenate([X.mean(0), (X * X).mean(0)]), rtol=1e-12)
    covariance = sketch_reply(task("covariance"), data, gate())
    Z = (X - X.mean(0)) / X.std(0)
    np.testing.assert_allclose(covariance.sketch.statistic, (Z.T @ Z / len(Z)).ravel(), rtol=1e-10, atol=1e-12)
    assert moments.n_windows == covariance.n_windows == X.shape[0]
    basis = basis_for(data, standardization)
    for rows in (data.train, data.held_out):
        np.testing.assert_allclose(
            project_rows(data.X, basis, data, rows), project_rows(data.X[rows], basis, data), rtol=1e-12, atol=1e-12
        )


def test_covariance_with_stats_of_another_width_is_refused_as_an_error():
    with pytest.raises(TaskRefused, match=r"stats_mean of shape \(3,\), this device has 6 features") as refused:
        sketch_reply(task("covariance", stats_mean=np.zeros(3), stats_scale=np.ones(3)), local_data(), gate())
    assert refused.value.level == logging.ERROR


def test_no_training_windows_refuses_every_phase():
    data = local_data()
    empty = LocalData(data.X, data.y, np.zeros_like(data.train), data.held_out)
    with pytest.raises(TaskRefused, match="no training windows"):
        sketch_reply(task("moments"), empty, gate())
    model = init_params(K, 2, random_state=1)
    with pytest.raises(TaskRefused, match="no training windows of classes"):
        train_reply(
            task(model=model),
            empty,
            basis_for(data),
            local_training=seeded_training,
            release=gate(),
            usage=lambda: USAGE,
        )


def test_local_mode_sketch_is_noised_charged_and_says_nothing_in_cleartext():
    release = gate()
    reply = sketch_reply(
        task(
            "covariance",
            stats_mean=np.zeros(D),
            stats_scale=np.ones(D),
            clip_norm=1.0,
            trust_mode="local",
            noise_multiplier=2.0,
        ),
        local_data(),
        release,
    )
    assert not reply.sketch.clipped and reply.norm > 1.0  # clipped, but that bit is data-dependent cleartext
    assert not np.allclose(reply.sketch.statistic, clip_l2(reply.sketch.statistic, 1.0)[0])  # the noise is there
    assert [(g.kind, g.noise_multiplier, g.count) for g in release.mechanism.ledger.groups] == [("basis", 2.0, 1)]


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("standardization", ["global", "device"])
def test_central_train_reply_is_the_clipped_delta_of_local_training(standardization):
    data = local_data()
    basis = basis_for(data, standardization)
    model = init_params(K, 2, random_state=1)
    t = task(model=model, clip_norm=0.05, local_epochs=3, lr=0.1, batch_size=4, adaptive_clipping=True)
    reply = train_reply(t, data, basis, local_training=seeded_training, release=gate(), usage=lambda: USAGE)
    if standardization == "device":
        mean, scale = data.standardization()
        Z = project(data.X, basis.components, mean=mean, scale=scale)
    else:
        Z = project(data.X, basis.components, mean=basis.mean, scale=basis.scale)
    np.testing.assert_allclose(project_rows(data.X, basis, data), Z)
    trained, loss = seeded_training(t, Z[data.train], data.y[data.train])
    np.testing.assert_allclose(reply.raw_delta, trained - model, rtol=1e-12)
    update = reply.update
    np.testing.assert_allclose(update.delta, clip_l2(trained - model, 0.05)[0], rtol=1e-12)
    assert update.clipped and update.norm_bit == 0 and reply.norm > 0.05
    assert update.n_examples == reply.n_windows == data.train.sum()
    accuracy = balanced_accuracy(data.y[data.held_out], predict_proba(model, Z[data.held_out], 2).argmax(1))
    m = update.metrics
    assert m.eval_balanced_accuracy == pytest.approx(accuracy) and m.eval_windows == data.held_out.sum()
    assert (m.loss, m.n_windows) == (pytest.approx(loss), data.train.sum())
    assert (m.rss_bytes, m.cpu_time_s, m.bytes_sent, m.bytes_received) == (123_456, 0.25, 10, 20)


def test_local_train_reply_is_noised_charged_and_carries_no_cleartext():
    data = local_data()
    release = gate()
    model = init_params(K, 2, random_state=1)
    reply = train_reply(
        task(model=model, clip_norm=0.05, trust_mode="local", noise_multiplier=1.0, adaptive_clipping=True),
        data,
        basis_for(data),
        local_training=seeded_training,
        release=release,
        usage=never_measured,
    )
    update = reply.update
    assert update.n_examples == 0 and not update.clipped and update.norm_bit is None
    m = update.metrics
    assert (m.loss, m.n_windows, m.rss_bytes, m.cpu_time_s, m.eval_balanced_accuracy, m.eval_windows) == (
        0.0,
        0,
        0,
        0.0,
        None,
        0,
    )
    assert not np.allclose(update.delta, clip_l2(reply.raw_delta, 0.05)[0])
    epsilon = RdpAccountant().compose(dp_accounting.GaussianDpEvent(1.0)).get_epsilon(1e-5)
    assert release.mechanism.ledger.epsilon() == pytest.approx(epsilon)


def test_distributed_train_reply_leaves_the_delta_to_secure_aggregation():
    data = local_data()
    model = init_params(K, 2, random_state=1)

    def refuse(task, vector, kind):
        raise AssertionError("a distributed-mode delta must not be released in the clear")

    reply = train_reply(
        task(model=model, trust_mode="distributed", noise_multiplier=1.0),
        data,
        basis_for(data),
        local_training=seeded_training,
        release=refuse,
        usage=never_measured,
    )
    assert reply.update.delta.size == 0 and reply.update.n_examples == 0
    assert reply.raw_delta.shape == model.shape and np.abs(reply.raw_delta).sum() > 0


def test_model_of_the_wrong_size_is_refused_before_training():
    data = local_data()

    def must_not_train(task, Z, y):
        raise AssertionError("trained on a refused task")

    with pytest.raises(TaskRefused, match=f"expected {n_params(K, 2)} for k={K}") as refused:
        train_reply(
            task(model=np.zeros(5)),
            data,
            basis_for(data),
            local_training=must_not_train,
            release=gate(),
            usage=lambda: USAGE,
        )
    assert refused.value.level == logging.ERROR
    with pytest.raises(TaskRefused, match="expected"):
        evaluate_reply(task("evaluate", model=np.zeros(5)), data, basis_for(data), lambda: USAGE)


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_reply_carries_the_held_out_metrics_only():
    data = local_data()
    basis = basis_for(data)
    model = init_params(K, 2, random_state=2)
    reply = evaluate_reply(task("evaluate", model=model), data, basis, lambda: USAGE)
    expected = held_out_metrics(task(model=model), basis, data)
    Z = project_rows(data.X[data.held_out], basis, data)
    proba = predict_proba(model, Z, 2)
    y = data.y[data.held_out]
    assert expected.loss == pytest.approx(-np.mean(np.log(proba[np.arange(y.size), y])))
    update = reply.update
    assert update.delta.size == 0 and update.n_examples == 0 and not update.clipped
    assert update.metrics.loss == pytest.approx(expected.loss) and update.metrics.n_windows == 4
    assert update.metrics.eval_balanced_accuracy == pytest.approx(expected.accuracy) == reply.held_out.accuracy
    local = evaluate_reply(task("evaluate", model=model, trust_mode="local"), data, basis, never_measured).update
    assert local.metrics.eval_balanced_accuracy is None and local.metrics.eval_windows == 0


def test_evaluate_without_held_out_windows_is_refused():
    data = local_data()
    none_held = LocalData(data.X, data.y, np.ones_like(data.train), np.zeros_like(data.held_out))
    with pytest.raises(TaskRefused, match="no held-out windows to evaluate round 7"):
        evaluate_reply(task("evaluate", model=init_params(K, 2)), none_held, basis_for(data), lambda: USAGE)


# ----------------------------------------------------------------------------- local training
def test_train_locally_is_minibatch_training_from_the_task_model():
    data = local_data()
    Z = project_rows(data.X[data.train], basis_for(data), data)
    y = data.y[data.train]
    t = task(model=init_params(K, 2, random_state=1), local_epochs=2, lr=0.1, batch_size=4, prox_mu=0.1)
    params, loss = train_locally(t, Z, y, random_state=np.random.default_rng(5))
    expected, expected_loss = train(
        t.model,
        Z,
        y,
        2,
        epochs=2,
        lr=0.1,
        batch_size=4,
        prox_mu=0.1,
        prox_center=t.model,
        random_state=np.random.default_rng(5),
    )
    np.testing.assert_array_equal(params, expected)
    assert loss == expected_loss


def test_train_locally_with_record_level_dp_charges_every_dp_sgd_step():
    data = local_data()
    Z = project_rows(data.X[data.train], basis_for(data), data)
    gate = PrivacyMechanism(PrivacyLedger(1e-4, ("rdp",)))
    dp = DeviceDPConfig(delta=1e-4, record_noise_multiplier=1.2, record_clip_norm=0.5, record_sampling_rate=0.25)
    t = task(model=init_params(K, 2, random_state=1), local_epochs=2, lr=0.1)
    params, loss = train_locally(
        t, Z, data.y[data.train], random_state=np.random.default_rng(0), record_dp=dp, record_gate=gate
    )
    assert params.shape == t.model.shape and np.isfinite(loss)
    assert [(g.sampling_rate, g.noise_multiplier, g.count) for g in gate.ledger.groups] == [(0.25, 1.2, 8)]
