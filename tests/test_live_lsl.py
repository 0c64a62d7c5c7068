"""datasets.live and the live paths built on it, on real LSL streams over loopback.

liblsl runs for real: :class:`LslPlayer` publishes outlets, :class:`LslSource` resolves and
pulls them. ``LSLAPICFG`` points to tests/lsl_api.cfg (set in conftest.py), so discovery and
data stay on this machine; ``test_lsl_traffic_stays_on_loopback`` checks the sockets.
"""

from __future__ import annotations

import ipaddress
import math
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from biofed.apps.cli import cli
from biofed.apps.federation import AgentThreads, broker_settings
from biofed.config import DeviceConfig
from biofed.datasets import Annotation, Recording, make_recording
from biofed.datasets.live import BadSpans, Gap, LslError, LslPlayer, LslSource
from biofed.edge.agent import AgentState, EdgeAgent
from biofed.edge.continuous import ContinuousIngestion
from brokers import amqtt_broker  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

_counter = iter(range(10_000))


def unique(prefix: str) -> str:
    """A stream name no other test (or leftover outlet) uses."""
    return f"{prefix}{next(_counter)}x{int(time.time() * 1000) % 100000}"


def synthetic(label: str = "rest", seconds: float = 30.0, **kwargs) -> Recording:
    return make_recording(label, duration_s=seconds, eeg_channels=4, audio_sfreq=2000.0, random_state=1, **kwargs)


def collect(source: LslSource, seconds: float) -> tuple[dict, list]:
    chunks, gaps = {}, []
    for event in source.chunks(seconds=seconds):
        if isinstance(event, Gap):
            gaps.append(event)
        else:
            chunks.setdefault(event.modality, []).append(event)
    return chunks, gaps


@pytest.mark.slow
def test_source_aligns_every_modality_on_the_recordings_clock_with_marker_labels():
    rec = synthetic()
    name = unique("align")
    player = LslPlayer(rec, name).start()
    source = LslSource(name, resolve_timeout_s=2.0)
    try:
        specs = source.open()
        assert set(specs) == {"eeg", "audio", "bio"}
        assert specs["eeg"].ch_names == rec.signals["eeg"].ch_names
        assert specs["bio"].ch_types == rec.signals["bio"].ch_types
        chunks, gaps = collect(source, 6.0)
    finally:
        source.close()
        player.stop()
    assert not gaps
    starts = {}
    for modality, parts in chunks.items():
        sig = rec.signals[modality]
        data = np.concatenate([c.data for c in parts], axis=1)
        assert data.shape[1] == round(6.0 * sig.sfreq)  # exactly the session's samples, no more
        # the samples are a contiguous stretch of the recording: find where it starts
        reference = sig.data[0]
        first = int(np.argmin(np.abs(reference - data[0, 0]) + np.abs(np.roll(reference, -1) - data[0, 1])))
        tol = 1e-6 * np.abs(sig.data).max() if modality == "audio" else 0.0  # audio travels as float32
        np.testing.assert_allclose(data, sig.data[:, first : first + data.shape[1]], atol=tol, rtol=0)
        starts[modality] = first / sig.sfreq
        assert [c.t0 for c in parts] == sorted(c.t0 for c in parts)
        assert {c.label for c in parts} == {"rest"}
    # every stream starts at the same recording time, within one sample period of the slowest
    assert max(starts.values()) - min(starts.values()) <= 1.0 / 250.0 + 1e-9


@pytest.mark.slow
def test_a_dropped_stream_is_reconnected_and_the_gap_reported():
    rec = synthetic(seconds=40.0)
    name = unique("gap")
    first = LslPlayer(rec, name).start()
    source = LslSource(name, resolve_timeout_s=2.0, stall_s=0.5, reconnect_s=1.0)
    events: list = []
    done = threading.Event()
    started = threading.Event()

    def consume():
        for event in source.chunks(done, seconds=9.0):
            started.set()
            events.append(event)

    second = None
    try:
        source.open()
        consumer = threading.Thread(target=consume)
        consumer.start()
        assert started.wait(30), "the session did not start"
        time.sleep(2.0)
        first.stop()  # the device disappears...
        time.sleep(2.0)
        second = LslPlayer(rec, name).start()  # ...and comes back
        consumer.join(timeout=40)
    finally:
        done.set()
        source.close()
        first.stop()
        if second is not None:
            second.stop()
    gaps = [e for e in events if isinstance(e, Gap)]
    assert len(gaps) == 1 and source.gaps == 1
    assert gaps[0].missing_s > 1.0
    for modality, sig in rec.signals.items():
        parts = [e for e in events if not isinstance(e, Gap) and e.modality == modality]
        before = [c for c in parts if c.t0 < gaps[0].t]
        after = [c for c in parts if c.t0 >= gaps[0].t]
        assert before and after, f"{modality}: no samples on one side of the gap"
        assert after[0].t0 == pytest.approx(gaps[0].t)
        # the session ran to its end: the samples after the gap fill it up to 9 s
        n_after = sum(c.data.shape[1] for c in after)
        assert n_after == math.ceil((9.0 - gaps[0].t) * sig.sfreq - 1e-7)
        # every sample pulled is delivered once: each side is one contiguous stretch of the recording
        tol = 1e-6 * np.abs(sig.data).max() if modality == "audio" else 0.0
        for side in (before, after):
            data = np.concatenate([c.data for c in side], axis=1)
            ref = sig.data[0]
            start = int(np.argmin(np.abs(ref - data[0, 0]) + np.abs(np.roll(ref, -1) - data[0, 1])))
            np.testing.assert_allclose(data, sig.data[:, start : start + data.shape[1]], atol=tol, rtol=0)


