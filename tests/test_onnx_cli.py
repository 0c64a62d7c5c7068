"""``biofed export`` and ``biofed predict`` through click's CliRunner (a model trained here, no federation)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from biofed.apps.cli import cli
from biofed.datasets import make_recording, read_recording
from biofed.edge.inference import OnnxModel
from biofed.edge.pipeline import PipelineConfig, extract_features
from biofed.edge.split import device_standardization
from biofed.kernels import init_params, predict_proba, project, train
from biofed.model import Basis, FeatureLayout, ModelFile, PrivacySpec, fit_basis, save_arrays

CLASSES = ("rest", "arithmetic")


def _write_fif(path, recording):
    """EEG + ECG of a synthetic recording as a FIF file with its label as an annotation."""
    import mne

    eeg, bio = recording.signals["eeg"], recording.signals["bio"]
    ecg = [i for i, t in enumerate(bio.ch_types) if t == "ecg"]
    info = mne.create_info(
        list(eeg.ch_names) + [bio.ch_names[i] for i in ecg], eeg.sfreq, ["eeg"] * len(eeg.ch_names) + ["ecg"] * len(ecg)
    )
    raw = mne.io.RawArray(np.vstack([eeg.data, bio.data[ecg]]), info, verbose="error")
    raw.set_annotations(mne.Annotations([0.0], [recording.duration], [recording.label]))
    raw.save(path, overwrite=True, verbose="error")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two FIF sessions, a model file trained on their windows, and the Numba probabilities."""
    folder = tmp_path_factory.mktemp("onnx_cli")
    files = [
        _write_fif(folder / f"s{i}_{label}_raw.fif", make_recording(label, duration_s=20.0, random_state=i))
        for i, label in enumerate(CLASSES)
    ]
    recordings = [read_recording(f) for f in files]
    config = PipelineConfig()
    rows = [extract_features(r, config)[0] for r in recordings]
    X = np.vstack(rows)
    y = np.concatenate([np.full(len(r), i, dtype=np.int64) for i, r in enumerate(rows)])
    basis = fit_basis(X, 32)
    Z = project(X, basis.components, mean=basis.mean, scale=basis.scale)
    params, _ = train(init_params(Z.shape[1], 2, 0, random_state=0), Z, y, 2, epochs=30, lr=0.1, random_state=0)
    spec = FeatureLayout.from_recording(recordings[0], config)
    model = ModelFile(
        params,
        CLASSES,
        0,
        basis,
        1,
        "ward7",
        21,
        20,
        spec,
        PrivacySpec(3.25, 1e-5, "rdp", {"rdp": 3.25}, "central", 1.0),
    )
    npz = save_arrays(folder / "model_final.npz", model.to_arrays())
    proba = predict_proba(params, project(rows[1], basis.components, mean=basis.mean, scale=basis.scale), 2)
    return folder, files, npz, proba


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_export_then_predict(trained):
    folder, files, npz, proba = trained
    out = folder / "model.onnx"
    result = _run("export", "--model", npz, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "opset 17" in result.output
    assert "fleet ward7, round 21 (20 training rounds)" in result.output
    assert "privacy: epsilon 3.25 at delta 1e-05 (rdp)" in result.output
    onnx.checker.check_model(onnx.load(out))
    assert OnnxModel(out).metadata.round == 21

    result = _run("predict", "--model", out, files[1])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    window_lines = [line for line in lines if line.strip().endswith("arithmetic") and "." in line.split()[0]]
    assert len(window_lines) == proba.shape[0] == 19
    expected = [CLASSES[i] for i in proba.argmax(axis=1)]
    assert [line.split()[1] for line in window_lines] == expected
    np.testing.assert_allclose([float(line.split()[2]) for line in window_lines], proba.max(axis=1), atol=1e-3)
    n_arith = expected.count("arithmetic")
    assert f"predicted: rest {19 - n_arith} ({(19 - n_arith) / 19:.1%}), arithmetic {n_arith}" in result.output
    assert f"accuracy: {n_arith / 19:.3f} ({n_arith}/19 windows labelled arithmetic)" in result.output
    assert "epsilon 3.25 at delta 1e-05 (rdp, central)" in result.output


def test_export_window_model_predicts_the_same(trained):
    folder, files, npz, proba = trained
    out = folder / "window.onnx"
    assert _run("export", "--model", npz, "--out", out, "--input", "window", "--dtype", "float64").exit_code == 0
    result = _run("predict", "--model", out, "--summary-only", files[1])
    assert result.exit_code == 0, result.output
    n_arith = int(np.sum(proba.argmax(axis=1) == 1))
    assert f"accuracy: {n_arith / 19:.3f}" in result.output and "window input" in result.output


def test_export_bad_inputs(trained, tmp_path):
    _, _, npz, _ = trained
    result = _run("export", "--model", tmp_path / "absent.npz", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "absent.npz: no such model file" in result.output
    (tmp_path / "notes.npz").write_text("not numpy")
    result = _run("export", "--model", tmp_path / "notes.npz", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "notes.npz: not a biofed model file" in result.output
    np.savez(tmp_path / "weights.npz", W=np.zeros((3, 2)))
    result = _run("export", "--model", tmp_path / "weights.npz", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "not a biofed model file: lacks ['params'" in result.output
    arrays = dict(np.load(npz))
    del arrays["layout"]
    save_arrays(tmp_path / "nolayout.npz", arrays)
    result = _run("export", "--model", tmp_path / "nolayout.npz", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "has no feature layout" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_predict_bad_inputs(trained, tmp_path):
    folder, files, npz, _ = trained
    model = folder / "model_bad_inputs.onnx"
    assert _run("export", "--model", npz, "--out", model).exit_code == 0
    result = _run("predict", "--model", tmp_path / "absent.onnx", files[0])
    assert result.exit_code == 1 and "absent.onnx: no such model file" in result.output
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 definitely not protobuf")
    result = _run("predict", "--model", tmp_path / "junk.onnx", files[0])
    assert result.exit_code == 1 and "junk.onnx: not a loadable ONNX model" in result.output
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(plain, tmp_path / "plain.onnx")
    result = _run("predict", "--model", tmp_path / "plain.onnx", files[0])
    assert result.exit_code == 1 and "plain.onnx is an ONNX model but not a biofed model" in result.output
    result = _run("predict", "--model", model, tmp_path / "absent.edf")
    assert result.exit_code == 1 and "absent.edf: no such recording file" in result.output
    result = _run("predict", "--model", model, files[0], files[1])
    assert result.exit_code == 1 and "repeats the eeg, bio modality" in result.output


def test_predict_calibrate_option(tmp_path):
    """A device-standardized model: --calibrate sets the standardization; a global one refuses it."""
    files = [
        _write_fif(tmp_path / f"{label}_raw.fif", make_recording(label, duration_s=20.0, subject="s3", random_state=i))
        for i, label in enumerate(CLASSES)
    ]
    recordings = [read_recording(f) for f in files]
    config = PipelineConfig()
    rows = [extract_features(r, config)[0] for r in recordings]
    mean, scale = device_standardization(np.vstack(rows))
    Z = (np.vstack(rows) - mean) / scale
    y = np.concatenate([np.full(len(r), i, dtype=np.int64) for i, r in enumerate(rows)])
    basis = fit_basis(Z, 16)
    d = Z.shape[1]
    params, _ = train(
        init_params(16, 2, 0, random_state=0), Z @ basis.components.T, y, 2, epochs=30, lr=0.1, random_state=0
    )
    spec = FeatureLayout.from_recording(recordings[0], config)
    model = ModelFile(
        params,
        CLASSES,
        0,
        Basis(basis.components, np.zeros(d), np.ones(d)),
        1,
        "ward7",
        21,
        20,
        spec,
        PrivacySpec(3.25, 1e-5, "rdp", {"rdp": 3.25}, "central", 1.0),
        standardization="device",
    )
    npz = save_arrays(tmp_path / "device.npz", model.to_arrays())
    assert _run("export", "--model", npz, "--out", tmp_path / "device.onnx").exit_code == 0
    result = _run(
        "predict",
        "--model",
        tmp_path / "device.onnx",
        "--summary-only",
        files[1],
        "--calibrate",
        files[0],
        "--calibrate",
        files[1],
    )
    assert result.exit_code == 0, result.output
    assert f"standardization: the subject's own, from {files[0]}, {files[1]}" in result.output
    expected = predict_proba(params, ((rows[1] - mean) / scale) @ basis.components.T, 2).argmax(axis=1)
    n_arith = int((expected == 1).sum())
    assert f"arithmetic {n_arith} ({n_arith / len(expected):.1%})" in result.output
    result = _run("predict", "--model", tmp_path / "device.onnx", "--summary-only", files[1])
    assert result.exit_code == 0 and "from the recording itself (pass --calibrate" in result.output
    result = _run("predict", "--model", tmp_path / "device.onnx", files[1], "--calibrate", tmp_path / "absent.edf")
    assert result.exit_code == 1 and "absent.edf: no such recording file" in result.output
    global_npz = dataclasses.replace(model, standardization="global", basis=Basis(basis.components, mean, scale)).save(
        tmp_path / "global.npz"
    )
    assert _run("export", "--model", global_npz, "--out", tmp_path / "global.onnx").exit_code == 0
    result = _run("predict", "--model", tmp_path / "global.onnx", files[1], "--calibrate", files[0])
    assert result.exit_code == 1 and "calibration recordings apply only" in result.output


def test_predict_refuses_other_layout(trained, shared_datasets):
    folder, _, npz, _ = trained
    model = folder / "model_layout.onnx"
    assert _run("export", "--model", npz, "--out", model).exit_code == 0
    result = _run("predict", "--model", model, shared_datasets / "eegmat" / "Subject02_2.edf")
    assert result.exit_code == 1
    assert (
        "does not fit" in result.output
        and "eeg: the model expects 250 Hz but the data is sampled at 500 Hz" in result.output
    )


def test_predict_a_session_of_two_files(tmp_path):
    """An EEG + ECG/PPG FIF and the WAV recorded with it form one session (the demo's devices)."""
    from biofed.apps.federation import write_synthetic_devices
    from biofed.edge.predict_cli import _session

    files = write_synthetic_devices(tmp_path / "data", 1, duration_s=10.0, random_state=2)["device00"]
    sessions = [_session((files[0], files[1])), _session((files[2], files[3]))]
    assert sessions[0].modalities == ("eeg", "audio", "bio") and sessions[1].annotations[0].label == "arithmetic"
    config = PipelineConfig()
    rows = [extract_features(s, config)[0] for s in sessions]
    X, y = np.vstack(rows), np.repeat([0, 1], [len(r) for r in rows])
    basis = fit_basis(X, 8)
    Z = project(X, basis.components, mean=basis.mean, scale=basis.scale)
    params, _ = train(init_params(8, 2, 0, random_state=0), Z, y, 2, epochs=30, lr=0.1, random_state=0)
    spec = FeatureLayout.from_recording(sessions[0], config)
    npz = ModelFile(params, CLASSES, 0, basis, 1, "demo", 3, 2, spec, PrivacySpec(None, None, "rdp")).save(
        tmp_path / "model.npz"
    )
    assert _run("export", "--model", npz, "--out", tmp_path / "m.onnx").exit_code == 0
    result = _run("predict", "--model", tmp_path / "m.onnx", "--summary-only", files[2], files[3])
    assert result.exit_code == 0, result.output
    expected = predict_proba(params, project(rows[1], basis.components, mean=basis.mean, scale=basis.scale), 2)
    n_arith = int(np.sum(expected.argmax(axis=1) == 1))
    assert f" s, {len(rows[1])} windows)" in result.output
    assert (
        f"accuracy: {n_arith / len(rows[1]):.3f} ({n_arith}/{len(rows[1])} windows labelled arithmetic)"
        in result.output
    )
    assert "no finite differential-privacy guarantee" in result.output
    result = _run("predict", "--model", tmp_path / "m.onnx", files[2])  # the WAV forgotten
    assert result.exit_code == 1
    assert "needs modalities ('eeg', 'audio', 'bio') but the data has ('eeg', 'bio')" in result.output


@pytest.mark.parametrize("content", ["text", "pickle_npy", "pickle_npz"])
def test_export_of_a_wrong_file_gives_no_pickle_advice(tmp_path, content):
    path = tmp_path / "model.npz"
    if content == "text":
        path.write_text("not a model\n")
    elif content == "pickle_npy":
        with path.open("wb") as handle:
            np.save(handle, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        np.savez(path, params=np.array([{"a": 1}], dtype=object))
    result = CliRunner().invoke(cli, ["export", "--model", str(path), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert "not a biofed model file" in result.output
    assert "allow_pickle" not in result.output and "unsafely" not in result.output
    assert ("not a NumPy .npz archive" in result.output) is (content == "text")


def test_predict_on_a_coordinator_model_file_says_export_first(tmp_path):
    path = tmp_path / "model_final.npz"
    np.savez(path, params=np.zeros(3))
    recording = tmp_path / "r.edf"
    recording.write_bytes(b"0")
    result = CliRunner().invoke(cli, ["predict", "--model", str(path), str(recording)])
    assert result.exit_code == 1 and "run `biofed export --model" in result.output


def test_predict_json_agrees_with_the_text_report(trained):
    import json

    folder, files, npz, proba = trained
    out = folder / "json.onnx"
    assert _run("export", "--model", npz, "--out", out).exit_code == 0
    result = _run("predict", "--model", out, "--json", files[1])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    n_arith = int(np.sum(proba.argmax(axis=1) == 1))
    assert report["counts"] == {"rest": 19 - n_arith, "arithmetic": n_arith}
    assert report["accuracy"] == pytest.approx(n_arith / 19) and report["labelled_windows"] == 19
    assert len(report["windows"]) == 19 and all(w["label"] == "arithmetic" for w in report["windows"])
    np.testing.assert_allclose([max(w["proba"]) for w in report["windows"]], proba.max(axis=1), atol=1e-3)
