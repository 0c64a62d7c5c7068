"""Fuzzing the real inbound handlers: the coordinator's :class:`Ingest` and the edge agent's
``handle_message`` get structured garbage (hypothesis strategies over the envelope and every
payload kind), byte-level mutations of valid messages and a seeded corpus of known crashers.

Every case must be handled without an exception escaping, and be accounted for: counted
under a rejection reason, or accepted. More than 10 000 cases run per test session (the
sum of ``max_examples`` below and the seeded mutations). The search is derandomized so CI is
reproducible; set ``BIOFED_FUZZ_RANDOM=1`` (hypothesis) and ``BIOFED_FUZZ_SEED`` (mutations) to
explore new inputs.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biofed.config import DeviceConfig
from biofed.coordinator.ingest import Ingest
from biofed.edge.agent import EdgeAgent
from biofed.model import FeatureLayout, ModelFormatError
from biofed.protocol import (
    PAYLOAD_TYPES,
    Basis,
    MalformedMessage,
    Model,
    Prediction,
    ProtocolError,
    Sketch,
    Status,
    Task,
    Topics,
    Update,
    UpdateMetrics,
    decode_topic_message,
    encode_message,
)
from biofed.secure_aggregation import SecAggRelay, SecAggUpload

FLEET = "ward7"
DEVICE = "pi-01"
TOPICS = Topics(FLEET)


def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=os.environ.get("BIOFED_FUZZ_RANDOM") != "1",
        suppress_health_check=list(HealthCheck),
    )


RNG = np.random.default_rng(7)


def valid_payloads() -> list:
    """One valid payload of every kind the handlers receive."""
    classes = ("rest", "task")
    return [
        Task(
            round=3,
            model=RNG.normal(size=10),
            basis_version=1,
            classes=classes,
            deadline=time.time() + 600,
            participants=(DEVICE,),
        ),
        Update(
            round=3,
            basis_version=1,
            delta=RNG.normal(size=10),
            n_examples=20,
            clipped=False,
            metrics=UpdateMetrics(loss=0.5, n_windows=20, rss_bytes=1, cpu_time_s=0.1),
        ),
        Model(round=3, params=RNG.normal(size=10), basis_version=1, classes=classes),
        Basis(round=2, version=1, components=RNG.normal(size=(4, 6)), mean=np.zeros(6), scale=np.ones(6)),
        Sketch(round=1, basis_version=0, phase="moments", statistic=RNG.normal(size=12), clipped=False, n_features=6),
        Status(round=0, state="online", layout='{"bands":[],"hop_s":1,"modalities":[],"n_mels":1,"window_s":2}'),
        Prediction(round=3, t=np.array([1.0]), proba=np.array([[0.3, 0.7]]), classes=classes),
        SecAggUpload(round=3, step="advertise", public_keys=np.zeros(64, dtype=np.uint8)),
        SecAggRelay(round=3, step="unmask", survivors=(DEVICE,)),
    ]


def topic_for(kind: str, device: str = DEVICE) -> str:
    per_device = {"update", "sketch", "status", "prediction", "secagg"}
    return f"biofed/{FLEET}/{kind}/{device}" if kind in per_device else f"biofed/{FLEET}/{kind}"


VALID = [
    (
        topic_for(p.KIND),
        encode_message(
            p, fleet=FLEET, sender="coordinator" if p.KIND in ("task", "model", "basis", "secagg_relay") else DEVICE
        ),
    )
    for p in valid_payloads()
]
TOPIC_CHOICES = [topic_for(kind) for kind in PAYLOAD_TYPES] + [
    f"biofed/{FLEET}/update/pi-02",
    f"biofed/other/update/{DEVICE}",
    "biofed",
    "",
    "biofed/ward7/update/a/b",
    "biofed/ward7/update/+",
    "biofed/ward7/status/" + "x" * 65,
]


# ----------------------------------------------------------------------------- the handlers under test
class Handlers:
    """A coordinator ingest (with an open training round) and an edge agent, both real."""

    def __init__(self, tmp_path) -> None:
        self.ingest = Ingest(TOPICS, max_bytes=1 << 20)
        self.ingest.known.add(DEVICE)
        self.agent = EdgeAgent(
            DeviceConfig(device_id=DEVICE, fleet=FLEET, recordings=(), store_path=tmp_path / "features.sqlite")
        )
        self.cases = 0
        self.ingest_outcomes: Counter[str] = Counter()
        self.agent_dispatched = 0

    def feed(self, topic: str, data: bytes) -> None:
        self.cases += 1
        outcome = self.ingest.handle(topic, data)  # must not raise, whatever the input
        assert outcome in ("accepted", "status", "secagg", "dropped"), outcome
        self.ingest_outcomes[outcome] += 1
        before = sum(self.agent.rejections.values())
        out = self.agent.handle_message(topic, data)  # must not raise either
        assert isinstance(out, list)
        if sum(self.agent.rejections.values()) == before:
            self.agent_dispatched += 1

    def check_accounting(self) -> None:
        """Every case is counted: the ingest's drop counters hold exactly its dropped cases
        (by reason; a status whose layout is refused is taken and its layout counted as
        "bad layout"), and every case the agent did not act on is in its rejection counters."""
        dropped = self.ingest.dropped
        assert sum(dropped.values()) - dropped["bad layout"] == self.ingest_outcomes["dropped"]
        assert sum(self.ingest_outcomes.values()) == self.cases
        assert sum(self.agent.rejections.values()) + self.agent_dispatched == self.cases
        assert "internal error" not in self.ingest.dropped and "internal error" not in self.agent.rejections


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    h = Handlers(tmp_path_factory.mktemp("fuzz"))
    yield h
    h.check_accounting()
    h.agent.close()


# ----------------------------------------------------------------------------- strategies
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=40)),
)
# one level of containers keeps generation cheap; nesting limits are covered by the corpus below
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), scalars, max_size=4),
)
kinds = st.one_of(st.sampled_from(sorted(PAYLOAD_TYPES)), values)


def _pack(obj) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True, strict_types=False)
    except (TypeError, ValueError, OverflowError):
        return None


@st.composite
def envelopes(draw):
    """An envelope map whose every field may be any msgpack value (or missing, or extra)."""
    env = {
        "v": draw(st.one_of(st.just(1), values)),
        "k": draw(kinds),
        "f": draw(st.one_of(st.just(FLEET), values)),
        "r": draw(st.one_of(st.integers(0, 10), values)),
        "s": draw(st.one_of(st.just(DEVICE), values)),
        "id": draw(st.one_of(st.binary(min_size=16, max_size=16), values)),
        "t": draw(st.one_of(st.floats(), values)),
        "p": draw(st.one_of(st.dictionaries(st.text(max_size=12), values, max_size=8), values)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(env)), max_size=2, unique=True)):
        del env[key]
    if draw(st.booleans()):
        env[draw(st.text(max_size=4))] = draw(values)
    return env


@st.composite
def payload_fields(draw):
    """A well-formed envelope of one kind whose payload mixes valid fields with random ones."""
    payload = draw(st.sampled_from(valid_payloads()))
    fields = {
        k: v for k, v in msgpack.unpackb(encode_message(payload, fleet=FLEET, sender=DEVICE), raw=False)["p"].items()
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields) + ["extra"]), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 3)) == 0:
            fields.pop(name, None)
        else:
            fields[name] = draw(values)
    return payload.KIND, {
        "v": 1,
        "k": payload.KIND,
        "f": FLEET,
        "r": payload.round,
        "s": DEVICE,
        "id": draw(st.binary(min_size=16, max_size=16)),
        "t": time.time(),
        "p": fields,
    }


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with 1 to 6 bytes flipped, inserted, deleted, truncated or repeated."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 7))):
        op = rng.integers(5)
        at = int(rng.integers(max(len(data), 1)))
        if op == 0 and data:
            data[at] ^= 1 << int(rng.integers(8))
        elif op == 1:
            data[at:at] = rng.bytes(int(rng.integers(1, 9)))
        elif op == 2:
            del data[at : at + int(rng.integers(1, 9))]
        elif op == 3:
            data = data[:at]
        else:
            data[at:at] = data[at : at + int(rng.integers(1, 65))]
    return bytes(data)


# ----------------------------------------------------------------------------- the fuzz runs (10 300 cases)
@fuzz(1000)
@given(env=envelopes(), topic=st.sampled_from(TOPIC_CHOICES))
@pytest.mark.slow
def test_fuzz_envelopes(handlers, env, topic):
    data = _pack(env)
    if data is not None:
        handlers.feed(topic, data)


@fuzz(1000)
@given(case=payload_fields())
@pytest.mark.slow
def test_fuzz_payload_fields_of_every_kind(handlers, case):
    kind, env = case
    data = _pack(env)
    if data is not None:
        handlers.feed(topic_for(kind), data)


MUTATIONS = 8000


@pytest.mark.slow
def test_fuzz_byte_mutations_of_valid_messages(handlers):
    """Seeded byte-level mutation of every valid message (a fifth also moved to another topic)."""
    rng = np.random.default_rng(int(os.environ.get("BIOFED_FUZZ_SEED", "11")))
    for i in range(MUTATIONS):
        topic, data = VALID[i % len(VALID)]
        if rng.integers(5) == 0:
            topic = TOPIC_CHOICES[int(rng.integers(len(TOPIC_CHOICES)))]
        handlers.feed(topic, mutate(data, rng))


@fuzz(300)
@given(data=st.binary(max_size=300), topic=st.sampled_from(TOPIC_CHOICES))
def test_fuzz_raw_bytes(handlers, data, topic):
    handlers.feed(topic, data)


def test_valid_messages_are_handled(handlers):
    """The control: the seed messages decode, and a valid status is taken."""
    for topic, data in VALID:
        decode_topic_message(TOPICS, topic, data)
    assert handlers.ingest.handle(*VALID[5]) == "status"


# ----------------------------------------------------------------------------- regression corpus
def _envelope(kind, payload: dict, sender: str = DEVICE) -> bytes:
    return msgpack.packb(
        {"v": 1, "k": kind, "f": FLEET, "r": 0, "s": sender, "id": os.urandom(16), "t": time.time(), "p": payload},
        use_bin_type=True,
    )


def _status_with_layout(layout: str) -> bytes:
    return encode_message(Status(round=0, state="online", layout=layout), fleet=FLEET, sender=DEVICE)


DEEP_LAYOUT = "[" * 50000
HUGE_INT_LAYOUT = '{"bands":[["alpha",1' + "0" * 309 + ',2]],"hop_s":1,"modalities":[],"n_mels":1,"window_s":2}'
CORPUS = {
    "list kind": (topic_for("update"), _envelope(["update"], {})),
    "dict kind": (topic_for("update"), _envelope({"k": "update"}, {})),
    "deep layout": (topic_for("status"), _status_with_layout(DEEP_LAYOUT)),
    "huge integer layout": (topic_for("status"), _status_with_layout(HUGE_INT_LAYOUT)),
    "huge integer window": (topic_for("status"), _status_with_layout('{"window_s":1' + "0" * 400 + "}")),
    "deep payload map": (topic_for("update"), _envelope("update", {"a": {"b": {"c": {"d": {}}}}})),
    "float overflow in layout": (topic_for("status"), _status_with_layout('{"window_s":1e999}')),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_regression_corpus(handlers, name):
    topic, data = CORPUS[name]
    before = sum(handlers.ingest.dropped.values())
    handlers.feed(topic, data)
    assert sum(handlers.ingest.dropped.values()) == before + 1, handlers.ingest.dropped  # counted as a rejection
    assert DEVICE not in handlers.ingest.layouts or handlers.ingest.layouts[DEVICE] not in (
        DEEP_LAYOUT,
        HUGE_INT_LAYOUT,
    )


@pytest.mark.parametrize(
    "text",
    [
        DEEP_LAYOUT,
        HUGE_INT_LAYOUT,
        '{"window_s":1' + "0" * 5000 + "}",
        "1e999",
        '"' + "x" * 70000 + '"',
        '{"a":' * 3 + "1" + "}" * 3,
        "[" * 5 + "]" * 5,
    ],
)
def test_layout_parsing_is_total(text):
    with pytest.raises(ModelFormatError):
        FeatureLayout.from_json(text)


def test_unhashable_kind_is_a_malformed_message():
    for kind in (["update"], {"k": 1}):
        with pytest.raises(MalformedMessage, match="unknown message kind"):
            decode_topic_message(TOPICS, topic_for("update"), _envelope(kind, {}))


def test_any_exception_inside_decoding_becomes_a_protocol_error():
    for data in (b"\xc1", b"\x91" * 2000 + b"\xc0", b"\xdd\xff\xff\xff\xff", b"\xc7\x05\x01\x01\x09"):
        with pytest.raises(ProtocolError):
            decode_topic_message(TOPICS, topic_for("update"), data)
