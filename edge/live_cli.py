"""``biofed play``: recordings as live LSL streams; ``biofed replay --lsl``: features from live streams.

``biofed play FILE... --lsl NAME`` reads the files with :func:`biofed.datasets.read_recording`
and serves them with :class:`biofed.datasets.live.LslPlayer` in real time (for tests and
demos): one stream per modality, ``NAME-eeg``, ``NAME-audio``, ``NAME-bio``, and the labels
on ``NAME-markers``.

``biofed replay --lsl NAME --seconds S`` reads those streams (or a real device's) with
:class:`biofed.datasets.live.LslSource` for ``S`` seconds of session time and computes the
same feature rows ``biofed replay FILE`` computes from files; ``--out`` writes the same
archive. Its latency is end to end: from the LSL timestamp of a window's last sample to the
moment its feature row exists.

LSL discovery uses multicast; on a machine that may only talk to itself set ``LSLAPICFG``
(see :mod:`biofed.datasets.live`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from biofed.cli_options import examples, logging_options

__all__ = ["play_command", "replay_lsl"]

logger = logging.getLogger(__name__)


@click.command(
    "play",
    epilog=examples(
        "biofed play eegmat/Subject02_2.edf --lsl pi-01",
        "biofed play session.edf session.wav --lsl pi-02 --speed 2 --repeat 10",
    ),
)
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--lsl", "name", required=True, help="Stream name prefix and source id (streams NAME-eeg, NAME-markers...)."
)
@click.option(
    "--speed",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.0, min_open=True),
    help="Playback speed: 1 = real time.",
)
@click.option(
    "--repeat", default=1, show_default=True, type=click.IntRange(min=1), help="Play the files this many times."
)
@click.option(
    "--chunk",
    "chunk_s",
    default=0.01,
    show_default=True,
    type=click.FloatRange(min=0.0, min_open=True),
    help="Seconds of signal per pushed chunk (a device's transfer block).",
)
@logging_options(default_level="warning")
def play_command(files, name, speed, repeat, chunk_s) -> None:
    """Serve recording FILEs as live LSL streams in real time (for tests and demos).

    The files play together on one clock, as `biofed replay` plays them; Ctrl-C stops.
    """
    from biofed.datasets import RecordingError, read_recording
    from biofed.datasets.live import LslPlayer

    try:
        recordings = [read_recording(path) for path in files]
    except RecordingError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        player = LslPlayer(recordings, name, speed=speed, repeat=repeat, chunk_s=chunk_s)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    player.start()
    streams = ", ".join(f"{name}-{m}" for m in player.signals) + f", {name}-markers"
    seconds = max(r.duration for r in recordings) * repeat / speed
    click.echo(f"playing {len(files)} file(s) as LSL streams {streams} for {seconds:.1f} s (Ctrl-C stops)")
    try:
        while not player.wait(timeout=0.5):
            pass
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        player.stop()
    click.echo(f"pushed {player.samples_pushed} samples")


@dataclass
class _LiveStream:
    """What ``replay_cli._write_npz`` needs of a stream: name, pipeline (layout) and rows."""

    name: str
    pipeline: object
    rows: list = field(default_factory=list)


def _load_kernels(config, layout) -> None:
    """Run one silent window through a throw-away pipeline, so loading the compiled kernels from
    Numba's cache does not delay the first live window."""
    from biofed.edge.pipeline import StreamingPipeline

    pipeline = StreamingPipeline(config, layout)
    for part in layout.modalities:
        n = layout.window_samples(part)
        pipeline.push(part.modality, np.random.default_rng(0).normal(size=(part.n_channels, n)))


def replay_lsl(names, seconds: float, out, config, k: int, progress: bool, timeout_s: float) -> None:
    """Body of ``biofed replay --lsl``: features of ``seconds`` of live streams; report like ``replay``."""
    from tqdm import tqdm

    from biofed.datasets.live import Gap, LslError, LslSource
    from biofed.edge.continuous import LiveFeatures
    from biofed.edge.replay_cli import _write_npz
    from biofed.model import FeatureLayout, LayoutError
    from biofed.peak_memory import peak_rss_mb

    source = LslSource(names, modalities=config.modalities, resolve_timeout_s=timeout_s)
    try:
        try:
            source.open()
        except LslError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            layout = FeatureLayout.from_channels(source.channels(), config)
        except LayoutError as exc:
            raise click.ClickException(f"{source.source}: {exc}") from None
        _load_kernels(config, layout)
        source.flush()  # start with fresh samples, not those buffered while the kernels loaded
        features = LiveFeatures(config, layout, source.bad_spans)
        stream = _LiveStream(source.source, features.pipeline)
        from mne_lsl.lsl import local_clock

        latencies: list[float] = []  # seconds, per window
        gaps = []
        window_end = {m.modality: config.window_s - 1.0 / m.sfreq for m in layout.modalities}
        last_sample = max(window_end.values())
        stop = threading.Event()
        started = time.perf_counter()
        bar = tqdm(total=seconds, unit="s", desc="live (session seconds)", file=sys.stderr, disable=not progress)
        with bar:
            for event in source.chunks(stop, seconds=seconds):
                if isinstance(event, Gap):
                    gaps.append(event)
                rows = features.feed(event)
                if rows:
                    now = local_clock()
                    latencies.extend(now - source.lsl_time(row.t + last_sample) for row in rows)
                    stream.rows.extend(rows)
                if not isinstance(event, Gap):
                    bar.n = round(min(event.t0, seconds), 2)
                    bar.refresh()
        wall = time.perf_counter() - started
    finally:
        source.close()
    n_rows = len(stream.rows)
    click.echo(f"source: {source.source}: {', '.join(layout.modality_names)}, {layout.n_features} features")
    click.echo(
        f"windows processed: {n_rows} in {wall:.1f} s wall"
        + (f" ({features.rejected_bad} overlapping BAD markers dropped)" if features.rejected_bad else "")
    )
    if gaps:
        click.echo(
            f"gaps: {len(gaps)} (" + ", ".join(f"{g.stream} {g.missing_s:.2f} s at t={g.t:.1f} s" for g in gaps) + ")"
        )
    labels = sorted({row.label or "" for row in stream.rows})
    click.echo("labels: " + (", ".join(label or "(none)" for label in labels) if labels else "none"))
    if latencies:
        p50, p95, p99 = np.percentile(np.array(latencies) * 1e3, [50, 95, 99])
        click.echo(
            f"latency per window (sample timestamp -> row): p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms"
        )
    if out is not None:
        if n_rows < 2:
            raise click.ClickException(f"only {n_rows} window(s) were produced; --out needs at least 2 to fit a basis.")
        _write_npz(out, [stream], k)
    click.echo(f"peak RSS: {peak_rss_mb():.1f} MB")
