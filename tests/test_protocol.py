"""biofed.protocol: topics, the msgpack envelope, payload schemas and idempotency."""

from __future__ import annotations

import math
import pickle
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from biofed import protocol
from biofed.protocol import (
    SCHEMA_VERSION,
    Basis,
    InvalidPayload,
    InvalidTopic,
    MalformedMessage,
    MessageTooLarge,
    Model,
    Prediction,
    ProtocolError,
    SeenMessageIds,
    SenderMismatch,
    Sketch,
    Status,
    Task,
    Topics,
    UnexpectedKind,
    UnsupportedVersion,
    Update,
    UpdateMetrics,
    WrongFleet,
    decode_message,
    decode_topic_message,
    encode_message,
    envelope,
    offline_status,
)
from biofed.protocol.arrays import decode_array, encode_array

RNG = np.random.default_rng(42)
METRICS = UpdateMetrics(
    loss=0.7,
    n_windows=120,
    rss_bytes=80_000_000,
    cpu_time_s=3.5,
    bytes_sent=1000,
    bytes_received=2000,
    eval_balanced_accuracy=0.75,
    eval_windows=30,
)
CLASSES = ("rest", "arithmetic")


def _payloads():
    """One fully populated payload of every kind."""
    return [
        Task(
            round=3,
            model=RNG.normal(size=66),
            basis_version=2,
            classes=CLASSES,
            deadline=1.8e9,
            hidden=0,
            trust_mode="local",
            clip_norm=0.5,
            noise_multiplier=1.1,
            adaptive_clipping=True,
            local_epochs=2,
            lr=0.01,
            batch_size=16,
            optimizer="adam",
            l2=1e-4,
            prox_mu=0.1,
            participants=("pi-01", "pi_02"),
        ),
        Update(
            round=3,
            basis_version=2,
            delta=RNG.normal(size=66).astype(np.float32),
            n_examples=240,
            clipped=True,
            metrics=METRICS,
            norm_bit=0,
        ),
        Model(
            round=3, params=RNG.normal(size=66), basis_version=2, classes=CLASSES, hidden=0, n_devices=5, epsilon=1.25
        ),
        Basis(
            round=1,
            version=2,
            components=RNG.normal(size=(32, 100)),
            mean=RNG.normal(size=100),
            scale=RNG.uniform(0.5, 2, size=100),
            feature_names=tuple(f"f{i}" for i in range(100)),
        ),
        Sketch(round=1, basis_version=2, phase="moments", statistic=RNG.normal(size=200), clipped=True, n_features=100),
        Status(round=3, state="training", basis_version=2, n_rows=5000, detail="epoch 1/2"),
        Prediction(round=3, t=np.array([1.7e9, 1.7e9 + 1]), proba=np.array([[0.2, 0.8], [0.6, 0.4]]), classes=CLASSES),
        # federated-flow variants: a covariance-phase task, a covariance sketch
        Task(
            round=1,
            model=np.empty(0),
            basis_version=0,
            classes=CLASSES,
            deadline=1.8e9,
            phase="covariance",
            stats_mean=RNG.normal(size=100),
            stats_scale=RNG.uniform(0.5, 2, size=100),
        ),
        Sketch(
            round=2, basis_version=2, phase="covariance", statistic=RNG.normal(size=100), clipped=False, n_features=10
        ),
    ]


def _assert_same(a, b):
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
        elif isinstance(x, UpdateMetrics):
            _assert_same(x, y)
        else:
            assert x == y, name


def _envelope(data):
    """The raw envelope map of an encoded message (arrays left as ExtType), for tampering."""
    return msgpack.unpackb(data, raw=False)


def _pack(envelope):
    return msgpack.packb(envelope, use_bin_type=True)


