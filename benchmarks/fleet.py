"""Fleet benchmark: N simulated devices x rounds against Mosquitto, next to the raw broker ceiling.

::

    python -m biofed.benchmarks.fleet --devices 100 1000 --rounds 3
    python -m biofed.benchmarks.fleet --rabbitmq --devices 100 --rounds 3
    python -m biofed.benchmarks.fleet --privacy-target --devices 1000 --rounds 10

For each N, :func:`biofed.apps.simulate.run_simulation` runs a whole federation (synthetic
sources dealt to N real edge agents in one process, the coordinator in its own process,
client-level DP at the demo's defaults) over a fresh Mosquitto, and reports:

- round close latency after the round's last accepted update (p50, p95 over the training
  rounds; the target is <= 5 s at 1000 devices);
- updates/s while a round's updates arrive (bounded by the devices' training, all in one
  process here), and the coordinator's own ingest rate (``benchmarks/ingest.py``'s path:
  pre-built updates from 4 publisher processes through the broker into
  :class:`~biofed.coordinator.ingest.Ingest`);
- coordinator CPU seconds and peak RSS; memory per simulated device;
- bytes per device per round (its task, its update and the round's model);
- the raw ceiling measured in the same run: the same number of update-sized QoS 1
  messages from 4 plain paho publisher processes through Mosquitto to one plain paho
  subscriber, and the ratio of the coordinator's ingest to it (target >= 0.8).

With ``--rabbitmq`` the federation runs on a two-node RabbitMQ cluster on loopback
(:func:`biofed.apps.rabbitmq.start_rabbitmq_cluster`; needs Debian ``rabbitmq-server`` and root)
with the devices spread over both nodes and the coordinator on the first; the same figures
are printed except the Mosquitto-only ingest and ceiling.

With ``--privacy-target`` each N runs the utility-under-privacy case instead
(:func:`privacy_target`): the same synthetic federation over Mosquitto once without noise and
once with client-level DP calibrated so that the whole run (the basis phase and every
training round, each charged at q = 1 since the cohort is public) stays within
``--target-epsilon`` at ``--delta`` (defaults 2 and 1e-6), printing both held-out balanced
accuracies, their difference (target <= 0.05 at 1000 devices) and the epsilon the
coordinator's ledger reported at the end of the private run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from biofed.benchmarks.harness import CaseResult, Metric, Target
from biofed.benchmarks.ingest import run as ingest_run

PRIVACY_TARGET_GAP = 0.05
"""Largest accuracy loss of the private run against the non-private one (held-out balanced accuracy)."""


def round_deadline_s(n_devices: int) -> float:
    """The rounds' deadline for ``n_devices``: every round waits for all of them, and the basis
    round's sketches (d x d statistics) come out of the one simulator process at a few dozen per
    second, fewer on a loaded machine. A missed deadline is not just slower: the round is retried,
    and a private run's retried round is charged again."""
    return max(120.0, 0.25 * n_devices)


def _raw_publisher(host: str, port: int, index: int, n: int, size: int, go, done) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{index}")
    client.max_inflight_messages_set(1000)
    client.connect(host, port)
    client.loop_start()
    payload = bytes(size)
    done.put(index)
    go.get()
    infos = [client.publish(f"raw/{index}/{k % 1000}", payload, qos=1) for k in range(n)]
    for info in infos:
        info.wait_for_publish(120)
    done.put(index)
    client.disconnect()
    client.loop_stop()


