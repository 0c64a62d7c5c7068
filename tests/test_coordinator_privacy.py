"""Privacy accounting (against dp_accounting used directly), the CLI, adaptive clipping."""

from __future__ import annotations

import json
import math
import re

import dp_accounting
import numpy as np
import pytest
from click.testing import CliRunner
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from biofed.apps.cli import cli
from biofed.coordinator.clipping import AdaptiveClipping, delta_noise_multiplier
from biofed.coordinator.privacy_cli import privacy_command
from biofed.privacy_ledger import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    distributed_noise_multiplier,
    plan_epsilon,
    round_event,
)
from biofed.privacy_mechanism import Charge, PrivacyMechanism

DELTA = 1e-5
# (q, z, T): PLD composes a self-composed event fast, so these stay well under a second each.
PLANS = [(0.1, 1.0, 50), (1.0, 1.5, 10), (0.02, 0.8, 200)]


def _direct(accountant_cls, q, z, T, delta=DELTA):
    gaussian = dp_accounting.GaussianDpEvent(z)
    event = gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    return accountant_cls().compose(event, T).get_epsilon(delta)


# ---------------------------------------------------------------------------- events and plans


def test_round_event_structure():
    assert round_event(1.0, 1.2) == dp_accounting.GaussianDpEvent(1.2)
    assert round_event(0.25, 0.7) == dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(0.7))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 1.0), r"sampling_rate must be in \(0, 1\]"),
        ((1.5, 1.0), r"sampling_rate must be in \(0, 1\]"),
        ((0.5, -0.1), "noise_multiplier must be a finite number >= 0"),
        ((0.5, math.inf), "noise_multiplier must be a finite number >= 0"),
    ],
)
def test_round_event_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        round_event(*args)


@pytest.mark.parametrize(("q", "z", "T"), PLANS)
@pytest.mark.slow
def test_plan_epsilon_matches_dp_accounting(q, z, T):
    eps = plan_epsilon(T, q, z, DELTA)
    assert eps["rdp"] == pytest.approx(_direct(RdpAccountant, q, z, T), rel=1e-12)
    assert eps["pld"] == pytest.approx(_direct(PLDAccountant, q, z, T), rel=1e-9)
    assert 0 < eps["pld"] <= eps["rdp"] * 1.05  # PLD is the tighter analysis


def test_plan_epsilon_without_noise_is_infinite():
    assert plan_epsilon(3, 0.5, 0.0, DELTA) == {"rdp": math.inf, "pld": math.inf}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0.5, 1.0, DELTA), "rounds must be an integer >= 1"),
        ((10, 0.5, 1.0, 0.0), r"delta must be in \(0, 1\)"),
        ((10, 0.5, 1.0, 1.0), r"delta must be in \(0, 1\)"),
    ],
)
def test_plan_epsilon_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        plan_epsilon(*args)


def test_calibrate_noise_multiplier_meets_target():
    z = calibrate_noise_multiplier(4.0, 100, 0.1, DELTA)
    assert _direct(RdpAccountant, 0.1, z, 100) <= 4.0
    assert _direct(RdpAccountant, 0.1, z - 1e-3, 100) > 4.0  # and it is the smallest such z
    with pytest.raises(ValueError, match="target_epsilon must be a finite number > 0"):
        calibrate_noise_multiplier(0.0, 100, 0.1, DELTA)


def test_distributed_noise_multiplier():
    assert distributed_noise_multiplier(1.0, 10, 10) == pytest.approx(1.0)
    assert distributed_noise_multiplier(1.0, 10, 5) == pytest.approx(math.sqrt(0.5))
    assert distributed_noise_multiplier(2.0, 4, 9) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="n_survivors must be an integer >= 1"):
        distributed_noise_multiplier(1.0, 10, 0)
    with pytest.raises(ValueError, match="n_min must be an integer >= 1"):
        distributed_noise_multiplier(1.0, 0, 3)


# ---------------------------------------------------------------------------- the ledger


def _ledger_with(rounds, delta=DELTA, **kwargs):
    ledger = PrivacyLedger(delta, **kwargs)
    for r, (q, z, kind) in enumerate(rounds):
        ledger.record_round(r, q, z, kind=kind)
    return ledger


