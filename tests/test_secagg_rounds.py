"""coordinator.secure_aggregation and edge.secure_aggregation: a distributed-mode round
driven over signed protocol messages, with step deadlines, dropouts and refusals."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from biofed.coordinator.secure_aggregation import SecureAggregationRound
from biofed.edge.secure_aggregation import SecureAggregationParticipant
from biofed.privacy_ledger import PrivacyLedger
from biofed.privacy_mechanism import Charge, PrivacyMechanism
from biofed.protocol import Task, Topics, decode_topic_message, encode_message
from biofed.secure_aggregation import FixedPoint, SecAggError, SecAggRelay
from biofed.signing import KeyRing, Signer, Verifier

FLEET, ROUND, P = "ward7", 12, 66
TOPICS = Topics(FLEET)


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def _gate(task):
    """A device's release gate (in-memory ledger) and the charge of its input."""
    return {
        "mechanism": PrivacyMechanism(PrivacyLedger(1e-5)),
        "charge": Charge(task.round, "train", 1.0, task.noise_multiplier),
    }


def _task(devices, *, threshold, z=0.0, clip=1.0):
    return Task(
        round=ROUND,
        model=np.zeros(P),
        basis_version=1,
        classes=("rest", "arithmetic"),
        deadline=1060.0,
        trust_mode="distributed",
        clip_norm=clip,
        noise_multiplier=z,
        participants=tuple(devices),
        secagg_threshold=threshold,
    )


class Wire:
    """Signed encode -> decode with verification, as over MQTT."""

    def __init__(self, devices):
        self.signers = {d: Signer.generate(d) for d in [*devices, "coordinator"]}
        ring = KeyRing({d: s.public_key for d, s in self.signers.items()})
        self.coordinator_in = Verifier(ring, clock=lambda: 1000.0)
        self.device_in = {d: Verifier(ring, clock=lambda: 1000.0) for d in devices}

    def up(self, device, payload):
        data = encode_message(payload, fleet=FLEET, sender=device, signer=self.signers[device], created=1000.0)
        message = decode_topic_message(TOPICS, TOPICS.secagg(device), data, verifier=self.coordinator_in)
        return message.sender, message.payload

    def down(self, payload, device):
        data = encode_message(
            payload, fleet=FLEET, sender="coordinator", signer=self.signers["coordinator"], created=1000.0
        )
        return decode_topic_message(TOPICS, TOPICS.secagg_relay, data, verifier=self.device_in[device]).payload


def _run(n=6, *, silent=None, z=0.0, threshold=None, seed=0):
    """One round; ``silent[step]`` lists devices that stop answering from that step on."""
    silent = silent or {}
    devices = [f"pi-{i:02d}" for i in range(n)]
    threshold = threshold or n // 2 + 1
    task = _task(devices, threshold=threshold, z=z)
    rng = np.random.default_rng(seed)
    deltas = {d: rng.normal(size=P) * 0.05 for d in devices}
    clock, wire = Clock(), Wire(devices)
    server = SecureAggregationRound(
        fleet=FLEET,
        round=ROUND,
        participants=devices,
        vector_size=P,
        threshold=threshold,
        advertise_deadline=task.deadline,
        step_timeout_s=10.0,
        clock=clock,
    )
    parts = {d: SecureAggregationParticipant(d, FLEET, task, deltas[d], **_gate(task)) for d in devices}
    gone: set[str] = set()

    def answering(step):
        gone.update(silent.get(step, ()))
        return [d for d in devices if d not in gone]

    for d in answering("advertise"):
        server.handle(*wire.up(d, parts[d].start()))
    relay = server.poll()
    if relay is None and not server.finished:  # somebody did not advertise: wait for the deadline
        clock.now = task.deadline
        relay = server.poll()
    for step in ("shares", "masked", "unmask"):
        if relay is None:
            break
        for d in answering(step):
            if d in server.expected:
                server.handle(*wire.up(d, parts[d].handle(wire.down(relay, d))))
        relay = server.poll()
        if relay is None and not server.finished:
            clock.now += 10.0
            relay = server.poll()
    return server, parts, deltas


def test_round_without_dropouts_gives_the_mean():
    server, parts, deltas = _run()
    assert server.finished and server.failure is None and server.step == "done"
    expected = sum(FixedPoint().decode(p.encoded) for p in parts.values()) / len(parts)
    np.testing.assert_allclose(server.mean_update(), expected, atol=1e-12)
    np.testing.assert_allclose(server.mean_update(), np.mean(list(deltas.values()), axis=0), atol=1e-7)
    assert all(p.finished for p in parts.values())