def raw_ceiling(n_messages: int, size: int, publishers: int = 4) -> float:
    """Messages/s of plain paho QoS 1 publishers -> Mosquitto -> one plain paho subscriber
    (first to last arrival)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from biofed.apps.broker import start_mosquitto

    with tempfile.TemporaryDirectory(prefix="biofed-raw-") as scratch:
        broker = start_mosquitto(Path(scratch) / "mosquitto")
        arrivals: list[float] = []
        complete = threading.Event()

        def on_message(client, userdata, message) -> None:
            arrivals.append(time.perf_counter())
            if len(arrivals) >= n_messages:
                complete.set()

        subscriber = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-sub")
        subscriber.on_message = on_message
        ctx = mp.get_context("spawn")
        go, done = ctx.Queue(), ctx.Queue()
        share = [n_messages // publishers + (i < n_messages % publishers) for i in range(publishers)]
        workers = [
            ctx.Process(target=_raw_publisher, args=(broker.host, broker.port, i, share[i], size, go, done))
            for i in range(publishers)
        ]
        try:
            subscriber.connect(broker.host, broker.port)
            subscriber.subscribe("raw/#", qos=1)
            subscriber.loop_start()
            time.sleep(0.5)
            for worker in workers:
                worker.start()
            for _ in workers:
                done.get(timeout=120)
            for _ in workers:
                go.put(1)
            if not complete.wait(300):
                raise RuntimeError(f"raw ceiling: {len(arrivals)} of {n_messages} messages arrived")
        finally:
            for worker in workers:
                worker.join(60)
                if worker.is_alive():
                    worker.kill()
            subscriber.disconnect()
            subscriber.loop_stop()
            broker.stop()
    return n_messages / (arrivals[-1] - arrivals[0])


def _fleet_figures(summary: dict) -> dict:
    train = [r["task_to_close_s"] for r in summary["rounds"] if r["phase"] == "train"]
    return {
        "devices": summary["devices"],
        "broker": summary["broker"],
        "devices_per_broker": summary["devices_per_broker"],
        "rounds": summary["settings"]["rounds"],
        "wall_s": summary["wall_s"],
        "ready_s": summary["ready_s"],
        "first_round_s": summary["first_round_s"],
        "close_latency_p50_s": summary["close_latency_p50_s"],
        "close_latency_p95_s": summary["close_latency_p95_s"],
        "basis_round_s": next((r["task_to_close_s"] for r in summary["rounds"] if r["phase"] != "train"), None),
        "train_round_s_median": statistics.median(train) if train else None,
        "fleet_updates_per_s": summary["updates_per_s"],
        "coordinator_cpu_s": summary["coordinator_cpu_s"],
        "coordinator_rss_mb": summary["coordinator_rss_mb"],
        "memory_per_device_mb": summary["memory_per_device_mb"],
        "simulator_rss_mb": summary["process_rss_mb"],
        "broker_rss_mb": summary["broker_rss_mb"],
        "bytes_per_device_per_round": summary["bytes_per_device_per_round"],
        "epsilon": summary["epsilon"],
        "balanced_accuracy": summary["balanced_accuracy"],
        "problems": summary["problems"],
    }


def fleet_settings(out: Path, n_devices: int, rounds: int, **demo_settings):
    """The demo's settings (:class:`biofed.apps.demo.DemoSettings`, overridden by
    ``demo_settings``) for a benchmark fleet of ``n_devices``: its rounds, a deadline that
    fits its size, an hour in all."""
    from biofed.apps.demo import DemoSettings

    return DemoSettings(
        out=out,
        devices=n_devices,
        rounds=rounds,
        round_deadline_s=round_deadline_s(n_devices),
        timeout_s=3600.0,
        **demo_settings,
    )


def run_rabbitmq(n_devices: int, rounds: int, out: Path, noise_multiplier: float, workers: int) -> dict:
    from biofed.apps.rabbitmq import start_rabbitmq_cluster
    from biofed.apps.simulate import FleetOptions, run_simulation

    started = time.monotonic()
    with start_rabbitmq_cluster(2) as cluster:
        cluster_start_s = time.monotonic() - started
        settings = fleet_settings(
            out / f"fleet-rabbitmq-{n_devices}", n_devices, rounds, noise_multiplier=noise_multiplier
        )
        summary = run_simulation(settings, FleetOptions(workers=workers, cluster=cluster))
    return {**_fleet_figures(summary), "cluster_start_s": round(cluster_start_s, 1)}


def run(n_devices: int, rounds: int, out: Path, noise_multiplier: float, workers: int) -> dict:
    from biofed.apps.simulate import FleetOptions, run_simulation

    settings = fleet_settings(
        out / f"fleet-{n_devices}", n_devices, rounds, mosquitto=True, noise_multiplier=noise_multiplier
    )
    summary = run_simulation(settings, FleetOptions(workers=workers))
    update_bytes = max(r["bytes_per_update"] for r in summary["rounds"] if r["phase"] == "train")
    n_messages = max(n_devices * rounds, 5000)
    ingest = ingest_run("mosquitto", n_devices, n_messages, 4, "float64")
    ceiling = raw_ceiling(n_messages, update_bytes)
    return {
        **_fleet_figures(summary),
        "bytes_per_update": update_bytes,
        "coordinator_ingest_per_s": ingest["updates_per_s"],
        "raw_ceiling_per_s": round(ceiling, 1),
        "ingest_to_ceiling": round(ingest["updates_per_s"] / ceiling, 3),
    }


def basis_charges(standardization: str) -> int:
    """Basis phases the coordinator charges before training: the covariance phase, and under
    global standardization the moments phase before it."""
    return 2 if standardization == "global" else 1


def calibrate_fleet_noise(
    target_epsilon: float, rounds: int, basis_noise_multiplier: float, n_basis: int, delta: float
) -> float:
    """The smallest training noise multiplier z whose run stays within ``target_epsilon`` (RDP,
    the coordinator's budget accountant): ``n_basis`` basis charges at ``basis_noise_multiplier``
    composed with ``rounds`` training rounds at z, every charge at q = 1 (the coordinator's
    public cohort). dp-accounting's own calibration (Brent's method) over that composition."""
    import dp_accounting

    from biofed.privacy_ledger import make_accountant, round_event

    basis = dp_accounting.SelfComposedDpEvent(round_event(1.0, basis_noise_multiplier), n_basis)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_accountant("rdp"),
            lambda z: dp_accounting.ComposedDpEvent(
                [basis, dp_accounting.SelfComposedDpEvent(round_event(1.0, z), rounds)]
            ),
            target_epsilon,
            delta,
            tol=1e-4,
        )
    )


def privacy_target(
    n_devices: int, rounds: int, out: Path, *, target_epsilon: float = 2.0, delta: float = 1e-6, workers: int = 4
) -> dict:
    """The synthetic federation of ``n_devices`` over Mosquitto, without noise and then with
    client-level DP calibrated to ``target_epsilon`` at ``delta`` for the whole run.

    Everything else is the demo's defaults (clip norm, local epochs, learning rate, basis noise,
    data seed): nothing is tuned on the held-out windows the accuracies are measured on. The
    private run also carries ``target_epsilon`` as the coordinator's budget, so a calibration
    that undercounted a release would show as fewer training rounds, never as a larger epsilon.
    The epsilon reported is the coordinator's (its ledger's last committed round), not
    recomputed here.
    """
    from biofed.apps.simulate import FleetOptions, run_simulation

    base = fleet_settings(out, n_devices, rounds, mosquitto=True, delta=delta)
    n_basis = basis_charges(base.standardization)
    z = calibrate_fleet_noise(target_epsilon, rounds, base.basis_noise_multiplier, n_basis, delta)
    options = FleetOptions(workers=workers)
    plain = run_simulation(replace(base, out=out / f"privacy-{n_devices}-none", noise_multiplier=0.0), options)
    private = run_simulation(
        replace(base, out=out / f"privacy-{n_devices}-dp", noise_multiplier=z, epsilon_budget=target_epsilon), options
    )
    state = out / f"privacy-{n_devices}-dp" / "state"
    records = json.loads((state / "rounds.json").read_text())
    basis_charged = _ledger_count(state, "basis")
    last = next((r for r in reversed(records) if r.get("epsilon_rdp") is not None), {})
    trained = sum(1 for r in records if r["phase"] == "train")
    gap = (
        None
        if plain["balanced_accuracy"] is None or private["balanced_accuracy"] is None
        else plain["balanced_accuracy"] - private["balanced_accuracy"]
    )
    epsilon = last.get("epsilon_rdp")
    return {
        "devices": n_devices,
        "broker": "mosquitto",
        "rounds": rounds,
        "rounds_trained_private": trained,
        "clip_norm": base.clip,
        "noise_multiplier": round(z, 4),
        "basis_noise_multiplier": base.basis_noise_multiplier,
        "basis_charges_planned": n_basis,
        "basis_charges_in_ledger": basis_charged,
        "noise_std_on_mean": round(z * base.clip / n_devices, 6),
        "delta": delta,
        "accuracy_non_private": plain["balanced_accuracy"],
        "accuracy_private": private["balanced_accuracy"],
        "accuracy_gap": None if gap is None else round(gap, 4),
        "epsilon_rdp": epsilon,
        "epsilon_pld": last.get("epsilon_pld"),
        "wall_s_non_private": plain["wall_s"],
        "wall_s_private": private["wall_s"],
        "problems": plain["problems"] + private["problems"],
        "met": bool(
            gap is not None
            and gap <= PRIVACY_TARGET_GAP
            and epsilon is not None
            and epsilon <= target_epsilon
            and trained == rounds
            and basis_charged == n_basis
        ),
    }


def _ledger_count(state_dir: Path, kind: str) -> int | None:
    """Rounds of ``kind`` the coordinator's committed ledger in ``state_dir`` charged (None: no ledger)."""
    from biofed.apps.demo import FLEET
    from biofed.coordinator.state import CoordinatorState
    from biofed.privacy_ledger import PrivacyLedger

    store = CoordinatorState(state_dir, FLEET)
    try:
        snapshot = store.load()
    finally:
        store.close()
    if snapshot is None or snapshot.ledger is None:
        return None
    return PrivacyLedger.from_json(snapshot.ledger).count(kind)


