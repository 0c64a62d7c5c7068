"""The release gate is the only place privacy noise is drawn, ledgers are charged and
device-derived vectors are turned into something publishable.

These tests read the package's syntax trees, so a new noise draw or a new publish path
that bypasses :mod:`biofed.privacy_mechanism` fails here before it can leak.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import (
    Charge,
    ClippedSum,
    PrivacyMechanism,
    discrete_gaussian,
    distributed_discrete_tau,
    grid_sensitivity,
    tree_nodes,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("biofed", "coordinator", "edge", "kernels", "datasets")
GATE = "biofed/privacy_mechanism.py"

NOISE_DRAWS = {
    "normal",
    "standard_normal",
    "laplace",
    "gauss",
    "normalvariate",
    "multivariate_normal",
    "standard_cauchy",
    "gumbel",
    "logistic",
    "exponential",
    "standard_exponential",
    "discrete_gaussian",
    "_gaussian",
}
"""Distribution samplers that could serve as privacy noise (and the gate's own samplers,
which nothing outside the gate may call)."""

NOT_PRIVACY_NOISE = {
    ("datasets/synthetic.py", "*"): "synthetic recordings",
    ("biofed/apps/audit.py", "__init__"): "the audit's canary device's own records",
    ("biofed/apps/audit_stats.py", "canary_directions"): "random canary directions of the audit",
    ("edge/live_cli.py", "_load_kernels"): "a throw-away window that loads the compiled kernels",
    ("kernels/svd.py", "_randomized_svd"): "random projection of the randomized SVD",
    ("kernels/training.py", "init_params"): "model initialisation",
}
"""(file, enclosing function) that draw from these distributions for something other than privacy."""


def _package_files():
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _calls_with_function(tree):
    """(call node, name of the innermost enclosing function or "<module>")."""

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from visit(child, child.name)
            else:
                if isinstance(child, ast.Call):
                    yield child, function
                yield from visit(child, function)

    yield from visit(tree, "<module>")


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def test_the_walk_sees_the_package():
    files = dict(_package_files())
    assert {GATE, "coordinator/server.py", "edge/agent.py", "edge/secure_aggregation.py"} <= set(files)
    draws = [
        (f, fn)
        for f, tree in files.items()
        for call, fn in _calls_with_function(tree)
        if _called_name(call) in NOISE_DRAWS
    ]
    assert (GATE, "_gaussian") in draws  # the walk finds the gate's own draws
    assert (GATE, "release_on_grid") in draws


def test_no_noise_is_drawn_outside_the_gate():
    offenders = []
    for path, tree in _package_files():
        if path == GATE:
            continue
        for call, function in _calls_with_function(tree):
            if _called_name(call) not in NOISE_DRAWS:
                continue
            if (path, "*") in NOT_PRIVACY_NOISE or (path, function) in NOT_PRIVACY_NOISE:
                continue
            offenders.append(f"{path}:{call.lineno} {function}() calls {_called_name(call)}()")
    assert not offenders, "noise drawn outside biofed.privacy_mechanism:\n" + "\n".join(offenders)


def test_every_exemption_names_a_draw_that_exists():
    draws = {
        (path, fn)
        for path, tree in _package_files()
        for call, fn in _calls_with_function(tree)
        if _called_name(call) in NOISE_DRAWS
    }
    files = {path for path, _ in draws}
    stale = [key for key in NOT_PRIVACY_NOISE if key not in draws and not (key[1] == "*" and key[0] in files)]
    assert not stale, f"exemptions without a draw (remove them): {stale}"


def test_only_the_gate_charges_a_ledger():
    offenders = [
        f"{path}:{call.lineno}"
        for path, tree in _package_files()
        if path not in (GATE, "biofed/privacy_ledger.py")
        for call, _ in _calls_with_function(tree)
        if _called_name(call) == "record_round"
    ]
    assert not offenders, "ledger charged outside the privacy mechanism: " + ", ".join(offenders)


def _assigned_values(function: ast.FunctionDef, name: str) -> list[ast.expr]:
    return [
        node.value
        for node in ast.walk(function)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name) and target.id == name
    ]


def _from_the_gate_or_empty(value: ast.expr) -> bool:
    """A value released by the gate (``self._release(...)``, ``...release(...)``) or an empty array."""
    if isinstance(value, ast.Call):
        name = _called_name(value)
        return name in ("_release", "release") or (
            name == "empty" and isinstance(value.args[0], ast.Constant) and value.args[0].value == 0
        )
    return False


@pytest.mark.parametrize(("payload", "field"), [("Update", "delta"), ("Sketch", "statistic")])
def test_device_payload_vectors_come_from_the_gate(payload, field):
    """Every Update/Sketch the device builds (its agent and its task handlers) takes its vector
    from a name that is only ever assigned a gate release (``release`` clips, and in
    local/distributed modes noises and charges) or an empty array."""
    trees = [ast.parse((ROOT / path).read_text()) for path in ("edge/agent.py", "edge/tasks.py")]
    built = 0
    for function in [n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for call in [n for n in ast.walk(function) if isinstance(n, ast.Call) and _called_name(n) == payload]:
            built += 1
            value = next(k.value for k in call.keywords if k.arg == field)
            assert isinstance(value, ast.Name) or _from_the_gate_or_empty(value), ast.unparse(value)
            if isinstance(value, ast.Name):
                assigned = _assigned_values(function, value.id)
                assert assigned and all(_from_the_gate_or_empty(v) for v in assigned), (
                    f"{function.name}: {payload}.{field} = {value.id} is assigned {[ast.unparse(v) for v in assigned]}"
                )
    assert built >= 1


# ----------------------------------------------------------------------------- the mechanism itself
def test_release_clips_noises_then_charges_durably_before_returning():
    events = []

    def persist(ledger):
        events.append(("persisted", len(ledger)))

    gate = PrivacyMechanism(PrivacyLedger(1e-5), persist=persist)
    rows = np.array([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5; C = 1
    (exact,) = gate.release(Charge(0, "train", 1.0, 0.0), ClippedSum(rows, 1.0, 0.0))
    np.testing.assert_allclose(exact, [0.9, 1.2])
    assert events == [("persisted", 1)]
    (noised,) = gate.release(Charge(1, "train", 1.0, 2.0), ClippedSum(np.zeros((3, 50_000)), 1.0, 2.0))
    assert noised.std() == pytest.approx(2.0, rel=0.02) and abs(noised.mean()) < 0.05
    assert events == [("persisted", 1), ("persisted", 2)]


def test_a_failed_persist_releases_nothing():
    def broken(ledger):
        raise OSError("disk full")

    gate = PrivacyMechanism(PrivacyLedger(1e-5), persist=broken)
    with pytest.raises(OSError, match="disk full"):
        gate.release(Charge(0, "train", 1.0, 1.0), ClippedSum(np.ones(3), 1.0, 1.0))


def test_noise_generator_is_private_and_unseeded():
    a, b = PrivacyMechanism(PrivacyLedger(1e-5)), PrivacyMechanism(PrivacyLedger(1e-5))
    x = a.release(Charge(0, "train", 1.0, 1.0), ClippedSum(np.zeros(8), 1.0, 1.0))[0]
    y = b.release(Charge(0, "train", 1.0, 1.0), ClippedSum(np.zeros(8), 1.0, 1.0))[0]
    assert not np.array_equal(x, y)
    np.random.seed(0)  # the global NumPy state plays no part
    assert not np.array_equal(a.release(Charge(1, "train", 1.0, 1.0), ClippedSum(np.zeros(8), 1.0, 1.0))[0], x)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda g: g.release(Charge(0, "train", 1.0, 1.0)), ValueError, "at least one ClippedSum"),
        (lambda g: g.release(Charge(0, "train", 1.0, 1.0), np.ones(3)), TypeError, "queries must be ClippedSum"),
        (lambda g: g.release((0, "train", 1.0, 1.0), ClippedSum(np.ones(3), 1.0, 1.0)), TypeError, "must be a Charge"),
        (
            lambda g: g.release(Charge(0, "train", 1.0, 1.0), ClippedSum(np.ones(3), 0.0, 1.0)),
            ValueError,
            "clip_norm must be a finite number > 0",
        ),
        (
            lambda g: g.release(Charge(0, "train", 1.0, 1.0), ClippedSum(np.ones(3), 1.0, -1.0)),
            ValueError,
            "noise_std must be a finite number >= 0",
        ),
        (lambda g: g.release(Charge(0, "train", 1.0, 1.0), ClippedSum([np.nan, 1.0], 1.0, 1.0)), ValueError, "NaN"),
        (
            lambda g: g.release(Charge(0, "train", 1.0, 1.0), ClippedSum(np.ones((2, 2, 2)), 1.0, 1.0)),
            ValueError,
            r"must be \(n, P\)",
        ),
        (
            lambda g: g.release(Charge(0, "eval", 1.0, 1.0), ClippedSum(np.ones(3), 1.0, 1.0)),
            ValueError,
            "kind must be one of",
        ),
    ],
)
def test_bad_releases_charge_nothing(call, error, match):
    gate = PrivacyMechanism(PrivacyLedger(1e-5))
    with pytest.raises(error, match=match):
        call(gate)
    assert len(gate.ledger) == 0


# ----------------------------------------------------------------------------- discrete Gaussian
def test_discrete_gaussian_matches_its_pmf():
    """Small sigma, where the discrete Gaussian differs from a rounded continuous one: the
    empirical distribution of 20 000 exact samples fits the pmf exp(-y^2 / 2 sigma^2) / Z."""
    import random as _random

    from scipy import stats

    sigma = 1.3
    samples = discrete_gaussian(sigma, 20_000, _random.SystemRandom())
    assert samples.dtype == np.int64
    support = np.arange(-8, 9)
    pmf = np.exp(-(support.astype(float) ** 2) / (2 * sigma**2))
    pmf /= np.exp(-(np.arange(-60, 61, dtype=float) ** 2) / (2 * sigma**2)).sum()
    observed = np.array([(samples == y).sum() for y in support])
    assert observed.sum() == samples.size  # nothing beyond |y| = 8 (probability < 1e-8)
    chi2 = stats.chisquare(observed, pmf / pmf.sum() * samples.size)
    assert chi2.pvalue > 1e-4
    # and the rounded continuous Gaussian is rejected at this size: its variance is sigma^2 + 1/12
    assert samples.var() == pytest.approx(sigma**2, rel=0.05)


def test_discrete_gaussian_large_sigma_and_bad_input():
    import random as _random

    samples = discrete_gaussian(3.0e6, 3000, _random.SystemRandom())
    assert samples.std() == pytest.approx(3.0e6, rel=0.06) and abs(samples.mean()) < 3.0e6 * 0.1
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        discrete_gaussian(0.0, 3, _random.SystemRandom())


def test_release_on_grid_is_integer_clipped_noised_and_charged():
    gate = PrivacyMechanism(PrivacyLedger(1e-5))
    step = 2.0**-10
    rows = np.array([3.0, 4.0])  # norm 5, clipped to 1 -> (0.6, 0.8) = (614.4, 819.2) steps
    exact = gate.release_on_grid(Charge(0, "train", 1.0, 0.0), ClippedSum(rows, 1.0, 0.0), step)
    np.testing.assert_array_equal(exact, [614, 819])
    noised = gate.release_on_grid(Charge(1, "train", 1.0, 2.0), ClippedSum(np.zeros(4000), 1.0, 0.5), step)
    assert noised.dtype == np.int64 and (noised * step).std() == pytest.approx(0.5, rel=0.05)
    assert len(gate.ledger) == 2
    assert grid_sensitivity(1.0, 4000, step) == pytest.approx(1.0 + math.sqrt(4000) * step / 2)
    assert distributed_discrete_tau(0.5 / step, 10) == 0.0
    assert distributed_discrete_tau(0.3, 10) > 0.1
    with pytest.raises(ValueError, match="grid_step must be a finite number > 0"):
        gate.release_on_grid(Charge(2, "train", 1.0, 1.0), ClippedSum(np.ones(3), 1.0, 1.0), 0.0)
    assert len(gate.ledger) == 2


def test_the_offline_evaluation_releases_through_the_gate():
    """``biofed evaluate`` simulates its private releases with the gate itself (an in-memory
    ledger per run), not with a module of its own."""
    tree = ast.parse((ROOT / "biofed/apps/evaluation.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "biofed.privacy_mechanism"
        for alias in node.names
    }
    assert {"PrivacyMechanism", "Charge", "ClippedSum"} <= imported
    assert not (ROOT / "coordinator/release.py").exists()


# ----------------------------------------------------------------------------- tree aggregation
def _reference_nodes(step: int) -> list[tuple[int, int]]:
    """The dyadic decomposition of 1..step by brute force: the largest aligned power-of-two
    blocks, left to right (block (level, j) = steps j 2^level + 1 .. (j + 1) 2^level)."""
    nodes, start = [], 0
    while start < step:
        level = max(lv for lv in range(64) if start % 2**lv == 0 and start + 2**lv <= step)
        nodes.append((level, start // 2**level))
        start += 2**level
    return nodes


def _tree_gate(persist=None) -> PrivacyMechanism:
    return PrivacyMechanism(PrivacyLedger(1e-5, ("rdp",)), persist=persist)


@pytest.mark.parametrize("step", range(1, 40))
def test_tree_nodes_are_the_dyadic_decomposition(step):
    assert tree_nodes(step) == _reference_nodes(step)
    assert len(tree_nodes(step)) == bin(step).count("1")


def test_tree_nodes_rejects_bad_steps():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="step must be an integer >= 1"):
            tree_nodes(bad)


def test_tree_without_noise_equals_the_numpy_dyadic_sums():
    """z = 0: every prefix is the sum, over its reference dyadic nodes, of the node sums of
    the clipped step sums (NumPy cumulative sums), i.e. the running sum of clipped rows."""
    rng = np.random.default_rng(0)
    steps, clip = 13, 1.5
    rows = [rng.normal(size=(rng.integers(1, 4), 5)) * 2 for _ in range(steps)]
    gate = _tree_gate()
    tree = gate.open_tree(Charge(0, "train", 1.0, 0.0, tree_steps=steps), clip)
    clipped = [(r * np.minimum(1.0, clip / np.linalg.norm(r, axis=1))[:, None]).sum(axis=0) for r in rows]
    cumulative = np.vstack([np.zeros(5), np.cumsum(clipped, axis=0)])
    ids = iter(range(1000))
    for t, r in enumerate(rows, start=1):
        released = tree.release_prefix(r, [next(ids) for _ in range(len(r))])
        nodes = [cumulative[(j + 1) * 2**lv] - cumulative[j * 2**lv] for lv, j in _reference_nodes(t)]
        np.testing.assert_allclose(released, np.sum(nodes, axis=0), rtol=1e-12, atol=1e-12)
    assert tree.released == steps


def test_tree_noise_has_the_covariance_of_shared_nodes():
    """z > 0, zero rows: the prefixes' noise has covariance sigma^2 * |nodes(s) & nodes(t)|
    (each node's noise drawn once and reused by every prefix that contains it)."""
    steps, sigma, dim = 11, 2.0, 40_000
    tree = _tree_gate().open_tree(Charge(0, "train", 1.0, sigma, tree_steps=steps), 1.0)
    noise = np.array([tree.release_prefix(np.zeros(dim), [t]) for t in range(steps)])
    expected = (
        np.array(
            [
                [len(set(_reference_nodes(s)) & set(_reference_nodes(t))) for t in range(1, steps + 1)]
                for s in range(1, steps + 1)
            ]
        )
        * sigma**2
    )
    np.testing.assert_allclose(noise @ noise.T / dim, expected, atol=0.1 * sigma**2)
    assert abs(noise.mean()) < 0.05


def test_tree_is_charged_durably_in_full_before_its_first_prefix():
    events = []
    gate = _tree_gate(persist=lambda ledger: events.append(("persisted", ledger.to_json())))
    tree = gate.open_tree(Charge(4, "train", 1.0, 1.2, tree_steps=8), 1.0)
    assert len(events) == 1 and tree.released == 0
    tree.release_prefix(np.ones(3), ["a"])  # the run stops after one of eight steps
    assert len(events) == 1  # prefixes charge nothing more
    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    direct.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.2, 8))
    assert gate.ledger.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    assert PrivacyLedger.from_json(events[0][1]).epsilon() == gate.ledger.epsilon()
    assert gate.ledger.last_round("train") == 11  # the tree covers rounds 4..11


