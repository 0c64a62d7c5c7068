"""One-shot LDA, DP-FTRL on the privacy mechanism, and ``biofed evaluate``.

The tree-aggregated release itself is tested with the mechanism (tests/test_privacy_gate.py)
and its accounting with the ledger (tests/test_privacy_ledger_tree.py)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from click.testing import CliRunner
from dp_accounting.rdp import RdpAccountant

from biofed.apps.evaluation import (
    Defaults,
    _method_event,
    _parse_variants,
    evaluate_command,
    fit_global,
    load_devices,
    noise_multiplier_for,
    plain_pipeline_rows,
    run_evaluation,
    targets,
    tune,
)
from biofed.coordinator.dp_ftrl import DPFTRL, dp_ftrl_event
from biofed.coordinator.lda import lda_from_statistics
from biofed.coordinator.one_shot import release_class_statistics
from biofed.edge.statistics import class_statistics, personalize
from biofed.kernels.training import init_params, predict_proba
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import PrivacyMechanism

REPLACE_SPECIAL = dp_accounting.NeighboringRelation.REPLACE_SPECIAL


def _gate(persist=None) -> PrivacyMechanism:
    return PrivacyMechanism(PrivacyLedger(1e-5, ("rdp",)), persist=persist)


# ----------------------------------------------------------------------------- one-shot
def _two_gaussians(rng, n=400, d=5, shift=1.0):
    cov = np.diag(np.linspace(0.5, 2.0, d))
    X0 = rng.multivariate_normal(np.zeros(d), cov, n)
    X1 = rng.multivariate_normal(np.full(d, shift), cov, n)
    return np.vstack([X0, X1]), np.repeat([0, 1], n)


def test_lda_from_statistics_matches_scikit_learn():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(0)
    X, y = _two_gaussians(rng)
    stats = class_statistics(X, y, 2, means_clip=1e6, scatter_clip=1e6)
    means, scatter = release_class_statistics(
        [stats], 2, means_clip=1e6, scatter_clip=1e6, noise_multiplier=0.0, mechanism=_gate()
    )
    params = lda_from_statistics(means, scatter, ridge=1e-9)
    ours = predict_proba(params, X, 2).argmax(axis=1)
    theirs = LinearDiscriminantAnalysis(priors=[0.5, 0.5]).fit(X, y).predict(X)
    assert np.mean(ours == theirs) > 0.995


def test_class_statistics_clip_and_missing_class():
    rng = np.random.default_rng(1)
    X, y = _two_gaussians(rng, n=50, shift=10.0)
    stats = class_statistics(X, y, 2, means_clip=1.0, scatter_clip=0.5)
    assert np.linalg.norm(stats.means) == pytest.approx(1.0)
    assert np.linalg.norm(stats.scatter) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
        class_statistics(X[y == 0], y[y == 0], 2, means_clip=1.0, scatter_clip=None)


def test_one_shot_is_one_release_of_both_blocks_charged_durably():
    rng = np.random.default_rng(2)
    stats = [class_statistics(*_two_gaussians(rng, n=30), 2, means_clip=1.0, scatter_clip=1.0) for _ in range(4)]
    persisted = []
    gate = _gate(persist=lambda ledger: persisted.append(ledger.to_json()))
    means, scatter = release_class_statistics(
        stats, 2, means_clip=1.0, scatter_clip=1.0, noise_multiplier=2.0, mechanism=gate, round=3
    )
    assert means.shape == (2, 5) and scatter.shape == (5, 5)
    assert len(gate.ledger) == 1 and len(persisted) == 1 and gate.ledger.last_round("statistics") == 3
    # both blocks travel packed in one vector of norm <= 1: one GaussianDpEvent(z) covers them
    direct = RdpAccountant()
    direct.compose(dp_accounting.GaussianDpEvent(2.0))
    assert gate.ledger.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    # each block carries noise of std z * clip on its sum: the released average differs from the exact one
    exact, _ = release_class_statistics(
        stats, 2, means_clip=1.0, scatter_clip=1.0, noise_multiplier=0.0, mechanism=_gate()
    )
    assert not np.allclose(means, exact)


def test_one_shot_bad_input_releases_nothing():
    gate = _gate()
    with pytest.raises(ValueError, match="at least one device"):
        release_class_statistics([], 2, means_clip=1.0, scatter_clip=None, noise_multiplier=1.0, mechanism=gate)
    rng = np.random.default_rng(5)
    stats = class_statistics(*_two_gaussians(rng, n=20), 2, means_clip=1.0, scatter_clip=None)
    stats.means[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        release_class_statistics([stats], 2, means_clip=1.0, scatter_clip=None, noise_multiplier=1.0, mechanism=gate)
    assert len(gate.ledger) == 0


# ----------------------------------------------------------------------------- DP-FTRL
def test_dp_ftrl_without_noise_is_gradient_descent_on_clipped_means():
    rng = np.random.default_rng(3)
    theta0 = rng.normal(size=4)
    server = DPFTRL(theta0, 6, clip=1.0, noise_multiplier=0.0, lr=0.5, mechanism=_gate())
    theta = theta0.copy()
    for r in range(6):
        grads = {f"d{r}-{k}": rng.normal(size=4) * 3 for k in range(3)}
        clipped = [g * min(1.0, 1.0 / np.linalg.norm(g)) for g in grads.values()]
        theta = theta - 0.5 * np.mean(clipped, axis=0)
        np.testing.assert_allclose(server.step(grads), theta)


def test_dp_ftrl_refuses_a_device_twice_per_epoch_and_charges_one_tree_per_epoch():
    persisted = []
    gate = _gate(persist=lambda ledger: persisted.append(ledger.count()))
    server = DPFTRL(np.zeros(3), 2, 3, clip=1.0, noise_multiplier=2.0, lr=1.0, mechanism=gate, first_round=10)
    server.step({"a": np.ones(3)})
    assert persisted == [1]  # the whole first tree, charged before its first prefix
    theta = server.theta.copy()
    with pytest.raises(ValueError, match="'a' already contributed to this tree"):
        server.step({"a": np.ones(3), "b": np.ones(3)})
    np.testing.assert_array_equal(server.theta, theta)  # the refused round changed nothing
    server.step({"b": np.ones(3)})
    server.step({"a": np.ones(3)})  # a new epoch, a new tree
    (group,) = gate.ledger.groups
    assert (group.count, group.tree_steps, group.first_round, group.last_round) == (2, 2, 10, 13)
    assert group.event == dp_accounting.SelfComposedDpEvent(dp_accounting.SingleEpochTreeAggregationDpEvent(2.0, 2), 2)
    server.step({"b": np.ones(3)})
    server.step({"a": np.ones(3)})
    server.step({"b": np.ones(3)})
    with pytest.raises(RuntimeError, match="all 3 epoch"):
        server.step({"c": np.ones(3)})
    assert persisted == [1, 2, 3]
    direct = RdpAccountant(neighboring_relation=REPLACE_SPECIAL)
    direct.compose(dp_ftrl_event(2.0, 2, 3))
    assert gate.ledger.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)


def test_dp_ftrl_stopped_early_has_spent_its_whole_tree():
    gate = _gate()
    server = DPFTRL(np.zeros(2), 8, clip=1.0, noise_multiplier=1.5, lr=1.0, mechanism=gate)
    server.step({"a": np.ones(2)})  # one round of eight, then the run stops
    direct = RdpAccountant(neighboring_relation=REPLACE_SPECIAL)
    direct.compose(dp_ftrl_event(1.5, 8, 1))
    assert gate.ledger.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)


def test_dp_ftrl_bad_input():
    with pytest.raises(TypeError, match="mechanism must be a PrivacyMechanism"):
        DPFTRL(np.zeros(2), 2, clip=1.0, noise_multiplier=1.0, lr=1.0, mechanism=PrivacyLedger(1e-5))
    with pytest.raises(ValueError, match="rounds_per_epoch must be an integer >= 1"):
        DPFTRL(np.zeros(2), 0, clip=1.0, noise_multiplier=1.0, lr=1.0, mechanism=_gate())
    pld = PrivacyMechanism(PrivacyLedger(1e-5))  # reports RDP and PLD: cannot account a tree
    server = DPFTRL(np.zeros(2), 2, clip=1.0, noise_multiplier=1.0, lr=1.0, mechanism=pld)
    with pytest.raises(ValueError, match="PLD accountant cannot account tree aggregation"):
        server.step({"a": np.ones(2)})
    assert len(pld.ledger) == 0
    with pytest.raises(ValueError, match="at least one device"):
        DPFTRL(np.zeros(2), 2, clip=1.0, noise_multiplier=1.0, lr=1.0, mechanism=_gate()).step({})


@pytest.mark.parametrize("method", ["one-shot", "dp-ftrl", "fedavg-dp", "central-dp"])
def test_noise_multiplier_meets_the_target_epsilon(method):
    d = Defaults()
    z = noise_multiplier_for(method, 4.0, 1e-5, d, basis="class", n_devices=7)
    accountant = RdpAccountant(neighboring_relation=REPLACE_SPECIAL)
    accountant.compose(_method_event(method, z, d, "class", 7))
    assert 3.9 <= accountant.get_epsilon(1e-5) <= 4.0
    assert noise_multiplier_for(method, math.inf, 1e-5, d) == 0.0


@pytest.mark.parametrize("method", ["one-shot", "dp-ftrl", "fedavg-dp", "central-dp"])
@pytest.mark.parametrize("projection", ["none", "class"])
def test_fit_global_spends_what_was_calibrated(method, projection):
    """The simulated run's own ledger (every release it made through its gate) reports the
    epsilon the calibration planned for all of the method's releases."""
    rng = np.random.default_rng(6)
    train_sets = [_two_gaussians(rng, n=20, d=6) for _ in range(5)]
    d = Defaults(dp_rounds=3, central_steps=3, ftrl_epochs=2, ftrl_devices_per_round=2, local_epochs=1)
    params, basis, spent = fit_global(method, train_sets, d, 4.0, 1e-5, projection=projection, k=3)
    z = noise_multiplier_for(method, 4.0, 1e-5, d, basis=projection, n_devices=5)
    planned = RdpAccountant(neighboring_relation=REPLACE_SPECIAL)
    planned.compose(_method_event(method, z, d, projection, 5))
    assert spent == pytest.approx(planned.get_epsilon(1e-5), rel=1e-9) and spent <= 4.0
    assert (basis is None) == (projection == "none") and np.isfinite(params).all()
    _, _, spent_inf = fit_global(method, train_sets, d, math.inf, 1e-5)
    assert spent_inf == math.inf


