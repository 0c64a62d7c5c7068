"""One-shot LDA, DP-FTRL tree aggregation, the release ledger and ``biofed evaluate``."""

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
    load_devices,
    noise_multiplier_for,
    plain_pipeline_rows,
    run_evaluation,
    targets,
    tune,
)
from biofed.coordinator.dp_ftrl import DPFTRL, dp_ftrl_event
from biofed.coordinator.one_shot import lda_from_statistics, release_class_statistics
from biofed.coordinator.release import ReleaseLedger, TreePrefixRelease, release_statistics, tree_nodes
from biofed.edge.statistics import class_statistics, personalize
from biofed.kernels.training import init_params, predict_proba

REPLACE_SPECIAL = dp_accounting.NeighboringRelation.REPLACE_SPECIAL


# ----------------------------------------------------------------------------- releases
@pytest.mark.parametrize("step", range(1, 40))
def test_tree_nodes_partition_the_prefix(step):
    covered = []
    for level, j in tree_nodes(step):
        covered += range(j * 2**level + 1, (j + 1) * 2**level + 1)
    assert sorted(covered) == list(range(1, step + 1))
    assert len(tree_nodes(step)) == bin(step).count("1")


def test_tree_nodes_rejects_step_zero():
    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        tree_nodes(0)


def test_tree_prefix_without_noise_is_the_running_sum_and_charges_once():
    ledger = ReleaseLedger()
    event = dp_accounting.SingleEpochTreeAggregationDpEvent(0.0, 5)
    tree = TreePrefixRelease(5, 0.0, event, ledger)
    values = np.arange(15.0).reshape(5, 3)
    out = [tree.release_prefix(v) for v in values]
    np.testing.assert_allclose(out, np.cumsum(values, axis=0))
    assert ledger.events == (event,)
    with pytest.raises(RuntimeError, match="charged for 5 steps"):
        tree.release_prefix(values[0])


def test_tree_prefix_noise_has_the_variance_of_its_nodes():
    sigma, dim = 2.0, 20000
    tree = TreePrefixRelease(7, sigma, dp_accounting.SingleEpochTreeAggregationDpEvent(1.0, 7), ReleaseLedger())
    noises = [tree.release_prefix(np.zeros(dim)) for _ in range(7)]
    for step, noise in enumerate(noises, start=1):
        expected = sigma * math.sqrt(bin(step).count("1"))
        assert noise.std() == pytest.approx(expected, rel=0.05)
    # prefix 2 is node (1, 0); prefix 3 is node (1, 0) + node (0, 2): they share half their noise
    assert np.corrcoef(noises[1], noises[2])[0, 1] == pytest.approx(1 / math.sqrt(2), abs=0.03)


def test_release_statistics_charges_before_release_and_uses_os_noise():
    ledger = ReleaseLedger()
    event = dp_accounting.GaussianDpEvent(1.5)
    a = release_statistics(np.zeros(1000), 1.0, event, ledger)
    b = release_statistics(np.zeros(1000), 1.0, event, ledger)
    assert ledger.events == (event, event)
    assert not np.allclose(a, b)  # fresh OS-seeded noise each time
    assert a.std() == pytest.approx(1.0, rel=0.1)
    direct = RdpAccountant(neighboring_relation=REPLACE_SPECIAL)
    direct.compose(event, 2)
    assert ledger.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5))


def test_release_rejects_bad_input_without_charging():
    ledger = ReleaseLedger()
    with pytest.raises(ValueError, match="NaN"):
        release_statistics([np.nan], 1.0, dp_accounting.GaussianDpEvent(1.0), ledger)
    with pytest.raises(ValueError, match="noise_std"):
        release_statistics([1.0], -1.0, dp_accounting.GaussianDpEvent(1.0), ledger)
    with pytest.raises(TypeError, match="DpEvent"):
        release_statistics([1.0], 1.0, "gaussian", ledger)
    assert ledger.events == ()
    assert ledger.epsilon(1e-5) == 0.0


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
        [stats], 2, means_clip=1e6, scatter_clip=1e6, noise_multiplier=0.0, ledger=ReleaseLedger()
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


def test_one_shot_is_one_release_per_block():
    rng = np.random.default_rng(2)
    stats = [class_statistics(*_two_gaussians(rng, n=30), 2, means_clip=1.0, scatter_clip=1.0) for _ in range(4)]
    ledger = ReleaseLedger()
    release_class_statistics(stats, 2, means_clip=1.0, scatter_clip=1.0, noise_multiplier=2.0, ledger=ledger)
    assert ledger.events == (dp_accounting.GaussianDpEvent(2.0),) * 2


# ----------------------------------------------------------------------------- DP-FTRL
def test_dp_ftrl_without_noise_is_gradient_descent_on_clipped_means():
    rng = np.random.default_rng(3)
    theta0 = rng.normal(size=4)
    server = DPFTRL(theta0, 6, clip=1.0, noise_multiplier=0.0, lr=0.5, ledger=ReleaseLedger())
    theta = theta0.copy()
    for r in range(6):
        grads = {f"d{r}-{k}": rng.normal(size=4) * 3 for k in range(3)}
        clipped = [g * min(1.0, 1.0 / np.linalg.norm(g)) for g in grads.values()]
        theta = theta - 0.5 * np.mean(clipped, axis=0)
        np.testing.assert_allclose(server.step(grads), theta)


def test_dp_ftrl_refuses_a_device_twice_per_epoch_and_charges_one_tree_per_epoch():
    ledger = ReleaseLedger()
    server = DPFTRL(np.zeros(3), 2, 3, clip=1.0, noise_multiplier=2.0, lr=1.0, ledger=ledger)
    server.step({"a": np.ones(3)})
    with pytest.raises(ValueError, match=r"\['a'\] already contributed in this epoch"):
        server.step({"a": np.ones(3), "b": np.ones(3)})
    server.step({"b": np.ones(3)})
    server.step({"a": np.ones(3)})  # a new epoch, a new tree
    tree = dp_accounting.SingleEpochTreeAggregationDpEvent(2.0, 2)
    assert ledger.events == (tree, tree)
    server.step({"b": np.ones(3)})
    server.step({"a": np.ones(3)})
    server.step({"b": np.ones(3)})
    with pytest.raises(RuntimeError, match="all 3 epoch"):
        server.step({"c": np.ones(3)})
    direct = RdpAccountant(neighboring_relation=REPLACE_SPECIAL)
    direct.compose(dp_ftrl_event(2.0, 2, 3))
    assert ledger.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5))


@pytest.mark.parametrize("method", ["one-shot", "dp-ftrl", "fedavg-dp", "central-dp"])
def test_noise_multiplier_meets_the_target_epsilon(method):
    d = Defaults()
    z = noise_multiplier_for(method, 4.0, 1e-5, d, basis="class", n_devices=7)
    accountant = RdpAccountant(neighboring_relation=REPLACE_SPECIAL)
    accountant.compose(_method_event(method, z, d, "class", 7))
    assert 3.9 <= accountant.get_epsilon(1e-5) <= 4.0
    assert noise_multiplier_for(method, math.inf, 1e-5, d) == 0.0


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