def case_fleet_privacy(s, result: CaseResult) -> None:
    """The suite's utility-under-privacy case: :func:`privacy_target` at 1000 devices, 10
    training rounds (``--quick``: 3), both federations in full (minutes)."""
    rounds = 3 if s.quick else 10
    with tempfile.TemporaryDirectory(prefix="biofed-bench-fleet-") as scratch:
        found = privacy_target(1000, rounds, Path(scratch))
    if found["problems"] or found["accuracy_gap"] is None or found["epsilon_rdp"] is None:
        raise RuntimeError(f"the privacy-target federations did not complete cleanly: {found}")
    detail = {
        k: found[k]
        for k in (
            "rounds",
            "rounds_trained_private",
            "clip_norm",
            "noise_multiplier",
            "basis_noise_multiplier",
            "delta",
        )
    }
    name = "fleet_privacy"
    result.metrics.append(
        Metric(name, "held-out balanced accuracy, no noise", found["accuracy_non_private"], "", detail)
    )
    result.metrics.append(Metric(name, "held-out balanced accuracy, DP", found["accuracy_private"], "", detail))
    result.metrics.append(Metric(name, "epsilon of the whole private run (RDP)", found["epsilon_rdp"], ""))
    result.metrics.append(Metric(name, "epsilon of the whole private run (PLD)", found["epsilon_pld"], ""))
    result.targets.append(
        Target(
            f"1000 devices, client-level epsilon <= 2 (delta 1e-6): accuracy loss <= {PRIVACY_TARGET_GAP}",
            found["accuracy_gap"],
            "<=",
            PRIVACY_TARGET_GAP,
        )
    )
    result.targets.append(Target("epsilon the coordinator reported for the run <= 2", found["epsilon_rdp"], "<=", 2.0))
    result.targets.append(
        Target("private training rounds run of those planned", found["rounds_trained_private"], ">=", rounds)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noise-multiplier", type=float, default=2.0, help="DP noise multiplier z (0: no DP).")
    parser.add_argument("--workers", type=int, default=4, help="Dispatcher threads of the simulator.")
    parser.add_argument("--rabbitmq", action="store_true", help="A 2-node RabbitMQ cluster instead of Mosquitto.")
    parser.add_argument(
        "--privacy-target",
        action="store_true",
        help="Accuracy without noise vs with DP calibrated to --target-epsilon for the whole run (Mosquitto).",
    )
    parser.add_argument("--target-epsilon", type=float, default=2.0, help="Epsilon of --privacy-target's run.")
    parser.add_argument("--delta", type=float, default=1e-6, help="Delta of --privacy-target's run.")
    parser.add_argument("--out", type=Path, default=None, help="Keep the runs' folders here (default: temporary).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON lines.")
    args = parser.parse_args()
    if min(args.devices) < 1 or args.rounds < 1:
        parser.error("--devices and --rounds must be >= 1")
    if args.privacy_target and args.rabbitmq:
        parser.error("--privacy-target runs on Mosquitto; leave out --rabbitmq")
    if not args.target_epsilon > 0 or not 0 < args.delta < 1:
        parser.error("--target-epsilon must be > 0 and --delta in (0, 1)")
    from biofed.apps.demo import DemoError

    failed = []
    with tempfile.TemporaryDirectory(prefix="biofed-fleet-") as scratch:
        out = args.out or Path(scratch)
        for n in args.devices:
            try:
                result = _run_case(args, n, out)
            except DemoError as exc:  # e.g. too few open files for n devices: say so, go on with the next n
                print(f"--- {n} devices x {args.rounds} rounds: failed: {exc}", file=sys.stderr, flush=True)
                failed.append(n)
                continue
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(f"--- {n} devices x {args.rounds} rounds ({result['broker']})")
                for key, value in result.items():
                    print(f"{key:>28}: {value}", flush=True)
    if failed:
        raise SystemExit(f"fleet benchmark: the runs of {', '.join(map(str, failed))} devices failed (see above)")


def _run_case(args: argparse.Namespace, n: int, out: Path) -> dict:
    if args.privacy_target:
        return privacy_target(
            n, args.rounds, out, target_epsilon=args.target_epsilon, delta=args.delta, workers=args.workers
        )
    runner = run_rabbitmq if args.rabbitmq else run
    return runner(n, args.rounds, out, args.noise_multiplier, args.workers)


if __name__ == "__main__":
    main()
