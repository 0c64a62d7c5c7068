"""biofed.datasets.replay: order, chunk sizes, one clock for many files, labels, pacing."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict

import numpy as np
import pytest

from biofed.datasets import Annotation, Recording, Signal, make_recording, read_recording, replay
from biofed.datasets.recording import stream_channels
from biofed.datasets.replay import group_streams, label_segments


def _streams(chunks):
    out = defaultdict(list)
    for c in chunks:
        out[(c.source, c.modality)].append(c)
    return out


def _check_stream(chunks, signal, chunk_s, offset=0.0):
    """Chunks of one stream: consecutive, floor/ceil sized, each inside one clock step, lossless."""
    nominal = chunk_s * signal.sfreq
    sizes = [c.data.shape[1] for c in chunks]
    assert all(s in (math.floor(nominal), math.ceil(nominal)) for s in sizes[1:-1])
    assert all(1 <= s <= math.ceil(nominal) for s in sizes)
    np.testing.assert_array_equal(np.concatenate([c.data for c in chunks], axis=1), signal.data)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    np.testing.assert_allclose([c.t0 for c in chunks], offset + starts / signal.sfreq)
    steps = []
    for c in chunks:
        first, last = c.t0, c.t0 + (c.data.shape[1] - 1) / signal.sfreq
        step = math.floor(first / chunk_s + 1e-9)
        assert math.floor(last / chunk_s + 1e-9) == step  # never straddles a step boundary
        steps.append(step)
    assert steps == list(range(steps[0], steps[0] + len(steps)))


def test_single_recording_all_modalities():
    rec = make_recording("rest", duration_s=3.0, eeg_sfreq=250.0, audio_sfreq=1000.0, bio_sfreq=130.0, random_state=0)
    chunks = list(replay(rec, chunk_s=0.3))
    t0 = [c.t0 for c in chunks]
    assert t0 == sorted(t0)  # time order across modalities
    streams = _streams(chunks)
    assert set(streams) == {(rec.source, m) for m in ("eeg", "audio", "bio")}
    for (_, modality), stream in streams.items():
        _check_stream(stream, rec.signals[modality], 0.3)
    assert len(streams[(rec.source, "bio")]) == 10  # 3 s / 0.3 s, 130 Hz gives uneven 39-sample chunks
    assert {c.label for c in chunks} == {"rest"}
    assert all(not c.data.flags.writeable for c in chunks)
    modality_order = [c.modality for c in chunks[:3]]
    assert modality_order == ["eeg", "audio", "bio"]


def test_several_recordings_share_one_clock():
    short = make_recording("rest", duration_s=1.0, subject="a", audio_sfreq=1000.0, random_state=0)
    long = make_recording("arithmetic", duration_s=2.5, subject="b", audio_sfreq=1000.0, random_state=1)
    chunks = list(replay([short, long], chunk_s=0.5))
    assert [c.t0 for c in chunks] == sorted(c.t0 for c in chunks)
    streams = _streams(chunks)
    for (source, modality), stream in streams.items():
        rec = short if source == short.source else long
        _check_stream(stream, rec.signals[modality], 0.5)
        assert stream[0].t0 == 0.0  # every recording starts at t = 0
    first_step = [c for c in chunks if c.t0 == 0.0]
    assert [(c.source, c.modality) for c in first_step] == [
        (s.source, m) for s in (short, long) for m in ("eeg", "audio", "bio")
    ]
    assert max(c.t0 for c in chunks if c.source == short.source) < 1.0
    assert max(c.t0 for c in chunks) == pytest.approx(2.0)


def test_sequential_playback():
    a = make_recording("rest", duration_s=1.2, subject="a", audio_sfreq=1000.0, random_state=0)
    b = make_recording("arithmetic", duration_s=1.0, subject="a", audio_sfreq=1000.0, random_state=1)
    chunks = list(replay([a, b], chunk_s=0.5, sequential=True))
    assert [c.t0 for c in chunks] == sorted(c.t0 for c in chunks)
    streams = _streams(chunks)
    assert streams[(b.source, "eeg")][0].t0 == pytest.approx(1.2)
    np.testing.assert_array_equal(
        np.concatenate([c.data for c in streams[(b.source, "eeg")]], axis=1), b.signals["eeg"].data
    )
    # the step [1.0, 1.5) holds a's last 0.2 s and b's first 0.3 s
    assert [c.data.shape[1] for c in chunks if c.modality == "eeg" and 1.0 <= c.t0 < 1.5] == [50, 75]
    assert {c.label for c in chunks if c.source == b.source} == {"arithmetic"}


def test_labels_follow_annotations():
    sig = Signal(np.zeros((1, 100)), 10.0, ("Cz",), ("eeg",), ("V",))
    rec = Recording(
        "ann.edf", {"eeg": sig}, label="whole",
        annotations=(Annotation(2.0, 3.0, "T1"), Annotation(4.0, 2.0, "T2"), Annotation(7.0, 0.0, "N"),
                     Annotation(8.0, 1.0, "BAD_gap")),
    )  # fmt: skip
    labels = [(c.t0, c.label) for c in replay(rec, chunk_s=1.0)]
    assert labels == [(0.0, "whole"), (1.0, "whole"), (2.0, "T1"), (3.0, "T1"), (4.0, "T2"), (5.0, "T2"),
                      (6.0, "whole"), (7.0, "whole"), (8.0, "whole"), (9.0, "whole")]  # fmt: skip


def test_real_recordings_on_one_clock(shared_datasets):
    eeg = read_recording(shared_datasets / "eegbci" / "S001R04.edf")
    ecg = read_recording(shared_datasets / "wfdb" / "a103l.hea")
    chunks = list(replay([eeg, ecg], chunk_s=1.0))
    streams = _streams(chunks)
    _check_stream(streams[(eeg.source, "eeg")], eeg.signals["eeg"], 1.0)
    _check_stream(streams[(ecg.source, "bio")], ecg.signals["bio"], 1.0)
    assert [c.t0 for c in chunks] == sorted(c.t0 for c in chunks)
    eeg_labels = [c.label for c in streams[(eeg.source, "eeg")]]
    assert eeg_labels[:6] == ["T0", "T0", "T0", "T0", "T0", "T2"]  # T0 until 4.2 s, T2 from 4.2 s
    assert set(eeg_labels) == {"T0", "T1", "T2"}
    assert {c.label for c in streams[(ecg.source, "bio")]} == {"false_alarm"}


def test_speed_paces_the_stream():
    rec = make_recording("rest", duration_s=1.0, audio_sfreq=1000.0, random_state=0)
    speed, chunk_s = 4.0, 0.25
    start = time.monotonic()
    arrivals = [(c.t0, time.monotonic() - start) for c in replay(rec, speed=speed, chunk_s=chunk_s)]
    for t0, elapsed in arrivals:  # a step is delivered once it has been "recorded"
        step_end = (math.floor(t0 / chunk_s + 1e-6) + 1) * chunk_s
        assert elapsed >= step_end / speed - 1e-3
    assert arrivals[-1][1] >= rec.duration / speed - 1e-3


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ([], {}, ValueError, "at least one Recording"),
        (["x.edf"], {}, TypeError, "Recording objects, got str"),
        (None, {"speed": -1.0}, ValueError, "speed must be finite and >= 0"),
        (None, {"speed": float("inf")}, ValueError, "speed must be finite"),
        (None, {"chunk_s": 0.0}, ValueError, "chunk_s must be finite and > 0"),
        (None, {"chunk_s": "x"}, ValueError, "must be numbers"),
    ],
)
def test_replay_rejects(args, kwargs, error, message):
    if args is None:
        args = [make_recording("rest", duration_s=1.0, audio_sfreq=1000.0, random_state=0)]
    with pytest.raises(error, match=message):
        replay(args, **kwargs)


def test_replay_is_lazy_and_restartable():
    rec = dataclasses.replace(make_recording("rest", duration_s=1.0, audio_sfreq=1000.0, random_state=0), source="r")
    first = [c.t0 for c in replay(rec)]
    assert first == [c.t0 for c in replay(rec)]
    assert len(first) == 3 * 4


def _only(rec: Recording, *modalities: str, subject: str | None = "S1") -> Recording:
    """``rec`` with only ``modalities`` (one file of a session) and the given subject."""
    return dataclasses.replace(rec, signals={m: rec.signals[m] for m in modalities}, subject=subject)


def test_label_segments_match_the_labels_replay_gives_its_chunks():
    rec = make_recording("rest", duration_s=6.0, random_state=0)
    rec = dataclasses.replace(
        rec,
        annotations=(
            Annotation(1.0, 2.0, "arithmetic"),
            Annotation(2.0, 0.5, "BAD_gap"),
            Annotation(2.5, 0.0, "beat"),
            Annotation(4.0, 1.0, "arithmetic"),
        ),
    )
    segments = label_segments(rec)
    assert segments == [(0.0, "rest"), (1.0, "arithmetic"), (3.0, "rest"), (4.0, "arithmetic"), (5.0, "rest")]
    starts = [start for start, _ in segments]
    for chunk in replay(rec, chunk_s=0.25):
        assert chunk.label == segments[np.searchsorted(starts, chunk.t0, side="right") - 1][1]


def test_group_streams_joins_the_files_of_one_session():
    rec = make_recording("rest", duration_s=1.0, subject="S1", random_state=0)
    edf, wav = _only(rec, "eeg", "bio"), _only(rec, "audio", subject=None)
    other = _only(make_recording("rest", duration_s=1.0, random_state=1), "eeg", subject="S2")
    again = _only(rec, "eeg")
    items = [("s1.edf", edf), ("s1.wav", wav), ("s2.edf", other), ("s1b.edf", again), ("s1b.wav", wav)]
    streams = [[key for key, _ in stream] for stream in group_streams(items)]
    assert streams == [["s1.edf", "s1.wav"], ["s2.edf"], ["s1b.edf", "s1b.wav"]]
    # A modality outside the collection never splits a stream; an unknown subject joins any.
    assert [[k for k, _ in s] for s in group_streams([("a", edf), ("b", again)], ("audio",))] == [["a", "b"]]
    assert list(group_streams([])) == []


def test_group_streams_is_lazy():
    rec = make_recording("rest", duration_s=1.0, subject="S1", random_state=0)

    def read():
        yield "first", rec
        yield "second", rec
        raise AssertionError("read past the second stream's first recording")

    first = next(group_streams(read()))
    assert [key for key, _ in first] == ["first"]


def test_stream_channels_of_a_multimodal_session():
    rec = make_recording("rest", duration_s=1.0, eeg_channels=3, random_state=0)
    channels = stream_channels([_only(rec, "eeg"), _only(rec, "audio", "bio")])
    assert set(channels) == {"eeg", "audio", "bio"}
    for modality, signal in rec.signals.items():
        assert channels[modality] == (signal.sfreq, signal.ch_names, signal.ch_types)