@pytest.mark.slow
def test_ledger_epsilon_matches_direct_composition_of_every_round():
    # Distributed-mode rounds with varying survivors, one basis round, varying q.
    rounds = [(0.2, 1.1, "basis")] + [(0.2, distributed_noise_multiplier(1.2, 8, n), "train") for n in (8, 6, 8)]
    rounds += [(0.1, 1.2, "train")] * 3
    ledger = _ledger_with(rounds)
    for cls, name in ((RdpAccountant, "rdp"), (PLDAccountant, "pld")):
        direct = cls()
        for q, z, _ in rounds:
            direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
        assert ledger.epsilon(name) == pytest.approx(direct.get_epsilon(DELTA), rel=1e-6)
    assert ledger.epsilons() == {"rdp": ledger.epsilon("rdp"), "pld": ledger.epsilon("pld")}
    assert ledger.epsilon() == ledger.epsilon("rdp")  # first accountant is the budget accountant


def test_ledger_epsilon_is_deterministic_and_monotone():
    ledger = PrivacyLedger(DELTA, accountants=("rdp",))
    assert ledger.epsilon() == 0.0
    previous = 0.0
    for r in range(5):
        ledger.record_round(r, 0.3, 1.0)
        eps = ledger.epsilon()
        assert eps > previous
        previous = eps
    assert PrivacyLedger.from_json(ledger.to_json()).epsilon() == previous


def test_ledger_zero_noise_is_infinite():
    ledger = _ledger_with([(0.5, 1.0, "train"), (0.5, 0.0, "train")])
    assert ledger.epsilon("rdp") == math.inf
    assert ledger.epsilon("pld") == math.inf


@pytest.mark.slow
def test_ledger_json_round_trip_and_dp_event():
    rounds = [(1.0, 2.0, "basis"), (0.5, 1.0, "train"), (0.5, 1.0, "train"), (0.25, 0.9, "train")]
    ledger = _ledger_with(rounds, epsilon_budget=20.0)
    text = ledger.to_json()
    json.loads(text)  # plain JSON
    back = PrivacyLedger.from_json(text)
    assert back.groups == ledger.groups and len(back) == len(ledger) == 4
    assert (back.delta, back.accountants, back.epsilon_budget) == (ledger.delta, ledger.accountants, 20.0)
    assert back.epsilons() == ledger.epsilons()
    assert back.groups[0].kind == "basis" and back.groups[0].event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(2.0), 1
    )
    assert [(g.sampling_rate, g.count, g.first_round, g.last_round) for g in back.groups[1:]] == [
        (0.5, 2, 1, 2),
        (0.25, 1, 3, 3),
    ]
    # The composed DpEvent reproduces epsilon in a fresh accountant.
    assert RdpAccountant().compose(back.dp_event).get_epsilon(DELTA) == pytest.approx(ledger.epsilon("rdp"))
    assert isinstance(back.dp_event, dp_accounting.ComposedDpEvent)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": 99}', "not a biofed privacy ledger"),
        ('{"format": 1, "delta": 1e-5}', "malformed privacy ledger"),
        (
            '{"format": 1, "delta": 1e-5, "accountants": ["rdp"], "epsilon_budget": null, '
            '"entries": [{"round": 0, "kind": "train", "sampling_rate": 2.0, "noise_multiplier": 1.0}]}',
            "sampling_rate must be in",
        ),
        (
            '{"format": 2, "delta": 1e-5, "accountants": ["rdp"], "epsilon_budget": null, "groups": [{"kind": '
            '"train", "sampling_rate": 1.0, "noise_multiplier": 1.0, "count": 0, "first_round": 0, "last_round": 0}]}',
            "malformed privacy ledger group",
        ),
        (
            '{"format": 2, "delta": 1e-5, "accountants": ["rdp"], "epsilon_budget": null, "groups": [{"kind": '
            '"train", "sampling_rate": 1.0, "noise_multiplier": 1.0, "count": 1}]}',
            "missing or invalid field",
        ),
    ],
)
def test_ledger_from_json_bad_input(text, match):
    with pytest.raises(ValueError, match=match):
        PrivacyLedger.from_json(text)


