"""``biofed replay``: stream recordings through the edge feature pipeline, as a device would.

Every FILE is read with :func:`biofed.datasets.read_recording` and played with
:func:`biofed.datasets.replay` (``--speed 0`` as fast as possible, ``1`` real time) chunk by
chunk into :class:`biofed.edge.pipeline.StreamingPipeline` objects.

Streams
    Files become *streams*, one pipeline each, in command-line order, grouped by
    :func:`biofed.datasets.replay.group_streams`: an EDF with EEG + ECG followed by the WAV
    recorded with it form one multimodal stream whose rows hold EEG, ECG and audio features of
    the same windows (the stream ends with its shorter file); another subject, or a second file
    with the same modalities (``Subject02_1.edf`` then ``Subject02_2.edf``), starts a stream of
    its own with its own pipeline and time base (every stream starts at t = 0).

Clock and memory
    The files of a stream always play together on one clock. With ``--speed`` > 0 every stream
    plays on one shared clock too (simulating devices recording at once), so every recording is
    held in memory. With ``--speed 0`` nothing waits for a clock and streams never interact, so
    they are replayed one after the other and only the current stream's recordings are in memory
    (the features are identical either way); the memory freed after each stream is handed back
    to the OS.

Report (stdout)
    windows processed; real-time factor = seconds of recorded signal (summed over files) / wall
    seconds of the replay (chunking, features, projection, sketching; reading files is reported
    separately); per-window latency percentiles (from the start of the ``push`` that completed a
    window to its row, ms); peak resident memory of the process.

``--out features.npz`` (``numpy.load(path)``, no pickles)
    ``features`` (N, F) raw rows, ``labels`` (N,) str (``""`` unlabelled), ``times`` (N,) window
    start in seconds of its stream, ``sources`` (N,) str (the stream's file(s), ``+``-joined),
    ``feature_names`` (F,), ``layout_hash``, and — since no global basis exists offline — a local
    standardized PCA basis fitted on all rows (``components`` (k, F), ``mean`` (F,), ``scale``
    (F,)) with the rows projected onto it, ``projected`` (N, k). All streams must then share one
    feature layout (same channels and rates).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from biofed.cli_options import examples
from biofed.peak_memory import peak_rss_mb

__all__ = ["replay_command"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Source:
    """What is kept of a recording once its stream has been replayed."""

    source: str


@dataclass
class _Stream:
    """One pipeline and the recordings feeding it."""

    recordings: list = field(default_factory=list)
    pipeline: object = None
    rows: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return "+".join(rec.source for rec in self.recordings)


def _read_streams(paths, modalities: tuple[str, ...], timer: dict) -> Iterator[list]:
    """Read ``paths`` one by one and yield the recordings of each stream (see module docstring)."""
    from biofed.datasets import RecordingError, read_recording
    from biofed.datasets.replay import group_streams

    def read():
        for path in paths:
            started = time.perf_counter()
            try:
                rec = read_recording(path)
            except RecordingError as exc:
                raise click.ClickException(f"cannot read {path}: {exc}") from None
            timer["read"] += time.perf_counter() - started
            yield path, rec

    for stream in group_streams(read(), modalities):
        yield [rec for _, rec in stream]


def _return_freed_memory() -> None:
    """Hand memory freed by the last stream back to the OS (glibc only; a no-op elsewhere).

    Reading an EDF allocates several transient copies of the signal; glibc keeps such freed
    blocks in its heap, where later long-lived allocations pin them, so RSS would creep up by
    one file's worth per stream. ``malloc_trim(0)`` releases every free page.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        logger.debug("malloc_trim unavailable; freed memory stays with the allocator")


