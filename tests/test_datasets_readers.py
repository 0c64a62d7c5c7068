"""biofed.datasets.readers: every shared recording, synthetic twins of each format, corrupt files."""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from pathlib import Path

import mne
import numpy as np
import pytest
from scipy.io import wavfile

from biofed.datasets import (
    SUPPORTED_EXTENSIONS,
    RecordingError,
    eegmat_subject_and_label,
    infer_channel_type,
    read_recording,
)

with warnings.catch_warnings():  # wfdb runs deprecated pandas calls at import time
    warnings.simplefilter("ignore", DeprecationWarning)
    import wfdb

# wfdb's writers use deprecated pandas calls (wfdb's business, not ours)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:wfdb")

EEGMAT_CHANNELS = [
    f"EEG {name}"
    for name in (
        "Fp1",
        "Fp2",
        "F3",
        "F4",
        "F7",
        "F8",
        "T3",
        "T4",
        "C3",
        "C4",
        "T5",
        "T6",
        "P3",
        "P4",
        "O1",
        "O2",
        "Fz",
        "Cz",
        "Pz",
    )
]


def _named(path: Path) -> str:
    """pytest.raises(match=...) pattern: the message must name the file."""
    return re.escape(str(path))


# ----------------------------------------------------------------------------------------
# hand-written writers (synthetic twins of the real files; no export backend needed)
# ----------------------------------------------------------------------------------------
def write_edf(path, data_v, sfreq, labels, annotations=(), record_s=1.0, bdf=False):
    """Minimal EDF+C (16-bit) or BDF+C (24-bit) writer: samples in µV, one annotation signal."""
    data_uv = np.asarray(data_v) * 1e6
    n_ch, n = data_uv.shape
    spr = int(round(sfreq * record_s))
    assert n % spr == 0, "test writer needs whole data records"
    n_rec, width = n // spr, (3 if bdf else 2)
    dmin, dmax = (-(2**23), 2**23 - 1) if bdf else (-32768, 32767)
    phys = [float(math.ceil(np.abs(row).max() + 1.0)) for row in data_uv]
    tals = [f"+{k * record_s:g}\x14\x14\x00" for k in range(n_rec)]
    tals[0] += "".join(f"+{o:g}\x15{d:g}\x14{text}\x14\x00" for o, d, text in annotations)
    ann_spr = max(len(t.encode()) for t in tals) // width + 2
    ns = n_ch + 1
    labels = list(labels) + ["BDF Annotations" if bdf else "EDF Annotations"]
    head = (b"\xffBIOSEMI" if bdf else b"0".ljust(8)) + b"X X X X".ljust(80) + b"Startdate 01-JAN-2020 X X X".ljust(80)
    head += b"01.01.2000.00.00" + str(256 * (ns + 1)).encode().ljust(8) + (b"BDF+C" if bdf else b"EDF+C").ljust(44)
    head += str(n_rec).encode().ljust(8) + f"{record_s:g}".encode().ljust(8) + str(ns).encode().ljust(4)
    fields = [
        [lab.encode().ljust(16) for lab in labels],
        [b"".ljust(80)] * ns,
        [b"uV".ljust(8)] * n_ch + [b"".ljust(8)],
        [f"{-p:g}".encode().ljust(8) for p in phys] + [b"-1".ljust(8)],
        [f"{p:g}".encode().ljust(8) for p in phys] + [b"1".ljust(8)],
        [str(dmin).encode().ljust(8)] * ns,
        [str(dmax).encode().ljust(8)] * ns,
        [b"".ljust(80)] * ns,
        [str(spr).encode().ljust(8)] * n_ch + [str(ann_spr).encode().ljust(8)],
        [b"".ljust(32)] * ns,
    ]
    head += b"".join(b"".join(f) for f in fields)
    assert len(head) == 256 * (ns + 1)
    gain = np.array(phys)[:, None] * 2 / (dmax - dmin)
    digital = np.clip(np.round((data_uv + np.array(phys)[:, None]) / gain + dmin), dmin, dmax).astype("<i4")
    as_bytes = digital.view(np.uint8).reshape(n_ch, n, 4)[:, :, :width]  # little-endian low bytes
    body = b""
    for k in range(n_rec):
        for ch in range(n_ch):
            body += as_bytes[ch, k * spr : (k + 1) * spr].tobytes()
        body += tals[k].encode().ljust(width * ann_spr, b"\x00")
    Path(path).write_bytes(head + body)
    return gain[:, 0] * 1e-6  # quantisation step per channel, volts


