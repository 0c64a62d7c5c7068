"""``biofed export --model MODEL --out model.onnx``: the coordinator's model as an ONNX graph.

MODEL is a coordinator model file (``state_dir/model_final.npz``, ``model_latest.npz`` or a
per-round ``models/round_NNNNN.npz``, read by :class:`biofed.model.ModelFile`); see
:mod:`biofed.coordinator.onnx_export` for the graph and :mod:`biofed.model.format` for the
metadata it carries.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from biofed.cli_options import examples
from biofed.model import DTYPES, INPUT_FEATURES, INPUT_KINDS

__all__ = ["export_command"]

logger = logging.getLogger(__name__)


@click.command(
    "export",
    epilog=examples(
        "biofed export --model state/model_final.npz --out model.onnx",
        "biofed export --model state/models/round_00005.npz --out round5.onnx --input window --dtype float64",
    ),
)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Coordinator model file (.npz): model_final.npz, model_latest.npz or models/round_NNNNN.npz.",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="ONNX file to write (a file path; its folder must exist).",
)
@click.option(
    "--input",
    "input_kind",
    type=click.Choice(INPUT_KINDS),
    default=INPUT_FEATURES,
    show_default=True,
    help="features: raw feature rows in; window: raw sensor windows (+ heart-rate features) in.",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="float32",
    show_default=True,
    help="Element type of the graph (float64 matches the Numba path to ~1e-12).",
)
def export_command(model_path: Path, out_path: Path, input_kind: str, dtype: str) -> None:
    """Export a coordinator model file as an ONNX model with biofed metadata."""
    from biofed.coordinator.onnx_export import ExportError, build_model, write_bytes
    from biofed.model import ModelFile, ModelFileError

    try:
        model = ModelFile.load(model_path)
        onnx_model = build_model(model, input_kind=input_kind, dtype=dtype)
    except (ModelFileError, ExportError) as exc:
        raise click.ClickException(str(exc)) from None
    data = onnx_model.SerializeToString()
    try:
        write_bytes(out_path, data)
    except OSError as exc:
        raise click.ClickException(f"{out_path}: cannot write the ONNX model: {exc}") from None
    layout = model.layout
    modalities = ", ".join(f"{m.modality} {len(m.ch_names)} ch @ {m.sfreq:g} Hz" for m in layout.modalities)
    eps = model.privacy.epsilon
    click.echo(
        f"wrote {out_path} ({len(data) / 1024:.1f} KiB, opset {onnx_model.opset_import[0].version}, "
        f"{input_kind} input, {dtype})"
    )
    kind = "logistic regression" if model.hidden == 0 else f"MLP ({model.hidden} hidden)"
    click.echo(
        f"fleet {model.fleet or '-'}, round {model.round} ({model.train_round} training rounds), basis "
        f"v{model.basis_version}, {kind} on k={model.k} of {model.n_features} features; classes "
        f"{', '.join(model.classes)}"
    )
    click.echo(f"layout: {modalities}; window {layout.window_s:g} s, hop {layout.hop_s:g} s")
    click.echo(
        "privacy: "
        + (
            "no finite guarantee"
            if eps is None
            else f"epsilon {eps:.4g} at delta {model.privacy.delta:g} ({model.privacy.accountant})"
        )
    )
