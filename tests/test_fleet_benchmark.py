"""The fleet benchmark's utility-under-privacy case: its noise calibration and its refusals."""

from __future__ import annotations

import sys

import pytest

from biofed.benchmarks.fleet import basis_charges, calibrate_fleet_noise, main, privacy_target
from biofed.privacy_ledger import PrivacyLedger, calibrate_noise_multiplier
from brokers import require_mosquitto


@pytest.mark.parametrize("standardization, n_basis", [("device", 1), ("global", 2)])
def test_the_calibrated_run_stays_within_the_target_on_the_coordinators_ledger(standardization, n_basis):
    """Charged as the coordinator charges them (basis phases, then every training round, all at
    q = 1), the calibrated run spends at most the target, and a slightly smaller z would not."""
    assert basis_charges(standardization) == n_basis
    rounds, z_basis, delta, target = 10, 10.0, 1e-6, 2.0
    z = calibrate_fleet_noise(target, rounds, z_basis, n_basis, delta)

    def spent(z_train: float) -> float:
        ledger = PrivacyLedger(delta, ("rdp",))
        for r in range(n_basis):
            ledger.record_round(r, 1.0, z_basis, kind="basis")
        for r in range(n_basis, n_basis + rounds):
            ledger.record_round(r, 1.0, z_train)
        return ledger.epsilon("rdp")

    assert spent(z) <= target
    assert spent(z * 0.99) > target
    # the basis takes its share: without it the same target allows less training noise
    assert z > calibrate_noise_multiplier(target, rounds, 1.0, delta)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rabbitmq"], "--privacy-target runs on Mosquitto"),
        (["--target-epsilon", "0"], "--target-epsilon must be > 0"),
        (["--delta", "1"], "--delta in (0, 1)"),
    ],
)
def test_privacy_target_refuses_rabbitmq_and_bad_privacy_parameters(monkeypatch, capsys, extra, message):
    monkeypatch.setattr(sys, "argv", ["fleet", "--privacy-target", "--devices", "10", *extra])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_privacy_target_runs_both_federations_and_reads_the_coordinators_ledger(tmp_path):
    """A small fleet end to end: the private run spends at most the target, charges the planned
    basis phase and every planned round, and the figures come from the coordinators' state."""
    require_mosquitto()
    found = privacy_target(12, 1, tmp_path, target_epsilon=2.0, delta=1e-6)
    assert found["problems"] == []
    assert found["rounds_trained_private"] == 1
    assert found["basis_charges_in_ledger"] == found["basis_charges_planned"] == 1
    assert 1.9 < found["epsilon_rdp"] <= 2.0  # calibrated to the target, read from the ledger
    assert found["epsilon_pld"] <= found["epsilon_rdp"]
    assert 0.0 <= found["accuracy_private"] <= 1.0 and 0.0 <= found["accuracy_non_private"] <= 1.0
    assert found["accuracy_gap"] == pytest.approx(found["accuracy_non_private"] - found["accuracy_private"], abs=1e-4)
    # the noise on the averaged update is z C / n
    assert found["noise_std_on_mean"] == pytest.approx(found["noise_multiplier"] * 0.25 / 12, rel=1e-3)
