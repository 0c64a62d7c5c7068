"""``biofed predict --model model.onnx FILE...``: classify a recording offline with an ONNX model.

The FILEs are read with :func:`biofed.datasets.read_recording`; several files form one
session when each adds modalities the others lack (an EDF with EEG + ECG and the WAV recorded
with it). The session's feature layout must be the model's (channels, rates, window/hop,
bands): a mismatch is refused with a message naming it. A model of a device-standardized
fleet z-scores the windows with the subject's statistics: those of the ``--calibrate``
recordings, else of the session itself. Every window is then classified with
onnxruntime (:class:`biofed.edge.inference.OnnxModel`): ``features`` models through
:func:`biofed.edge.pipeline.extract_features`, ``window`` models on the raw windows.

Output (stdout): the model's provenance and privacy guarantee, one line per window
(``t``, predicted class, probability, the recording's label) unless ``--summary-only``,
then the counts per predicted class and, where the recording is labelled with the model's
classes, the accuracy against those labels.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections import Counter
from pathlib import Path

import click

from biofed.cli_options import examples

__all__ = ["predict_command"]

logger = logging.getLogger(__name__)


def _read(path: Path):
    from biofed.datasets import RecordingError, read_recording

    if not path.is_file():
        raise click.ClickException(f"{path}: no such recording file")
    try:
        return read_recording(path)
    except (RecordingError, OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None


def _session(paths: tuple[Path, ...]):
    """One :class:`Recording` from the files (their modalities must not overlap)."""
    from biofed.datasets import Recording

    recordings = [_read(path) for path in paths]
    if len(recordings) == 1:
        return recordings[0]
    signals: dict = {}
    for path, recording in zip(paths, recordings):
        repeated = [m for m in recording.modalities if m in signals]
        if repeated:
            raise click.ClickException(
                f"{path} repeats the {', '.join(repeated)} modality of an earlier file; pass the files of one "
                "session (e.g. an EDF with EEG + ECG and the WAV recorded with it), or run predict once per file"
            )
        signals.update(recording.signals)
    first = recordings[0]
    return Recording(
        source="+".join(str(p) for p in paths),
        signals=signals,
        start_time=first.start_time,
        annotations=next((r.annotations for r in recordings if r.annotations), ()),
        label=next((r.label for r in recordings if r.label is not None), None),
        subject=next((r.subject for r in recordings if r.subject is not None), None),
    )


@click.command(
    "predict",
    epilog=examples(
        "biofed predict --model model.onnx Subject02_2.edf --calibrate Subject02_1.edf",
        "biofed predict --model model.onnx session.edf session.wav --summary-only",
        "biofed predict --model model.onnx Subject02_2.edf --json > predictions.json",
    ),
)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="ONNX model written by `biofed export` (or the coordinator's model_latest.onnx).",
)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--calibrate",
    "calibration_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Recording of the same subject whose windows set the standardization of a device-standardized "
    "model (repeatable; e.g. the subject's sessions of the other classes). Default: the recording "
    "itself.",
)
@click.option("--summary-only", is_flag=True, help="Print only the summary, not one line per window.")
@click.option(
    "--threads", type=click.IntRange(min=1), default=1, show_default=True, help="onnxruntime intra-op threads."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object: model, recording, windows (unless --summary-only), counts, accuracy.",
)
def predict_command(
    model_path: Path,
    files: tuple[Path, ...],
    calibration_files: tuple[Path, ...],
    summary_only: bool,
    threads: int,
    as_json: bool,
) -> None:
    """Classify every window of a recording (FILE, or the files of one session) with an ONNX model.

    A model of a device-standardized fleet (the default) z-scores the windows with the
    subject's own statistics, as each device does: from the --calibrate recordings or, without
    them, from the recording itself. A recording of one class only should be calibrated with
    the subject's other sessions, e.g.

        biofed predict --model model.onnx Subject02_2.edf --calibrate Subject02_1.edf
    """
    from biofed.edge.inference import InferenceError, OnnxModel

    if model_path.is_file() and (model_path.suffix == ".npz" or zipfile.is_zipfile(model_path)):
        raise click.ClickException(
            f"{model_path} is a coordinator model file, not an ONNX model; run `biofed export --model {model_path} "
            "--out model.onnx` first, then `biofed predict --model model.onnx ...`"
        )
    try:
        model = OnnxModel(model_path, threads=threads)
    except InferenceError as exc:
        raise click.ClickException(str(exc)) from None
    recording = _session(files)
    calibration = [_read(path) for path in calibration_files]
    try:
        result = model.predict_recording(recording, calibration=calibration)
    except InferenceError as exc:
        raise click.ClickException(str(exc)) from None
    counts = Counter(result.predicted.tolist())
    total = len(result.t)
    known = [i for i, label in enumerate(result.labels) if label in model.classes]
    correct = sum(result.predicted[i] == result.labels[i] for i in known)
    if as_json:
        report = {
            "model": model.describe(),
            "recording": recording.source,
            "duration_s": recording.duration,
            "calibration": [str(p) for p in calibration_files],
            "classes": list(model.classes),
            "counts": {c: counts.get(c, 0) for c in model.classes},
            "accuracy": correct / len(known) if known else None,
            "labelled_windows": len(known),
        }
        if not summary_only:
            report["windows"] = [
                {"t": float(t), "predicted": str(predicted), "proba": [float(x) for x in proba], "label": label or None}
                for t, predicted, proba, label in zip(result.t, result.predicted, result.proba, result.labels)
            ]
        click.echo(json.dumps(report))
        return
    click.echo(f"model: {model.describe()}")
    click.echo(f"recording: {recording.source} ({recording.duration:.1f} s, {len(result.t)} windows)")
    if model.metadata.standardization == "device":
        source = (
            ", ".join(str(p) for p in calibration_files)
            or "the recording itself (pass --calibrate with the "
            "subject's other sessions when this one holds a single class)"
        )
        click.echo(f"standardization: the subject's own, from {source}")
    if not summary_only:
        click.echo(f"{'t_s':>8}  {'predicted':<14} {'p':>6}  label")
        for t, predicted, proba, label in zip(result.t, result.predicted, result.proba, result.labels):
            click.echo(f"{t:8.1f}  {predicted:<14} {proba.max():6.3f}  {label or '-'}")
    click.echo(
        "predicted: "
        + (
            ", ".join(f"{c} {counts.get(c, 0)} ({counts.get(c, 0) / total:.1%})" for c in model.classes)
            if total
            else "no complete window"
        )
    )
    if known:
        labels = ", ".join(sorted(set(result.labels[known].tolist())))
        click.echo(f"accuracy: {correct / len(known):.3f} ({correct}/{len(known)} windows labelled {labels})")
    else:
        click.echo("accuracy: n/a (no window labelled with one of the model's classes)")
