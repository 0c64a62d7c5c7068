"""A device's recordings into its feature store: streams, a device clock, and a ledger that survives restarts.

The configured recordings are replayed (:func:`biofed.datasets.replay` at ``replay_speed``)
through :class:`~biofed.edge.continuous.LiveFeatures` into the
:class:`~biofed.edge.store.FeatureStore` as raw, labelled feature rows. Files are grouped into
*streams* as ``biofed replay`` does (:func:`biofed.datasets.replay.group_streams`: an EDF/FIF
with EEG + ECG and the WAV recorded with it form one); every stream has its own pipeline.
Streams play one after the other on a device clock (each stream starts ``window_s + hop_s``
after the last stored window), so window times increase across sessions and the held-out rule
of :mod:`biofed.edge.split` ("last 20 % of each label in time order") is well defined. Windows
overlapping a ``BAD*`` annotation are not stored.

The store's ingestion ledger records each stream: *begun* before its first row is written and
*finished* after its last; :meth:`Ingestion.ingest` first deletes the rows of a stream begun but
never finished and replays it, so a restart neither duplicates nor loses windows. Files already
ingested are not read again. A device keeps one sensor layout: a stream of another feature
layout than the stored one is logged and skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from biofed.config import DeviceConfig
from biofed.edge.pipeline import FeatureRow, PipelineConfig
from biofed.edge.store import FeatureStore, StoreError
from biofed.model import FeatureLayout, LayoutError

__all__ = ["Ingestion", "recording_files"]

logger = logging.getLogger(__name__)

_APPEND_EVERY = 64
"""Rows buffered before a store append while ingesting (one durable transaction each)."""


def recording_files(config: DeviceConfig) -> list[Path]:
    """``config.recordings`` and the files of its ``kind = "file"`` sources (a folder's recordings, sorted)."""
    from biofed.datasets import recordings_in

    files = list(config.recordings)
    for source in config.sources:
        if source.kind == "file":
            files += recordings_in(source.path) if source.path.is_dir() else [source.path]
    return files


def _stream_key(paths: Sequence[Path]) -> str:
    return "+".join(str(p) for p in paths)


class Ingestion:
    """Feature rows of one device into its store, from recordings or from live sources.

    Parameters
    ----------
    config : DeviceConfig
        The device's settings: recordings, sources, ``replay_speed``, ``store_path``.
    store : FeatureStore
        The device's store (shared with the task handlers; it is thread-safe).
    pipeline_config : PipelineConfig
        Window, hop and mel settings of the device's pipeline.
    on_rows : callable, optional
        ``on_rows(rows, offset)`` for every batch of new rows as it is produced (``offset``:
        the stream's start on the device clock); the agent classifies them.
    on_layout : callable, optional
        ``on_layout(layout_json)`` when the device's feature layout becomes known or changes.
    on_stored : callable, optional
        ``on_stored(n)`` after ``n`` rows were committed.
    """

    def __init__(
        self,
        config: DeviceConfig,
        store: FeatureStore,
        pipeline_config: PipelineConfig,
        *,
        on_rows: Callable[[list[FeatureRow], float], None] | None = None,
        on_layout: Callable[[str], None] | None = None,
        on_stored: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.store = store
        self.pipeline_config = pipeline_config
        self._on_rows = on_rows
        self._on_layout = on_layout
        self._on_stored = on_stored
        current = store.layout_hash
        self.layout_json = "" if current is None else store.layout_spec_json(current)
        """The device's feature layout (JSON of :class:`biofed.model.FeatureLayout`), "" until known."""

    # ------------------------------------------------------------------ layout and clock
    def bind(self, layout: FeatureLayout) -> bool:
        """Make ``layout`` the store's and the device's; False (nothing changes) when the store
        already holds rows of another layout."""
        if not self.store.bind_layout(layout.hash):
            return False
        self._set_layout(layout.hash, layout.to_json())
        return True

    def _set_layout(self, layout_hash: str, layout_json: str) -> None:
        if layout_json == self.layout_json:
            return
        self.store.save_layout_spec(layout_hash, layout_json)
        self.layout_json = layout_json
        if self._on_layout is not None:
            self._on_layout(layout_json)

    def next_offset(self) -> float:
        """Where a new stream starts on the device clock: ``window_s + hop_s`` after the last stored window."""
        last = self.store.latest_time()
        return 0.0 if last is None else last + self.pipeline_config.window_s + self.pipeline_config.hop_s

    # ------------------------------------------------------------------ rows
    def append(self, rows: Sequence[FeatureRow], offset: float, stream: str) -> int:
        """Store ``rows`` (``t`` = seconds of their stream, which starts at ``offset``) with
        ``source = stream`` in one transaction; returns how many were stored (0 and logged
        when the store refuses them)."""
        if not rows:
            return 0
        X = np.stack([r.vector for r in rows])
        t = np.array([offset + r.t for r in rows])
        try:
            self.store.append(X, [r.label for r in rows], t, source=stream)
        except StoreError as exc:
            logger.error("%s: %d windows of %s not stored: %s", self.device_id, len(rows), stream, exc)
            return 0
        if self._on_stored is not None:
            self._on_stored(len(rows))
        return len(rows)

    def produced(self, rows: list[FeatureRow], offset: float) -> None:
        """Hand new rows to ``on_rows`` (a prediction for every new window, as it is produced)."""
        if rows and self._on_rows is not None:
            self._on_rows(rows, offset)

    def store_windows(
        self, X: np.ndarray, labels: Sequence[str], t: np.ndarray, *, layout_hash: str, layout_json: str, source: str
    ) -> int:
        """Add feature windows computed elsewhere with the same pipeline (a simulator deals the
        windows of a few recordings to many small devices). ``layout_hash`` / ``layout_json``:
        the :class:`~biofed.model.FeatureLayout` hash and JSON of the rows. Returns the rows added.

        Raises
        ------
        StoreError
            The store already holds rows of another layout, or the rows are invalid.
        """
        if not self.store.bind_layout(layout_hash):
            raise StoreError(f"{self.config.store_path} holds layout {self.store.layout_hash}, not {layout_hash}")
        self._set_layout(layout_hash, layout_json)
        self.store.append(X, list(labels), t, source=source)
        return len(t)

    # ------------------------------------------------------------------ recordings
    def ingested_paths(self) -> set[str]:
        """The recording files already ingested completely."""
        return self.store.ingested_paths()

    def _streams(self, paths: Sequence[Path]) -> Iterator[tuple[list[Path], list]]:
        """Read ``paths`` one by one and yield ``(paths, recordings)`` per stream (unreadable files skipped)."""
        from biofed.datasets import RecordingError, read_recording
        from biofed.datasets.replay import group_streams

        def readable():
            for path in paths:
                try:
                    yield Path(path), read_recording(path)
                except (RecordingError, OSError) as exc:
                    logger.error("%s: cannot read recording %s, skipped: %s", self.device_id, path, exc)

        for stream in group_streams(readable(), self.pipeline_config.modalities):
            yield [path for path, _ in stream], [recording for _, recording in stream]

    def ingest(self, stop: threading.Event | None = None, *, paths: Sequence[Path] | None = None) -> int:
        """Replay every configured recording (or ``paths``) not ingested yet into the store.

        Returns the number of rows added. Unreadable files and streams whose feature layout
        differs from the stored one are logged and skipped.
        """
        from biofed.datasets import replay
        from biofed.datasets.live import BadSpans
        from biofed.datasets.recording import stream_channels
        from biofed.datasets.replay import bad_spans
        from biofed.edge.continuous import LiveFeatures

        for stream, deleted in self.store.recover_interrupted().items():
            logger.warning(
                "%s: ingestion of %s was interrupted; dropped its %d stored rows, replaying it",
                self.device_id,
                stream,
                deleted,
            )
        done = self.store.ingested_paths()
        configured = recording_files(self.config) if paths is None else list(paths)
        todo = [p for p in configured if str(p) not in done]
        skipped = len(configured) - len(todo)
        if skipped:
            logger.info("%s: %d recording(s) already ingested, skipped", self.device_id, skipped)
        added = 0
        for stream_paths, recordings in self._streams(todo):
            if stop is not None and stop.is_set():
                break
            stream = _stream_key(stream_paths)
            channels = stream_channels(recordings)
            try:
                layout = FeatureLayout.from_channels(channels, self.pipeline_config)
            except LayoutError as exc:
                logger.error("%s: stream %s has no usable layout, skipped: %s", self.device_id, stream, exc)
                continue
            if not self.bind(layout):
                logger.error(
                    "%s: stream %s has feature layout %s (%d features) but the store %s holds layout %s; "
                    "a device keeps one sensor layout: skipped",
                    self.device_id,
                    stream,
                    layout.hash,
                    layout.n_features,
                    self.config.store_path,
                    self.store.layout_hash,
                )
                continue
            offset = self.next_offset()
            self.store.begin_stream(stream_paths, stream)
            bad = BadSpans()
            for recording in recordings:  # every recording of a stream starts at its t = 0
                for onset, end in bad_spans(recording):
                    bad.add(onset, end)
            features = LiveFeatures(self.pipeline_config, layout, bad)
            rows: list = []
            n_stream = 0
            interrupted = False
            for chunk in replay(recordings, speed=self.config.replay_speed):
                if stop is not None and stop.is_set():
                    interrupted = True
                    break
                new = features.feed(chunk)
                rows.extend(new)
                self.produced(new, offset)
                if len(rows) >= _APPEND_EVERY:
                    n_stream += self.append(rows, offset, stream)
                    rows = []
            if interrupted:
                logger.info("%s: stopped while ingesting %s (replayed again on restart)", self.device_id, stream)
                break
            features.pipeline.flush()
            n_stream += self.append(rows, offset, stream)
            self.store.finish_stream(stream_paths, stream, n_stream)
            added += n_stream
            logger.info(
                "%s: ingested %s: %d windows of %d features%s",
                self.device_id,
                stream,
                n_stream,
                layout.n_features,
                f" ({features.rejected_bad} overlapping BAD annotations dropped)" if features.rejected_bad else "",
            )
        return added
