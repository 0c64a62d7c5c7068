"""``biofed replay`` on files written in tmp_path (EDF + WAV) and on real eegmat recordings."""

from __future__ import annotations

import mne
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.io import wavfile

from biofed.apps.cli import cli
from biofed.datasets import Recording, make_recording, read_recording
from biofed.edge.pipeline import PipelineConfig, extract_features

EEG_SFREQ = 250.0
AUDIO_SFREQ = 2000.0


def _write_session(folder, stem: str, label: str, seconds: float, seed: int):
    """An EDF (4 EEG + ECG at 250 Hz) and a WAV (phonocardiogram at 2 kHz) of one synthetic session.

    eegmat-style names (``SubjectNN_1`` rest, ``_2`` arithmetic) give subject and label.
    """
    rec = make_recording(
        label, duration_s=seconds, eeg_channels=4, eeg_sfreq=EEG_SFREQ, audio_sfreq=AUDIO_SFREQ,
        bio_sfreq=EEG_SFREQ, subject=stem.split("_")[0], random_state=seed,
    )  # fmt: skip
    eeg, bio = rec.signals["eeg"], rec.signals["bio"]
    info = mne.create_info([f"EEG {n}" for n in eeg.ch_names] + ["ECG ECG"], EEG_SFREQ, ["eeg"] * 4 + ["ecg"])
    raw = mne.io.RawArray(np.vstack([eeg.data, bio.data[:1]]), info, verbose="error")
    edf = folder / f"{stem}.edf"
    mne.export.export_raw(edf, raw, fmt="edf", verbose="error")
    wav = folder / f"{stem}.wav"
    wavfile.write(wav, int(AUDIO_SFREQ), rec.signals["audio"].data[0].astype(np.float32))
    return edf, wav


def _replay(args):
    result = CliRunner().invoke(cli, ["replay", "--no-progress", *map(str, args)])
    return result


def test_edf_and_wav_of_one_session_form_one_multimodal_stream(tmp_path):
    edf, wav = _write_session(tmp_path, "Subject91_1", "rest", 9.0, seed=1)
    out = tmp_path / "features.npz"
    result = _replay([edf, wav, "--out", out, "--k", "8", "--chunk", "0.3"])
    assert result.exit_code == 0, result.output
    assert "files: 2 in 1 stream(s)" in result.output
    assert "windows processed: 8" in result.output
    for line in ("real-time factor", "latency per window (push -> row): p50", "p95", "p99", "peak RSS:"):
        assert line in result.output
    with np.load(out) as npz:
        data = {key: npz[key] for key in npz.files}
    n_features = 4 * 5 + 32 + 7  # EEG bands + mels + ECG statistics and heart rate
    assert data["features"].shape == (8, n_features)
    assert data["feature_names"].shape == (n_features,)
    assert data["feature_names"][0] == "eeg:EEG Fp1:delta" and "audio:audio:mel31" in data["feature_names"]
    assert list(data["labels"]) == ["rest"] * 8
    np.testing.assert_array_equal(data["times"], np.arange(8.0))
    assert set(data["sources"]) == {f"{edf}+{wav}"}
    assert data["components"].shape == (8, n_features) and data["projected"].shape == (8, 8)
    np.testing.assert_allclose(data["components"] @ data["components"].T, np.eye(8), atol=1e-10)
    # The CLI's rows are the pipeline's features of the two files fused on one clock.
    eeg_bio, audio = read_recording(edf), read_recording(wav)
    fused = Recording(source="fused", signals={**eeg_bio.signals, **audio.signals}, label="rest")
    X, _, _ = extract_features(fused, PipelineConfig())
    np.testing.assert_allclose(data["features"], X, rtol=1e-12, atol=1e-12)
    scores = (data["features"] - data["mean"]) / data["scale"] @ data["components"].T
    np.testing.assert_allclose(data["projected"], scores, rtol=1e-10, atol=1e-10)