def write_brainvision(vhdr: Path, data_v, sfreq, labels, markers=()):
    """Minimal BrainVision writer (float32 multiplexed, µV) with stimulus markers (sample, name)."""
    stem = vhdr.stem
    (vhdr.parent / f"{stem}.eeg").write_bytes((np.asarray(data_v).T * 1e6).astype("<f4").tobytes())
    channels = "\n".join(f"Ch{i + 1}={lab},,1,µV" for i, lab in enumerate(labels))
    vhdr.write_text(
        "Brain Vision Data Exchange Header File Version 1.0\n\n[Common Infos]\nCodepage=UTF-8\n"
        f"DataFile={stem}.eeg\nMarkerFile={stem}.vmrk\nDataFormat=BINARY\nDataOrientation=MULTIPLEXED\n"
        f"NumberOfChannels={len(labels)}\nSamplingInterval={1e6 / sfreq:g}\n\n[Binary Infos]\n"
        f"BinaryFormat=IEEE_FLOAT_32\n\n[Channel Infos]\n{channels}\n",
        encoding="utf-8",
    )
    marks = "\n".join(f"Mk{i + 2}=Stimulus,{name},{s + 1},1,0" for i, (s, name) in enumerate(markers))
    (vhdr.parent / f"{stem}.vmrk").write_text(
        "Brain Vision Data Exchange Marker File, Version 1.0\n\n[Common Infos]\nCodepage=UTF-8\n"
        f"DataFile={stem}.eeg\n\n[Marker Infos]\nMk1=New Segment,,1,1,0\n{marks}\n",
        encoding="utf-8",
    )


def write_eeglab(path: Path, data_v, sfreq, labels, events=()):
    """Minimal EEGLAB .set (MATLAB v5, data inside) with events (latency sample, type)."""
    from scipy.io import savemat

    chanlocs = np.array([(lab,) for lab in labels], dtype=[("labels", object)])
    event = np.array(
        [(name, s + 1.0, 0.0) for s, name in events], dtype=[("type", object), ("latency", float), ("duration", float)]
    )
    n = data_v.shape[1]
    eeg = {"srate": float(sfreq), "nbchan": len(labels), "pnts": n, "trials": 1, "xmin": 0.0, "xmax": (n - 1) / sfreq,
           "data": (np.asarray(data_v) * 1e6).astype(np.float32), "chanlocs": chanlocs, "event": event,
           "times": np.arange(n) / sfreq * 1e3, "setname": path.stem, "filename": "", "ref": "common"}  # fmt: skip
    savemat(path, {"EEG": eeg}, appendmat=False)


@pytest.fixture()
def eeg_data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 1000)) * 20e-6  # 4 s at 250 Hz, volts


@pytest.fixture()
def edf_twin(tmp_path, eeg_data):
    """An eegmat-like EDF+: EEG channels, the linked-ear reference and ECG, with annotations."""
    path = tmp_path / "Subject99_2.edf"
    step = write_edf(
        path, eeg_data, 250.0, ["EEG Fz", "EEG Cz", "EEG A2-A1", "ECG ECG"], [(0.5, 1.0, "T1"), (2.0, 1.5, "T2")]
    )
    return path, step


# ----------------------------------------------------------------------------------------
# channel types and naming rules
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("label", "expected"),
    [("EEG Fp1", "eeg"), ("EEG A2-A1", "ref"), ("EEG M1", "ref"), ("A1", "ref"), ("ECG ECG", "ecg"),
     ("Fc5.", "eeg"), ("Oz..", "eeg"), ("Fcz.", "eeg"), ("T9..", "eeg"), ("Fp1-F7", "eeg"), ("Cz", "eeg"),
     ("MLII", "ecg"), ("V5", "ecg"), ("II", "ecg"), ("V", "ecg"), ("PLETH", "ppg"), ("RESP", "resp"),
     ("Resp", "resp"), ("ABP", "misc"), ("EOG left", "misc"), ("EMG chin", "misc"), ("EOG", "misc"),
     ("acc_x", "acc"), ("EDA", "eda"), ("PCG", "audio"), ("STI 014", "misc"), ("EEG", "eeg")],
)  # fmt: skip
def test_infer_channel_type(label, expected):
    assert infer_channel_type(label) == expected


def test_infer_channel_type_default_for_unknown_labels():
    assert infer_channel_type("foo") == "misc"
    assert infer_channel_type("foo", default=None) is None


def test_eegmat_naming_rule():
    assert eegmat_subject_and_label("Subject02_1") == ("Subject02", "rest")
    assert eegmat_subject_and_label("Subject35_2") == ("Subject35", "arithmetic")
    assert eegmat_subject_and_label("Subject02_3") is None
    assert eegmat_subject_and_label("S001R04") is None


# ----------------------------------------------------------------------------------------
# real recordings
# ----------------------------------------------------------------------------------------
EEGMAT_DURATIONS = {"Subject04_1": 170.0}  # every other _1 file is 182 s, every _2 file 62 s