# ----------------------------------------------------------------------------- topics
def test_topic_layout():
    t = Topics("ward7")
    assert (t.model, t.task, t.basis) == ("biofed/ward7/model", "biofed/ward7/task", "biofed/ward7/basis")
    assert t.update("pi-01") == "biofed/ward7/update/pi-01"
    assert t.sketch("pi-01") == "biofed/ward7/sketch/pi-01"
    assert t.status("pi-01") == "biofed/ward7/status/pi-01"
    assert t.prediction("pi-01") == "biofed/ward7/prediction/pi-01"
    assert t.all_devices("update") == "biofed/ward7/update/+"
    assert t.parse("biofed/ward7/update/pi-01") == ("update", "pi-01")
    assert t.parse("biofed/ward7/model") == ("model", None)
    assert t.device_id("biofed/ward7/status/A_b-9", "status") == "A_b-9"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "dév", "a b", "pi.01"])
def test_topics_reject_bad_ids(bad):
    with pytest.raises(InvalidTopic, match="invalid device id"):
        Topics("ward7").update(bad)
    with pytest.raises(InvalidTopic, match="invalid fleet"):
        Topics(bad)
    with pytest.raises(InvalidTopic):
        Topics("ward7").parse(f"biofed/ward7/update/{bad}")


@pytest.mark.parametrize(
    "topic",
    [
        "biofed/other/update/pi-01",  # other fleet
        "biofed/ward7/update",  # device id missing
        "biofed/ward7/model/pi-01",  # broadcast topic with a device
        "biofed/ward7/update/pi-01/x",  # too deep
        "biofed/ward7/secrets/pi-01",  # unknown kind
        "other/ward7/update/pi-01",  # wrong root
        "biofed/ward7/update/+",  # wildcard is not a device
    ],
)
def test_parse_rejects_foreign_topics(topic):
    with pytest.raises(InvalidTopic):
        Topics("ward7").parse(topic)


def test_device_id_checks_kind():
    with pytest.raises(InvalidTopic, match="is not a update topic"):
        Topics("ward7").device_id("biofed/ward7/status/pi-01", "update")
    with pytest.raises(InvalidTopic, match="has no per-device topic"):
        Topics("ward7").all_devices("model")


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("payload", _payloads(), ids=lambda p: p.KIND)
def test_round_trip_every_kind(payload):
    data = encode_message(payload, fleet="ward7", sender="pi-01", created=1.7e9)
    message = decode_message(data, fleet="ward7", kinds=(payload.KIND,))
    assert (message.version, message.kind, message.fleet, message.sender) == (
        SCHEMA_VERSION,
        payload.KIND,
        "ward7",
        "pi-01",
    )
    assert message.round == payload.round
    assert message.created == 1.7e9
    assert len(message.message_id) == 32 and int(message.message_id, 16) >= 0
    _assert_same(message.payload, payload)


def test_decoded_arrays_are_read_only():
    update = _payloads()[1]
    message = decode_message(encode_message(update, fleet="f", sender="d"))
    with pytest.raises(ValueError, match="read-only"):
        message.payload.delta[0] = 1.0


def test_message_ids_are_fresh_unless_given():
    status = Status(round=0, state="online")
    a = decode_message(encode_message(status, fleet="f", sender="d"))
    b = decode_message(encode_message(status, fleet="f", sender="d"))
    assert a.message_id != b.message_id
    fixed = decode_message(encode_message(status, fleet="f", sender="d", message_id=bytes(range(16))))
    assert fixed.message_id == bytes(range(16)).hex()


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.dtype(t) for t in ("<f4", ">f4", "<f8", ">f8", "<i4", ">i4", "<i8", "u1")]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_array_codec_round_trip(array):
    ext = encode_array(array)
    decoded = decode_array(ext.code, ext.data)
    assert decoded.shape == array.shape
    assert decoded.dtype == array.dtype.newbyteorder("=")
    np.testing.assert_array_equal(decoded, array)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64]),
        shape=st.integers(0, 300),
        elements=st.floats(-1e6, 1e6, width=32),
    )
)
def test_update_delta_round_trip(delta):
    update = Update(round=1, basis_version=0, delta=delta, n_examples=3, clipped=False, metrics=METRICS)
    decoded = decode_message(encode_message(update, fleet="f", sender="d")).payload.delta
    assert decoded.dtype == delta.dtype
    np.testing.assert_array_equal(decoded, delta)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_protocol_errors(data):
    with pytest.raises(ProtocolError):
        decode_message(data)