def test_ledger_budget_stops_training():
    q, z, budget = 0.5, 1.5, 5.0
    ledger = PrivacyLedger(DELTA, epsilon_budget=budget)
    r = 0
    while not ledger.would_exceed(q, z):
        ledger.record_round(r, q, z)
        r += 1
        assert r < 1000
    assert 0 < r
    assert ledger.epsilon() <= budget
    assert _direct(RdpAccountant, q, z, r + 1) > budget  # the refused round would have overspent
    assert _direct(RdpAccountant, q, z, r) == pytest.approx(ledger.epsilon())
    # A no-noise round always exceeds a budget; no budget never stops.
    assert ledger.would_exceed(q, 0.0)
    assert not PrivacyLedger(DELTA).would_exceed(q, 0.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: PrivacyLedger(0.0), r"delta must be in \(0, 1\)"),
        (lambda: PrivacyLedger(DELTA, accountants=("moments",)), "unknown accountant 'moments'"),
        (lambda: PrivacyLedger(DELTA, accountants=("rdp", "rdp")), "at most once"),
        (lambda: PrivacyLedger(DELTA, epsilon_budget=-1.0), "epsilon_budget must be > 0"),
        (lambda: PrivacyLedger(DELTA).record_round(-1, 0.5, 1.0), "round must be an integer >= 0"),
        (lambda: PrivacyLedger(DELTA).record_round(0, 0.5, 1.0, kind="eval"), "kind must be one of"),
        (lambda: PrivacyLedger(DELTA).record_round(0, 0.0, 1.0), r"sampling_rate must be in \(0, 1\]"),
        (lambda: PrivacyLedger(DELTA).epsilon("moments"), "unknown accountant"),
        (lambda: _ledger_with([(0.5, 1.0, "train")]).record_round(0, 0.5, 1.0), "is not after round 0"),
    ],
)
def test_ledger_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_ledger_same_round_train_and_basis_is_allowed():
    ledger = PrivacyLedger(DELTA, accountants=("rdp",))
    ledger.record_round(0, 1.0, 2.0, kind="basis")
    ledger.record_round(0, 0.5, 1.0, kind="train")
    assert len(ledger) == 2


# ---------------------------------------------------------------------------- the CLI


def _cli_epsilons(output):
    found = dict(re.findall(r"epsilon \((RDP|PLD)\): (\S+)", output))
    return {k.lower(): float(v) for k, v in found.items()}


@pytest.mark.slow
def test_privacy_cli_matches_plan_epsilon():
    runner = CliRunner()
    result = runner.invoke(
        cli, ["privacy", "--rounds", "50", "--sampling-rate", "0.1", "--noise-multiplier", "1.0", "--delta", "1e-5"]
    )
    assert result.exit_code == 0, result.output
    expected = plan_epsilon(50, 0.1, 1.0, 1e-5)
    got = _cli_epsilons(result.output)
    assert got["rdp"] == pytest.approx(expected["rdp"], abs=1e-6)
    assert got["pld"] == pytest.approx(expected["pld"], abs=1e-6)


@pytest.mark.slow
def test_privacy_cli_plans_record_level_dp_sgd():
    """--level record: every DP-SGD step of every round is one Poisson-sampled Gaussian."""
    result = CliRunner().invoke(privacy_command, ["--level", "record", "-T", "10", "-q", "0.05", "-z", "1.1"])
    assert result.exit_code == 0, result.output
    assert "steps_per_round=20" in result.output and "record-level epsilon (RDP)" in result.output
    assert "client-level" not in result.output
    assert _cli_epsilons(result.output)["rdp"] == pytest.approx(plan_epsilon(200, 0.05, 1.1, 1e-5)["rdp"], abs=1e-6)
    result = CliRunner().invoke(
        privacy_command, ["--level", "record", "-T", "10", "-q", "0.05", "-z", "1.1", "--steps-per-round", "5"]
    )
    assert _cli_epsilons(result.output)["rdp"] == pytest.approx(plan_epsilon(50, 0.05, 1.1, 1e-5)["rdp"], abs=1e-6)
    client = CliRunner().invoke(privacy_command, ["-T", "10", "-q", "0.05", "-z", "1.1"])
    assert "client-level epsilon (RDP)" in client.output


def test_privacy_cli_no_noise_reports_infinity():
    result = CliRunner().invoke(privacy_command, ["--rounds", "3", "--noise-multiplier", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.count("inf (no noise: no differential privacy)") == 2


@pytest.mark.slow
def test_privacy_cli_target_epsilon_calibrates():
    result = CliRunner().invoke(privacy_command, ["-T", "100", "-q", "0.1", "--target-epsilon", "4"])
    assert result.exit_code == 0, result.output
    z = float(re.search(r"calibrated noise multiplier \(RDP, target epsilon 4\): (\S+)", result.output).group(1))
    assert z == pytest.approx(calibrate_noise_multiplier(4.0, 100, 0.1, 1e-5), abs=1e-6)
    assert _cli_epsilons(result.output)["rdp"] == pytest.approx(4.0, abs=1e-3)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--rounds", "0", "-z", "1"], "rounds must be an integer >= 1"),
        (["--rounds", "5", "-q", "0", "-z", "1"], r"sampling_rate must be in \(0, 1\]"),
        (["--rounds", "5", "-q", "1.2", "-z", "1"], r"sampling_rate must be in \(0, 1\]"),
        (["--rounds", "5", "-z", "-1"], "noise_multiplier must be a finite number >= 0"),
        (["--rounds", "5", "-z", "1", "--delta", "1"], r"delta must be in \(0, 1\)"),
        (["--rounds", "5", "-z", "1", "--delta", "0"], r"delta must be in \(0, 1\)"),
        (["--rounds", "5"], "exactly one of --noise-multiplier and --target-epsilon"),
        (["--rounds", "5", "-z", "1", "-e", "2"], "exactly one of --noise-multiplier and --target-epsilon"),
        (["--rounds", "5", "-e", "-2"], "target epsilon must be a finite number > 0"),
        (["--rounds", "5", "-z", "1", "--steps-per-round", "3"], "applies to --level record only"),
        (["--rounds", "5", "-z", "1", "--level", "record", "--steps-per-round", "0"], "must be an integer >= 1"),
    ],
)
def test_privacy_cli_bad_input(args, match):
    result = CliRunner().invoke(privacy_command, args)
    assert result.exit_code == 2
    assert re.search(match, result.output), result.output