def test_personalize_moves_toward_the_device_data():
    rng = np.random.default_rng(4)
    X, y = _two_gaussians(rng, n=100, shift=2.0)
    start = init_params(X.shape[1], 2)
    own = personalize(start, X, y, 2, epochs=20, random_state=0)
    assert np.mean(predict_proba(own, X, 2).argmax(1) == y) > 0.85


# ----------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def synthetic_files(tmp_path_factory):
    from biofed.apps.federation import write_synthetic_devices

    return write_synthetic_devices(tmp_path_factory.mktemp("fleet"), 3, duration_s=30.0, random_state=5)


@pytest.mark.slow
def test_evaluation_on_synthetic_devices(synthetic_files):
    devices = load_devices(synthetic_files)
    plain = load_devices(synthetic_files, rows=plain_pipeline_rows)
    assert [dev.name for dev in devices] == [dev.name for dev in plain]
    for ours, theirs in zip(devices, plain):
        np.testing.assert_array_equal(ours.held_out, theirs.held_out)  # same windows, same split
    fast = Defaults(rounds=3, dp_rounds=3, ftrl_epochs=1, central_epochs=10, central_steps=5, personal_epochs=5)
    evaluation = run_evaluation(
        devices,
        plain_devices=plain,
        epsilons=(2.0, math.inf),
        repeats=2,
        methods=("one-shot", "dp-ftrl"),
        variants=(("none", 0), ("pca", 8)),
        defaults=fast,
    )
    summaries = {(s["view"], s["method"], s["variant"], s["epsilon_target"]): s for s in evaluation.summaries()}
    for key in [
        ("personalized", "local", "none", math.inf),
        ("new patient", "central", "pca8", math.inf),
        ("personalized", "one-shot+personal", "none", 2.0),
        ("new patient", "dp-ftrl", "none", 2.0),
        ("personalized", "plain", "none", math.inf),
        ("new patient", "fedavg", "none", math.inf),
        ("new patient", "biofed-features+sklearn", "none", math.inf),
    ]:
        assert key in summaries, key
    private = summaries[("personalized", "one-shot", "none", 2.0)]
    assert private["repeats"] == 2 and private["epsilon_spent"] <= 2.0
    assert private["ci95"][0] <= private["mean"] <= private["ci95"][1]
    for s in summaries.values():
        assert 0.0 <= s["worst"] <= s["mean"] <= 1.0
    assert summaries[("personalized", "local", "none", math.inf)]["mean"] > 0.6  # synthetic classes separate
    names = [t[0] for t in targets(evaluation, "one-shot", 2.0)]
    assert any("new patient" in n for n in names)
    assert "single draw" not in evaluation.format_table()