# ----------------------------------------------------------------------------- hostile input
def test_oversized_message_rejected_before_unpacking(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("msgpack.unpackb must not run on an oversized message")

    monkeypatch.setattr(envelope.msgpack, "unpackb", never)
    huge_prefix = b"\xc6\xff\xff\xff\xff" + b"\x00" * 2000  # bin32 claiming 4 GiB
    with pytest.raises(MessageTooLarge, match="2005 bytes, above the 1000-byte limit"):
        decode_message(huge_prefix, max_bytes=1000)


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff" + b"\x00" * 64,  # array32 claiming 4 G elements
        b"\xdf\xff\xff\xff\xff" + b"\x00" * 64,  # map32 claiming 4 G entries
        b"\xdb\x00\x01\x90\x00" + b"a" * 102_400,  # a complete 100 KiB str32, above the 64 KiB string limit
    ],
    ids=["array32", "map32", "str32"],
)
def test_huge_length_prefix_inside_message(data):
    with pytest.raises(MessageTooLarge, match="declares a length above the limits"):
        decode_message(data)


def test_bin_prefix_longer_than_message_is_malformed():
    with pytest.raises(MalformedMessage, match="incomplete input"):
        decode_message(b"\xc6\xff\xff\xff\xff" + b"\x00" * 10)


def test_encode_refuses_message_above_limit():
    update = Update(round=1, basis_version=0, delta=np.zeros(1000), n_examples=1, clipped=False, metrics=METRICS)
    with pytest.raises(MessageTooLarge, match="above the 4000-byte limit"):
        encode_message(update, fleet="f", sender="d", max_bytes=4000)


def test_truncated_message():
    data = encode_message(_payloads()[1], fleet="f", sender="d")
    for cut in (1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(MalformedMessage, match="not a msgpack message"):
            decode_message(data[:cut])


def test_trailing_bytes():
    data = encode_message(_payloads()[5], fleet="f", sender="d")
    with pytest.raises(MalformedMessage, match="extra data"):
        decode_message(data + b"\x00")


@pytest.mark.parametrize("obj", [{"v": 1, "k": "update"}, np.arange(3.0), [1, 2, 3]])
def test_pickle_bytes_are_never_unpickled(obj):
    with pytest.raises(MalformedMessage):
        decode_message(pickle.dumps(obj))


@pytest.mark.parametrize("version", [0, 2, "1", None, True])
def test_wrong_version(version):
    envelope = _envelope(encode_message(_payloads()[5], fleet="f", sender="d"))
    envelope["v"] = version
    with pytest.raises(UnsupportedVersion, match="schema version .* is not supported"):
        decode_message(_pack(envelope))


def test_not_a_map():
    with pytest.raises(MalformedMessage, match="not an envelope map"):
        decode_message(_pack([1, 2, 3]))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("k", "rootkit", "unknown message kind"),
        ("f", "a/b", "invalid fleet"),
        ("s", "", "invalid sender"),
        ("id", b"short", "message id must be 16 bytes"),
        ("t", float("nan"), "created time must be a finite number"),
        ("r", -1, "round must be >= 0"),
        ("p", [1], "payload must be a map"),
    ],
)
def test_bad_envelope_fields(field, value, match):
    envelope = _envelope(encode_message(_payloads()[5], fleet="f", sender="d"))
    envelope[field] = value
    with pytest.raises(ProtocolError, match=match):
        decode_message(_pack(envelope))


def test_missing_and_extra_envelope_fields():
    envelope = _envelope(encode_message(_payloads()[5], fleet="f", sender="d"))
    with pytest.raises(MalformedMessage, match="envelope fields"):
        decode_message(_pack({**envelope, "x": 1}))
    del envelope["t"]
    with pytest.raises(MalformedMessage, match="envelope fields"):
        decode_message(_pack(envelope))


