"""The benchmark harness and the ``biofed bench`` command (no timed assertions)."""

from __future__ import annotations

import itertools
import json
import math
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from biofed.apps.bench import _json_safe, bench_command, format_report, load_suite
from biofed.apps.cli import COMMANDS, cli
from biofed.benchmarks.harness import (
    CaseResult,
    Comparison,
    Target,
    Timing,
    max_relative_difference,
    measure,
    measure_interleaved,
)


def fake_clock(durations):
    """A clock whose consecutive start/stop pairs are ``durations`` apart."""
    ticks = iter(itertools.accumulate(itertools.chain.from_iterable((0.0, d) for d in durations)))

    def clock():
        return next(ticks)

    return clock


def test_measure_statistics_from_injected_clock():
    calls = []
    timing, result = measure(
        lambda: calls.append(1) or len(calls), repeats=5, clock=fake_clock([7.0, 3.0, 1.0, 3.0, 2.0, 9.0])
    )
    assert result == 1  # the warm-up call's return value
    assert len(calls) == 6  # warm-up + 5 repeats
    assert timing.first_call == 7.0
    assert timing.times == (3.0, 1.0, 3.0, 2.0, 9.0)
    assert (timing.median, timing.min, timing.max) == (3.0, 1.0, 9.0)


def test_measure_even_repeats_median_and_bad_repeats():
    timing, _ = measure(lambda: None, repeats=4, clock=fake_clock([0.5, 4.0, 1.0, 2.0, 8.0]))
    assert timing.median == 3.0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure(lambda: None, repeats=0)


def test_measure_interleaved_alternates_the_functions():
    calls = []
    runs = measure_interleaved(
        {"a": lambda: calls.append("a") or "A", "b": lambda: calls.append("b") or "B"},
        repeats=2,
        clock=fake_clock([5.0, 6.0, 1.0, 2.0, 3.0, 4.0]),
    )
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then one call of each per round
    assert runs["a"][0].first_call == 5.0 and runs["a"][0].times == (1.0, 3.0) and runs["a"][1] == "A"
    assert runs["b"][0].first_call == 6.0 and runs["b"][0].times == (2.0, 4.0) and runs["b"][1] == "B"
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_interleaved({"a": lambda: None}, repeats=0)


def test_max_relative_difference_and_ratio():
    expected = np.array([[1.0, -4.0], [0.0, 2.0]])
    assert max_relative_difference(expected, expected) == 0.0
    assert max_relative_difference(expected + [[0.0, 0.0], [0.04, 0.0]], expected) == pytest.approx(0.01)
    assert max_relative_difference(np.zeros(3), np.zeros(3)) == 0.0
    assert math.isinf(max_relative_difference(np.ones(3), np.zeros(3)))
    with pytest.raises(ValueError, match="shapes"):
        max_relative_difference(np.zeros(3), np.zeros(4))
    fast, slow = Timing((1.0, 2.0, 3.0), 10.0), Timing((8.0, 4.0, 6.0), 0.1)
    row = Comparison("k", "(3,)", fast, "numpy", slow, rel_diff=2e-6, tolerance=1e-6)
    assert row.ratio == 3.0 and row.flagged
    assert "FLAG" in format_report([CaseResult("k", comparisons=[row])], [])


def test_target_pass_and_miss_in_report():
    targets = [Target("speed", 25.0, ">=", 20.0, "x"), Target("start", 3.0, "<=", 2.0, " s")]
    assert [t.passed for t in targets] == [True, False]
    text = format_report([], targets)
    assert "PASS" in text and "MISS" in text and ">= 20x" in text


def test_bench_registered_in_cli():
    assert COMMANDS["bench"] == "biofed.apps.bench:bench_command"


