"""datasets.xdf: LabRecorder's XDF through pyxdf, streams aligned, markers as annotations.

The files are written here by a small XDF writer following the XDF specification (chunks
FileHeader, StreamHeader, Samples, ClockOffset, StreamFooter), so the reader is tested on real
bytes parsed by pyxdf.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from biofed.datasets import RecordingError, read_recording


def _varlen(n: int) -> bytes:
    return b"\x01" + struct.pack("<B", n) if n < 256 else b"\x04" + struct.pack("<I", n)


def _chunk(tag: int, content: bytes) -> bytes:
    return _varlen(len(content) + 2) + struct.pack("<H", tag) + content


def _header(name, stype, rate, fmt, channels) -> str:
    chans = "".join(
        f"<channel><label>{label}</label><type>{kind}</type><unit>{unit}</unit></channel>"
        for label, kind, unit in channels
    )
    return (
        f'<?xml version="1.0"?><info><name>{name}</name><type>{stype}</type>'
        f"<channel_count>{max(len(channels), 1)}</channel_count><nominal_srate>{rate}</nominal_srate>"
        f"<channel_format>{fmt}</channel_format><created_at>0</created_at>"
        f"<desc><channels>{chans}</channels></desc></info>"
    )


def write_xdf(path: Path, streams: list[dict]) -> None:
    """streams: dicts with name, type, rate, format ("double64" or "string"), channels, stamps, values."""
    out = bytearray(b"XDF:")
    out += _chunk(1, b'<?xml version="1.0"?><info><version>1.0</version></info>')
    for sid, s in enumerate(streams, start=1):
        out += _chunk(
            2, struct.pack("<I", sid) + _header(s["name"], s["type"], s["rate"], s["format"], s["channels"]).encode()
        )
    for sid, s in enumerate(streams, start=1):
        body = bytearray(struct.pack("<I", sid) + _varlen(len(s["stamps"])))
        for t, row in zip(s["stamps"], s["values"]):
            body += b"\x08" + struct.pack("<d", t)
            if s["format"] == "string":
                text = row.encode()
                body += _varlen(len(text)) + text
            else:
                body += struct.pack(f"<{len(row)}d", *row)
        out += _chunk(3, bytes(body))
        out += _chunk(4, struct.pack("<I", sid) + struct.pack("<dd", s["stamps"][0], 0.0))
        out += _chunk(4, struct.pack("<I", sid) + struct.pack("<dd", s["stamps"][-1], 0.0))
    for sid, s in enumerate(streams, start=1):
        footer = (
            f'<?xml version="1.0"?><info><first_timestamp>{s["stamps"][0]}</first_timestamp>'
            f"<last_timestamp>{s['stamps'][-1]}</last_timestamp><sample_count>{len(s['stamps'])}</sample_count>"
            "</info>"
        )
        out += _chunk(6, struct.pack("<I", sid) + footer.encode())
    path.write_bytes(bytes(out))


RNG = np.random.default_rng(0)


def session(
    tmp_path: Path,
    *,
    eeg_start=100.0,
    ecg_start=100.5,
    markers=((101.0, "rest"), (104.0, "BAD_motion"), (105.0, "task")),
) -> tuple[Path, dict]:
    eeg = RNG.normal(size=(2500, 3)) * 20.0  # µV
    ecg = RNG.normal(size=(1200, 1)) * 1.0  # mV
    streams = [
        dict(
            name="headset",
            type="EEG",
            rate=250,
            format="double64",
            channels=[("Fz", "EEG", "microvolts"), ("Cz", "EEG", "microvolts"), ("Trig", "TRG", "")],
            stamps=eeg_start + np.arange(2500) / 250.0,
            values=eeg,
        ),
        dict(
            name="chest",
            type="ECG",
            rate=100,
            format="double64",
            channels=[("ECG", "ECG", "mV")],
            stamps=ecg_start + np.arange(1200) / 100.0,
            values=ecg,
        ),
        dict(
            name="labels",
            type="Markers",
            rate=0,
            format="string",
            channels=[],
            stamps=np.array([t for t, _ in markers]),
            values=[m for _, m in markers],
        ),
    ]
    path = tmp_path / "session.xdf"
    write_xdf(path, streams)
    return path, {"eeg": eeg, "ecg": ecg}


def test_xdf_streams_are_aligned_scaled_and_typed(tmp_path):
    path, raw = session(tmp_path)
    rec = read_recording(path)
    eeg, bio = rec.signals["eeg"], rec.signals["bio"]
    assert eeg.ch_names == ("Fz", "Cz") and eeg.sfreq == 250 and eeg.units == ("V", "V")
    assert bio.ch_types == ("ecg",) and bio.sfreq == 100
    assert ("Trig", "misc") in rec.excluded_channels
    # common span: from the later start (100.5 s) to the earlier end (110.0 s)
    assert eeg.n_samples == round(9.5 * 250) and bio.n_samples == round(9.5 * 100)
    np.testing.assert_allclose(eeg.data, raw["eeg"][125 : 125 + eeg.n_samples, :2].T * 1e-6, rtol=1e-9)
    np.testing.assert_allclose(bio.data, raw["ecg"][: bio.n_samples].T * 1e-3, rtol=1e-9)


def test_xdf_markers_become_labelled_spans_and_bad_spans(tmp_path):
    path, _ = session(tmp_path)
    rec = read_recording(path)
    spans = [(round(a.onset, 6), round(a.duration, 6), a.label) for a in rec.annotations]
    assert spans == [(0.5, 3.0, "rest"), (3.5, 1.0, "BAD_motion"), (4.5, 5.0, "task")]


def test_xdf_recording_replays_into_labelled_windows(tmp_path):
    from biofed.datasets.replay import bad_spans

    path, _ = session(tmp_path)
    rec = read_recording(path)
    assert bad_spans(rec) == [pytest.approx((3.5, 4.5))]
    assert read_recording(path, modality="bio").modalities == ("bio",)


def test_xdf_without_overlap_or_data_is_a_clear_error(tmp_path):
    path, _ = session(tmp_path, ecg_start=200.0)
    with pytest.raises(RecordingError, match="do not overlap"):
        read_recording(path)
    markers_only = tmp_path / "markers.xdf"
    write_xdf(
        markers_only,
        [dict(name="m", type="Markers", rate=0, format="string", channels=[], stamps=np.array([1.0]), values=["rest"])],
    )
    with pytest.raises(RecordingError, match="no regularly sampled stream"):
        read_recording(markers_only)
    corrupt = tmp_path / "corrupt.xdf"
    corrupt.write_bytes(b"XDF:\x01\x05")
    with pytest.raises(RecordingError, match="corrupt"):
        read_recording(corrupt)