def _outlet(name: str, sfreq: float = 250.0):
    from mne_lsl import lsl

    return lsl.StreamOutlet(lsl.StreamInfo(name, "EEG", 2, sfreq, "float64", "dev"), chunk_size=1)


def test_a_stream_moves_only_to_a_new_instance_unless_its_connection_is_lost():
    from biofed.datasets.live import StreamSpec, _Inlet

    name = unique("instance")
    old, new, other_rate = _outlet(name), _outlet(name), _outlet(name, sfreq=500.0)
    old_info, new_info, other_info = (o.get_sinfo() for o in (old, new, other_rate))
    assert len({old_info.uid, new_info.uid, other_info.uid}) == 3
    item = _Inlet(StreamSpec(name, "eeg", 250.0, ("a", "b"), ("eeg", "eeg"), (0, 1)), old_info, inlet=None)
    # the open instance is still published: the inlet keeps it
    assert LslSource._new_instance(item, [old_info, new_info]) is None
    assert LslSource._new_instance(item, [new_info]).uid == new_info.uid  # the device restarted
    assert LslSource._new_instance(item, [other_info]) is None  # not the same stream
    assert LslSource._new_instance(item, []) is None
    item.lost = True  # the connection broke: any instance of the stream will do, the same one too
    assert LslSource._new_instance(item, [old_info]).uid == old_info.uid


def test_a_replacement_inlet_skips_the_samples_the_old_one_delivered():
    from mne_lsl import lsl

    from biofed.datasets.live import StreamSpec, _Inlet

    name = unique("replace")
    outlet = _outlet(name)
    info = lsl.resolve_streams(timeout=5.0, name=name)[0]
    inlet = LslSource._open_inlet(lsl, info)
    item = _Inlet(StreamSpec(name, "eeg", 250.0, ("a", "b"), ("eeg", "eeg"), (0, 1)), info, inlet)
    source = LslSource(name)
    try:
        time.sleep(0.5)  # the inlet's connection is up before the samples are pushed
        stamps = lsl.local_clock() + np.arange(10) / 250.0
        outlet.push_chunk(np.arange(20, dtype=np.float64).reshape(10, 2), timestamp=stamps)
        item.after_stamp = float(stamps[4])  # the old inlet delivered samples 0-4 already
        deadline = time.monotonic() + 10
        while sum(ts.size for _, ts in item.pending) < 5 and time.monotonic() < deadline:
            source._pull(item)
            time.sleep(0.05)
    finally:
        inlet.close_stream()
    data = np.concatenate([d for d, _ in item.pending], axis=1)
    np.testing.assert_array_equal(data, np.arange(10, 20, dtype=np.float64).reshape(5, 2).T)
    assert item.after_stamp is None and item.last_stamp == pytest.approx(stamps[-1], abs=1e-3)