@pytest.mark.parametrize("subject", [f"Subject{i:02d}" for i in range(2, 10)])
@pytest.mark.parametrize("run", [1, 2])
def test_eegmat(shared_datasets, subject, run):
    path = shared_datasets / "eegmat" / f"{subject}_{run}.edf"
    rec = read_recording(path)
    eeg, bio = rec.signals["eeg"], rec.signals["bio"]
    assert rec.modalities == ("eeg", "bio")
    assert list(eeg.ch_names) == EEGMAT_CHANNELS and set(eeg.ch_types) == {"eeg"}
    assert bio.ch_names == ("ECG ECG",) and bio.ch_types == ("ecg",)
    assert rec.excluded_channels == (("EEG A2-A1", "ref"),)
    assert eeg.n_channels + bio.n_channels + len(rec.excluded_channels) == 21
    assert eeg.sfreq == bio.sfreq == 500.0
    expected = EEGMAT_DURATIONS.get(path.stem, 182.0 if run == 1 else 62.0)
    assert rec.duration == pytest.approx(expected)
    assert rec.label == ("rest" if run == 1 else "arithmetic")
    assert rec.subject == subject
    assert rec.annotations == ()
    assert set(eeg.units) == {"V"} and bio.units == ("V",)
    assert 1e-6 < np.abs(eeg.data).max() < 5e-3  # volts, not µV
    assert rec.start_time is not None and rec.source == str(path)


@pytest.mark.parametrize(("run", "duration"), [("R01", 60.0), ("R02", 60.0), ("R04", 125.0)])
def test_eegbci(shared_datasets, run, duration):
    rec = read_recording(shared_datasets / "eegbci" / f"S001{run}.edf")
    eeg = rec.signals["eeg"]
    assert rec.modalities == ("eeg",) and rec.excluded_channels == ()
    assert eeg.n_channels == 64 and eeg.sfreq == 160.0 and eeg.ch_names[0] == "Fc5."
    assert rec.duration == pytest.approx(duration)
    assert rec.subject == "S001" and rec.label is None
    counts = Counter(a.label for a in rec.annotations)
    if run == "R04":
        assert counts == {"T0": 15, "T1": 8, "T2": 7}
        assert rec.annotations[1].onset == pytest.approx(4.2) and rec.annotations[1].duration == pytest.approx(4.1)
        assert all(0 <= a.onset < duration for a in rec.annotations)
    else:
        assert counts == {"T0": 1}


@pytest.mark.parametrize("name", ["100.hea", "100.dat"])
def test_wfdb_mitdb_100(shared_datasets, name):
    rec = read_recording(shared_datasets / "wfdb" / name)
    bio = rec.signals["bio"]
    assert bio.ch_names == ("MLII", "V5") and bio.ch_types == ("ecg", "ecg") and bio.units == ("V", "V")
    assert bio.sfreq == 360.0 and bio.n_samples == 650000
    assert rec.duration == pytest.approx(650000 / 360)
    assert 1e-4 < np.abs(bio.data).max() < 1e-2  # mV scaled to V
    counts = Counter(a.label for a in rec.annotations)
    assert counts == {"N": 2239, "A": 33, "V": 1, "(N": 1}
    assert all(a.duration == 0 for a in rec.annotations)
    onsets = [a.onset for a in rec.annotations]
    assert onsets == sorted(onsets) and onsets[-1] < rec.duration
    assert rec.subject == "100" and rec.label is None


def test_wfdb_challenge_records_with_gaps(shared_datasets):
    v = read_recording(shared_datasets / "wfdb" / "v102s.hea")
    bio = v.signals["bio"]
    assert bio.ch_names == ("II", "V", "PLETH", "RESP")
    assert bio.ch_types == ("ecg", "ecg", "ppg", "resp") and bio.units == ("V", "V", "NU", "NU")
    assert bio.sfreq == 250.0 and v.duration == pytest.approx(300.0)
    assert v.label == "false_alarm" and v.subject == "v102s"
    gaps = [a for a in v.annotations if a.label == "BAD_gap"]
    assert len(gaps) == len(v.annotations) == 23  # every NaN run is annotated, nothing else
    assert np.isfinite(bio.data).all()
    raw = wfdb.rdrecord(str(shared_datasets / "wfdb" / "v102s")).p_signal.T
    nan = np.isnan(raw)
    assert nan.any()
    units = np.array([1e-3, 1e-3, 1, 1])[:, None]
    np.testing.assert_allclose(bio.data[~nan], (raw * units)[~nan])  # valid samples untouched
    covered = np.zeros(raw.shape[1], bool)
    for g in gaps:
        covered[round(g.onset * 250) : round((g.onset + g.duration) * 250)] = True
    np.testing.assert_array_equal(covered, nan.any(axis=0))

    a = read_recording(shared_datasets / "wfdb" / "a103l.mat")
    assert a.signals["bio"].ch_names == ("II", "V", "PLETH")
    assert a.signals["bio"].ch_types == ("ecg", "ecg", "ppg")
    assert a.signals["bio"].sfreq == 250.0 and a.duration == pytest.approx(330.0)
    assert a.label == "false_alarm" and a.annotations == ()