def _update_envelope():
    update = Update(round=1, basis_version=0, delta=np.ones(10), n_examples=1, clipped=False, metrics=METRICS)
    return _envelope(encode_message(update, fleet="f", sender="d"))


@pytest.mark.parametrize("code", [0, 6, 17, 255])
def test_unknown_or_object_dtype_code(code):
    envelope = _update_envelope()
    ext = envelope["p"]["delta"]
    envelope["p"]["delta"] = msgpack.ExtType(ext.code, bytes([code]) + ext.data[1:])
    with pytest.raises(MalformedMessage, match=f"unknown dtype code {code}"):
        decode_message(_pack(envelope))


def test_object_dtype_cannot_be_encoded():
    with pytest.raises(InvalidPayload, match="object arrays cannot be sent"):
        encode_array(np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InvalidPayload, match="float32 or float64"):
        Update(
            round=1,
            basis_version=0,
            delta=np.array([1.0, "x"], dtype=object),
            n_examples=1,
            clipped=False,
            metrics=METRICS,
        )


@pytest.mark.parametrize("dtype", [np.float16, np.complex128, np.bool_, np.int8, np.uint32])
def test_unlisted_dtypes_cannot_be_encoded(dtype):
    with pytest.raises(InvalidPayload, match="cannot be sent; use one of float32"):
        encode_array(np.zeros(3, dtype=dtype))


@pytest.mark.parametrize("shape,extra", [((11,), 0), ((10,), 8), ((10,), -8), ((5, 3), 0), ((2**40,), 0)])
def test_shape_byte_length_mismatch(shape, extra):
    envelope = _update_envelope()
    raw = envelope["p"]["delta"].data[10:]  # 10 float64 ones
    raw = raw + b"\x00" * extra if extra >= 0 else raw[:extra]
    header = struct.pack(f"<BB{len(shape)}Q", 2, len(shape), *shape)
    envelope["p"]["delta"] = msgpack.ExtType(1, header + raw)
    with pytest.raises(MalformedMessage, match="needs .* bytes, message carries"):
        decode_message(_pack(envelope))


def test_truncated_array_header():
    envelope = _update_envelope()
    envelope["p"]["delta"] = msgpack.ExtType(1, b"\x02\x03\x00")
    with pytest.raises(MalformedMessage, match="shape is truncated"):
        decode_message(_pack(envelope))
    envelope["p"]["delta"] = msgpack.ExtType(1, b"\x02\x09" + b"\x00" * 80)
    with pytest.raises(MalformedMessage, match="at most 8 are allowed"):
        decode_message(_pack(envelope))
    envelope["p"]["delta"] = msgpack.ExtType(7, b"")
    with pytest.raises(MalformedMessage, match="unknown msgpack extension type 7"):
        decode_message(_pack(envelope))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_delta_rejected_on_the_wire(bad):
    data = encode_message(
        Update(round=1, basis_version=0, delta=np.arange(10.0) + 0.5, n_examples=1, clipped=False, metrics=METRICS),
        fleet="f",
        sender="d",
    )
    tampered = data.replace(struct.pack("<d", 3.5), struct.pack("<d", bad))
    assert tampered != data
    with pytest.raises(InvalidPayload, match=r"update from 'd': Update.delta contains 1 NaN/inf values"):
        decode_message(tampered)


def test_non_finite_delta_rejected_on_encode():
    with pytest.raises(InvalidPayload, match="Update.delta contains 2 NaN/inf values"):
        Update(
            round=1,
            basis_version=0,
            delta=np.array([1.0, np.nan, np.inf]),
            n_examples=1,
            clipped=False,
            metrics=METRICS,
        )


