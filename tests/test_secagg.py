"""biofed.secure_aggregation and its two halves' cores (SecAggClient, SecAggServer): exact
sums under dropouts, thresholds, uniformity of masked inputs, fixed point, Shamir sharing,
refusals, and distributed-DP accounting vs dp_accounting."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from scipy import stats

from biofed.coordinator.secure_aggregation import AggregateResult, SecAggServer
from biofed.edge.secure_aggregation import SecAggClient, noise_share_std, prepare_input
from biofed.privacy_ledger import PrivacyLedger, distributed_noise_multiplier
from biofed.privacy_mechanism import Charge, PrivacyMechanism, grid_sensitivity
from biofed.protocol import InvalidPayload, InvalidTopic
from biofed.secure_aggregation import (
    FIELD_PRIME,
    FixedPoint,
    NotEnoughSurvivors,
    SecAggError,
    SecAggRelay,
    SecAggUpload,
    advertised_keys,
    default_threshold,
    prg_words,
    session_id,
    shamir_combine,
    shamir_split,
)

FLEET, ROUND = "ward7", 3
FP = FixedPoint()
M = 66  # default model: logistic regression on k=32 features, 2 classes


def _seeded(seed):
    """A reproducible byte source standing in for the OS CSPRNG in tests."""
    return np.random.default_rng(seed).bytes


def _inputs(n, m=M, seed=0):
    rng = np.random.default_rng(seed)
    return {f"pi-{i:02d}": FP.encode(rng.uniform(-1, 1, m) / math.sqrt(m)) for i in range(n)}


def simulate_round(
    inputs: Mapping[str, np.ndarray],
    *,
    threshold: int | None = None,
    drop_before_sharing: Sequence[str] = (),
    drop_before_masking: Sequence[str] = (),
    drop_before_unmasking: Sequence[str] = (),
    random_bytes=secrets.token_bytes,
) -> AggregateResult:
    """Run every step of one round in-process.

    Parameters
    ----------
    inputs : mapping of device id to (m,) uint64
        Encoded inputs (:func:`prepare_input`).
    drop_before_sharing, drop_before_masking, drop_before_unmasking : sequence of str
        Devices that go silent after advertising keys, after sharing keys (so their pairwise
        masks must be removed), and after sending their masked input (they are survivors
        whose self mask the others reconstruct).
    """
    devices = sorted(inputs)
    m = len(next(iter(inputs.values())))
    server = SecAggServer(FLEET, ROUND, vector_size=m, threshold=threshold)
    clients = {d: SecAggClient(d, FLEET, ROUND, random_bytes=random_bytes) for d in devices}
    for d, c in clients.items():
        server.receive(d, c.advertise())
    key_list = server.key_list()
    for d in devices:
        if d not in drop_before_sharing:
            server.receive(d, clients[d].share_keys(key_list))
    forwarded = server.forward()
    for d in forwarded.ciphertexts:
        if d not in drop_before_masking:
            server.receive(d, clients[d].masked_input(forwarded, inputs[d]))
    request = server.unmask_request()
    for d in request.survivors:
        if d not in drop_before_unmasking:
            server.receive(d, clients[d].unmask(request))
    return server.aggregate()


def _sum(inputs, devices):
    total = np.zeros(len(next(iter(inputs.values()))), dtype=np.uint64)
    for d in devices:
        total += inputs[d]
    return total


# ----------------------------------------------------------------------------- exact sums
@pytest.mark.parametrize(
    ("n", "before", "after"),
    [
        (7, 0, 0),  # no dropout
        (7, 1, 0),  # one dropout after sharing keys, before its masked input
        (7, 0, 1),  # one dropout after its masked input (committed), before unmasking
        (7, 3, 0),  # n - t dropouts, all before masking
        (7, 0, 3),  # n - t dropouts, all after masking
        (12, 2, 3),  # n - t dropouts, mixed
    ],
)
def test_sum_is_exact_under_dropouts(n, before, after):
    inputs = _inputs(n)
    devices = sorted(inputs)
    t = default_threshold(n)
    assert before + after <= n - t
    dropped_early, dropped_late = devices[:before], devices[n - after :]
    result = simulate_round(
        inputs, drop_before_masking=dropped_early, drop_before_unmasking=dropped_late, random_bytes=_seeded(n)
    )
    survivors = [d for d in devices if d not in dropped_early]
    assert result.survivors == tuple(survivors) and result.dropped == tuple(dropped_early)
    np.testing.assert_array_equal(result.total, _sum(inputs, survivors))
    # and the decoded sum is the float sum to within the fixed-point rounding
    floats = sum(FP.decode(inputs[d]) for d in survivors)
    np.testing.assert_allclose(FP.decode(result.total), floats, rtol=0, atol=1e-12)


def test_device_dropping_before_sharing_is_left_out():
    inputs = _inputs(6)
    devices = sorted(inputs)
    result = simulate_round(inputs, drop_before_sharing=devices[:2], random_bytes=_seeded(1))
    assert result.survivors == tuple(devices[2:])
    np.testing.assert_array_equal(result.total, _sum(inputs, devices[2:]))


def test_sum_is_exact_with_os_randomness_and_large_values():
    fp = FixedPoint(scale_bits=16, max_summands=8)
    rng = np.random.default_rng(5)
    inputs = {f"d{i}": fp.encode(rng.uniform(-fp.max_abs, fp.max_abs, 40)) for i in range(8)}
    result = simulate_round(inputs, drop_before_unmasking=["d3"])
    np.testing.assert_array_equal(result.total, _sum(inputs, sorted(inputs)))
    # near the limit, the signed integer sum (exact in Python ints) still fits: no wrap-around
    exact = [sum(int(v.view(np.int64)[j]) for v in inputs.values()) for j in range(40)]
    assert max(abs(e) for e in exact) > 2**60
    assert result.total.view(np.int64).tolist() == exact


@pytest.mark.parametrize("step", ["sharing", "masking", "unmasking"])
def test_fewer_than_threshold_survivors_is_a_clear_error(step):
    inputs = _inputs(7)
    devices = sorted(inputs)
    silent = devices[:4]  # leaves 3 < t = 4
    kwargs = {f"drop_before_{step}": silent}
    with pytest.raises(NotEnoughSurvivors, match="threshold is 4: the round is abandoned"):
        simulate_round(inputs, random_bytes=_seeded(2), **kwargs)


def test_too_few_devices_advertising():
    server = SecAggServer(FLEET, ROUND, vector_size=M, threshold=3)
    server.receive("a", SecAggClient("a", FLEET, ROUND).advertise())
    server.receive("b", SecAggClient("b", FLEET, ROUND).advertise())
    with pytest.raises(NotEnoughSurvivors, match="2 devices advertised keys, threshold is 3"):
        server.key_list()


def test_threshold_is_raised_to_a_majority():
    server = SecAggServer(FLEET, ROUND, vector_size=M, threshold=2)
    for i in range(6):
        server.receive(f"d{i}", SecAggClient(f"d{i}", FLEET, ROUND).advertise())
    assert server.key_list().threshold == 4


# ----------------------------------------------------------------------------- privacy of one input
def _masked_of_one(m, seed):
    """The masked input of one device among 5 (its plaintext: small values, very non-uniform bytes)."""
    rng = np.random.default_rng(seed)
    inputs = {f"d{i}": FP.encode(rng.normal(0, 0.01, m)) for i in range(5)}
    server = SecAggServer(FLEET, ROUND, vector_size=m)
    clients = {d: SecAggClient(d, FLEET, ROUND, random_bytes=_seeded(seed + i)) for i, d in enumerate(inputs)}
    for d, c in clients.items():
        server.receive(d, c.advertise())
    keys = server.key_list()
    for d, c in clients.items():
        server.receive(d, c.share_keys(keys))
    forwarded = server.forward()
    return inputs["d2"], clients["d2"].masked_input(forwarded, inputs["d2"]).masked.view(np.uint64)


def test_masked_input_is_indistinguishable_from_uniform():
    plain, masked = _masked_of_one(8192, seed=11)
    counts = np.bincount(masked.view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4  # 255 dof over 65536 bytes
    assert stats.kstest(masked.astype(np.float64) / 2.0**64, "uniform").pvalue > 1e-4
    # the same tests have power: they flag the unmasked encoding at once
    assert stats.chisquare(np.bincount(plain.view(np.uint8), minlength=256)).pvalue < 1e-12
    assert stats.kstest(plain.astype(np.float64) / 2.0**64, "uniform").pvalue < 1e-12


def test_prg_is_deterministic_per_seed_and_differs_across_seeds():
    a, b = bytes(32), bytes(31) + b"\x01"
    np.testing.assert_array_equal(prg_words(a, 100), prg_words(a, 100))
    np.testing.assert_array_equal(prg_words(a, 100)[:10], prg_words(a, 10))
    assert not np.any(prg_words(a, 100) == prg_words(b, 100))
    with pytest.raises(SecAggError, match="PRG seed must be 32 bytes"):
        prg_words(b"short", 4)


# ----------------------------------------------------------------------------- fixed point
def test_fixed_point_round_trip_error_bounded():
    rng = np.random.default_rng(3)
    for fp in (FixedPoint(), FixedPoint(scale_bits=10), FixedPoint(scale_bits=40, max_summands=4)):
        x = np.concatenate([rng.uniform(-1, 1, 1000), rng.uniform(-fp.max_abs, fp.max_abs, 100), [0.0, -0.0]])
        err = np.abs(fp.decode(fp.encode(x)) - x)
        assert err.max() <= fp.resolution / 2 * (1 + 1e-12) + np.spacing(fp.max_abs)
    np.testing.assert_array_equal(FP.decode(FP.encode([-1.5, 0.25, 3.0])), [-1.5, 0.25, 3.0])


def test_fixed_point_rejects_bad_values():
    with pytest.raises(SecAggError, match="exceeds the fixed-point limit"):
        FP.encode([FP.max_abs * 1.01])
    with pytest.raises(SecAggError, match="1 NaN/inf"):
        FP.encode([0.0, np.nan])
    with pytest.raises(SecAggError, match="must be 1-D"):
        FP.encode(np.zeros((2, 2)))
    with pytest.raises(SecAggError, match="1-D uint64"):
        FP.decode(np.zeros(3))
    with pytest.raises(SecAggError, match="no integer headroom"):
        FixedPoint(scale_bits=60, max_summands=16)
    assert FP.max_abs == 2.0**29


def _gate():
    return PrivacyMechanism(PrivacyLedger(1e-5))


def test_prepare_input_clips_noises_and_charges():
    x = np.full(M, 1.0)  # norm sqrt(66) > C
    gate = _gate()
    clean = FP.decode(
        prepare_input(
            x, clip_norm=0.5, noise_multiplier=0.0, n_min=4, mechanism=gate, charge=Charge(0, "train", 1.0, 0.0)
        )
    )
    np.testing.assert_allclose(np.linalg.norm(clean), 0.5, atol=1e-6)
    noisy = FP.decode(
        prepare_input(
            np.zeros(20000),
            clip_norm=2.0,
            noise_multiplier=1.5,
            n_min=9,
            mechanism=gate,
            charge=Charge(1, "train", 1.0, 1.5),
        )
    )
    assert noisy.std() == pytest.approx(1.5 * 2.0 / 3.0, rel=0.03)
    # charged against the grid sensitivity: rounding to the grid may lengthen the clipped update
    charged = gate.ledger.groups[-1].noise_multiplier
    assert len(gate.ledger) == 2 and charged < 1.5
    assert charged == pytest.approx(1.5 * 2.0 / grid_sensitivity(2.0, 20000, FP.resolution), rel=1e-12)
    assert noise_share_std(2.0, 1.5, 9) == pytest.approx(1.0)
    with pytest.raises(SecAggError, match="n_min must be an integer >= 1"):
        noise_share_std(1.0, 1.0, 0)
    with pytest.raises(SecAggError, match="clip_norm must be"):
        prepare_input(
            x, clip_norm=0.0, noise_multiplier=1.0, n_min=2, mechanism=_gate(), charge=Charge(0, "train", 1.0, 1.0)
        )


# ----------------------------------------------------------------------------- distributed DP
@pytest.mark.slow
def test_distributed_noise_and_epsilon_match_dp_accounting():
    """10 devices, threshold (= n_min) 6, 2 drop after sharing: the revealed sum carries
    std z*C*sqrt(8/6), and the ledger's epsilon is dp_accounting's for that z."""
    n, n_min, z, clip, m, delta = 10, 6, 1.1, 0.8, 4000, 1e-5
    rng = np.random.default_rng(21)
    updates = {f"pi-{i:02d}": rng.normal(size=m) for i in range(n)}
    inputs = {
        d: prepare_input(
            u, clip_norm=clip, noise_multiplier=z, n_min=n_min, mechanism=_gate(), charge=Charge(0, "train", 1.0, z)
        )
        for d, u in updates.items()
    }
    result = simulate_round(inputs, threshold=n_min, drop_before_masking=["pi-00", "pi-05"], random_bytes=_seeded(4))
    assert len(result.survivors) == 8
    clipped_sum = sum(u * min(1.0, clip / np.linalg.norm(u)) for d, u in updates.items() if d in result.survivors)
    noise = FP.decode(result.total) - clipped_sum
    z_present = z * math.sqrt(8 / n_min)
    assert noise.std() == pytest.approx(z_present * clip, rel=0.05)

    ledger = PrivacyLedger(delta, accountants=("rdp", "pld"))
    z_eff = distributed_noise_multiplier(z, n_min, len(result.survivors))
    assert z_eff == pytest.approx(z_present)
    ledger.record_round(1, 1.0, z_eff)
    for name, accountant in (("rdp", RdpAccountant()), ("pld", dp_accounting.pld.PLDAccountant())):
        expected = accountant.compose(dp_accounting.GaussianDpEvent(z * math.sqrt(8 / 6))).get_epsilon(delta)
        assert ledger.epsilon(name) == pytest.approx(expected, rel=1e-9)
    # fewer noise shares than planned would have been a weaker guarantee
    weaker = RdpAccountant().compose(dp_accounting.GaussianDpEvent(z)).get_epsilon(delta)
    assert ledger.epsilon("rdp") < weaker


# ----------------------------------------------------------------------------- Shamir
def test_shamir_any_t_shares_reconstruct():
    rng = np.random.default_rng(8)
    secret = int.from_bytes(rng.bytes(32), "big")
    shares = shamir_split(secret, 4, range(1, 10), random_bytes=_seeded(9))
    for _ in range(10):
        subset = rng.choice(np.arange(1, 10), size=4, replace=False)
        assert shamir_combine({int(x): shares[int(x)] for x in subset}, 4) == secret
    assert shamir_combine(shares, 4) == secret
    with pytest.raises(NotEnoughSurvivors, match="3 shares cannot reconstruct a 4-of-n secret"):
        shamir_combine({x: shares[x] for x in (1, 2, 3)}, 4)
    # t-1 shares interpolate to something else (the secret stays hidden)
    assert shamir_combine({x: shares[x] for x in (1, 2, 3)}, 3) != secret
    with pytest.raises(SecAggError, match="secret must be an integer"):
        shamir_split(FIELD_PRIME, 2, [1, 2])
    with pytest.raises(SecAggError, match="distinct"):
        shamir_split(5, 2, [1, 1, 2])
    with pytest.raises(SecAggError, match="2 shares cannot meet threshold 3"):
        shamir_split(5, 3, [1, 2])


# ----------------------------------------------------------------------------- refusals
def _round_to_masked(n=5, seed=0):
    inputs = _inputs(n, seed=seed)
    server = SecAggServer(FLEET, ROUND, vector_size=M)
    clients = {
        d: SecAggClient(d, FLEET, ROUND, random_bytes=_seeded(seed * 100 + i)) for i, d in enumerate(sorted(inputs))
    }
    for d, c in clients.items():
        server.receive(d, c.advertise())
    keys = server.key_list()
    for d, c in clients.items():
        server.receive(d, c.share_keys(keys))
    return inputs, server, clients, keys, server.forward()


def _unmask_relay(survivors, dropped=()):
    return SecAggRelay(ROUND, "unmask", survivors=tuple(survivors), dropped=tuple(dropped))


def _with_ciphertext(forwarded, recipient, sender, ciphertext):
    """The shares relay with ``recipient``'s ciphertext from ``sender`` replaced."""
    ciphertexts = {v: dict(cts) for v, cts in forwarded.ciphertexts.items()}
    ciphertexts[recipient][sender] = ciphertext
    return SecAggRelay(ROUND, "shares", ciphertexts=ciphertexts)