@click.command(
    "replay",
    epilog=examples(
        "biofed replay eegmat/*.edf --speed 0 --out /tmp/features.npz",
        "biofed replay Subject02_1.edf --speed 1 --no-progress   # real time",
        "biofed replay --lsl pi-01 --seconds 60 --out /tmp/live.npz",
    ),
)
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--lsl",
    "lsl_names",
    multiple=True,
    help="Read live LSL streams of this name, name prefix or source id instead of FILEs (repeatable).",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0.0, min_open=True),
    help="With --lsl: seconds of live signal to process (required).",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.0, min_open=True),
    help="With --lsl: seconds to look for the streams.",
)
@click.option(
    "--speed",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Playback speed: 0 = as fast as possible, 1 = real time, 10 = ten times faster.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="File (.npz) to write features, labels, times, sources, names and a fitted local k-basis to.",
)
@click.option("--window", "window_s", default=2.0, show_default=True, type=float, help="Window length (s).")
@click.option("--hop", "hop_s", default=1.0, show_default=True, type=float, help="Hop between windows (s).")
@click.option(
    "--k",
    "k",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Components of the local basis written with --out.",
)
@click.option(
    "--chunk",
    "chunk_s",
    default=0.25,
    show_default=True,
    type=float,
    help="Replay chunk length (s), i.e. how often a sensor delivers samples.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm progress bar on stderr.")
