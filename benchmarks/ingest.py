"""Load generator for the coordinator's ingest path (broker -> decode -> validate -> accept).

::

    python -m biofed.benchmarks.ingest --mosquitto --devices 200 --updates 5000

Starts a broker (Mosquitto with ``--mosquitto``, else the embedded amqtt), connects a
coordinator-side client that feeds every message into :class:`biofed.coordinator.ingest.Ingest`
(the exact path :class:`~biofed.coordinator.server.Coordinator` runs: size limit, envelope
and payload validation, fleet/sender/round/deadline/basis/participant checks, duplicate
ids), and publishes pre-built :class:`~biofed.protocol.Update` messages of the default
model (k=32 logistic regression, 2 classes: 66 float64 parameters) from ``--devices``
device ids over ``--publishers`` MQTT connections in a separate process, so the
coordinator side has its own interpreter as it would in production.

Updates go out round by round (``ceil(updates / devices)`` rounds; each device sends one
update per round); a round's burst is published without waiting for acknowledgements and
the next round opens when the previous one has every update. Reported:

- ``updates_per_s``: accepted updates / wall time from the first publish to the last
  acceptance (end to end through the broker);
- ``ingest_only_per_s``: the same messages through ``Ingest.handle`` in-process, no broker
  (the coordinator's CPU cost per update);
- ``bytes_per_update``: encoded message size.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np

from biofed.apps.broker import start_embedded_broker, start_mosquitto
from biofed.coordinator.ingest import Ingest, OpenRound
from biofed.kernels.training import n_params
from biofed.mqtt import MqttClient
from biofed.protocol import SeenMessageIds, Status, Topics, Update, UpdateMetrics, encode_message

FLEET = "bench"
TOPICS = Topics(FLEET)
K, N_CLASSES = 32, 2
BASIS_VERSION = 1


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:05d}" for i in range(n)]


def build_updates(
    devices: list[str], rounds: int, total: int, dtype: str, seed: int = 0
) -> list[list[tuple[str, bytes]]]:
    """Encoded updates per round: ``[(topic, bytes), ...]`` for rounds 1..rounds (``total`` in all)."""
    rng = np.random.default_rng(seed)
    size = n_params(K, N_CLASSES)
    metrics = UpdateMetrics(
        loss=0.6, n_windows=240, rss_bytes=80_000_000, cpu_time_s=0.2, eval_balanced_accuracy=0.7, eval_windows=60
    )
    out, left = [], total
    for r in range(1, rounds + 1):
        batch = []
        for device in devices[: min(len(devices), left)]:
            update = Update(
                round=r,
                basis_version=BASIS_VERSION,
                delta=(rng.normal(size=size) * 0.01).astype(dtype),
                n_examples=240,
                clipped=False,
                metrics=metrics,
            )
            batch.append((TOPICS.update(device), encode_message(update, fleet=FLEET, sender=device)))
        left -= len(batch)
        out.append(batch)
    return out


def _publisher(
    host: str,
    port: int,
    protocol: str,
    index: int,
    rounds: list[list[tuple[str, bytes]]],
    statuses: list[tuple[str, bytes]],
    go: mp.Queue,
    done: mp.Queue,
) -> None:
    """Publisher process body: statuses first, then one round per ``go`` token."""
    with MqttClient(host, port, f"publisher-{index}", protocol=protocol, clean=True, max_inflight=1000) as client:
        for topic, data in statuses:
            client.publish(topic, data, retain=True, wait=False)
        done.put(("statuses", index))
        for batch in rounds:
            go.get()
            infos = [client.publish(topic, data, wait=False) for topic, data in batch]
            for info in infos:
                info.wait_for_publish(60)
            done.put(("round", index))
        go.get()  # keep the connection until the receiver is finished


def _ingest_only_rate(devices, statuses, updates, n_updates: int) -> float:
    """Updates per second through ``Ingest.handle`` in-process: the coordinator's CPU cost, no broker."""
    ingest = Ingest(TOPICS, max_bytes=16 * 1024 * 1024, seen=SeenMessageIds(n_updates + 10))
    for topic, data in statuses:
        ingest.handle(topic, data)
    start = time.perf_counter()
    for r, batch in enumerate(updates, start=1):
        ingest.open = OpenRound(
            round=r,
            phase="train",
            participants=frozenset(devices),
            deadline=time.time() + 3600,
            basis_version=BASIS_VERSION,
            n_params=n_params(K, N_CLASSES),
        )
        for topic, data in batch:
            ingest.handle(topic, data)
    return n_updates / (time.perf_counter() - start)