def test_devices_refuse_unsafe_unmask_requests():
    inputs, server, clients, keys, forwarded = _round_to_masked()
    for d, c in clients.items():
        server.receive(d, c.masked_input(forwarded, inputs[d]))
    devices = sorted(inputs)
    with pytest.raises(SecAggError, match="must partition"):
        clients[devices[0]].unmask(_unmask_relay(devices[:4]))
    with pytest.raises(InvalidPayload, match="both as survivor and as dropped"):
        _unmask_relay(devices, (devices[0],))
    with pytest.raises(NotEnoughSurvivors, match="2 survivors < threshold 3; refusing"):
        clients[devices[1]].unmask(_unmask_relay(devices[:2], devices[2:]))
    with pytest.raises(SecAggError, match="step 'unmask' called while the round expects 'done'"):
        clients[devices[1]].unmask(_unmask_relay(devices))  # a device answers once
    with pytest.raises(SecAggError, match="not list this device as a survivor"):
        clients[devices[2]].unmask(_unmask_relay(devices[3:] + devices[:2], (devices[2],)))
    with pytest.raises(SecAggError, match="relay of round 4, this device is in round 3"):
        clients[devices[3]].unmask(SecAggRelay(ROUND + 1, "unmask", survivors=tuple(devices)))


def test_tampered_or_misrouted_shares_rejected():
    inputs, server, clients, keys, forwarded = _round_to_masked()
    a, b = sorted(inputs)[:2]
    ct = forwarded.ciphertexts[a][b].copy()
    ct[20] ^= 1
    with pytest.raises(SecAggError, match=f"shares from '{b}' fail authentication"):
        clients[a].masked_input(_with_ciphertext(forwarded, a, b, ct), inputs[a])
    # a ciphertext meant for a, delivered to c
    c = sorted(inputs)[2]
    with pytest.raises(SecAggError, match="fail authentication"):
        clients[c].masked_input(_with_ciphertext(forwarded, c, b, forwarded.ciphertexts[a][b]), inputs[c])
    # a device left out of the relay
    d = sorted(inputs)[3]
    others = {v: cts for v, cts in forwarded.ciphertexts.items() if v != d}
    with pytest.raises(SecAggError, match="nothing for this device"):
        clients[d].masked_input(SecAggRelay(ROUND, "shares", ciphertexts=others), inputs[d])