@pytest.mark.slow
def test_bad_markers_open_spans_that_drop_windows():
    from biofed.edge.continuous import LiveFeatures
    from biofed.edge.pipeline import PipelineConfig
    from biofed.model import FeatureLayout

    rec = synthetic(seconds=40.0)
    rec = Recording(
        signals=rec.signals,
        annotations=(Annotation(14.0, 2.0, "BAD_motion"),),
        label="rest",
        subject=rec.subject,
        source="bad.fif",
    )
    name = unique("bad")
    player = LslPlayer(rec, name).start()
    source = LslSource(name, resolve_timeout_s=2.0)
    config = PipelineConfig()
    try:
        source.open()
        features = LiveFeatures(config, FeatureLayout.from_channels(source.channels(), config), source.bad_spans)
        rows = []
        for event in source.chunks(seconds=24.0):
            if not isinstance(event, Gap) and event.modality == "eeg" and not rows and event.t0 == 0:
                first_sample = event.data[0, 0]
            rows += features.feed(event)
    finally:
        source.close()
        player.stop()
    spans = source.bad_spans.spans
    assert len(spans) == 1 and spans[0][1] is not None
    assert spans[0][1] - spans[0][0] == pytest.approx(2.0, abs=0.02)
    # the span sits where the annotation is, on the session clock (session 0 = this recording sample)
    start = int(np.flatnonzero(rec.signals["eeg"].data[0] == first_sample)[0]) / rec.signals["eeg"].sfreq
    assert spans[0][0] == pytest.approx(14.0 - start, abs=0.02)
    onset, end = spans[0]
    assert rows and all(r.t + config.window_s <= onset or r.t >= end for r in rows)
    assert features.rejected_bad in (3, 4)  # windows of 2 s every 1 s touching a 2 s span
    assert {r.label for r in rows} == {"rest"}


def test_bad_spans_overlap_rule():
    spans = BadSpans()
    spans.add(3.0, 5.0)
    assert spans.overlaps(1.5, 3.5) and spans.overlaps(4.0, 6.0)
    assert not spans.overlaps(1.0, 3.0) and not spans.overlaps(5.0, 7.0)
    spans.open(10.0)
    assert spans.overlaps(100.0, 102.0)
    spans.close(11.0)
    assert not spans.overlaps(11.0, 13.0)
    spans.forget_before(6.0)
    assert spans.spans == [[10.0, 11.0]]


@pytest.mark.slow
def test_missing_stream_is_a_clear_error():
    source = LslSource(unique("absent"), resolve_timeout_s=0.3)
    with pytest.raises(LslError, match="no LSL data stream named"):
        source.open()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(names=()), "non-empty stream names"),
        (dict(names="x", gap_tolerance_s=0), "gap_tolerance_s"),
        (dict(names="x", poll_s=float("nan")), "poll_s"),
    ],
)
def test_bad_source_settings_are_clear_errors(kwargs, match):
    names = kwargs.pop("names")
    with pytest.raises(ValueError, match=match):
        LslSource(names, **kwargs)


def test_player_refuses_bad_settings():
    with pytest.raises(ValueError, match="speed"):
        LslPlayer(synthetic(seconds=2.0), "x", speed=0)
    with pytest.raises(ValueError, match="name"):
        LslPlayer(synthetic(seconds=2.0), "")