BIOSPPY = {  # file: (modality -> (channel names, types, units)), sfreq, duration
    "acc.txt": ({"bio": (("acc_x", "acc_y", "acc_z"), ("acc",) * 3, ("m/s^2",) * 3)}, 100.0, 20.0),
    "ecg.txt": ({"bio": (("ECG",), ("ecg",), ("NU",))}, 1000.0, 15.0),
    "eda.txt": ({"bio": (("EDA",), ("eda",), ("NU",))}, 1000.0, 150.0),
    "eeg_ec.txt": ({"eeg": (("EEG",), ("eeg",), ("NU",))}, 125.0, 38219 / 125),
    "eeg_eo.txt": ({"eeg": (("EEG",), ("eeg",), ("NU",))}, 125.0, 30203 / 125),
    "pcg.txt": ({"audio": (("PCG",), ("audio",), ("NU",))}, 1000.0, 30.0),
    "pcg_ecg.txt": ({"audio": (("PCG",), ("audio",), ("V",)), "bio": (("ECG",), ("ecg",), ("V",))}, 2000.0, 5.0),
    "ppg.txt": ({"bio": (("PPG",), ("ppg",), ("NU",))}, 1000.0, 20.0),
    "resp.txt": ({"bio": (("Resp",), ("resp",), ("NU",))}, 1000.0, 60.0),
}


@pytest.mark.parametrize("name", sorted(BIOSPPY))
def test_biosppy_text_files(shared_datasets, name):
    path = shared_datasets / "biosppy" / name
    layout, sfreq, duration = BIOSPPY[name]
    rec = read_recording(path)
    assert set(rec.signals) == set(layout)
    for modality, (names, types, units) in layout.items():
        sig = rec.signals[modality]
        assert (sig.ch_names, sig.ch_types, sig.units) == (names, types, units)
        assert sig.sfreq == sfreq
    assert rec.duration == pytest.approx(duration)
    first_row = np.array(next(ln for ln in path.read_text().splitlines() if not ln.startswith("#")).split(), float)
    stacked = np.concatenate([rec.signals[m].data[:, 0] for m in rec.modalities])
    np.testing.assert_array_equal(np.sort(stacked), np.sort(first_row))
    assert rec.label == {"eeg_ec.txt": "eyes_closed", "eeg_eo.txt": "eyes_open"}.get(name)


def test_every_shared_recording_is_readable(shared_datasets):
    """Nothing under shared/datasets with a supported extension fails to read."""
    skip = {"subject-info.csv"}  # metadata table, not a recording
    paths = [p for p in shared_datasets.rglob("*") if p.suffix.lower() in SUPPORTED_EXTENSIONS and p.name not in skip]
    assert len(paths) >= 30
    for path in paths:
        assert read_recording(path).duration > 0


# ----------------------------------------------------------------------------------------
# synthetic twins: EDF, BrainVision, FIF, WFDB, WAV, text
# ----------------------------------------------------------------------------------------
def test_edf_twin_roundtrip(edf_twin, eeg_data):
    path, step = edf_twin
    rec = read_recording(path)
    assert rec.label == "arithmetic" and rec.subject == "Subject99"
    assert rec.signals["eeg"].ch_names == ("EEG Fz", "EEG Cz")
    assert rec.signals["bio"].ch_names == ("ECG ECG",)
    assert rec.excluded_channels == (("EEG A2-A1", "ref"),)
    assert rec.signals["eeg"].sfreq == 250.0 and rec.duration == pytest.approx(4.0)
    np.testing.assert_allclose(rec.signals["eeg"].data, eeg_data[:2], rtol=0, atol=step[:2].max())
    np.testing.assert_allclose(rec.signals["bio"].data, eeg_data[3:], rtol=0, atol=step[3])
    assert [(a.onset, a.duration, a.label) for a in rec.annotations] == [(0.5, 1.0, "T1"), (2.0, 1.5, "T2")]


def test_bdf_twin(tmp_path, eeg_data):
    path = tmp_path / "biosemi.bdf"
    step = write_edf(path, eeg_data, 250.0, ["Fz", "Cz", "Pz", "EXG1"], [(1.0, 2.0, "task")], bdf=True)
    rec = read_recording(path)
    assert rec.signals["eeg"].ch_names == ("Fz", "Cz", "Pz", "EXG1")  # BDF channels are EEG unless labelled
    np.testing.assert_allclose(rec.signals["eeg"].data, eeg_data, rtol=0, atol=step.max())
    assert step.max() < 1e-9  # 24 bits: far finer than EDF
    assert [(a.onset, a.duration, a.label) for a in rec.annotations] == [(1.0, 2.0, "task")]