def test_wrong_delta_shape_on_the_wire():
    envelope = _update_envelope()
    envelope["p"]["delta"] = encode_array(np.ones((2, 5)))
    with pytest.raises(InvalidPayload, match=r"Update.delta must be 1-D, got shape \(2, 5\)"):
        decode_message(_pack(envelope))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda p: p.pop("n_examples"), "update payload lacks field 'n_examples'"),
        (lambda p: p.update(evil=1), r"unknown fields \['evil'\]"),
        (lambda p: p.update(n_examples=-1), "Update.n_examples must be >= 0"),
        (lambda p: p.update(n_examples=1.5), "Update.n_examples must be an integer"),
        (lambda p: p.update(clipped=1), "Update.clipped must be a bool"),
        (lambda p: p.update(norm_bit=2), "Update.norm_bit must be 0, 1 or None"),
        (lambda p: p.update(delta=[1.0, 2.0]), "Update.delta must be a typed array"),
        (lambda p: p["metrics"].update(loss=float("nan")), "UpdateMetrics.loss must be finite"),
        (lambda p: p["metrics"].update(eval_balanced_accuracy=1.5), "eval_balanced_accuracy must be <= 1"),
        (lambda p: p["metrics"].update(eval_windows=-1), "UpdateMetrics.eval_windows must be >= 0"),
        (lambda p: p["metrics"].update(gpu=1), "unexpected keyword argument 'gpu'"),
        (lambda p: p.update(metrics={"a": {"b": {"c": {"d": 1}}}}), "nests maps deeper than 3"),
        (lambda p: p.update(tags=[1, [2]]), r"tags\[1\] is a list"),
    ],
)
def test_bad_update_payloads(mutate, match):
    envelope = _update_envelope()
    mutate(envelope["p"])
    with pytest.raises(InvalidPayload, match=match):
        decode_message(_pack(envelope))


def test_timestamp_extension_is_not_a_payload_value():
    envelope = _update_envelope()
    envelope["p"]["n_examples"] = msgpack.Timestamp(1, 0)
    with pytest.raises(InvalidPayload, match="is a Timestamp"):
        decode_message(_pack(envelope))


# ----------------------------------------------------------------------------- schema validation
def test_schema_shape_checks():
    with pytest.raises(InvalidPayload, match=r"Basis.mean must have shape \(4,\)"):
        Basis(round=0, version=1, components=np.ones((2, 4)), mean=np.ones(3), scale=np.ones(4))
    with pytest.raises(InvalidPayload, match="Basis.scale must be > 0"):
        Basis(round=0, version=1, components=np.ones((2, 4)), mean=np.ones(4), scale=np.array([1.0, 0, 1, 1]))
    with pytest.raises(InvalidPayload, match="3 names for 4 features"):
        Basis(
            round=0,
            version=1,
            components=np.ones((2, 4)),
            mean=np.ones(4),
            scale=np.ones(4),
            feature_names=("a", "b", "c"),
        )
    with pytest.raises(
        InvalidPayload, match=r"Sketch.statistic of phase 'moments' with n_features=4 must have shape \(8,\)"
    ):
        Sketch(round=0, basis_version=1, phase="moments", statistic=np.ones(16), clipped=False, n_features=4)
    with pytest.raises(
        InvalidPayload, match=r"Sketch.statistic of phase 'covariance' with n_features=4 must have shape \(16,\)"
    ):
        Sketch(round=0, basis_version=1, phase="covariance", statistic=np.ones(8), clipped=False, n_features=4)
    with pytest.raises(InvalidPayload, match="Sketch.phase must be one of"):
        Sketch(round=0, basis_version=1, phase="train", statistic=np.ones(8), clipped=False, n_features=4)
    with pytest.raises(InvalidPayload, match="Sketch.clipped must be a bool"):
        Sketch(round=0, basis_version=1, phase="moments", statistic=np.ones(8), clipped=0, n_features=4)
    with pytest.raises(InvalidPayload, match="Sketch.n_features must be >= 1"):
        Sketch(round=0, basis_version=1, phase="moments", statistic=np.ones(0), clipped=False, n_features=0)
    with pytest.raises(InvalidPayload, match=r"Prediction.proba must have shape \(2, 2\)"):
        Prediction(round=0, t=np.ones(2), proba=np.ones((2, 3)), classes=CLASSES)
    with pytest.raises(InvalidPayload, match="Task.classes needs at least 2"):
        Task(round=0, model=np.ones(3), basis_version=0, classes=("one",), deadline=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"trust_mode": "none"}, "Task.trust_mode must be one of"),
        ({"clip_norm": 0.0}, "Task.clip_norm must be > 0"),
        ({"noise_multiplier": -1.0}, "Task.noise_multiplier must be >= 0"),
        ({"optimizer": "lbfgs"}, "Task.optimizer must be one of"),
        ({"batch_size": 0}, "Task.batch_size must be >= 1"),
        ({"deadline": float("inf")}, "Task.deadline must be finite"),
        ({"participants": ("ok", "not/ok")}, "invalid device id 'not/ok'"),
        ({"adaptive_clipping": "yes"}, "Task.adaptive_clipping must be a bool"),
        ({"phase": "fit"}, "Task.phase must be one of"),
        ({"stats_mean": np.zeros(3)}, "stats_mean and Task.stats_scale must be given together"),
        ({"stats_mean": np.zeros(3), "stats_scale": np.ones(4)}, r"Task.stats_scale must have shape \(3,\)"),
        ({"stats_mean": np.zeros(3), "stats_scale": np.array([1.0, 0.0, 1.0])}, "Task.stats_scale must be > 0"),
    ],
)
def test_task_validation(kwargs, match):
    base = dict(round=0, model=np.ones(3), basis_version=0, classes=CLASSES, deadline=1.7e9)
    with pytest.raises(ProtocolError, match=match):
        Task(**{**base, **kwargs})