def test_other_session_cannot_decrypt():
    """Keys and ciphertexts are bound to (fleet, round): a device in another session rejects them."""
    server = SecAggServer(FLEET, ROUND, vector_size=M)
    clients = {
        "a": SecAggClient("a", FLEET, ROUND),
        "b": SecAggClient("b", FLEET, ROUND),
        "c": SecAggClient("c", "ward8", ROUND),
    }
    for d, c in clients.items():
        server.receive(d, c.advertise())
    keys = server.key_list()
    for d, c in clients.items():
        server.receive(d, c.share_keys(keys))
    with pytest.raises(SecAggError, match="fail authentication"):
        clients["c"].masked_input(server.forward(), np.zeros(M, np.uint64))


def _masked(values):
    return SecAggUpload(ROUND, "masked", masked=np.asarray(values, np.uint64).view(np.int64))


def test_server_rejects_messages_out_of_place():
    inputs, server, clients, keys, forwarded = _round_to_masked()
    devices = sorted(inputs)
    with pytest.raises(SecAggError, match="after the key list was sent"):
        server.receive("late", SecAggClient("late", FLEET, ROUND).advertise())
    with pytest.raises(SecAggError, match="outside the share-keys step"):
        server.receive(
            "x",
            SecAggUpload(ROUND, "shares", ciphertexts={"a": np.zeros(3, np.uint8)}, commitment=np.zeros(32, np.uint8)),
        )
    with pytest.raises(SecAggError, match="has shape"):
        server.receive(devices[0], _masked(np.zeros(M + 1)))
    with pytest.raises(SecAggError, match="did not share keys"):
        server.receive("stranger", _masked(np.zeros(M)))
    with pytest.raises(SecAggError, match="is for round 4, this round is 3"):
        server.receive(devices[0], SecAggUpload(ROUND + 1, "masked", masked=np.zeros(M, np.int64)))
    server.receive(devices[0], clients[devices[0]].masked_input(forwarded, inputs[devices[0]]))
    with pytest.raises(SecAggError, match="twice"):
        server.receive(devices[0], _masked(np.zeros(M)))
    for d in devices[1:]:
        server.receive(d, clients[d].masked_input(forwarded, inputs[d]))
    request = server.unmask_request()
    with pytest.raises(SecAggError, match="does not match the request"):
        server.receive(devices[0], SecAggUpload(ROUND, "unmask", b_shares={devices[0]: np.zeros(66, np.uint8)}))
    with pytest.raises(InvalidPayload, match="reveals both shares"):
        SecAggUpload(
            ROUND,
            "unmask",
            b_shares={devices[1]: np.zeros(66, np.uint8)},
            key_shares={devices[1]: np.zeros(66, np.uint8)},
        )
    with pytest.raises(InvalidPayload, match="non-empty 1-D int64"):
        SecAggUpload(ROUND, "masked", masked=np.zeros(3))
    responses = {d: clients[d].unmask(request) for d in devices}
    # a corrupted share: the reconstructed seed fails its SHA-256 commitment
    bad = dict(responses[devices[0]].b_shares)
    bad[devices[1]] = np.frombuffer(
        (int.from_bytes(bad[devices[1]].tobytes(), "big") + 1).to_bytes(66, "big"), np.uint8
    )
    server.receive(devices[0], SecAggUpload(ROUND, "unmask", b_shares=bad))
    for d in devices[1:]:
        server.receive(d, responses[d])
    with pytest.raises(SecAggError, match="does not match its commitment"):
        server.aggregate()