def test_subjects_are_separate_streams_and_speed_does_not_change_features(tmp_path):
    files = [
        _write_session(tmp_path, "Subject92_1", "rest", 6.0, seed=2)[0],
        _write_session(tmp_path, "Subject92_2", "arithmetic", 5.0, seed=3)[0],
        _write_session(tmp_path, "Subject93_1", "rest", 7.0, seed=4)[0],
    ]
    fast, clocked = tmp_path / "fast.npz", tmp_path / "clocked.npz"
    result = _replay([*files, "--out", fast, "--k", "4"])
    assert result.exit_code == 0, result.output
    assert "files: 3 in 3 stream(s)" in result.output
    # --speed > 0 plays every stream on one shared clock (here 200x real time: ~35 ms).
    result = _replay([*files, "--out", clocked, "--k", "4", "--speed", "200"])
    assert result.exit_code == 0, result.output
    with np.load(fast) as a, np.load(clocked) as b:
        for key in ("features", "labels", "times", "sources", "projected"):
            np.testing.assert_array_equal(a[key], b[key])
        assert list(a["labels"]) == ["rest"] * 5 + ["arithmetic"] * 4 + ["rest"] * 6
        np.testing.assert_array_equal(a["times"], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5])
        assert list(dict.fromkeys(a["sources"])) == [str(f) for f in files]


def test_out_refuses_mixed_layouts(tmp_path):
    edf, _ = _write_session(tmp_path, "Subject94_1", "rest", 4.0, seed=5)
    _, other_wav = _write_session(tmp_path, "Subject95_1", "rest", 4.0, seed=6)
    result = _replay([edf, other_wav, "--out", tmp_path / "x.npz"])
    assert result.exit_code == 2
    assert "has another feature layout than" in result.output
    assert not (tmp_path / "x.npz").exists()
    # Without --out the two subjects simply replay as two streams (progress bar on stderr).
    result = CliRunner().invoke(cli, ["replay", str(edf), str(other_wav)])
    assert result.exit_code == 0, result.output
    assert "files: 2 in 2 stream(s)" in result.stdout and "windows processed: 6" in result.stdout
    assert "replay (signal seconds)" in result.stderr and "replay (signal" not in result.stdout


def test_bad_arguments_give_clear_errors(tmp_path):
    edf, _ = _write_session(tmp_path, "Subject96_1", "rest", 4.0, seed=7)
    broken = tmp_path / "broken.edf"
    broken.write_bytes(b"0       " + b"x" * 300)
    result = _replay([broken])
    assert result.exit_code == 1 and "cannot read" in result.output and "broken.edf" in result.output
    result = _replay([edf, edf])
    assert result.exit_code == 2 and "given more than once" in result.output
    result = _replay([edf, "--chunk", "0"])
    assert result.exit_code == 2 and "--chunk" in result.output
    result = _replay([edf, "--window", "0"])
    assert result.exit_code == 2 and "window_s must be finite and > 0" in result.output
    result = _replay([edf, "--chunk", "inf"])
    assert result.exit_code == 2 and "finite number of seconds" in result.output
    result = _replay([edf, "--speed", "-1"])
    assert result.exit_code == 2 and "--speed" in result.output
    result = _replay([edf, "--speed", "inf"])
    assert result.exit_code == 2 and "must be finite" in result.output
    result = _replay([edf, "--window", "5", "--out", tmp_path / "none.npz"])
    assert result.exit_code == 1 and "--out needs at least 2" in result.output


def test_eegmat_rest_and_arithmetic(shared_datasets, tmp_path):
    files = [shared_datasets / "eegmat" / f"Subject02_{i}.edf" for i in (1, 2)]
    if not all(f.exists() for f in files):
        pytest.skip("eegmat Subject02 recordings not found")
    out = tmp_path / "eegmat.npz"
    result = _replay([*files, "--out", out])
    assert result.exit_code == 0, result.output
    assert "files: 2 in 2 stream(s)" in result.output
    with np.load(out) as npz:
        labels, features, projected = npz["labels"], npz["features"], npz["projected"]
        assert npz["components"].shape == (32, 19 * 5 + 7)
        sources = npz["sources"]
    n_rest, n_arith = 181, int(np.sum(labels == "arithmetic"))
    assert np.sum(labels == "rest") == n_rest and n_arith >= 58
    assert set(labels) == {"rest", "arithmetic"}
    assert projected.shape == (n_rest + n_arith, 32) and features.shape == (n_rest + n_arith, 102)
    assert set(sources[labels == "rest"]) == {str(files[0])}
    X_rest, _, _ = extract_features(read_recording(files[0]))
    np.testing.assert_allclose(features[:n_rest], X_rest, rtol=1e-12, atol=1e-12)