def test_status_state_word():
    with pytest.raises(InvalidPayload, match="Status.state must be a lowercase word"):
        Status(round=0, state="Offline!")


def test_encode_rejects_non_payloads_and_bad_ids():
    with pytest.raises(InvalidPayload, match="cannot encode a dict"):
        encode_message({"round": 1}, fleet="f", sender="d")
    with pytest.raises(InvalidTopic, match="invalid sender"):
        encode_message(Status(round=0, state="online"), fleet="f", sender="a/b")
    with pytest.raises(InvalidPayload, match="message_id must be 16 bytes"):
        encode_message(Status(round=0, state="online"), fleet="f", sender="d", message_id=b"x")


# ----------------------------------------------------------------------------- receiver checks
def test_wrong_fleet_and_kind():
    data = encode_message(_payloads()[1], fleet="ward7", sender="pi-01")
    with pytest.raises(WrongFleet, match="message is for fleet 'ward7', this receiver serves 'ward8'"):
        decode_message(data, fleet="ward8")
    with pytest.raises(UnexpectedKind, match=r"got a update message, expected one of \('task',\)"):
        decode_message(data, kinds=("task",))


def test_decode_topic_message_checks_sender_and_kind():
    topics = Topics("ward7")
    data = encode_message(_payloads()[1], fleet="ward7", sender="pi-01")
    assert decode_topic_message(topics, topics.update("pi-01"), data).sender == "pi-01"
    with pytest.raises(SenderMismatch, match="claims sender 'pi-01'"):
        decode_topic_message(topics, topics.update("pi-02"), data)
    with pytest.raises(UnexpectedKind):
        decode_topic_message(topics, topics.status("pi-01"), data)
    with pytest.raises(InvalidTopic):
        decode_topic_message(topics, "biofed/ward8/update/pi-01", data)
    with pytest.raises(WrongFleet):
        decode_topic_message(Topics("ward8"), "biofed/ward8/update/pi-01", data)


def test_offline_status_is_the_last_will_payload():
    message = decode_message(offline_status(fleet="ward7", device_id="pi-01", round=4))
    assert (message.kind, message.sender, message.round, message.payload.state) == ("status", "pi-01", 4, "offline")