def test_corrupted_key_share_detected():
    inputs, server, clients, keys, forwarded = _round_to_masked(seed=3)
    devices = sorted(inputs)
    for d in devices[1:]:
        server.receive(d, clients[d].masked_input(forwarded, inputs[d]))
    request = server.unmask_request()
    assert request.dropped == (devices[0],)
    responses = {d: clients[d].unmask(request) for d in devices[1:]}
    first = min(responses)
    key = responses[first].key_shares[devices[0]].tobytes()
    bad = np.frombuffer((int.from_bytes(key, "big") ^ 1).to_bytes(66, "big"), np.uint8)
    server.receive(
        first, SecAggUpload(ROUND, "unmask", b_shares=responses[first].b_shares, key_shares={devices[0]: bad})
    )
    for d in sorted(responses)[1:]:
        server.receive(d, responses[d])
    with pytest.raises(SecAggError, match="does not match its advertised public key"):
        server.aggregate()


def _key_relay(threshold, public_keys):
    return SecAggRelay(ROUND, "keys", threshold=threshold, public_keys=public_keys)


def test_message_and_key_list_validation():
    ka, kb = SecAggClient("a", FLEET, ROUND).advertise(), SecAggClient("b", FLEET, ROUND).advertise()
    keys = {"a": ka.public_keys, "b": kb.public_keys}
    assert advertised_keys(_key_relay(2, keys))["a"] == (ka.public_keys[:32].tobytes(), ka.public_keys[32:].tobytes())
    with pytest.raises(SecAggError, match="not a majority"):
        advertised_keys(_key_relay(1, keys))
    with pytest.raises(SecAggError, match="repeats a public key"):
        advertised_keys(
            _key_relay(2, {"a": ka.public_keys, "b": np.concatenate([ka.public_keys[:32], kb.public_keys[32:]])})
        )
    same = np.concatenate([ka.public_keys[:32], ka.public_keys[:32]])
    with pytest.raises(SecAggError, match="must be different keys"):
        advertised_keys(_key_relay(2, {"a": same, "b": kb.public_keys}))
    server = SecAggServer(FLEET, ROUND, vector_size=M)
    with pytest.raises(SecAggError, match="keys of 'a': advertised c_pk and s_pk must be different keys"):
        server.receive("a", SecAggUpload(ROUND, "advertise", public_keys=same))
    with pytest.raises(InvalidPayload, match="must hold 64 bytes"):
        SecAggUpload(ROUND, "advertise", public_keys=np.zeros(33, np.uint8))
    with pytest.raises(InvalidTopic, match="invalid device id 'a/b'"):
        SecAggClient("a/b", FLEET, ROUND)
    c = SecAggClient("c", FLEET, ROUND)
    c.advertise()
    with pytest.raises(SecAggError, match="lacks this device's advertised keys"):
        c.share_keys(_key_relay(2, keys))
    with pytest.raises(SecAggError, match="step 'masked_input' called while the round expects 'advertise'"):
        SecAggClient("d", FLEET, ROUND).masked_input(
            SecAggRelay(ROUND, "shares", ciphertexts={"d": {}}), np.zeros(3, np.uint64)
        )
    e = SecAggClient("e", FLEET, ROUND)
    e.advertise()
    with pytest.raises(SecAggError, match="expected the 'keys' relay, got the 'unmask' relay"):
        e.share_keys(_unmask_relay(["e"]))
    with pytest.raises(SecAggError, match="round must be an integer >= 0"):
        session_id("ward7", -1)


