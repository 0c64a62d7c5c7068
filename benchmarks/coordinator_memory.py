"""Coordinator memory over a long federation: RSS flat from round 10 to round 200.

:func:`biofed.apps.simulate.run_simulation` runs a real federation: 10 edge agents (synthetic
sources) in this process, the coordinator in its own process, over a fresh Mosquitto, with
central DP (z=2, C=0.25) and the epsilon budget lifted so every round runs. The simulator
records the coordinator's RSS as each training round's task appears; the target is its
ratio between the last round and round 10 (the ledger, the round records and the state
must not grow with the number of past rounds). The per-round close time after the last
accepted update (aggregation, accounting, commit, publish) is reported early and late.
``--quick`` runs 20 rounds and compares round 20 with round 5.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from biofed.benchmarks.harness import CaseResult, Metric, Target

__all__ = ["case_coordinator_memory"]

DEVICES = 10
EPSILON_BUDGET = 1e9
"""Lifted so that no round is refused for budget: the run must reach its last round."""
TREND_ROUNDS = 10


def case_coordinator_memory(s, result: CaseResult) -> None:
    from biofed.apps.demo import DemoSettings
    from biofed.apps.simulate import FleetOptions, run_simulation

    rounds, first = (20, 5) if s.quick else (200, 10)
    label = f"{DEVICES} devices, {rounds} rounds" + (" (--quick)" if s.quick else "")
    with tempfile.TemporaryDirectory(prefix="biofed-bench-coordinator-") as tmp:
        settings = DemoSettings(
            out=Path(tmp),
            devices=DEVICES,
            rounds=rounds,
            mosquitto=True,
            noise_multiplier=2.0,
            clip=0.25,
            epsilon_budget=EPSILON_BUDGET,
            trust_mode="central",
            evaluate=False,
            synthetic_seconds=s.seconds(60.0, 20.0),
            round_deadline_s=60.0,
            timeout_s=s.seconds(7200.0, 900.0),
            seed=s.seed,
        )
        summary = run_simulation(settings, FleetOptions(workers=2))
    if summary["problems"]:
        raise RuntimeError("the federation broke an invariant: " + "; ".join(summary["problems"]))
    rss = {int(k): v for k, v in summary["coordinator_rss_mb_by_round"].items()}
    missing = [r for r in (first, rounds) if r not in rss]
    if missing:
        raise RuntimeError(f"no coordinator RSS sample at training round(s) {missing}; sampled {sorted(rss)}")
    samples = {r: rss[r] for r in sorted(rss) if r == first or r % max(rounds // 10, 1) == 0 or r == rounds}
    detail = {
        "devices": DEVICES,
        "rounds": rounds,
        "broker": summary["broker"],
        "epsilon": summary["epsilon"],
        "rss_mb_by_round": samples,
        "wall_s": summary["wall_s"],
    }
    for r in (first, rounds):
        result.metrics.append(
            Metric(
                "coordinator_memory",
                f"coordinator RSS at training round {r} ({label})",
                rss[r],
                "MB",
                detail if r == rounds else {},
            )
        )
    ratio = rss[rounds] / rss[first]
    result.metrics.append(Metric("coordinator_memory", f"coordinator RSS round {rounds} / round {first}", ratio, "x"))
    result.targets.append(
        Target(f"coordinator RSS at round {rounds} <= 1.10x round {first} ({label})", ratio, "<=", 1.10, "x")
    )
    close = [r["close_after_last_update_s"] for r in summary["rounds"] if r["phase"] == "train"]
    if len(close) >= 2 * TREND_ROUNDS:
        early = statistics.median(close[:TREND_ROUNDS])
        late = statistics.median(close[-TREND_ROUNDS:])
        result.metrics.append(
            Metric(
                "coordinator_memory",
                f"round close after last update, median of the first {TREND_ROUNDS} training rounds",
                early * 1e3,
                "ms",
            )
        )
        result.metrics.append(
            Metric(
                "coordinator_memory",
                f"round close after last update, median of the last {TREND_ROUNDS} training rounds",
                late * 1e3,
                "ms",
            )
        )