# ----------------------------------------------------------------------------- idempotency
def test_duplicate_message_ids_recognised():
    seen = SeenMessageIds(capacity=3)
    data = encode_message(_payloads()[1], fleet="f", sender="d")
    first, redelivered = decode_message(data), decode_message(data)
    assert seen.add(first.message_id) is True
    assert seen.add(redelivered.message_id) is False
    assert first.message_id in seen and len(seen) == 1


def test_seen_ids_forget_least_recently_used():
    seen = SeenMessageIds(capacity=2)
    assert seen.add("a") and seen.add("b")
    assert not seen.add("a")  # refreshes "a"
    assert seen.add("c")  # evicts "b"
    assert "b" not in seen and "a" in seen and "c" in seen
    assert len(seen) == 2
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        SeenMessageIds(0)


def test_max_bytes_default_fits_a_million_parameter_float32_update():
    delta = np.zeros(1_000_000, dtype=np.float32)
    data = encode_message(
        Update(round=1, basis_version=0, delta=delta, n_examples=1, clipped=False, metrics=METRICS),
        fleet="f",
        sender="d",
    )
    assert math.isclose(len(data), 4_000_000, rel_tol=0.01)
    assert decode_message(data).payload.delta.shape == (1_000_000,)


# ----------------------------------------------------------------------------- standardization of a basis
def test_basis_standardization_round_trip_and_default():
    d = 5
    device = Basis(
        round=4, version=2, components=np.eye(d)[:3], mean=np.zeros(d), scale=np.ones(d), standardization="device"
    )
    decoded = decode_message(encode_message(device, fleet="f", sender="coordinator")).payload
    assert decoded.standardization == "device" and decoded.version == 2
    np.testing.assert_array_equal(decoded.components, device.components)
    # a basis message without the field (older coordinators) means the fleet-wide standardization
    payload = {k: v for k, v in device.to_payload().items() if k != "standardization"}
    assert Basis.from_payload(4, payload).standardization == "global"
    assert (
        Basis(round=0, version=1, components=np.ones((2, d)), mean=np.ones(d), scale=np.ones(d)).standardization
        == "global"
    )
    assert protocol.STANDARDIZATIONS == ("global", "device")


def test_basis_standardization_is_validated():
    d = 4
    with pytest.raises(InvalidPayload, match=r"Basis.standardization must be one of \('global', 'device'\)"):
        Basis(
            round=0,
            version=1,
            components=np.ones((2, d)),
            mean=np.zeros(d),
            scale=np.ones(d),
            standardization="subject",
        )
    with pytest.raises(InvalidPayload, match="needs mean all zeros and scale all ones"):
        Basis(
            round=0,
            version=1,
            components=np.ones((2, d)),
            mean=np.full(d, 0.5),
            scale=np.ones(d),
            standardization="device",
        )
    with pytest.raises(InvalidPayload, match="needs mean all zeros and scale all ones"):
        Basis(
            round=0,
            version=1,
            components=np.ones((2, d)),
            mean=np.zeros(d),
            scale=np.full(d, 2.0),
            standardization="device",
        )


def test_task_optimizers_are_the_ones_the_kernels_implement():
    from biofed.kernels.training import OPTIMIZERS

    assert protocol.OPTIMIZERS == OPTIMIZERS
    for optimizer in OPTIMIZERS:
        assert (
            Task(
                round=1, model=np.zeros(3), basis_version=1, classes=("a", "b"), deadline=1.0, optimizer=optimizer
            ).optimizer
            == optimizer
        )
    with pytest.raises(InvalidPayload, match=r"Task.optimizer must be one of \('sgd', 'adam'\)"):
        Task(round=1, model=np.zeros(3), basis_version=1, classes=("a", "b"), deadline=1.0, optimizer="rmsprop")


def test_the_import_of_the_protocol_stays_light():
    """Every command decodes messages; none of them should pay for Numba to do so."""
    import subprocess
    import sys

    code = "import sys, biofed.protocol, biofed.config; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