def test_bdf_truncated(tmp_path, eeg_data):
    path = tmp_path / "short.bdf"
    write_edf(path, eeg_data, 250.0, ["Fz", "Cz", "Pz", "Oz"], bdf=True)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(RecordingError, match=_named(path) + ".*truncated EDF/BDF data"):
        read_recording(path)


def test_edf_modality_selection_and_sfreq_check(edf_twin):
    path, _ = edf_twin
    rec = read_recording(path, modality="bio")
    assert rec.modalities == ("bio",)
    assert ("EEG Fz", "eeg") in rec.excluded_channels
    assert read_recording(path, sfreq=250).duration == pytest.approx(4.0)
    with pytest.raises(RecordingError, match=_named(path) + ".*declares a sampling rate of 250 Hz"):
        read_recording(path, sfreq=500)
    with pytest.raises(RecordingError, match=_named(path) + ".*modality must be one of"):
        read_recording(path, modality="emg")


def test_edf_without_eeg_channels(tmp_path):
    path = tmp_path / "ecg_only.edf"
    write_edf(path, np.zeros((2, 250)) + 1e-4, 250.0, ["ECG ECG", "EOG left"])
    with pytest.raises(RecordingError, match=_named(path) + ".*no usable channels: no EEG channels"):
        read_recording(path)
    assert read_recording(path, modality="bio").signals["bio"].ch_names == ("ECG ECG",)


def test_brainvision_twin(tmp_path, eeg_data):
    path = tmp_path / "bv.vhdr"
    write_brainvision(path, eeg_data, 250.0, ["Fz", "Cz", "Pz", "EOG"], markers=[(250, "S  1"), (500, "S  2")])
    rec = read_recording(path)
    eeg = rec.signals["eeg"]
    assert eeg.ch_names == ("Fz", "Cz", "Pz") and eeg.sfreq == 250.0
    assert rec.excluded_channels == (("EOG", "misc"),)
    np.testing.assert_allclose(eeg.data, eeg_data[:3], rtol=1e-6, atol=1e-12)  # float32 storage
    assert [(a.onset, a.label) for a in rec.annotations] == [(1.0, "Stimulus/S  1"), (2.0, "Stimulus/S  2")]


def test_eeglab_twin(tmp_path, eeg_data):
    path = tmp_path / "session.set"
    write_eeglab(path, eeg_data, 250.0, ["Fz", "Cz", "Pz", "EOG"], events=[(125, "S1"), (250, "S2")])
    rec = read_recording(path)
    assert rec.signals["eeg"].ch_names == ("Fz", "Cz", "Pz") and rec.excluded_channels == (("EOG", "misc"),)
    np.testing.assert_allclose(rec.signals["eeg"].data, eeg_data[:3], rtol=1e-6, atol=1e-12)
    assert [(a.onset, a.label) for a in rec.annotations] == [(0.5, "S1"), (1.0, "S2")]


def _raw_array(eeg_data):
    info = mne.create_info(["Fz", "Cz", "ECG", "EOG"], 250.0, ["eeg", "eeg", "ecg", "eog"])
    raw = mne.io.RawArray(eeg_data, info, verbose="error")
    raw.set_meas_date(1_600_000_000.0)
    raw.set_annotations(mne.Annotations([0.5, 2.0], [1.0, 0.0], ["rest", "blink"], orig_time=raw.info["meas_date"]))
    return raw


def test_fif_roundtrip(tmp_path, eeg_data):
    path = tmp_path / "synthetic_raw.fif"
    _raw_array(eeg_data).save(path, verbose="error")
    rec = read_recording(path)
    assert rec.signals["eeg"].ch_names == ("Fz", "Cz") and rec.signals["bio"].ch_types == ("ecg",)
    assert rec.excluded_channels == (("EOG", "misc"),)
    np.testing.assert_allclose(rec.signals["eeg"].data, eeg_data[:2], rtol=1e-6)  # FIF stores float32
    np.testing.assert_allclose(rec.signals["bio"].data, eeg_data[2:3], rtol=1e-6)
    assert [(a.onset, a.duration, a.label) for a in rec.annotations] == [(0.5, 1.0, "rest"), (2.0, 0.0, "blink")]
    assert rec.start_time is not None and rec.start_time.timestamp() == 1_600_000_000.0


def test_fif_with_non_finite_samples(tmp_path, eeg_data):
    raw = _raw_array(eeg_data)
    raw._data[1, 10] = np.nan
    path = tmp_path / "holes_raw.fif"
    raw.save(path, verbose="error")
    with pytest.raises(RecordingError, match=_named(path) + ".*non-finite sample.*channel 1 at sample 10"):
        read_recording(path)