@pytest.mark.parametrize("step", ["advertise", "shares", "masked", "unmask"])
def test_a_silent_device_at_each_step(step):
    server, parts, deltas = _run(silent={step: ["pi-03"]})
    assert server.finished and server.failure is None
    # silent at unmasking = its masked input is already in: still a survivor
    survivors = [d for d in deltas if d != "pi-03" or step == "unmask"]
    assert server.result.survivors == tuple(survivors)
    np.testing.assert_allclose(server.mean_update(), np.mean([deltas[d] for d in survivors], axis=0), atol=1e-7)


def test_too_many_silent_devices_abandon_the_round():
    server, _, _ = _run(silent={"masked": ["pi-00", "pi-01", "pi-02"]})
    assert server.finished and server.result is None
    assert "step masked" in server.failure and "threshold is 4" in server.failure
    with pytest.raises(SecAggError, match="has no aggregate"):
        server.mean_update()
    with pytest.raises(SecAggError, match="no aggregate to account"):
        server.noise_multiplier(1.0)


def test_effective_noise_multiplier_counts_the_survivors():
    server, _, _ = _run(n=7, threshold=4, silent={"shares": ["pi-06"]}, z=1.0)
    assert len(server.result.survivors) == 6
    assert server.noise_multiplier(1.3) == pytest.approx(1.3 * math.sqrt(6 / 4))


def test_coordinator_drops_messages_that_do_not_fit():
    devices = ["a", "b", "c"]
    task = _task(devices, threshold=2)
    server = SecureAggregationRound(
        fleet=FLEET,
        round=ROUND,
        participants=devices[:2],
        vector_size=P,
        threshold=2,
        advertise_deadline=task.deadline,
        step_timeout_s=5.0,
        clock=Clock(),
    )
    parts = {d: SecureAggregationParticipant(d, FLEET, task, np.zeros(P), **_gate(task)) for d in devices}
    advert = parts["a"].start()
    with pytest.raises(SecAggError, match="not expected at step 'advertise'"):
        server.handle("c", parts["c"].start())
    server.handle("a", advert)
    with pytest.raises(SecAggError, match="already answered"):
        server.handle("a", advert)
    other_round = SecureAggregationParticipant("b", FLEET, replace(task, round=ROUND + 1), np.zeros(P), **_gate(task))
    with pytest.raises(SecAggError, match="the open round is 12"):
        server.handle("b", other_round.start())
    assert server.poll() is None  # b has not advertised and the deadline is ahead


def test_participant_refusals():
    devices = ["a", "b", "c"]
    with pytest.raises(SecAggError, match="needs a distributed-mode task"):
        SecureAggregationParticipant(
            "a", FLEET, _task(devices, threshold=0), np.zeros(P), **_gate(_task(devices, threshold=0))
        )
    task = _task(devices, threshold=3)
    parts = {d: SecureAggregationParticipant(d, FLEET, task, np.zeros(P), **_gate(task)) for d in [*devices, "x"]}
    server = SecureAggregationRound(
        fleet=FLEET,
        round=ROUND,
        participants=[*devices, "x"],
        vector_size=P,
        threshold=1,
        advertise_deadline=0.0,
        step_timeout_s=5.0,
        clock=Clock(),
    )
    for d in ("a", "b", "c"):
        server.handle(d, parts[d].start())
    keys = server.poll()  # deadline passed: x is missing, threshold raised to a majority of 3 = 2
    assert keys.threshold == 2
    with pytest.raises(SecAggError, match="below the task's secagg_threshold 3"):
        parts["a"].handle(keys)
    with pytest.raises(SecAggError, match="expecting 'keys'"):
        parts["b"].handle(SecAggRelay(ROUND, "unmask", survivors=("a", "b")))
    with pytest.raises(SecAggError, match="this device is in round 12"):
        parts["b"].handle(SecAggRelay(ROUND + 1, "unmask", survivors=("a", "b")))
    with pytest.raises(SecAggError, match="start\\(\\) called twice"):
        parts["b"].start()
    # a key list naming a device that is not in the task
    lone = _task(["a", "b"], threshold=2)
    strict = SecureAggregationParticipant("a", FLEET, lone, np.zeros(P), **_gate(task))
    strict.start()
    with pytest.raises(SecAggError, match="outside the task: \\['c'\\]"):
        strict.handle(SecAggRelay(ROUND, "keys", threshold=2, public_keys=dict(keys.public_keys)))