# ----------------------------------------------------------------------------- over the wire
def test_round_over_signed_protocol_messages():
    """Every step message encoded, signed, decoded and verified as on MQTT; 1 dropout each way."""
    from biofed.protocol import Topics, decode_topic_message, encode_message
    from biofed.signing import KeyRing, Signer, Verifier

    topics = Topics(FLEET)
    inputs = _inputs(6, seed=9)
    devices = sorted(inputs)
    signers = {d: Signer.generate(d) for d in [*devices, "coordinator"]}
    ring = KeyRing({d: s.public_key for d, s in signers.items()})
    coordinator_in, device_in = Verifier(ring), {d: Verifier(ring) for d in devices}
    server = SecAggServer(FLEET, ROUND, vector_size=M)
    clients = {d: SecAggClient(d, FLEET, ROUND, random_bytes=_seeded(i)) for i, d in enumerate(devices)}

    def upload(device, message):
        data = encode_message(message, fleet=FLEET, sender=device, signer=signers[device])
        decoded = decode_topic_message(topics, topics.secagg(device), data, verifier=coordinator_in)
        assert decoded.round == ROUND
        server.receive(decoded.sender, decoded.payload)

    def relay(message, device):
        data = encode_message(message, fleet=FLEET, sender="coordinator", signer=signers["coordinator"])
        return decode_topic_message(topics, topics.secagg_relay, data, verifier=device_in[device]).payload

    for d in devices:
        upload(d, clients[d].advertise())
    keys = server.key_list()
    for d in devices:
        upload(d, clients[d].share_keys(relay(keys, d)))
    forwarded = server.forward()
    early, late = devices[0], devices[-1]
    for d in devices[1:]:
        upload(d, clients[d].masked_input(relay(forwarded, d), inputs[d]))
    request = server.unmask_request()
    for d in devices[1:-1]:
        upload(d, clients[d].unmask(relay(request, d)))
    result = server.aggregate()
    assert result.dropped == (early,) and late in result.survivors
    np.testing.assert_array_equal(result.total, _sum(inputs, devices[1:]))