def test_a_tree_whose_charge_fails_to_persist_releases_nothing():
    def broken(ledger):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        PrivacyMechanism(PrivacyLedger(1e-5, ("rdp",)), persist=broken).open_tree(
            Charge(0, "train", 1.0, 1.0, tree_steps=4), 1.0
        )


def test_tree_refuses_repeat_contributors_and_steps_beyond_its_charge():
    tree = _tree_gate().open_tree(Charge(0, "train", 1.0, 0.0, tree_steps=3), 1.0)
    tree.release_prefix(np.array([[0.1, 0.0], [0.0, 0.2]]), ["a", "b"])
    for rows, ids, match in [
        (np.ones((2, 2)) * 0.1, ["c", "a"], "'a' already contributed to this tree"),
        (np.ones((2, 2)) * 0.1, ["c", "c"], "contributors repeat within the step"),
        (np.ones((2, 2)) * 0.1, ["c"], "one id per row"),
        (np.ones(3) * 0.1, ["c"], "one size P"),
        (np.array([np.nan, 1.0]), ["c"], "NaN"),
        (np.ones((0, 2)), [], "at least one contributor"),
    ]:
        with pytest.raises(ValueError, match=match):
            tree.release_prefix(rows, ids)
    assert tree.released == 1  # every refusal left the tree as it was
    np.testing.assert_allclose(tree.release_prefix(np.array([0.3, 0.0]), ["c"]), [0.4, 0.2])
    np.testing.assert_allclose(tree.release_prefix(np.array([0.0, 0.1]), ["d"]), [0.4, 0.3])
    with pytest.raises(ValueError, match="charged for 3 steps and all are released"):
        tree.release_prefix(np.array([0.0, 0.1]), ["e"])