@pytest.mark.slow
def test_play_and_replay_lsl_commands_compute_features_over_loopback(tmp_path):
    from biofed.apps.federation import write_synthetic_devices

    files = write_synthetic_devices(tmp_path, 1, duration_s=40.0, random_state=5)["device00"]
    fif = next(f for f in files if f.suffix == ".fif")
    name = unique("cli")
    player = subprocess.Popen(
        [sys.executable, "-m", "biofed", "play", str(fif), "--lsl", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    out = tmp_path / "live.npz"
    try:
        assert player.stdout.readline().startswith("playing 1 file(s) as LSL streams")  # outlets exist now
        result = CliRunner().invoke(
            cli, ["replay", "--lsl", name, "--seconds", "8", "--timeout", "10", "--no-progress", "--out", str(out)]
        )
    finally:
        player.terminate()
        player.wait(timeout=30)
    assert result.exit_code == 0, result.output
    assert "windows processed: 7" in result.output
    assert "latency per window (sample timestamp -> row)" in result.output
    with np.load(out) as archive:
        assert archive["features"].shape[0] == 7
        assert set(archive["labels"]) == {fif.stem.split("_")[2]}
        assert np.all(np.diff(archive["times"]) == pytest.approx(1.0))
        offline = CliRunner().invoke(cli, ["replay", str(fif), "--no-progress", "--out", str(tmp_path / "f.npz")])
        assert offline.exit_code == 0, offline.output
        with np.load(tmp_path / "f.npz") as files_archive:  # same layout as the file path
            assert str(files_archive["layout_hash"]) == str(archive["layout_hash"])
            np.testing.assert_array_equal(files_archive["feature_names"], archive["feature_names"])


def test_replay_needs_files_or_lsl_with_seconds():
    runner = CliRunner()
    assert "one of the two" in runner.invoke(cli, ["replay"]).output
    assert "--lsl needs --seconds" in runner.invoke(cli, ["replay", "--lsl", "x"]).output


@pytest.mark.slow
def test_agent_ingests_a_live_source_and_keeps_its_windows(tmp_path):
    name = unique("agent")
    config = DeviceConfig(
        device_id="pi-01",
        fleet="ward7",
        store_path=tmp_path / "features.sqlite",
        sources=[{"kind": "lsl", "name": name, "resolve_timeout_s": 2.0}],
        warmup=False,
    )
    agent = EdgeAgent(config)
    player = LslPlayer(synthetic("arithmetic", seconds=60.0), name).start()
    stop = threading.Event()
    ingestion = ContinuousIngestion(agent)
    try:
        ingestion.start(stop)
        deadline = time.monotonic() + 60
        while agent.n_rows < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        ingestion.join()
        player.stop()
    X, labels, t = agent.store.read()
    agent.close()
    assert X.shape[0] >= 5 and X.shape[1] == 141 - (141 - X.shape[1])
    assert set(labels) == {"arithmetic"}
    assert np.all(np.diff(t) == pytest.approx(1.0))
    assert '"eeg"' in agent.layout_json


def test_watched_folder_is_ingested_without_restart(tmp_path):
    from biofed.apps.federation import write_synthetic_devices

    source_files = write_synthetic_devices(tmp_path / "made", 1, duration_s=8.0, random_state=2)["device00"]
    watched = tmp_path / "incoming"
    watched.mkdir()
    config = DeviceConfig(
        device_id="pi-01",
        fleet="ward7",
        store_path=tmp_path / "features.sqlite",
        sources=[{"kind": "file", "path": watched, "watch": True}],
        warmup=False,
    )
    agent = EdgeAgent(config)
    stop = threading.Event()
    ingestion = ContinuousIngestion(agent, watch_interval_s=0.2)
    try:
        ingestion.start(stop)
        time.sleep(0.5)
        assert agent.n_rows == 0
        fif = next(f for f in source_files if f.suffix == ".fif")
        shutil.copy(fif, watched / fif.name)
        deadline = time.monotonic() + 60
        while agent.n_rows == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        ingestion.join()
    assert agent.n_rows == 7  # 8 s: windows of 2 s every 1 s
    assert str(watched / fif.name) in agent.store.ingested_paths()
    agent.close()


@pytest.mark.slow
def test_lsl_traffic_stays_on_loopback():
    """Every socket liblsl opens while resolving and streaming talks to loopback only."""
    name = unique("net")
    player = LslPlayer(synthetic(seconds=10.0), name).start()
    source = LslSource(name, resolve_timeout_s=1.0)
    try:
        source.open()
        collect(source, 1.0)
        connections = psutil.Process().net_connections(kind="inet")
    finally:
        source.close()
        player.stop()
    remote = {c.raddr.ip for c in connections if c.raddr}
    assert remote, "expected LSL data connections"
    assert all(ipaddress.ip_address(ip).is_loopback for ip in remote), remote


def test_agent_with_an_lsl_source_answers_tasks_over_mqtt(amqtt_broker, tmp_path):
    """The whole device: LSL player -> agent.run (warm-up, live ingestion, MQTT) -> a sketch of
    the live windows answered to the coordinator, then a clean stop."""
    from biofed.mqtt import MqttClient
    from biofed.protocol import Task, Topics, decode_topic_message, encode_message

    name = unique("mqtt")
    topics = Topics("ward7")
    broker = broker_settings(amqtt_broker, "3.1.1")
    config = DeviceConfig(
        device_id="pi-01",
        fleet="ward7",
        store_path=tmp_path / "features.sqlite",
        broker=broker,
        sources=[{"kind": "lsl", "name": name, "resolve_timeout_s": 2.0}],
    )
    agent = EdgeAgent(config)
    player = LslPlayer(synthetic("rest", seconds=60.0), name, repeat=10).start()  # outlives a cold warm-up
    coordinator = MqttClient(amqtt_broker.host, amqtt_broker.port, "coordinator", protocol="3.1.1").connect()
    coordinator.subscribe(topics.all_devices("status"))
    coordinator.subscribe(topics.all_devices("sketch"))
    try:
        with AgentThreads([agent]):
            deadline = time.monotonic() + 500
            while agent.n_rows < 4 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert agent.n_rows >= 4
            task = Task(
                round=1,
                model=np.empty(0),
                basis_version=0,
                classes=("rest", "arithmetic"),
                deadline=time.time() + 60,
                phase="moments",
                clip_norm=1e6,
            )
            coordinator.publish(topics.task, encode_message(task, fleet="ward7", sender="coordinator"))
            sketch = None
            while sketch is None and time.monotonic() < deadline:
                inbound = coordinator.receive(timeout_s=0.5)
                if inbound is not None:
                    message = decode_topic_message(topics, inbound.topic, inbound.payload)
                    sketch = message.payload if message.kind == "sketch" else None
            assert sketch is not None and sketch.n_features == agent.n_features
    finally:
        player.stop()
        coordinator.close()
    assert agent.state is AgentState.STOPPED  # the loop ended cleanly
