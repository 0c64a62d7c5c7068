"""Continuous operation of a device: live sources and watched folders feed the store while the agent serves.

:class:`LiveFeatures` turns a source's events (:class:`~biofed.datasets.Chunk` and
:class:`~biofed.datasets.live.Gap`) into feature rows on the session clock: a gap ends the
current windows (:meth:`StreamingPipeline.flush`) and the next rows count from the new
segment's start; windows overlapping a bad span (``BAD*`` annotations of a file, ``BAD*``
markers of a live stream) are dropped. ``biofed replay --lsl`` and the agent both use it.

:class:`ContinuousIngestion` runs beside :meth:`EdgeAgent.run <biofed.edge.agent.EdgeAgent.run>`:

* every ``kind = "lsl"`` source in its own thread: resolve (retried until the device appears),
  check that its feature layout is the store's, then store every window as it is completed
  (rows of a live session are committed as they come: a restart keeps them) and classify it
  with the current global model (``predict = true``). When a source fails it is reopened.
* every ``kind = "file"`` source naming a folder with ``watch = true``: the folder is scanned
  every ``watch_interval_s``; a recording file that is new and has not changed size for one
  interval is ingested like the configured recordings (once, remembered across restarts).

Memory stays flat over any session length: pipelines have fixed buffers, rows go to the store
in small batches, the store evicts its oldest rows beyond ``store_max_rows``, markers and bad
spans older than the current windows are forgotten.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from biofed.datasets.live import BadSpans, Gap
from biofed.edge.pipeline import ChunkError, FeatureRow, PipelineConfig, StreamingPipeline
from biofed.model import FeatureLayout, LayoutError

__all__ = ["ContinuousIngestion", "LiveFeatures"]

logger = logging.getLogger(__name__)

_RETRY_S = 5.0


@dataclass
class LiveFeatures:
    """Events of one source in, feature rows (``t`` = session seconds) out, bad windows dropped.

    Parameters
    ----------
    config : PipelineConfig
    layout : FeatureLayout
        The source's channels.
    bad_spans : BadSpans
        Spans (session seconds) whose windows are dropped; the source may still add to it.
    """

    config: PipelineConfig
    layout: FeatureLayout
    bad_spans: BadSpans

    def __post_init__(self) -> None:
        self.pipeline = StreamingPipeline(self.config, self.layout)
        self.segment_start = 0.0
        self.rejected_bad = 0
        self.rejected_chunks = 0
        self.gaps = 0

    def feed(self, event) -> list[FeatureRow]:
        """Push one event; return the windows it completed that overlap no bad span."""
        if isinstance(event, Gap):
            self.pipeline.flush()
            self.segment_start = event.t
            self.gaps += 1
            return []
        if event.modality not in self.layout.modality_names:
            return []
        try:
            rows = self.pipeline.push(event.modality, event.data, event.label)
        except ChunkError as exc:
            self.rejected_chunks += 1
            logger.warning("%s: dropped a %s chunk at t=%.2f s: %s", event.source, event.modality, event.t0, exc)
            return []
        if not rows:
            return rows
        window = self.config.window_s
        kept = []
        for row in rows:
            t = self.segment_start + row.t
            if self.bad_spans.overlaps(t, t + window):
                self.rejected_bad += 1
                continue
            kept.append(FeatureRow(t, row.label, row.vector))
        return kept


class ContinuousIngestion:
    """Live LSL sources and watched folders of one agent (see the module docstring)."""

    def __init__(self, agent, *, watch_interval_s: float = 5.0) -> None:
        self.agent = agent
        self.watch_interval_s = watch_interval_s
        self._threads: list[threading.Thread] = []
        self.rows_stored = 0
        self.windows_rejected = 0

    @staticmethod
    def needed(config) -> bool:
        """Whether a device config has live sources or watched folders."""
        return any(s.kind == "lsl" or s.watch for s in config.sources)

    def start(self, stop: threading.Event) -> None:
        """Start a thread per live source and one for the watched folders."""
        sources = self.agent.config.sources
        for source in sources:
            if source.kind == "lsl":
                self._spawn(f"lsl-{source.name}", self._run_lsl, source, stop)
        folders = [s.path for s in sources if s.kind == "file" and s.watch]
        if folders:
            self._spawn("watch", self._run_watch, folders, stop)

    def join(self, timeout: float = 10.0) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _spawn(self, name: str, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------------ live streams
    def _run_lsl(self, source, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self._lsl_session(source, stop)
            except Exception:  # noqa: BLE001 - a live source is reopened, never ends the agent
                logger.exception(
                    "%s: LSL source %s failed; reopening in %.0f s", self.agent.device_id, source.name, _RETRY_S
                )
            stop.wait(_RETRY_S)

    def _lsl_session(self, source, stop: threading.Event) -> None:
        from biofed.datasets.live import LslError, LslSource

        agent = self.agent
        ingestion = agent.ingestion
        live = LslSource(
            source.name,
            modalities=agent.pipeline_config.modalities,
            resolve_timeout_s=source.resolve_timeout_s,
            gap_tolerance_s=source.gap_tolerance_s,
        )
        try:
            try:
                live.open()
            except LslError as exc:
                logger.warning("%s: %s", agent.device_id, exc)
                return
            try:
                layout = FeatureLayout.from_channels(live.channels(), agent.pipeline_config)
            except LayoutError as exc:
                logger.error("%s: LSL source %s has no usable feature layout: %s", agent.device_id, source.name, exc)
                return
            if not ingestion.bind(layout):
                logger.error(
                    "%s: LSL source %s has feature layout %s (%d features) but the store holds layout %s; "
                    "a device keeps one sensor layout",
                    agent.device_id,
                    source.name,
                    layout.hash,
                    layout.n_features,
                    agent.store.layout_hash,
                )
                return
            offset = ingestion.next_offset()
            key = f"{live.source}@{time.strftime('%Y-%m-%dT%H:%M:%S')}"
            features = LiveFeatures(agent.pipeline_config, layout, live.bad_spans)
            logger.info("%s: ingesting live from %s (%d features)", agent.device_id, live.source, layout.n_features)
            for event in live.chunks(stop):
                rows = features.feed(event)
                if rows:
                    self.rows_stored += ingestion.append(rows, offset, key)
                    ingestion.produced(rows, offset)
            self.windows_rejected += features.rejected_bad
        finally:
            live.close()

    # ------------------------------------------------------------------ watched folders
    def _run_watch(self, folders: list[Path], stop: threading.Event) -> None:
        from biofed.datasets import recordings_in

        sizes: dict[Path, int] = {}
        while not stop.is_set():
            done = self.agent.ingestion.ingested_paths()
            ready = []
            for folder in folders:
                try:
                    entries = recordings_in(folder)
                except OSError as exc:
                    logger.warning("%s: cannot list watched folder %s: %s", self.agent.device_id, folder, exc)
                    continue
                for path in entries:
                    if str(path) in done:
                        continue
                    try:
                        size = path.stat().st_size
                    except OSError:  # removed meanwhile
                        continue
                    if sizes.get(path) == size:  # unchanged for one interval: the writer is done
                        ready.append(path)
                    sizes[path] = size
            if ready:
                logger.info("%s: %d new recording(s) in watched folders", self.agent.device_id, len(ready))
                try:
                    added = self.agent.ingest(stop, paths=ready)
                except Exception:  # noqa: BLE001 - a bad file must not stop the watcher
                    logger.exception("%s: ingesting %s failed", self.agent.device_id, [str(p) for p in ready])
                    added = 0
                for path in ready:
                    sizes.pop(path, None)
                if added:
                    self.agent.publish(self.agent.status_message())
            stop.wait(self.watch_interval_s)