@pytest.mark.slow
def test_bench_json_for_a_kernel_and_the_chain(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli, ["bench", "--quick", "--repeats", "3", "--only", "transform,chain", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "fusion chain" in result.stderr and "Targets" in result.stderr  # the table; stdout is JSON only
    data = json.loads(out.read_text())
    assert json.loads(result.stdout) == data
    assert {"machine", "cases", "targets", "mode", "repeats"} <= set(data)
    assert {"platform", "cpu", "python", "versions", "blas"} <= set(data["machine"])
    assert data["machine"]["versions"]["numpy"] == np.__version__
    assert [c["name"] for c in data["cases"]] == ["transform", "chain"]
    rows = [row for case in data["cases"] for row in case["comparisons"]]
    assert rows and all(row["ratio"] > 0 for row in rows)
    for row in rows:
        assert {"median_s", "min_s", "max_s", "first_call_s", "repeats"} <= set(row["biofed"])
        assert not row["flagged"] and row["max_rel_diff"] <= row["tolerance"], row
    sweep = [row["shape"] for row in rows if row["case"] == "transform[relu] (plan)"]
    assert [s.split(",")[0] for s in sweep] == ["(1", "(16", "(256", "(5000"]
    chain = [row for row in rows if row["case"].startswith("fusion chain")]
    assert {(row["case"], row["baseline_name"]) for row in chain} == {
        (f"fusion chain ({mode})", base)
        for mode in ("batch", "per window")
        for base in ("mne+scipy+numpy", "scipy+numpy")
    } | {(f"fusion chain float64 ({mode})", "mne+scipy+numpy") for mode in ("batch", "per window")}
    for row in chain:
        if "float64" in row["case"]:
            assert row["tolerance"] == 1e-12
        assert row["max_rel_diff"] <= row["tolerance"]
    names = {t["name"]: t for t in data["targets"]}
    for mode, goal in (("batch", 10), ("per window", 20)):
        assert names[f"fusion chain float64 max rel diff <= 1e-12 ({mode})"]["passed"]
        assert names[f"fusion chain >= {goal}x faster than MNE/SciPy version ({mode})"]["measured"] > 0
    assert "transform (plan) >= 1x NumPy at every size (1, 16, 256, 5000)" in names


def test_stage_table_is_printed_with_the_fft_limit():
    from biofed.benchmarks.harness import Table

    table = Table(
        "Per-window stage profile",
        ("stage", "us/window", "fraction of limit"),
        (("eeg band powers", 61.5, 0.55), ("bio window statistics", 9.0, "-")),
        note="limit measured here",
    )
    result = CaseResult("realtime", tables=[table])
    text = format_report([result], [])
    assert (
        "Per-window stage profile" in text and "61.5" in text and "0.55" in text and "note: limit measured here" in text
    )
    assert result.to_dict()["tables"][0]["rows"][1] == ["bio window statistics", 9.0, "-"]


@pytest.mark.parametrize("n_windows", [1, 2, 29])
def test_chain_counts_the_rffts_of_its_distinct_segments(n_windows):
    """The FFT limits' rfft counts equal the distinct Welch segments of the windows, counted naively."""
    from biofed.benchmarks.stream import HOP, STAGE_MODALITIES, WINDOW_S, Chain, make_stream

    chain = Chain("float32")
    channels = {m: x.shape[0] for m, x in make_stream(WINDOW_S).items() if m in ("eeg", "audio")}
    batch, live = chain.rffts_in_batch(n_windows), chain.rffts_per_window()
    assert set(batch) == set(live) == {name for name, m in STAGE_MODALITIES.items() if m in channels}
    for name, m in STAGE_MODALITIES.items():
        if m not in channels:
            continue
        plan = chain.plans[m]

        def segments(w, plan=plan, m=m):
            return {w * HOP[m] + s * plan.step for s in range(plan.n_seg)}

        distinct = set().union(*(segments(w) for w in range(n_windows)))
        assert batch[name] == {"rffts": channels[m] * len(distinct), "nperseg": plan.nperseg}
        assert live[name]["rffts"] == channels[m] * len(segments(1) - segments(0))


def test_bench_unknown_case_is_a_clear_error():
    result = CliRunner().invoke(bench_command, ["--only", "nope"])
    assert result.exit_code == 2
    assert "unknown case(s) nope" in result.output and "band_powers" in result.output


def test_suite_is_the_installed_package():
    suite = load_suite()
    assert suite.__name__ == "biofed.benchmarks.suite" and "windowing" in suite.CASES


def test_missing_suite_dependency_is_a_clear_error(monkeypatch):
    import click

    # numpy absent, as in a base install without the extras: importing the suite fails on it
    for name in [m for m in sys.modules if m == "biofed.benchmarks" or m.startswith("biofed.benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(click.ClickException, match=r"needs numpy.*biofed\[coordinator\]"):
        load_suite()


@pytest.mark.slow
def test_bench_evaluation_case_quick(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", "--quick", "--only", "evaluation", "--json", str(out)])
    assert result.exit_code == 0, result.output
    case = json.loads(out.read_text())["cases"][0]
    assert case["error"] is None
    names = {m["name"] for m in case["metrics"]}
    assert (
        "new patient / dp-ftrl / proj none / eps 8" in names and "personalized / plain / proj none / eps inf" in names
    )
    assert all(0.0 <= m["value"] <= 1.0 for m in case["metrics"])
    assert any("personalized mean (one-shot+personal, eps 8)" in t["name"] for t in case["targets"])


def test_privacy_ledger_case_reports_a_bounded_ledger_equal_to_dp_accounting():
    from biofed.benchmarks.suite import Settings, run_case

    result = run_case("privacy_ledger", Settings(quick=True, repeats=3))
    assert result.error is None
    targets = {t.name: t for t in result.targets}
    assert targets["ledger size at round 200 <= 1.1x round 10"].passed
    assert targets["ledger epsilon equals dp_accounting on the full history"].passed
    # timings are reported, never asserted: only their presence is checked here
    assert any(t.name.startswith("accounting time per round") for t in result.targets)


@pytest.mark.slow
def test_coordinator_memory_case_quick_runs_a_federation_and_reports_the_rss_ratio():
    from biofed.benchmarks.suite import Settings, run_case

    result = run_case("coordinator_memory", Settings(quick=True))
    assert result.error is None
    metrics = {m.name: m for m in result.metrics}
    first = metrics["coordinator RSS at training round 5 (10 devices, 20 rounds (--quick))"]
    last = metrics["coordinator RSS at training round 20 (10 devices, 20 rounds (--quick))"]
    assert 10 < first.value < 4000 and 10 < last.value < 4000  # MB of a real coordinator process
    assert last.detail["broker"] == "mosquitto" and last.detail["rounds"] == 20
    assert metrics["coordinator RSS round 20 / round 5"].value == pytest.approx(last.value / first.value)
    # the ratio is reported as a target, never asserted
    [target] = result.targets
    assert target.name == "coordinator RSS at round 20 <= 1.10x round 5 (10 devices, 20 rounds (--quick))"
    assert target.op == "<=" and target.threshold == 1.10
    assert any(name.startswith("round close after last update") for name in metrics)


def test_the_report_json_takes_numpy_scalars_and_non_finite_figures():
    results = {"targets": [{"pass": np.bool_(True), "measured": np.float64(np.inf), "n": np.int64(3)}], "x": [1.5]}
    text = json.dumps(_json_safe(results), allow_nan=False)
    assert json.loads(text) == {"targets": [{"pass": True, "measured": None, "n": 3}], "x": [1.5]}
