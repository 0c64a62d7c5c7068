"""biofed.datasets.synthetic: determinism, shapes, and class information only in the band structure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import find_peaks, welch

from biofed.datasets import CLASSES, EEG_CHANNELS, make_federation, make_recording


def _relative_band(signal, lo, hi):
    f, p = welch(signal.data, signal.sfreq, nperseg=int(2 * signal.sfreq))
    total = p[:, (f >= 1) & (f < 45)].sum(axis=1)
    return (p[:, (f >= lo) & (f < hi)].sum(axis=1) / total).mean()


def _heart_rate(rec):
    ecg = rec.signals["bio"]
    x = ecg.data[0]
    peaks, _ = find_peaks(x, distance=int(0.3 * ecg.sfreq), height=0.5 * x.max())
    return 60.0 / np.diff(peaks / ecg.sfreq).mean()


def test_shapes_labels_and_types():
    rec = make_recording("rest", duration_s=4.0, subject="s1", random_state=0)
    assert rec.label == "rest" and rec.subject == "s1" and rec.source == "synthetic/s1/rest"
    assert rec.modalities == ("eeg", "audio", "bio")
    eeg, audio, bio = rec.signals["eeg"], rec.signals["audio"], rec.signals["bio"]
    assert eeg.data.shape == (19, 1000) and eeg.ch_names == EEG_CHANNELS and eeg.sfreq == 250.0
    assert audio.data.shape == (1, 32000) and audio.ch_types == ("audio",) and np.abs(audio.data).max() <= 1.0
    assert bio.data.shape == (2, 1000) and bio.ch_types == ("ecg", "ppg") and bio.units == ("V", "NU")
    assert rec.duration == pytest.approx(4.0)
    assert 5e-6 < eeg.data.std() < 5e-5  # scalp EEG amplitude in volts
    small = make_recording("arithmetic", duration_s=2.0, eeg_channels=3, eeg_sfreq=128.0, audio_sfreq=1000.0,
                           bio_sfreq=100.0, random_state=0)  # fmt: skip
    assert small.signals["eeg"].ch_names == ("Fp1", "Fp2", "F3")
    assert small.signals["audio"].data.shape == (1, 2000) and small.signals["bio"].data.shape == (2, 200)
    wide = make_recording("rest", duration_s=1.0, eeg_channels=21, random_state=0)
    assert wide.signals["eeg"].ch_names[-1] == "E21"


def test_seeded_determinism():
    a = make_recording("arithmetic", duration_s=3.0, subject="s2", random_state=5)
    b = make_recording("arithmetic", duration_s=3.0, subject="s2", random_state=np.random.default_rng(5))
    c = make_recording("arithmetic", duration_s=3.0, subject="s2", random_state=6)
    for m in a.modalities:
        np.testing.assert_array_equal(a.signals[m].data, b.signals[m].data)
        assert not np.array_equal(a.signals[m].data, c.signals[m].data)


def test_federation_is_deterministic_and_per_subject():
    fed = make_federation(3, recordings_per_class=2, duration_s=2.0, random_state=11)
    again = make_federation(3, recordings_per_class=2, duration_s=2.0, random_state=11)
    assert list(fed) == ["device00", "device01", "device02"]
    for device, recs in fed.items():
        assert [r.label for r in recs] == ["rest", "arithmetic"] * 2
        assert {r.subject for r in recs} == {device.replace("device", "subject")}
        for r, s in zip(recs, again[device]):
            assert r.source == s.source
            np.testing.assert_array_equal(r.signals["eeg"].data, s.signals["eeg"].data)
    sources = [r.source for recs in fed.values() for r in recs]
    assert len(set(sources)) == len(sources) and sources[1] == "synthetic/subject00/arithmetic/0"
    first, second = fed["device00"][0], fed["device00"][2]  # same subject and class, fresh noise
    assert not np.array_equal(first.signals["eeg"].data, second.signals["eeg"].data)


def test_classes_differ_in_band_power_not_total_power():
    fed = make_federation(5, duration_s=20.0, random_state=3)
    alpha = {c: [] for c in CLASSES}
    theta = {c: [] for c in CLASSES}
    for recs in fed.values():
        rest, arith = recs
        # Total power per channel is the subject's, identical for both classes ...
        np.testing.assert_allclose(
            rest.signals["eeg"].data.var(axis=1), arith.signals["eeg"].data.var(axis=1), rtol=1e-9
        )
        for rec in recs:
            alpha[rec.label].append(_relative_band(rec.signals["eeg"], 8, 13))
            theta[rec.label].append(_relative_band(rec.signals["eeg"], 4, 8))
    # ... while within every subject rest has more relative alpha and less theta than arithmetic,
    for a_rest, a_arith, t_rest, t_arith in zip(alpha["rest"], alpha["arithmetic"], theta["rest"], theta["arithmetic"]):
        assert a_rest > 1.1 * a_arith and t_arith > 1.05 * t_rest
    # ... by an effect no larger than the differences between subjects (realistic, not trivially separable).
    assert max(theta["rest"]) > min(theta["arithmetic"])
    assert np.mean(alpha["rest"]) < 2.5 * np.mean(alpha["arithmetic"])
    # Subjects differ in amplitude: total power alone carries subject identity, not class.
    totals = [recs[0].signals["eeg"].data.var() for recs in fed.values()]
    assert max(totals) > 1.2 * min(totals)


def test_rhythms_wax_and_wane_between_windows():
    rec = make_recording("rest", duration_s=60.0, subject="s2", random_state=4)
    eeg = rec.signals["eeg"]
    o1 = eeg.data[EEG_CHANNELS.index("O1")]
    window = int(2 * eeg.sfreq)
    alpha = []
    for start in range(0, o1.size - window + 1, window):
        f, p = welch(o1[start : start + window], eeg.sfreq, nperseg=window)
        alpha.append(p[(f >= 8) & (f < 13)].sum() / p[(f >= 1) & (f < 45)].sum())
    # alpha comes in bursts: its relative power varies between 2 s windows of one recording
    assert np.std(alpha) / np.mean(alpha) > 0.15


def test_heart_rate_is_class_dependent_and_audio_follows_the_ecg():
    for i in range(3):
        rest = make_recording("rest", duration_s=20.0, subject=f"p{i}", random_state=i)
        arith = make_recording("arithmetic", duration_s=20.0, subject=f"p{i}", random_state=i)
        hr_rest, hr_arith = _heart_rate(rest), _heart_rate(arith)
        assert 45 < hr_rest < 95 and hr_rest + 2 < hr_arith < hr_rest + 10  # mild stress: a few bpm
        # An S1 heart sound follows every R peak: loud just after it, quiet in late diastole.
        audio, bio = arith.signals["audio"], arith.signals["bio"]
        x = np.abs(audio.data[0])
        peaks, _ = find_peaks(bio.data[0], distance=int(0.3 * bio.sfreq), height=0.5 * bio.data[0].max())
        for r in peaks[1:-1] / bio.sfreq:
            after = x[int((r + 0.03) * audio.sfreq) : int((r + 0.10) * audio.sfreq)].mean()
            before = x[int((r - 0.12) * audio.sfreq) : int((r - 0.02) * audio.sfreq)].mean()
            assert after > 3 * before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label": "sleep"}, "label must be one of"),
        ({"duration_s": 0}, "duration_s must be a finite number > 0"),
        ({"eeg_channels": 0}, "eeg_channels must be an integer >= 1"),
        ({"eeg_channels": 2.5}, "eeg_channels must be an integer"),
        ({"eeg_sfreq": 32.0}, "eeg_sfreq must be a finite number >= 64"),
        ({"audio_sfreq": 100.0}, "audio_sfreq must be a finite number >= 500"),
        ({"bio_sfreq": float("nan")}, "bio_sfreq"),
        ({"subject": ""}, "subject must be a non-empty string"),
    ],
)
def test_make_recording_rejects(kwargs, message):
    kwargs = {"label": "rest", "duration_s": 1.0} | kwargs
    label = kwargs.pop("label")
    with pytest.raises(ValueError, match=message):
        make_recording(label, **kwargs)


def test_make_federation_rejects():
    with pytest.raises(ValueError, match="n_devices must be an integer >= 1"):
        make_federation(0)
    with pytest.raises(ValueError, match="recordings_per_class must be an integer >= 1"):
        make_federation(2, recordings_per_class=0)
    with pytest.raises(TypeError, match="random_state"):
        make_recording("rest", duration_s=1.0, random_state=True)