def test_secagg_payload_validation():
    from biofed.protocol import Topics

    u8 = np.zeros(64, np.uint8)
    with pytest.raises(InvalidPayload, match="step 'advertise' needs public_keys"):
        SecAggUpload(1, "advertise")
    with pytest.raises(InvalidPayload, match="step 'advertise' must not carry masked"):
        SecAggUpload(1, "advertise", public_keys=u8, masked=np.zeros(3, np.int64))
    with pytest.raises(InvalidPayload, match="must hold 64 bytes"):
        SecAggUpload(1, "advertise", public_keys=np.zeros(10, np.uint8))
    with pytest.raises(InvalidPayload, match="1-D uint8 array"):
        SecAggUpload(1, "shares", ciphertexts={"a": np.zeros(3)}, commitment=np.zeros(32, np.uint8))
    with pytest.raises(InvalidPayload, match="invalid device id"):
        SecAggUpload(1, "shares", ciphertexts={"a b": np.zeros(3, np.uint8)}, commitment=np.zeros(32, np.uint8))
    with pytest.raises(InvalidPayload, match="non-empty 1-D int64"):
        SecAggUpload(1, "masked", masked=np.zeros(3, np.uint8))
    with pytest.raises(InvalidPayload, match="both shares"):
        SecAggUpload(1, "unmask", b_shares={"a": np.zeros(66, np.uint8)}, key_shares={"a": np.zeros(66, np.uint8)})
    with pytest.raises(InvalidPayload, match="step must be one of"):
        SecAggUpload(1, "hello")
    with pytest.raises(InvalidPayload, match="step 'keys' needs threshold"):
        SecAggRelay(1, "keys", public_keys={"a": u8})
    with pytest.raises(InvalidPayload, match="both as survivor and as dropped"):
        SecAggRelay(1, "unmask", survivors=("a", "b"), dropped=("a",))
    with pytest.raises(InvalidPayload, match="step 'unmask' must not carry threshold"):
        SecAggRelay(1, "unmask", survivors=("a",), threshold=3)
    topics = Topics("ward7")
    assert topics.parse(topics.secagg("pi-01")) == ("secagg", "pi-01")
    assert topics.parse(topics.secagg_relay) == ("secagg_relay", None)
    assert topics.all_devices("secagg") == "biofed/ward7/secagg/+"