def test_tune_ranks_settings_without_touching_held_out_windows(synthetic_files):
    devices = load_devices(synthetic_files)
    for dev in devices:  # poison the held-out windows: tuning must not see them
        dev.X[dev.held_out] = np.nan
    ranked = tune(devices, "one-shot", {"ridge": [0.1, 10.0]}, epsilon=math.inf, repeats=1)
    assert [sorted(s) for s, _ in ranked] == [["ridge"], ["ridge"]]
    assert all(0.0 <= score <= 1.0 for _, score in ranked)
    assert ranked[0][1] >= ranked[1][1]


def test_parse_variants_errors():
    assert _parse_variants("none,pca32,class16") == (("none", 0), ("pca", 32), ("class", 16))
    import click

    with pytest.raises(click.BadParameter, match="pcaK"):
        _parse_variants("pca")
    with pytest.raises(click.BadParameter, match="pcaK"):
        _parse_variants("svd32")


def test_evaluate_command_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(evaluate_command, ["--data", str(tmp_path), "--epsilons", "8,x"])
    assert result.exit_code != 0 and "comma-separated" in result.output
    result = runner.invoke(evaluate_command, ["--data", str(tmp_path)])
    assert result.exit_code != 0 and "at least 2 subjects" in result.output
    result = runner.invoke(evaluate_command, ["--data", str(tmp_path), "--methods", "magic"])
    assert result.exit_code != 0 and "unknown method" in result.output
    result = runner.invoke(evaluate_command, ["--data", str(tmp_path), "--tune", '{"nope": [1]}'])
    assert result.exit_code != 0 and "--tune needs a JSON object" in result.output