@pytest.mark.parametrize(
    ("fmt", "ext", "backend"),
    [("edf", ".edf", "edfio"), ("brainvision", ".vhdr", "pybv"), ("eeglab", ".set", "eeglabio")],
)
def test_mne_export_roundtrip(tmp_path, eeg_data, fmt, ext, backend):
    pytest.importorskip(backend, reason=f"mne.export to {fmt} needs the optional package {backend!r}")
    raw = _raw_array(eeg_data).pick(["Fz", "Cz", "ECG"])
    path = tmp_path / f"exported{ext}"
    mne.export.export_raw(path, raw, fmt=fmt, verbose="error")
    rec = read_recording(path)
    assert rec.signals["eeg"].ch_names == ("Fz", "Cz")
    # EDF stores 16-bit integers over the channel's range: allow one quantisation step.
    atol = 2 * np.abs(eeg_data).max() / 65535 * 2 if fmt == "edf" else 1e-12
    np.testing.assert_allclose(rec.signals["eeg"].data, eeg_data[:2], rtol=1e-6, atol=atol)


def _write_wfdb_twin(tmp_path, with_gaps=True):
    fs, n = 100, 1000
    t = np.arange(n) / fs
    sig = np.stack([np.sin(2 * np.pi * 1.2 * t), np.cos(2 * np.pi * 1.2 * t) + 2, np.sin(2 * np.pi * 0.25 * t), 80 + t])
    if with_gaps:
        sig[0, 100:105] = np.nan
        sig[2, 103:110] = np.nan
        sig[1, 990:] = np.nan
    wfdb.wrsamp("twin", fs=fs, units=["mV", "NU", "NU", "mmHg"], sig_name=["II", "PLETH", "RESP", "ABP"],
                p_signal=sig.T, fmt=["16"] * 4, adc_gain=[1000.0] * 3 + [100.0], baseline=[0] * 4,
                comments=["Bradycardia", "True alarm"], write_dir=str(tmp_path))  # fmt: skip
    beats = np.arange(40, n, 83)
    wfdb.wrann("twin", "atr", beats, symbol=["N"] * len(beats), write_dir=str(tmp_path))
    return tmp_path / "twin.hea", sig, fs, beats


def test_wfdb_twin_interpolates_and_annotates_gaps(tmp_path):
    path, sig, fs, beats = _write_wfdb_twin(tmp_path)
    rec = read_recording(path)
    bio = rec.signals["bio"]
    assert bio.ch_names == ("II", "PLETH", "RESP") and bio.ch_types == ("ecg", "ppg", "resp")
    assert bio.units == ("V", "NU", "NU") and rec.excluded_channels == (("ABP", "misc"),)
    assert rec.label == "true_alarm" and rec.subject == "twin"
    gaps = [(a.onset, a.duration) for a in rec.annotations if a.label == "BAD_gap"]
    assert gaps == [(pytest.approx(1.0), pytest.approx(0.10)), (pytest.approx(9.9), pytest.approx(0.1))]
    # linear interpolation across the gap, edge gap held at the last valid sample
    expected = np.interp(np.arange(100, 105), [99, 105], sig[0, [99, 105]]) * 1e-3
    np.testing.assert_allclose(bio.data[0, 100:105], expected, atol=1e-6)
    np.testing.assert_allclose(bio.data[1, 990:], bio.data[1, 989], atol=1e-3)
    valid = ~np.isnan(sig[:3])
    # adc_gain 1000: samples are quantised to 1e-3 physical units
    np.testing.assert_allclose(bio.data[valid], (sig[:3] * np.array([[1e-3], [1], [1]]))[valid], atol=5.01e-4)
    beat_onsets = [a.onset for a in rec.annotations if a.label == "N"]
    np.testing.assert_allclose(beat_onsets, beats / fs)


def test_wfdb_modality_selection(tmp_path):
    path, *_ = _write_wfdb_twin(tmp_path)
    assert read_recording(path, modality="bio").modalities == ("bio",)
    with pytest.raises(RecordingError, match=_named(path) + ".*no usable channels: found no 'eeg' channels"):
        read_recording(path, modality="eeg")
    with pytest.raises(RecordingError, match=_named(path) + ".*declares a sampling rate of 100 Hz"):
        read_recording(path, sfreq=250)


def test_wfdb_all_nan_channel_is_excluded(tmp_path):
    fs, n = 100, 300
    sig = np.stack([np.sin(np.arange(n) / 10), np.full(n, np.nan)])
    wfdb.wrsamp("holes", fs=fs, units=["mV", "NU"], sig_name=["II", "PLETH"], p_signal=sig.T, fmt=["16"] * 2,
                adc_gain=[1000.0] * 2, baseline=[0] * 2, write_dir=str(tmp_path))  # fmt: skip
    rec = read_recording(tmp_path / "holes.dat")
    assert rec.signals["bio"].ch_names == ("II",)
    assert ("PLETH", "ppg") in rec.excluded_channels


