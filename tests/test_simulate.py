"""biofed simulate: many real edge agents in one process, and the seeded fault schedule at scale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from biofed.apps.demo import DemoSettings
from biofed.apps.simulate import FaultPlan, FleetOptions, check_federation, run_simulation, split_windows
from brokers import require_mosquitto


def _labels(n_rest: int, n_task: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array(["rest"] * n_rest + ["arithmetic"] * n_task)
    t = np.concatenate([np.arange(n_rest), 1000 + np.arange(n_task)]).astype(float)
    return labels, t


def test_split_windows_deals_disjoint_blocks_of_every_class():
    labels, t = _labels(40, 40)
    parts = split_windows(labels, t, 4, 10, ("rest", "arithmetic"))
    assert len(parts) == 4
    seen = np.concatenate(parts)
    assert len(set(seen.tolist())) == seen.size == 80  # disjoint, all used
    for rows in parts:
        assert (labels[rows] == "rest").sum() == 10 and (labels[rows] == "arithmetic").sum() == 10
        rest = rows[labels[rows] == "rest"]
        assert np.array_equal(t[rest], np.arange(t[rest][0], t[rest][0] + 10))  # consecutive in time


def test_split_windows_overlaps_evenly_when_the_source_is_short():
    labels, t = _labels(20, 12)
    parts = split_windows(labels, t, 5, 8, ("rest", "arithmetic"))
    for rows in parts:
        assert (labels[rows] == "rest").sum() == 8 and (labels[rows] == "arithmetic").sum() == 8
    firsts = [int(t[rows[labels[rows] == "rest"]][0]) for rows in parts]
    assert firsts == [0, 3, 6, 9, 12]  # evenly spaced over the 20 windows


def test_fault_plan_picks_are_seeded_and_reproducible():
    devices = [f"d{i:03d}" for i in range(200)]
    plan = FaultPlan(seed=7)
    a = plan.pick(devices, 0.1, salt=1)
    assert a == FaultPlan(seed=7).pick(devices, 0.1, salt=1)
    assert len(a) == 20
    assert a != plan.pick(devices, 0.1, salt=2)
    assert a != FaultPlan(seed=8).pick(devices, 0.1, salt=1)
    assert plan.pick(devices, 0.0, salt=1) == set()


@pytest.mark.slow
@pytest.mark.mosquitto
def test_fault_schedule_at_100_devices_keeps_every_invariant(tmp_path):
    """100 simulated devices on Mosquitto under the standard schedule: connection drops,
    a broker restart and a coordinator kill -9 mid-round, slow (late) and duplicating
    devices. Every round still closes and the committed state stays exact."""
    require_mosquitto()
    deadline = 8.0
    rounds = 4
    settings = DemoSettings(
        out=tmp_path / "sim",
        devices=100,
        rounds=rounds,
        mosquitto=True,
        round_deadline_s=deadline,
        min_devices=50,
        synthetic_seconds=40.0,
        timeout_s=600.0,
    )
    plan = FaultPlan.standard(seed=3, round_deadline_s=deadline)
    summary = run_simulation(settings, FleetOptions(workers=4, windows_per_device=8, plan=plan))
    assert summary["problems"] == []
    faults = " | ".join(summary["faults"])
    assert "training round 1): dropped" in faults and "broker restarted" in faults
    assert "coordinator kill -9" in faults and "training round 4): dropped" in faults
    assert summary["coordinator_starts"] == 2
    assert summary["slow_devices"] == 5 and summary["late_published"] > 0
    assert summary["duplicating_devices"] == 5 and summary["duplicates_published"] > 0
    records = json.loads((tmp_path / "sim" / "state" / "rounds.json").read_text())
    train = [r for r in records if r["phase"] == "train"]
    assert len(train) == rounds
    # the slow devices' updates arrive after the deadline: never in a committed round, except in
    # the round of the broker restart (training round 2), whose deadline moves by the outage
    assert all(50 <= r["n_devices"] <= (100 if r["train_round"] == 2 else 95) for r in train)
    assert records[-1]["phase"] == "evaluate"
    assert records[-1]["epsilon_rdp"] is not None and np.isfinite(records[-1]["epsilon_rdp"])
    # the invariants are checked against the committed state, so a broken state must be caught
    state = tmp_path / "sim" / "state"
    import sqlite3

    db = sqlite3.connect(state / "coordinator.sqlite")
    round_, device = db.execute("SELECT round, device_id FROM accepted WHERE kind = 'update' LIMIT 1").fetchone()
    db.execute("INSERT INTO accepted VALUES ('forged-duplicate', ?, ?, 'update')", (round_, device))
    db.commit()
    db.close()
    problems = check_federation(state, expected_train_rounds=rounds)
    assert any("counted twice" in p for p in problems)


@pytest.mark.slow
def test_demo_runs_a_fleet_above_a_handful_in_its_own_process(tmp_path):
    from biofed.apps.demo import IN_PROCESS_FLEET, run_demo

    out = tmp_path / "demo"
    n = IN_PROCESS_FLEET + 1
    summary = run_demo(
        DemoSettings(out=out, devices=n, rounds=2, synthetic_seconds=10.0, timeout_s=400.0, noise_multiplier=0.0)
    )
    assert len(summary["devices"]) == n
    assert {p.name for p in (out / "logs").iterdir()} == {"warmup.log", "coordinator.log", "devices.log"}
    log = (out / "logs" / "devices.log").read_text()
    assert all(f"{device}: online with" in log for device in summary["devices"])
    assert len(summary["federated"]["per_device"]) == n


def test_simulate_refuses_the_fault_schedule_without_mosquitto(tmp_path):
    from click.testing import CliRunner

    from biofed.apps.cli import cli

    result = CliRunner().invoke(cli, ["simulate", "--devices", "2", "--faults", "--out", str(tmp_path / "sim")])
    assert result.exit_code != 0
    assert "the broker restart fault needs --mosquitto" in result.output


def test_simulate_refuses_a_fleet_beyond_the_open_file_limit_before_starting_anything(tmp_path):
    import resource
    from pathlib import Path

    from click.testing import CliRunner

    from biofed.apps.cli import cli
    from biofed.apps.simulate import FD_HEADROOM, FDS_PER_DEVICE

    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    devices = nr_open // FDS_PER_DEVICE + 1  # beyond what any process may open, whatever its privileges
    out = tmp_path / "sim"
    result = CliRunner().invoke(cli, ["simulate", "--devices", str(devices), "--mosquitto", "--out", str(out)])
    assert result.exit_code != 0
    needed = FDS_PER_DEVICE * devices + FD_HEADROOM
    assert f"a simulation of {devices} devices needs {needed} open files" in result.output
    assert f"fs.nr_open = {nr_open}" in result.output
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        assert f"one process simulates at most {(hard - FD_HEADROOM) // FDS_PER_DEVICE} devices" in result.output
    assert not (out / "mosquitto").exists()  # no broker was started
