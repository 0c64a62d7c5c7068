"""The release gate is the only place privacy noise is drawn, ledgers are charged and
device-derived vectors are turned into something publishable.

These tests read the package's syntax trees, so a new noise draw or a new publish path
that bypasses :mod:`biofed.privacy_mechanism` fails here before it can leak.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import (
    Charge,
    ClippedSum,
    PrivacyMechanism,
    discrete_gaussian,
    distributed_discrete_tau,
    grid_sensitivity,
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
}
"""Distribution samplers that could serve as privacy noise."""

NOT_PRIVACY_NOISE = {
    ("datasets/synthetic.py", "*"): "synthetic recordings",
    ("biofed/apps/audit.py", "__init__"): "the audit's canary device's own records",
    ("biofed/apps/audit_stats.py", "canary_directions"): "random canary directions of the audit",
    ("coordinator/release.py", "_os_seeded_normal"): "simulated releases of `biofed evaluate` only, which holds "
    "every recording in one process (nothing crosses a trust boundary); "
    "test_offline_release_module_stays_out_of_the_federation keeps it so",
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
    assert (GATE, "release") in draws  # the walk finds the gate's own draw


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


OFFLINE_RELEASE_MODULES = ("biofed.coordinator.release", "biofed.coordinator.one_shot", "biofed.coordinator.dp_ftrl")
"""Simulated private releases for the offline evaluation; they draw their own noise."""


def test_offline_release_module_stays_out_of_the_federation():
    """Only the offline evaluation (and the offline modules among themselves) may import the
    simulated releases: a live federation releases through the gate alone."""
    allowed = {
        "biofed/apps/evaluation.py",
        "coordinator/release.py",
        "coordinator/one_shot.py",
        "coordinator/dp_ftrl.py",
    }
    importers = set()
    for path, tree in _package_files():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(name in OFFLINE_RELEASE_MODULES for name in names):
                importers.add(path)
    assert "biofed/apps/evaluation.py" in importers  # the walk sees the one legitimate importer
    assert importers <= allowed, f"simulated releases imported by {sorted(importers - allowed)}"