def test_wfdb_truncated_signal_and_missing_header(tmp_path):
    path, *_ = _write_wfdb_twin(tmp_path, with_gaps=False)
    dat = tmp_path / "twin.dat"
    dat.write_bytes(dat.read_bytes()[:1001])
    with pytest.raises(RecordingError, match=_named(path)):
        read_recording(path)
    lonely = tmp_path / "lonely.dat"
    lonely.write_bytes(b"\x00\x01" * 50)
    with pytest.raises(RecordingError, match=_named(lonely) + ".*lonely.hea not found"):
        read_recording(lonely)


@pytest.mark.parametrize(
    ("dtype", "scale"), [(np.int16, 32768.0), (np.int32, 2.0**31), (np.float32, 1.0), (np.uint8, None)]
)
def test_wav(tmp_path, dtype, scale):
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.9, 0.9, (800, 2))
    if dtype == np.uint8:
        stored = np.round(x * 128 + 128).astype(np.uint8)
        expected = (stored.astype(float) - 128) / 128
    elif dtype == np.float32:
        stored = x.astype(np.float32)
        expected = stored.astype(float)
    else:
        stored = np.round(x * (scale - 1)).astype(dtype)
        expected = stored / scale
    path = tmp_path / "heart.wav"
    wavfile.write(path, 4000, stored)
    rec = read_recording(path)
    audio = rec.signals["audio"]
    assert rec.modalities == ("audio",) and audio.ch_names == ("audio_1", "audio_2")
    assert audio.sfreq == 4000.0 and audio.n_samples == 800 and set(audio.ch_types) == {"audio"}
    np.testing.assert_allclose(audio.data, expected.T)
    assert np.abs(audio.data).max() <= 1.0


def test_wav_mono_and_errors(tmp_path):
    path = tmp_path / "mono.wav"
    wavfile.write(path, 8000, np.zeros(100, np.int16))
    assert read_recording(path).signals["audio"].ch_names == ("audio",)
    with pytest.raises(RecordingError, match=_named(path) + ".*WAV files are audio"):
        read_recording(path, modality="eeg")
    bad = tmp_path / "nan.wav"
    wavfile.write(bad, 8000, np.array([0.0, np.nan, 0.1], np.float32))
    with pytest.raises(RecordingError, match=_named(bad) + ".*non-finite"):
        read_recording(bad)
    empty = tmp_path / "silent.wav"
    wavfile.write(empty, 8000, np.zeros(0, np.int16))
    with pytest.raises(RecordingError, match=_named(empty) + ".*no samples"):
        read_recording(empty)


SIMPLE_TEXT = "# Simple Text Format\n# Sampling Rate (Hz):= {fs}\n# Units:= {units}\n# Labels:= {labels}\n{rows}"


def _text(path, rows, fs="200.00", units="mV", labels="ECG\tPPG"):
    path.write_text(SIMPLE_TEXT.format(fs=fs, units=units, labels=labels, rows=rows), encoding="utf-8")
    return path


def test_text_twin(tmp_path):
    rows = "".join(f"{i}\t{2 * i}\n" for i in range(400))
    rec = read_recording(_text(tmp_path / "pair.txt", rows))
    bio = rec.signals["bio"]
    assert bio.ch_names == ("ECG", "PPG") and bio.ch_types == ("ecg", "ppg") and bio.units == ("V", "V")
    assert bio.sfreq == 200.0 and rec.duration == pytest.approx(2.0)
    np.testing.assert_allclose(bio.data, np.stack([np.arange(400), 2 * np.arange(400)]) * 1e-3)
    forced = read_recording(_text(tmp_path / "pair.txt", rows), modality="eeg")
    assert forced.modalities == ("eeg",) and forced.signals["eeg"].ch_types == ("eeg", "eeg")