def test_biofed_eeg_features_equal_the_plain_pipeline(shared_datasets):
    """The feature gap is not in the features: biofed's 95 EEG band powers are the plain
    MNE/SciPy pipeline's log10 Welch band powers, window for window (to the float32
    precision the device pipeline computes them in by default)."""
    from biofed.apps.evaluation import _recording_rows
    from biofed.kernels import FLOAT32_RTOL

    paths = [shared_datasets / "eegmat" / "Subject02_1.edf"]
    X, labels, t = _recording_rows(paths)
    P, plabels, pt = plain_pipeline_rows(paths)
    assert P.shape == (X.shape[0], 95)
    np.testing.assert_allclose(X[:, :95], P, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL)
    np.testing.assert_allclose(t, pt)
    assert set(labels) == set(plabels) == {"rest"}


@pytest.mark.slow
def test_evaluate_command_on_eegmat(shared_datasets, tmp_path):
    out = tmp_path / "ev"
    result = CliRunner().invoke(
        evaluate_command,
        [
            "--data",
            str(shared_datasets / "eegmat"),
            "--epsilons",
            "8,inf",
            "--repeats",
            "1",
            "--methods",
            "one-shot",
            "--projections",
            "none",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "new patient" in result.output and "plain" in result.output and "single draw" in result.output
    assert (out / "epsilon_accuracy.png").stat().st_size > 0
    assert "[met] personalized mean (one-shot+personal, eps 8)" in result.output
