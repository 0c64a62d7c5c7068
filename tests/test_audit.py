"""``biofed audit`` on small real federations (agent processes, canary clients, a real broker).

A correct federation must come out consistent (lower bound <= ledger epsilon); these runs use
99.9 % confidence, so a sound audit fails them with probability below 1e-3. Each fixture that
re-introduces a leak must come out as a VIOLATION; they run with a strong signal (low z), so
the audit's lower bound clears the leaky ledger by several standard errors.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant

from biofed.apps.audit import AuditSettings, CanaryAgent, ledger_epsilons, run_audit
from biofed.coordinator.server import Coordinator
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import PrivacyMechanism

SMALL = dict(runs=1, devices=2, rounds=3, synthetic_seconds=8.0, timeout_s=240.0, round_deadline_s=30.0)


def _only(audits, mode, adversary):
    [audit] = [a for a in audits if a.trust_mode == mode and a.adversary == adversary]
    return audit


@pytest.mark.slow
def test_audit_help_documents_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "biofed", "audit", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for text in (
        "--trust-mode",
        "--out",
        "--runs",
        "--confidence",
        "Andrew et al. 2023",
        "VIOLATION",
        "biofed audit --trust-mode local --runs 3",
    ):
        assert text in result.stdout


@pytest.mark.slow
def test_audit_of_a_small_central_federation_is_consistent(tmp_path):
    out = tmp_path / "audit"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "biofed",
            "audit",
            "--trust-mode",
            "central",
            "--runs",
            "1",
            "--devices",
            "2",
            "--rounds",
            "3",
            "--seconds",
            "8",
            "--confidence",
            "0.999",
            "--timeout",
            "240",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "eps lower" in result.stdout and "ledger eps" in result.stdout
    [row] = [line for line in result.stdout.splitlines() if line.startswith("central ")]
    assert row.split()[1] == "observer" and row.endswith("consistent")
    summary = json.loads((out / "audit.json").read_text())
    [audit] = summary["audits"]
    # the ledger: one basis round (z_b = 10) and 3 training rounds (z = 2), every device every round
    accountant = PLDAccountant().compose(dp_accounting.GaussianDpEvent(10.0))
    expected = accountant.compose(dp_accounting.GaussianDpEvent(2.0), 3).get_epsilon(1e-5)
    assert audit["ledger"]["pld"] == pytest.approx(expected, rel=1e-6)
    assert audit["ledger_epsilon"] == min(audit["ledger"].values())
    assert audit["verdict"] == "consistent" and audit["lower_bound"] <= audit["ledger_epsilon"]
    assert audit["rounds_seen"] == 3
    assert audit["gaussian"]["n_inserted"] == 16 and audit["gaussian"]["n_held_out"] == 17
    scores = audit["scores"]
    # in units of C, an inserted canary adds 1 per round: its mean score is far above the held-out ones
    assert np.mean(scores["inserted"]) - np.mean(scores["held_out"]) > 0
    assert ledger_epsilons(out / "central" / "run1" / "state") == audit["ledger"]


@pytest.mark.slow
def test_audit_of_small_local_and_distributed_federations_is_consistent(tmp_path):
    audits = run_audit(
        AuditSettings(out=tmp_path / "audit", trust_modes=("local", "distributed"), confidence=0.999, **SMALL)
    )
    assert {(a.trust_mode, a.adversary) for a in audits} == {
        ("local", "observer"),
        ("local", "coordinator"),
        ("distributed", "observer"),
        ("distributed", "coordinator"),
    }
    for audit in audits:
        assert audit.consistent, audit
        assert audit.lower_bound <= audit.ledger_epsilon
    # the local coordinator sees each canary's own noised update, and scores every canary's updates
    # on every held-out direction
    local = _only(audits, "local", "coordinator")
    assert local.gaussian.n_held_out == 16 * 17 and local.rounds_seen == 3
    assert _only(audits, "distributed", "coordinator").rounds_seen == 3


# ----------------------------------------------------------------------------- leaks
@pytest.fixture
def noiseless_gate(monkeypatch):
    """Leak: the privacy mechanism releases without noise but charges the ledger as if it had noised."""
    release = PrivacyMechanism.release

    def without_noise(self, charge, *queries):
        return release(self, charge, *(replace(q, noise_std=0.0) for q in queries))

    monkeypatch.setattr(PrivacyMechanism, "release", without_noise)


@pytest.fixture
def undercharging_ledger(monkeypatch):
    """Leak: every ledger entry records 100x the noise that was released."""
    record_round = PrivacyLedger.record_round

    def undercharged(self, round, sampling_rate, noise_multiplier, *, kind="train"):
        return record_round(self, round, sampling_rate, 100 * noise_multiplier, kind=kind)

    monkeypatch.setattr(PrivacyLedger, "record_round", undercharged)


@pytest.mark.slow
def test_audit_catches_a_ledger_that_charges_less_than_was_released(tmp_path, undercharging_ledger):
    [audit] = run_audit(AuditSettings(out=tmp_path / "audit", trust_modes=("central",), noise_multiplier=0.5, **SMALL))
    assert audit.verdict == "VIOLATION"
    assert audit.ledger_epsilon < 0.5 < audit.gaussian.lower


@pytest.mark.slow
def test_audit_catches_a_coordinator_that_releases_without_noise(tmp_path, noiseless_gate):
    [audit] = run_audit(AuditSettings(out=tmp_path / "audit", trust_modes=("central",), **SMALL))
    assert math.isfinite(audit.ledger_epsilon)  # the ledger still charges z = 2
    assert audit.verdict == "VIOLATION" and audit.gaussian.lower == math.inf


class RetryingCoordinator(Coordinator):
    """Leak: every training round is first gathered and discarded ``discarded`` times, as a
    round with too few replies is, without charging them; what the discarded gathers
    delivered (local: the updates; distributed: the unmasked sums) reached the coordinator
    all the same."""

    discarded = 6

    def _gather(self, phase, participants, attempts):
        if phase == "train":
            charge = self.mechanism.charge
            self.mechanism.charge = lambda _charge: None
            try:
                for _ in range(self.discarded):
                    super()._gather(phase, participants, attempts)
            finally:
                self.mechanism.charge = charge
        return super()._gather(phase, participants, attempts)


@pytest.mark.slow
def test_audit_catches_uncharged_retried_rounds_against_the_local_coordinator(tmp_path):
    settings = AuditSettings(
        out=tmp_path / "audit", trust_modes=("local",), noise_multiplier=1.0, **{**SMALL, "rounds": 2}
    )
    audits = run_audit(settings, coordinator_class=RetryingCoordinator)
    coordinator = _only(audits, "local", "coordinator")
    assert coordinator.rounds_seen == 14  # 2 charged rounds, 12 discarded ones
    assert coordinator.verdict == "VIOLATION"
    # the released models are those of the 2 charged rounds: the observer has nothing to complain about
    observer = _only(audits, "local", "observer")
    assert observer.rounds_seen == 2 and observer.consistent


@pytest.mark.slow
def test_audit_catches_uncharged_unmasked_sums_against_the_distributed_coordinator(tmp_path):
    class Retrying(RetryingCoordinator):
        discarded = 10

    # z = 0.3 planned for the secure-aggregation threshold (2 of 18 devices): the sum carries z 3
    settings = AuditSettings(
        out=tmp_path / "audit", trust_modes=("distributed",), noise_multiplier=0.3, **{**SMALL, "rounds": 2}
    )
    audits = run_audit(settings, coordinator_class=Retrying)
    coordinator = _only(audits, "distributed", "coordinator")
    assert coordinator.rounds_seen == 22
    assert coordinator.verdict == "VIOLATION"
    assert _only(audits, "distributed", "observer").rounds_seen == 2


@pytest.mark.slow
def test_audit_catches_devices_that_send_their_update_without_noise(tmp_path, noiseless_gate):
    audits = run_audit(AuditSettings(out=tmp_path / "audit", trust_modes=("local",), **SMALL))
    coordinator = _only(audits, "local", "coordinator")
    assert coordinator.verdict == "VIOLATION" and coordinator.gaussian.lower == math.inf


def test_canary_agent_refuses_a_direction_that_is_not_a_unit_vector(tmp_path):
    from biofed.config import DeviceConfig

    config = DeviceConfig(
        device_id="canary00",
        fleet="demo",
        store_path=tmp_path / "features.sqlite",
        broker={"host": "127.0.0.1", "port": 1},
    )
    with pytest.raises(ValueError, match="unit vector"):
        CanaryAgent(config, np.ones(4), 8, random_state=np.random.default_rng(0))
