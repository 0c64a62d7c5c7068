"""biofed.datasets.recording: validation of Signal, Annotation and Recording."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import numpy as np
import pytest

from biofed.datasets import Annotation, Recording, RecordingError, Signal


def _signal(n_ch=2, n=100, kind="eeg", **overrides):
    kwargs = dict(
        data=np.zeros((n_ch, n)),
        sfreq=100.0,
        ch_names=tuple(f"c{i}" for i in range(n_ch)),
        ch_types=(kind,) * n_ch,
        units=("V",) * n_ch,
    )
    kwargs.update(overrides)
    return Signal(**kwargs)


def test_signal_is_an_immutable_float64_copy():
    source = np.arange(6, dtype=np.int32).reshape(2, 3)
    sig = _signal(n=3, data=source)
    assert sig.data.dtype == np.float64 and sig.data.flags.c_contiguous
    assert not sig.data.flags.writeable
    source[0, 0] = 99
    assert sig.data[0, 0] == 0
    assert (sig.n_channels, sig.n_samples, sig.duration) == (2, 3, 0.03)
    with pytest.raises(AttributeError):
        sig.sfreq = 5.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data": np.zeros(100)}, "must be 2-D .*got shape \\(100,\\)"),
        ({"data": np.zeros((2, 0))}, "empty"),
        ({"data": np.array([[0.0, np.nan], [0, 0]])}, "1 non-finite sample.*channel 0 at sample 1"),
        ({"data": np.array([[0.0, 0], [np.inf, 0]])}, "channel 1 at sample 0"),
        ({"data": np.array([["a", "b"], ["c", "d"]])}, "real numbers"),
        ({"sfreq": 0.0}, "sfreq must be finite and > 0"),
        ({"sfreq": float("nan")}, "sfreq must be finite"),
        ({"sfreq": "fast"}, "sfreq must be a number"),
        ({"ch_names": ("a",)}, "ch_names has 1 entries but data has 2"),
        ({"ch_names": "ab"}, "single string"),
        ({"ch_names": ("a", "a")}, "unique.*'a'"),
        ({"ch_types": ("eeg", "brain")}, "unknown channel type.*brain"),
        ({"units": ("V",)}, "units has 1 entries"),
        ({"units": ("V", 1)}, "strings only"),
    ],
)
def test_signal_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        _signal(**overrides)


def test_annotation_validation():
    a = Annotation(1, 0, "N")
    assert (a.onset, a.duration, a.label) == (1.0, 0.0, "N")
    with pytest.raises(ValueError, match="duration must be >= 0"):
        Annotation(0.0, -1.0, "x")
    with pytest.raises(ValueError, match="onset must be finite"):
        Annotation(float("nan"), 1.0, "x")
    with pytest.raises(ValueError, match="label must be a string"):
        Annotation(0.0, 1.0, 3)


def test_recording_properties_and_read_only_mapping():
    eeg = _signal(n=200)
    bio = _signal(n_ch=1, n=50, kind="ecg", sfreq=10.0)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    rec = Recording("x.edf", {"bio": bio, "eeg": eeg}, start, [Annotation(0, 1, "a")], "rest", "s1")
    assert rec.duration == 5.0  # the longest modality
    assert rec.modalities == ("eeg", "bio")
    assert rec.annotations == (Annotation(0.0, 1.0, "a"),)
    with pytest.raises(TypeError):
        rec.signals["audio"] = eeg
    assert rec.excluded_channels == ()


@pytest.mark.parametrize(
    ("signals", "kwargs", "message"),
    [
        ({}, {}, "no usable channels"),
        ({"emg": None}, {}, "unknown modality 'emg'"),
        ({"eeg": np.zeros((2, 2))}, {}, "must be a Signal"),
        ({"eeg": _signal(kind="ecg")}, {}, "modality 'eeg' accepts channel types \\('eeg',\\)"),
        ({"bio": _signal(kind="ref")}, {}, "reference and misc channels belong in excluded_channels"),
        ({"eeg": _signal()}, {"annotations": ("x",)}, "Annotation instances"),
        ({"eeg": _signal()}, {"start_time": "2020-01-01"}, "start_time must be a datetime"),
        ({"eeg": _signal()}, {"label": 1}, "label must be a string"),
        ({"eeg": _signal()}, {"subject": 2}, "subject must be a string"),
    ],
)
def test_recording_errors_name_the_source(signals, kwargs, message):
    with pytest.raises(RecordingError, match="^session_7\\.edf: .*" + message):
        Recording("session_7.edf", signals, **kwargs)


def test_recording_needs_a_source():
    with pytest.raises(ValueError, match="source must be a non-empty string"):
        Recording("", {"eeg": _signal()})


def test_recording_error_keeps_source_and_pickles():
    err = RecordingError("a/b.edf", "broken header")
    assert str(err) == "a/b.edf: broken header" and err.source == "a/b.edf" and err.reason == "broken header"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.source == "a/b.edf"