def run(broker_kind: str, n_devices: int, n_updates: int, n_publishers: int, dtype: str) -> dict:
    devices = device_ids(n_devices)
    rounds = math.ceil(n_updates / n_devices)
    updates = build_updates(devices, rounds, n_updates, dtype)
    bytes_per_update = int(np.mean([len(data) for batch in updates for _, data in batch]))
    statuses = [
        (TOPICS.status(d), encode_message(Status(round=0, state="online"), fleet=FLEET, sender=d)) for d in devices
    ]

    ingest_only = _ingest_only_rate(devices, statuses, updates, n_updates)

    with tempfile.TemporaryDirectory(prefix="biofed-ingest-") as scratch:
        if broker_kind == "mosquitto":
            broker, protocol = start_mosquitto(Path(scratch) / "mosquitto"), "5"
        else:
            broker, protocol = start_embedded_broker(), "3.1.1"
        ctx = mp.get_context("spawn")
        # one start queue per publisher: a shared one would let a fast publisher take two
        # tokens and send its next round while the current one is still open
        gos, done = [ctx.Queue() for _ in range(n_publishers)], ctx.Queue()
        shares = [slice(i, None, n_publishers) for i in range(n_publishers)]
        workers = [
            ctx.Process(
                target=_publisher,
                args=(
                    broker.host,
                    broker.port,
                    protocol,
                    i,
                    [batch[share] for batch in updates],
                    statuses[share],
                    gos[i],
                    done,
                ),
            )
            for i, share in enumerate(shares)
        ]
        receiver = MqttClient(
            broker.host, broker.port, "coordinator-bench", protocol=protocol, clean=True, inbox_size=100_000
        )
        try:
            receiver.connect()
            for kind in ("status", "update"):
                receiver.subscribe(TOPICS.all_devices(kind))
            ingest = Ingest(TOPICS, max_bytes=16 * 1024 * 1024, seen=SeenMessageIds(n_updates + 10))
            for worker in workers:
                worker.start()
            for _ in workers:
                done.get(timeout=120)
            while len(ingest.known) < n_devices:
                message = receiver.receive(30)
                if message is None:
                    raise RuntimeError(f"only {len(ingest.known)} of {n_devices} statuses arrived")
                ingest.handle(message.topic, message.payload)
            accepted = 0
            start = time.perf_counter()
            for r, batch in enumerate(updates, start=1):
                ingest.open = OpenRound(
                    round=r,
                    phase="train",
                    participants=frozenset(devices),
                    deadline=time.time() + 3600,
                    basis_version=BASIS_VERSION,
                    n_params=n_params(K, N_CLASSES),
                )
                for go in gos:
                    go.put(r)
                while len(ingest.open.received) < len(batch):
                    message = receiver.receive(30)
                    if message is None:
                        raise RuntimeError(f"round {r}: {len(ingest.open.received)} of {len(batch)} updates arrived")
                    ingest.handle(message.topic, message.payload)
                accepted += len(ingest.open.received)
                for _ in workers:
                    done.get(timeout=60)
            elapsed = time.perf_counter() - start
        finally:
            for go in gos:
                go.put(None)
            for worker in workers:
                worker.join(30)
                if worker.is_alive():
                    worker.kill()
            receiver.close()
            broker.stop()
    return {
        "broker": broker_kind,
        "mqtt": protocol,
        "devices": n_devices,
        "updates": accepted,
        "rounds": rounds,
        "publishers": n_publishers,
        "model": f"logistic regression k={K}, {N_CLASSES} classes, {n_params(K, N_CLASSES)} {dtype} parameters",
        "bytes_per_update": bytes_per_update,
        "seconds": round(elapsed, 3),
        "updates_per_s": round(accepted / elapsed, 1),
        "ingest_only_per_s": round(ingest_only, 1),
        "dropped": dict(ingest.dropped),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mosquitto", action="store_true", help="Mosquitto (MQTT 5) instead of embedded amqtt.")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--updates", type=int, default=5000)
    parser.add_argument("--publishers", type=int, default=4, help="MQTT connections publishing the updates.")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="Update.delta dtype.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    args = parser.parse_args()
    if args.devices < 1 or args.updates < 1 or args.publishers < 1:
        parser.error("--devices, --updates and --publishers must be >= 1")
    result = run("mosquitto" if args.mosquitto else "amqtt", args.devices, args.updates, args.publishers, args.dtype)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