# ---------------------------------------------------------------------------- adaptive clipping


def test_delta_noise_multiplier_formula_and_error():
    z, sigma_b = 1.0, 5.0
    z_delta = delta_noise_multiplier(z, sigma_b)
    assert z_delta == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    # Update and centred-count mechanisms recombine to exactly z.
    assert (z_delta**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    assert z_delta > z
    with pytest.raises(ValueError, match="count_noise_std=0.5 is too small for noise_multiplier=1.0"):
        delta_noise_multiplier(1.0, 0.5)
    with pytest.raises(ValueError, match="count_noise_std must be a finite number > 0"):
        delta_noise_multiplier(1.0, 0.0)
    assert AdaptiveClipping(0.5, 0.2, 5.0).delta_noise_multiplier(1.0) == z_delta


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
def test_adaptive_clipping_converges_to_quantile(gamma):
    rng = np.random.default_rng(int(gamma * 100))
    mu, s, n = 0.0, 0.5, 200
    true_quantile = math.exp(mu + s * stats.norm.ppf(gamma))
    clipper = AdaptiveClipping(target_quantile=gamma, learning_rate=0.2, count_noise_std=1.0)
    gate = PrivacyMechanism(PrivacyLedger(DELTA))
    clip, history = 0.1, []
    for r in range(1500):
        norms = rng.lognormal(mu, s, size=n)
        (count,) = gate.release(Charge(r, "train", 1.0, 0.5), clipper.count_query(norms <= clip))
        clip = clipper.next_clip(clip, float(count[0]), n)
        history.append(clip)
    estimate = math.exp(np.mean(np.log(history[-500:])))
    assert estimate == pytest.approx(true_quantile, rel=0.03)


def test_adaptive_clipping_update_rule():
    clipper = AdaptiveClipping(0.5, learning_rate=0.3, count_noise_std=0.0)
    # 3 of 4 unclipped -> centred sum 1 -> b_bar = 0.75 -> C * exp(-0.3 * 0.25)
    query = clipper.count_query([1, 1, 1, 0])
    assert query.clip_norm == 0.5 and query.noise_std == 0.0
    assert query.clipped_total()[0][0] == pytest.approx(1.0)
    assert clipper.next_clip(2.0, 1.0, 4) == pytest.approx(2.0 * math.exp(-0.3 * 0.25))
    # 2 reports while 4 were expected: centred estimate (2 - 1) / 4 + 1/2 = 0.75
    assert clipper.count_query(np.array([True, True])).clipped_total()[0][0] == pytest.approx(1.0)
    assert clipper.next_clip(3.0, 1.0, 4) == pytest.approx(3.0 * math.exp(-0.3 * 0.25))
    # all clipped (b_bar = 0 < gamma): the clip grows; none clipped: it shrinks
    assert clipper.next_clip(1.0, -2.0, 4) > 1.0 > clipper.next_clip(1.0, 2.0, 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: AdaptiveClipping(1.0), r"target_quantile must be in \(0, 1\)"),
        (lambda: AdaptiveClipping(0.5, learning_rate=-1), "learning_rate must be a finite number > 0"),
        (lambda: AdaptiveClipping(0.5, count_noise_std=-1), "count_noise_std must be a finite number >= 0"),
        (lambda: AdaptiveClipping(0.5).count_query([0, 2]), "only 0/1"),
        (lambda: AdaptiveClipping(0.5).count_query([[0, 1]]), "must be 1-D"),
        (lambda: AdaptiveClipping(0.5).next_clip(1.0, 0.0, 0), "n_expected must be an integer >= 1"),
        (lambda: AdaptiveClipping(0.5).next_clip(0.0, 0.0, 4), "clip_norm must be a finite number > 0"),
    ],
)
def test_adaptive_clipping_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