def test_a_refused_relay_leaves_the_step_open():
    """A key list or shares relay the device refuses does not use up its step: the genuine one still works."""
    inputs = _inputs(3)
    devices = sorted(inputs)
    server = SecAggServer(FLEET, ROUND, vector_size=M)
    clients = {d: SecAggClient(d, FLEET, ROUND, random_bytes=_seeded(i)) for i, d in enumerate(devices)}
    for d, c in clients.items():
        server.receive(d, c.advertise())
    keys = server.key_list()
    with pytest.raises(SecAggError, match="not a majority"):
        clients[devices[0]].share_keys(_key_relay(1, keys.public_keys))
    for d, c in clients.items():
        server.receive(d, c.share_keys(keys))
    forwarded = server.forward()
    with pytest.raises(SecAggError, match="nothing for this device"):
        clients[devices[0]].masked_input(SecAggRelay(ROUND, "shares", ciphertexts={devices[1]: {}}), inputs[devices[0]])
    for d, c in clients.items():
        server.receive(d, c.masked_input(forwarded, inputs[d]))
    request = server.unmask_request()
    for d, c in clients.items():
        server.receive(d, c.unmask(request))
    np.testing.assert_array_equal(server.aggregate().total, _sum(inputs, devices))


@pytest.mark.parametrize(
    "first",
    ["biofed.secure_aggregation.messages", "biofed.secure_aggregation", "biofed.protocol.envelope", "biofed.protocol"],
)
def test_the_protocol_and_its_secagg_kinds_import_in_either_order(first):
    """biofed.protocol registers the secure-aggregation messages as payload kinds, which build on its schema."""
    import subprocess
    import sys

    code = (
        f"import {first}\n"
        "from biofed.protocol import PAYLOAD_TYPES\n"
        "from biofed.secure_aggregation import SecAggRelay, SecAggUpload\n"
        "assert PAYLOAD_TYPES['secagg'] is SecAggUpload and PAYLOAD_TYPES['secagg_relay'] is SecAggRelay\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
