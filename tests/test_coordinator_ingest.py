"""coordinator.ingest: every inbound message decoded, admitted, deduplicated and routed, or
dropped with its reason, fed message by message without a broker (the clock is injected)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from biofed.coordinator.ingest import AllowList, Ingest, OpenRound
from biofed.protocol import Sketch, Status, Topics, Update, UpdateMetrics, encode_message, offline_status

FLEET = "ward7"
TOPICS = Topics(FLEET)


def _update_bytes(device="pi-00", round=5, basis_version=1, size=10, fleet=FLEET, message_id=None, **kwargs):
    fields = dict(
        round=round,
        basis_version=basis_version,
        delta=np.full(size, 0.01),
        n_examples=3,
        clipped=False,
        metrics=UpdateMetrics(loss=0.1, n_windows=3, rss_bytes=1, cpu_time_s=0),
    )
    fields.update(kwargs)
    return encode_message(Update(**fields), fleet=fleet, sender=device, message_id=message_id)


def test_ingest_drop_reasons(caplog):
    now = [1000.0]
    ingest = Ingest(TOPICS, max_bytes=4096, clock=lambda: now[0])
    status = encode_message(Status(round=0, state="online"), fleet=FLEET, sender="pi-00")
    assert ingest.handle(TOPICS.status("pi-00"), status) == "status" and ingest.online == {"pi-00"}
    topic = TOPICS.update("pi-00")
    assert ingest.handle(topic, _update_bytes()) == "dropped"  # no open round
    ingest.open = OpenRound(
        round=5,
        phase="train",
        participants=frozenset({"pi-00"}),
        deadline=1010.0,
        basis_version=1,
        n_params=10,
        need_norm_bit=True,
    )
    cases = [
        (TOPICS.update("pi-01"), _update_bytes("pi-01"), "unknown device"),
        (topic, _update_bytes(round=4), "wrong round"),
        (topic, _update_bytes(basis_version=2), "basis version"),
        (topic, _update_bytes(size=11, norm_bit=1), "bad payload"),
        (topic, _update_bytes(), "bad payload"),  # adaptive clipping needs the norm bit
        (topic, _update_bytes(device="pi-01"), "SenderMismatch"),
        (topic, b"\xc1", "MalformedMessage"),
        (topic, b"x" * 5000, "MessageTooLarge"),
        (topic, _update_bytes(fleet="other"), "WrongFleet"),
        (
            TOPICS.sketch("pi-00"),
            encode_message(
                Sketch(round=5, basis_version=1, phase="moments", statistic=np.ones(4), clipped=False, n_features=2),
                fleet=FLEET,
                sender="pi-00",
            ),
            "wrong kind",
        ),
    ]
    with caplog.at_level(logging.WARNING):
        for t, data, reason in cases:
            before = ingest.dropped[reason]
            assert ingest.handle(t, data) == "dropped", reason
            assert ingest.dropped[reason] == before + 1, reason
            assert reason in caplog.text
    good = _update_bytes(norm_bit=1, message_id=b"a" * 16)
    assert ingest.handle(topic, good) == "accepted"
    assert ingest.handle(topic, good) == "dropped" and ingest.dropped["duplicate"] == 1
    assert ingest.handle(topic, _update_bytes(norm_bit=1)) == "dropped" and ingest.dropped["second reply"] == 1
    # late and not-selected
    ingest.open = OpenRound(
        round=6, phase="train", participants=frozenset({"pi-01"}), deadline=1010.0, basis_version=1, n_params=10
    )
    assert ingest.handle(topic, _update_bytes(round=6)) == "dropped" and ingest.dropped["not selected"] == 1
    now[0] = 1011.0
    assert ingest.handle(topic, _update_bytes(round=6)) == "dropped" and ingest.dropped["late"] == 1
    # sketches of another feature count than the first accepted one
    ingest.handle(TOPICS.status("pi-01"), encode_message(Status(round=0, state="idle"), fleet=FLEET, sender="pi-01"))
    ingest.open = OpenRound(
        round=7, phase="moments", participants=frozenset({"pi-00", "pi-01"}), deadline=2000.0, basis_version=0
    )
    for device, d, outcome in (("pi-00", 2, "accepted"), ("pi-01", 3, "dropped")):
        data = encode_message(
            Sketch(round=7, basis_version=0, phase="moments", statistic=np.ones(2 * d), clipped=False, n_features=d),
            fleet=FLEET,
            sender=device,
        )
        assert ingest.handle(TOPICS.sketch(device), data) == outcome
    offline = offline_status(fleet=FLEET, device_id="pi-01")
    assert ingest.handle(TOPICS.status("pi-01"), offline) == "status" and ingest.online == {"pi-00"}


def _write_allow_list(path: Path, devices: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"fleet": FLEET, "devices": list(devices)}))
    tmp.replace(path)  # as biofed provision writes it: a new file, atomically


def test_ingest_drops_devices_not_on_the_allow_list_and_follows_revocation(tmp_path, caplog):
    path = tmp_path / "allowed_devices.json"
    _write_allow_list(path, ["pi-00", "pi-01"])
    ingest = Ingest(TOPICS, max_bytes=4096, allowed=AllowList(path))
    for device in ("pi-00", "pi-01", "pi-99"):
        ingest.handle(
            TOPICS.status(device), encode_message(Status(round=0, state="online"), fleet=FLEET, sender=device)
        )
    assert ingest.online == {"pi-00", "pi-01"} and ingest.dropped["not admitted"] == 1
    ingest.open = OpenRound(
        round=5,
        phase="train",
        participants=frozenset({"pi-00", "pi-01", "pi-99"}),
        deadline=time.time() + 60,
        basis_version=1,
        n_params=10,
    )
    assert ingest.handle(TOPICS.update("pi-99"), _update_bytes("pi-99")) == "dropped"
    assert ingest.dropped["not admitted"] == 2
    assert ingest.handle(TOPICS.update("pi-00"), _update_bytes("pi-00")) == "accepted"

    _write_allow_list(path, ["pi-00"])  # biofed provision revoke pi-01
    with caplog.at_level(logging.INFO):
        ingest.refresh_allowed()
    assert ingest.online == {"pi-00"} and "pi-01" not in ingest.known
    assert "removed from the allow list" in caplog.text
    assert ingest.handle(TOPICS.update("pi-01"), _update_bytes("pi-01")) == "dropped"
    assert ingest.dropped["not admitted"] == 3

    path.write_text("{not json")  # a broken edit keeps the previous list
    with caplog.at_level(logging.ERROR):
        ingest.refresh_allowed()
    assert "keeping the previous allow list of 1 devices" in caplog.text
    assert ingest.allowed.devices == {"pi-00"} and ingest.online == {"pi-00"}