def replay_command(files, lsl_names, seconds, timeout_s, speed, out, window_s, hop_s, k, chunk_s, progress) -> None:
    """Replay recording FILEs through the edge feature pipeline and report its throughput.

    Each file is its own stream (own pipeline, own time base) unless it adds new modalities of
    the same subject to the file before it (e.g. an EDF followed by its WAV): then they form one
    multimodal stream. With --lsl NAME --seconds S, live LSL streams are read instead.
    """
    from tqdm import tqdm

    from biofed.datasets import replay
    from biofed.datasets.recording import stream_channels
    from biofed.edge.pipeline import (
        ChunkError,
        PipelineConfig,
        PipelineError,
        StreamingPipeline,
    )
    from biofed.model import FeatureLayout, LayoutError

    if bool(files) == bool(lsl_names):
        raise click.UsageError("give recording FILEs or --lsl NAME (live streams), one of the two.")
    if lsl_names and seconds is None:
        raise click.BadParameter("--lsl needs --seconds S (how much live signal to process).", param_hint="--seconds")
    if not lsl_names and seconds is not None:
        raise click.BadParameter("--seconds applies to --lsl only; files are replayed whole.", param_hint="--seconds")
    if len(set(map(str, files))) != len(files):
        raise click.BadParameter("a file is given more than once.", param_hint="FILES")
    if not (math.isfinite(chunk_s) and chunk_s > 0):
        raise click.BadParameter(f"must be a finite number of seconds > 0, got {chunk_s}.", param_hint="--chunk")
    if not math.isfinite(speed):
        raise click.BadParameter(f"must be finite (0 = as fast as possible), got {speed}.", param_hint="--speed")
    try:
        config = PipelineConfig(window_s=window_s, hop_s=hop_s, k=k)
    except PipelineError as exc:
        raise click.UsageError(str(exc)) from None

    if lsl_names:
        from biofed.edge.live_cli import replay_lsl

        replay_lsl(lsl_names, seconds, out, config, k, progress, timeout_s)
        return
    timer = {"read": 0.0, "replay": 0.0}
    groups = _read_streams(files, config.modalities, timer)
    # speed 0: one stream at a time (bounded memory); speed > 0: every stream on one clock.
    batches = ([group] for group in groups) if speed == 0 else [list(groups)]
    streams: list[_Stream] = []
    latencies: list[float] = []
    n_rows = dropped_chunks = dropped_windows = 0
    stream_seconds = 0.0
    bar = tqdm(unit="s", desc="replay (signal seconds)", file=sys.stderr, disable=not progress, unit_scale=True)
    with bar:
        for batch in batches:
            batch_streams, by_source = [], {}
            for group in batch:
                stream = _Stream(recordings=group)
                channels = stream_channels(group)
                try:
                    layout = FeatureLayout.from_channels(channels, config)
                except LayoutError as exc:
                    raise click.ClickException(f"{stream.name}: {exc}") from None
                if out is not None and streams and layout.hash != streams[0].pipeline.layout.hash:
                    first = streams[0].pipeline.layout
                    raise click.UsageError(
                        f"--out stacks every row in one matrix, but {stream.name} ({layout.n_features} features of "
                        f"{'+'.join(layout.modality_names)}) has another feature layout than {streams[0].name} "
                        f"({first.n_features} features of {'+'.join(first.modality_names)}); replay files with the "
                        "same channels and rates together, or run once per layout."
                    )
                stream.pipeline = StreamingPipeline(config, layout)
                logger.info(
                    "stream %s: %s, %d features", stream.name, "+".join(layout.modality_names), layout.n_features
                )
                streams.append(stream)
                batch_streams.append(stream)
                for rec in group:
                    by_source[rec.source] = (stream, len(rec.modalities))
                    stream_seconds += rec.duration
            recordings = [rec for group in batch for rec in group]
            t0 = time.perf_counter()
            for chunk in replay(recordings, speed=speed, chunk_s=chunk_s):
                stream, n_modalities = by_source[chunk.source]
                pipe = stream.pipeline
                if chunk.modality not in pipe.layout.modality_names:
                    continue
                started = time.perf_counter()
                try:
                    rows = pipe.push(chunk.modality, chunk.data, chunk.label)
                except ChunkError as exc:  # as on a device: log and drop, never crash
                    dropped_chunks += 1
                    logger.warning(
                        "%s: dropped a %s chunk at t=%.2f s: %s", chunk.source, chunk.modality, chunk.t0, exc
                    )
                    continue
                if rows:
                    latency = time.perf_counter() - started
                    latencies.extend([latency] * len(rows))
                    n_rows += len(rows)
                    if out is not None:
                        stream.rows.extend(rows)
                bar.update(chunk.data.shape[1] / pipe.layout.modality(chunk.modality).sfreq / n_modalities)
            dropped_windows += sum(stream.pipeline.flush() for stream in batch_streams)
            timer["replay"] += time.perf_counter() - t0
            for stream in batch_streams:
                stream.recordings = [_Source(rec.source) for rec in stream.recordings]  # free the samples
            del batch, recordings
            _return_freed_memory()

    wall = timer["replay"]
    click.echo(f"files: {len(files)} in {len(streams)} stream(s), read in {timer['read']:.2f} s")
    click.echo(f"windows processed: {n_rows}" + (f" ({dropped_windows} incomplete dropped)" if dropped_windows else ""))
    if dropped_chunks:
        click.echo(f"chunks rejected: {dropped_chunks} (see the log)")
    rtf = stream_seconds / wall if wall > 0 else float("inf")
    click.echo(f"stream time: {stream_seconds:.1f} s in {wall:.3f} s wall -> real-time factor {rtf:.0f}x")
    if latencies:
        p50, p95, p99 = np.percentile(np.array(latencies) * 1e3, [50, 95, 99])
        click.echo(f"latency per window (push -> row): p50 {p50:.3f} ms, p95 {p95:.3f} ms, p99 {p99:.3f} ms")
    if out is not None:
        if n_rows < 2:
            raise click.ClickException(f"only {n_rows} window(s) were produced; --out needs at least 2 to fit a basis.")
        _write_npz(out, streams, k)
    click.echo(f"peak RSS: {peak_rss_mb():.1f} MB")


def _write_npz(out: Path, streams: list[_Stream], k: int) -> None:
    """Stack every stream's rows, fit the local basis and write the ``--out`` archive."""
    from biofed.kernels import project
    from biofed.model import fit_basis

    layout = streams[0].pipeline.layout
    X = np.stack([row.vector for stream in streams for row in stream.rows])
    labels = np.array(["" if row.label is None else row.label for s in streams for row in s.rows], dtype=str)
    times = np.array([row.t for s in streams for row in s.rows], dtype=np.float64)
    sources = np.array([s.name for s in streams for _ in s.rows], dtype=str)
    basis = fit_basis(X, k)
    projected = project(X, basis.components, mean=basis.mean, scale=basis.scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:  # a file object keeps numpy from appending ".npz" to other names
        np.savez(
            fh, features=X, labels=labels, times=times, sources=sources,
            feature_names=np.array(layout.feature_names, dtype=str), layout_hash=np.array(layout.hash),
            components=basis.components, mean=basis.mean, scale=basis.scale, projected=projected,
        )  # fmt: skip
    click.echo(
        f"wrote {out}: features {X.shape}, projected {projected.shape} (local k={basis.components.shape[0]} basis)"
    )