def test_text_modality_from_file_name_and_csv_with_sfreq(tmp_path):
    eeg = tmp_path / "eeg_session.csv"
    eeg.write_text("a,b\n1,2\n3,4\n5,6\n", encoding="utf-8")
    rec = read_recording(eeg, sfreq=128)
    assert rec.modalities == ("eeg",) and rec.signals["eeg"].ch_names == ("a", "b")
    np.testing.assert_array_equal(rec.signals["eeg"].data, [[1, 3, 5], [2, 4, 6]])
    pcg = tmp_path / "pcg_left.txt"
    pcg.write_text("0.1\n0.2\n", encoding="utf-8")
    assert read_recording(pcg, sfreq=1000).signals["audio"].ch_names == ("pcg_left",)
    other = tmp_path / "ecg_chest.txt"
    other.write_text("0.1\n0.2\n", encoding="utf-8")
    assert read_recording(other, sfreq=1000).signals["bio"].ch_types == ("ecg",)
    unknown = tmp_path / "sensor.txt"
    unknown.write_text("0.1\n0.2\n", encoding="utf-8")
    with pytest.raises(RecordingError, match=_named(unknown) + ".*no usable channels"):
        read_recording(unknown, sfreq=1000)


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("1\n2\n", {}, "missing sampling rate"),
        (SIMPLE_TEXT.format(fs="fast", units="", labels="ECG", rows="1\n"), {}, "'Sampling Rate \\(Hz\\)' is 'fast'"),
        (SIMPLE_TEXT.format(fs="-5", units="", labels="ECG", rows="1\n"), {}, "must be finite and > 0"),
        (SIMPLE_TEXT.format(fs="100", units="", labels="ECG", rows="1\n"), {"sfreq": 50}, "declares a sampling rate"),
        (SIMPLE_TEXT.format(fs="100", units="", labels="ECG", rows=""), {}, "no samples"),
        (SIMPLE_TEXT.format(fs="100", units="", labels="ECG\tPPG", rows="1\t2\n3\n"), {}, "mismatched column counts"),
        (SIMPLE_TEXT.format(fs="100", units="", labels="ECG PPG EDA", rows="1\t2\n"), {}, "names 3 channel"),
        (SIMPLE_TEXT.format(fs="100", units="", labels="ECG", rows="1\nnan\n"), {},
         "non-finite sample in column 0 at data row 1"),
        (SIMPLE_TEXT.format(fs="100", units="", labels="ECG", rows="1\nabc\n"), {}, "non-numeric"),
    ],
)  # fmt: skip
def test_text_errors(tmp_path, content, kwargs, message):
    path = tmp_path / "broken.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RecordingError, match=_named(path) + ".*" + message):
        read_recording(path, **kwargs)


# ----------------------------------------------------------------------------------------
# corrupt and wrong files: always a RecordingError naming the file
# ----------------------------------------------------------------------------------------
def test_edf_truncated_header(edf_twin):
    path, _ = edf_twin
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RecordingError, match=_named(path) + ".*truncated EDF/BDF header: 200 bytes"):
        read_recording(path)


def test_edf_header_cut_inside_signal_fields(edf_twin):
    path, _ = edf_twin
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(RecordingError, match=_named(path) + ".*truncated EDF/BDF header"):
        read_recording(path)


def test_edf_corrupt_header_field(edf_twin):
    path, _ = edf_twin
    raw = bytearray(path.read_bytes())
    raw[252:256] = b"ab  "
    path.write_bytes(bytes(raw))
    with pytest.raises(RecordingError, match=_named(path) + ".*'number of signals' .* is 'ab'"):
        read_recording(path)


@pytest.mark.parametrize("duration", [b"0       ", b"-1      ", b"nan     "])
def test_edf_record_duration_must_be_positive(edf_twin, duration):
    path, _ = edf_twin
    raw = bytearray(path.read_bytes())
    raw[244:252] = duration
    path.write_bytes(bytes(raw))
    with pytest.raises(RecordingError, match=_named(path) + ".*record duration .* must be a positive number"):
        read_recording(path)


def test_edf_truncated_data(edf_twin):
    path, _ = edf_twin
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        RecordingError, match=_named(path) + ".*truncated EDF/BDF data: the header declares 4 data records"
    ):
        read_recording(path)


def test_edf_with_wrong_content(tmp_path):
    path = tmp_path / "notes.edf"
    path.write_text("just some notes\n" * 40, encoding="utf-8")
    with pytest.raises(RecordingError, match=_named(path) + ".*not an EDF file"):
        read_recording(path)


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_garbage_bytes(tmp_path, ext):
    path = tmp_path / f"garbage{ext}"
    path.write_bytes(np.random.default_rng(7).bytes(4096))
    with pytest.raises(RecordingError, match=_named(path)):
        read_recording(path)


@pytest.mark.parametrize("ext", SUPPORTED_EXTENSIONS)
def test_zero_length_file(tmp_path, ext):
    path = tmp_path / f"empty{ext}"
    path.write_bytes(b"")
    with pytest.raises(RecordingError, match=_named(path) + ".*empty \\(0 bytes\\)"):
        read_recording(path)


def test_missing_file_and_unknown_extension(tmp_path, edf_twin):
    missing = tmp_path / "nowhere.edf"
    with pytest.raises(RecordingError, match=_named(missing) + ".*no such file"):
        read_recording(missing)
    edf, _ = edf_twin
    renamed = tmp_path / "Subject99_2.xyz"
    renamed.write_bytes(edf.read_bytes())
    with pytest.raises(RecordingError, match=_named(renamed) + ".*unknown file extension '.xyz'"):
        read_recording(renamed)
    as_wav = tmp_path / "Subject99_2.wav"  # right bytes, wrong extension
    as_wav.write_bytes(edf.read_bytes())
    with pytest.raises(RecordingError, match=_named(as_wav) + ".*could not read the file as WAV"):
        read_recording(as_wav)