@pytest.mark.parametrize(
    ("ledger", "charge", "clip", "error", "match"),
    [
        (("rdp", "pld"), Charge(0, "train", 1.0, 1.0, tree_steps=4), 1.0, ValueError, "PLD accountant cannot"),
        (("rdp",), Charge(0, "train", 1.0, 1.0), 1.0, ValueError, "needs a Charge with tree_steps"),
        (("rdp",), Charge(0, "train", 1.0, 1.0, tree_steps=0), 1.0, ValueError, "tree steps must be an integer >= 1"),
        (("rdp",), Charge(0, "train", 0.5, 1.0, tree_steps=4), 1.0, ValueError, "sampling_rate must be 1"),
        (("rdp",), Charge(0, "train", 1.0, -1.0, tree_steps=4), 1.0, ValueError, "noise_multiplier must be"),
        (("rdp",), Charge(0, "train", 1.0, 1.0, tree_steps=4), 0.0, ValueError, "clip_norm must be a finite"),
        (("rdp",), Charge(0, "eval", 1.0, 1.0, tree_steps=4), 1.0, ValueError, "kind must be one of"),
        (("rdp",), (0, "train", 1.0, 1.0), 1.0, TypeError, "must be a Charge"),
    ],
)
def test_bad_trees_charge_nothing(ledger, charge, clip, error, match):
    gate = PrivacyMechanism(PrivacyLedger(1e-5, ledger))
    with pytest.raises(error, match=match):
        gate.open_tree(charge, clip)
    assert len(gate.ledger) == 0
