"""Live sources: Lab Streaming Layer (LSL) streams in, aligned chunks out; recordings out as LSL.

:class:`LslSource` turns the LSL streams of one device (a headset's EEG, a microphone, a
wearable's ECG/PPG/EDA, and a marker stream) into the same time-ordered
:class:`~biofed.datasets.Chunk` objects :func:`biofed.datasets.replay` makes from files, so
the edge pipeline computes the same windows from a live device as from its recording.
:class:`LslPlayer` does the reverse: it serves recordings as live LSL streams in real time,
for tests and demos (``biofed play``).

Streams of a device
-------------------
A source is given one or more *names*. A stream belongs to it when its LSL name equals a
name, starts with ``name + "-"`` (``biofed play --lsl pi-01`` publishes ``pi-01-eeg``,
``pi-01-bio``, ``pi-01-audio`` and ``pi-01-markers``), or its ``source_id`` equals a name.
Each regular-rate stream is one modality, from the channel types in its description
(``eeg``; ``audio``; ``ecg``/``ppg``/``resp``/``eda``/``acc`` = ``bio``), else from its channel
labels, else from its LSL type (``EEG``, ``Audio``, ``ECG``...), as
:func:`biofed.datasets.readers.stream_channel_types` decides; the stream is the modality most
of its channels belong to. Other channels (reference, EOG, trigger...) are dropped. An
irregular-rate string stream is the *marker stream*.

Clock and alignment
-------------------
Sample timestamps are mapped onto this machine's LSL clock by liblsl's ``clocksync``
post-processing (a robust running estimate of each sender's clock offset, from
``time_correction`` probes); ``dejitter`` smooths the stamps of regular streams. A
*segment* starts once every stream has delivered samples: its start time is the latest first
timestamp, earlier samples are dropped, and from then on sample ``i`` of a stream of rate
``f`` stands for ``start + i / f``, as in a file. The session clock (``Chunk.t0``) counts
seconds since the first segment's start.

Gaps and reconnection
---------------------
When a stream's next timestamp deviates from its expected time by more than
``gap_tolerance_s`` (samples lost, a device restarted, clock drift), the source reports a
:class:`Gap` and starts a new segment: consumers end their windows there (a window never
spans a gap). A stream whose connection liblsl reports lost, or that delivers nothing for
``reconnect_s``, is looked up again every ``reconnect_s`` (a stream silent for ``stall_s`` is
logged as stalled). The source reconnects by itself instead of letting liblsl recover the old
inlet: liblsl's recovery re-resolves on its own schedule, which can take tens of seconds, and
keeps the old inlet's clock-offset and dejitter estimates. When a new instance of the stream
is published (a new LSL ``uid``: the device or the player restarted), an inlet is opened on
it, together with its first clock-offset estimate, in a background thread, so the streams
that still deliver are pulled without delay; then the old inlet is drained and replaced. The
marker stream of a restarted device is replaced the same way. Samples already pulled are
kept, and a replacement inlet never delivers a sample again that the old one delivered.
Gaps are counted in :attr:`LslSource.gaps`.

Labels
------
A marker sets the label of the samples from its timestamp on: ``"rest"``, ``"task"``...
A marker starting with ``BAD`` (``"BAD_motion"``) opens a bad span that the next marker
closes; the span goes to :attr:`LslSource.bad_spans` (session seconds) and the label in force
before it continues. Consumers drop windows overlapping bad spans
(:class:`~biofed.datasets.BadSpans`).

Network
-------
LSL discovers streams by UDP multicast and broadcast. Where a machine may only talk to
itself (tests, CI), point the environment variable ``LSLAPICFG`` to a file such as
``tests/lsl_api.cfg``::

    [ports]
    IPv6 = disable
    [lab]
    ResolveScope = machine
    KnownPeers = {127.0.0.1}

It must be set before the first LSL call of the process.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from biofed.datasets.readers import stream_channel_types
from biofed.datasets.recording import MODALITIES, Recording, modality_of
from biofed.datasets.replay import Chunk, bad_spans, is_bad_label, replay

__all__ = ["BadSpans", "Gap", "LslError", "LslPlayer", "LslSource", "StreamSpec"]

logger = logging.getLogger(__name__)

_MARKER_SUFFIX = "markers"
_STYPES = {"eeg": "EEG", "audio": "Audio", "bio": "Biosensor"}
_LOOKUP_S = 1.0
"""How long a look-up for lost streams listens: liblsl reports what answered after about 0.5 s."""


class LslError(RuntimeError):
    """No matching LSL stream, or streams that cannot form one device."""


@dataclass
class BadSpans:
    """Bad time spans ``[onset, end)`` in seconds (``end`` None: still open) and the overlap test.

    Filled from ``BAD*`` annotations of a file (:func:`biofed.datasets.replay.bad_spans`) or from
    ``BAD*`` markers of a live stream; :meth:`overlaps` tells whether a window touches one.
    Thread-safe: a live source adds spans while a consumer tests windows.
    """

    spans: list[list] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def open(self, onset: float) -> None:
        with self._lock:
            if not self.spans or self.spans[-1][1] is not None:
                self.spans.append([onset, None])

    def close(self, end: float) -> None:
        with self._lock:
            if self.spans and self.spans[-1][1] is None:
                self.spans[-1][1] = end

    def add(self, onset: float, end: float) -> None:
        with self._lock:
            self.spans.append([onset, end])
            self.spans.sort(key=lambda span: span[0])

    def overlaps(self, start: float, stop: float) -> bool:
        """Whether ``[start, stop)`` overlaps a bad span."""
        with self._lock:
            return any(onset < stop and (end is None or end > start) for onset, end in self.spans)

    def forget_before(self, t: float) -> None:
        """Drop spans that ended before ``t`` (keeps memory flat over a long session)."""
        with self._lock:
            self.spans = [span for span in self.spans if span[1] is None or span[1] > t]


@dataclass(frozen=True)
class Gap:
    """Samples of ``stream`` were missing: the segment before ``t`` ended, a new one starts at ``t``.

    ``t`` is session seconds of the new segment's start and ``missing_s`` how long the stream
    was silent (or how far its clock jumped).
    """

    stream: str
    t: float
    missing_s: float


@dataclass(frozen=True)
class StreamSpec:
    """A resolved data stream: LSL name, modality, rate, and the channels kept (indices into the stream)."""

    name: str
    modality: str
    sfreq: float
    ch_names: tuple[str, ...]
    ch_types: tuple[str, ...]
    keep: tuple[int, ...]


def _lsl():
    from mne_lsl import lsl

    return lsl


def _matches(info, names: Sequence[str]) -> bool:
    return any(info.name == n or info.name.startswith(f"{n}-") or info.source_id == n for n in names)


def _modality_and_channels(info) -> tuple[str, tuple[str, ...], tuple[str, ...], tuple[int, ...]] | None:
    """Classify a data stream into one modality and its feature channels (None: nothing usable)."""
    names = info.get_channel_names() or []
    names = [names[i] if i < len(names) and names[i] else f"ch{i + 1}" for i in range(info.n_channels)]
    declared = info.get_channel_types() or [None] * len(names)
    types = stream_channel_types(names, declared, info.stype)
    found = [m for m in map(modality_of, types) if m is not None]
    if not found:
        return None
    modality = max(MODALITIES, key=found.count)  # the modality most channels belong to
    keep = tuple(i for i, t in enumerate(types) if modality_of(t) == modality)
    return modality, tuple(names[i] for i in keep), tuple(types[i] for i in keep), keep


@dataclass
class _Inlet:
    spec: StreamSpec
    info: object
    inlet: object
    pending: list = field(default_factory=list)  # [(data (C, n), corrected timestamps (n,))]
    n_emitted: int = 0
    last_data: float = field(default_factory=time.monotonic)
    stalled: bool = False
    lost: bool = False  # liblsl reported the connection lost: the inlet delivers nothing more
    next_lookup: float = 0.0  # monotonic time of the next look-up of a stalled or lost stream
    replacement: Future | None = None  # (inlet, info) being opened on a new instance of the stream
    last_stamp: float = -math.inf  # timestamp of the last sample pulled
    after_stamp: float | None = None  # a replacement inlet's samples up to this stamp were pulled already


class LslSource:
    """The LSL streams of one device as aligned, labelled chunks (see the module docstring).

    Parameters
    ----------
    names : str or sequence of str
        Stream names (or name prefixes, or source ids) of the device.
    modalities : sequence of str
        Modalities to use; streams of others are ignored.
    resolve_timeout_s : float
        How long to look for the streams when opening.
    gap_tolerance_s : float
        Largest accepted deviation between a sample's timestamp and its expected time.
    stall_s, reconnect_s : float
        Silence after which a stream is reported stalled; silence after which it is looked up
        again (a lost one at once), and the interval between look-ups.
    poll_s : float
        Sleep between pulls when no stream had new samples.
    """

    def __init__(
        self,
        names: str | Sequence[str],
        *,
        modalities: Sequence[str] = MODALITIES,
        resolve_timeout_s: float = 5.0,
        gap_tolerance_s: float = 0.1,
        stall_s: float = 2.0,
        reconnect_s: float = 5.0,
        poll_s: float = 0.005,
    ) -> None:
        names = (names,) if isinstance(names, str) else tuple(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"LslSource needs one or more non-empty stream names, got {names!r}.")
        for label, value in (
            ("resolve_timeout_s", resolve_timeout_s),
            ("gap_tolerance_s", gap_tolerance_s),
            ("stall_s", stall_s),
            ("reconnect_s", reconnect_s),
            ("poll_s", poll_s),
        ):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{label} must be a finite number of seconds > 0, got {value!r}.")
        self.names = names
        self.modalities = tuple(modalities)
        self.resolve_timeout_s = float(resolve_timeout_s)
        self.gap_tolerance_s = float(gap_tolerance_s)
        self.stall_s = float(stall_s)
        self.reconnect_s = float(reconnect_s)
        self.poll_s = float(poll_s)
        self.source = "+".join(f"lsl:{n}" for n in names)
        self.gaps = 0
        self.bad_spans = BadSpans()
        self._inlets: dict[str, _Inlet] = {}
        self._markers = None
        self._marker_times: list[float] = []  # LSL clock, ascending
        self._marker_labels: list[str | None] = []
        self._session_start: float | None = None
        self._segment_start: float | None = None
        self._pending_gap: tuple[str, float] | None = None
        """(stream, seconds missing) of a gap whose new segment has not started yet."""
        self._workers: ThreadPoolExecutor | None = None
        self._lookup: Future | None = None

    # ------------------------------------------------------------------ resolution
    def _resolve(self, timeout: float) -> list:
        """The matching streams seen within ``timeout`` (liblsl looks for the whole time)."""
        return [info for info in _lsl().resolve_streams(timeout=timeout) if _matches(info, self.names)]

    def open(self) -> dict[str, StreamSpec]:
        """Resolve the device's streams and open an inlet per stream; returns the data streams by modality.

        Raises
        ------
        LslError
            No matching data stream within ``resolve_timeout_s``, or two streams of one modality.
        """
        lsl = _lsl()
        infos = self._resolve(self.resolve_timeout_s)
        specs: dict[str, StreamSpec] = {}
        marker_info = None
        for info in infos:
            if info.sfreq == 0:
                if info.dtype == "string" or str(info.dtype) == "string" or info.dtype is str:
                    marker_info = marker_info or info
                continue
            inlet = self._open_inlet(lsl, info)
            full = inlet.get_sinfo(timeout=5.0)  # a resolved info lacks the channel description
            classified = _modality_and_channels(full)
            if classified is None or classified[0] not in self.modalities:
                logger.info("LSL stream %s: no %s channels, ignored", info.name, "/".join(self.modalities))
                inlet.close_stream()
                continue
            modality, ch_names, ch_types, keep = classified
            if modality in specs:
                inlet.close_stream()
                self.close()
                raise LslError(
                    f"LSL streams {specs[modality].name} and {info.name} are both {modality}; a device has "
                    "one stream per modality: name the one to use."
                )
            specs[modality] = StreamSpec(info.name, modality, float(info.sfreq), ch_names, ch_types, keep)
            self._inlets[modality] = _Inlet(specs[modality], info, inlet)
        if not specs:
            found = ", ".join(sorted(i.name for i in lsl.resolve_streams(timeout=0.5))) or "none"
            raise LslError(
                f"no LSL data stream named {' or '.join(self.names)} (or {self.names[0]}-*) within "
                f"{self.resolve_timeout_s:g} s; streams visible: {found}. Is the device (or biofed play) "
                "running, and does LSLAPICFG allow discovery on this machine?"
            )
        if marker_info is not None:
            self._markers = _Inlet(
                StreamSpec(marker_info.name, "markers", 0.0, (), (), ()),
                marker_info,
                self._open_inlet(lsl, marker_info),
            )
        self.flush()
        logger.info(
            "LSL source %s: %s%s",
            self.source,
            ", ".join(f"{s.name} ({s.modality}, {len(s.ch_names)} ch, {s.sfreq:g} Hz)" for s in specs.values()),
            f", markers {marker_info.name}" if marker_info is not None else ", no marker stream",
        )
        return specs

    def flush(self) -> None:
        """Drop the samples buffered so far: the session starts with the next ones (called by
        :meth:`open`; call it again after a slow set-up, before the first pull)."""
        if self._session_start is not None:
            raise LslError("the session has started; flushing now would open a gap")
        for item in self._inlets.values():
            item.inlet.flush()
            item.pending.clear()
            item.last_data = time.monotonic()

    @staticmethod
    def _open_inlet(lsl, info):
        # clocksync: liblsl maps the sender's timestamps onto this clock with a robust running
        # estimate of the offset (time_correction); dejitter smooths a regular stream's stamps.
        # recover=False: a lost connection raises at the next pull and the source reconnects
        # itself (_reconnect) with a fresh inlet, whose clock and dejitter estimates start anew.
        flags = ("clocksync", "dejitter") if info.sfreq > 0 else ("clocksync",)
        inlet = lsl.StreamInlet(info, max_buffered=60, recover=False, processing_flags=flags)
        inlet.open_stream(timeout=5.0)
        # the first clock-offset estimate takes a few probes; without one, the first pull would
        # wait for it and hold up the other streams
        inlet.time_correction(timeout=5.0)
        return inlet

    def close(self) -> None:
        """Close every inlet (idempotent)."""
        for item in [*self._inlets.values(), self._markers]:
            if item is not None:
                try:
                    item.inlet.close_stream()
                except Exception:  # noqa: BLE001 - closing a dead inlet must not mask the real error
                    logger.debug("closing the inlet of %s failed", item.spec.name, exc_info=True)
        self._inlets.clear()
        self._markers = None
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
            self._workers, self._lookup = None, None

    def channels(self) -> dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]]:
        """``{modality: (sfreq, ch_names, ch_types)}`` of the open streams (for ``FeatureLayout.from_channels``)."""
        return {m: (s.spec.sfreq, s.spec.ch_names, s.spec.ch_types) for m, s in self._inlets.items()}

    # ------------------------------------------------------------------ pulling
    def _pull_markers(self) -> None:
        if self._markers is None:
            return
        item = self._markers
        try:
            data, ts = item.inlet.pull_chunk(timeout=0.0)
        except RuntimeError as exc:  # mne-lsl's LostError: the marker outlet is gone
            self._lose(item, exc)
            return
        for row, stamp in zip(data, ts):
            if item.after_stamp is not None and stamp <= item.after_stamp:
                continue  # a replacement inlet: the old one delivered this marker
            item.after_stamp = None
            item.last_stamp = float(stamp)
            text = str(row[0]) if len(row) else ""
            self._add_marker(float(stamp), text)

    def _add_marker(self, t: float, text: str) -> None:
        session = self._session_start
        if is_bad_label(text):
            if session is not None:
                self.bad_spans.open(t - session)
            else:
                self._pending_bad = t
            return
        if session is not None:
            self.bad_spans.close(t - session)
        elif getattr(self, "_pending_bad", None) is not None:
            self._pending_bad = None
        i = bisect.bisect_right(self._marker_times, t)
        self._marker_times.insert(i, t)
        self._marker_labels.insert(i, text or None)

    def _label_at(self, t: float) -> str | None:
        i = bisect.bisect_right(self._marker_times, t) - 1
        return self._marker_labels[i] if i >= 0 else None

    def _forget_markers_before(self, t: float) -> None:
        i = bisect.bisect_right(self._marker_times, t) - 1
        if i > 0:
            del self._marker_times[:i]
            del self._marker_labels[:i]

    def _pull(self, item: _Inlet) -> bool:
        try:
            data, ts = item.inlet.pull_chunk(timeout=0.0, max_samples=4096)
        except RuntimeError as exc:  # mne-lsl's LostError: the outlet is gone
            self._lose(item, exc)
            return False
        if len(ts) == 0:
            return False
        # copies: mne-lsl returns views of buffers that the inlet's next pull overwrites
        block = np.array(data, dtype=np.float64).T
        ts = np.array(ts, dtype=np.float64)
        if item.after_stamp is not None:  # a replacement inlet: skip what the old inlet delivered
            fresh = ts > item.after_stamp + 0.5 / item.spec.sfreq
            block, ts = block[:, fresh], ts[fresh]
            if len(ts) == 0:
                return False
            item.after_stamp = None
        if item.spec.keep != tuple(range(block.shape[0])):
            block = block[list(item.spec.keep)]
        item.pending.append((np.ascontiguousarray(block), ts))
        item.last_stamp = float(ts[-1])
        item.last_data = time.monotonic()
        if item.stalled:
            logger.warning("LSL stream %s delivers samples again", item.spec.name)
            item.stalled = False
        return True

    def _lose(self, item: _Inlet, exc: Exception) -> None:
        if not item.lost:
            item.lost = True
            item.next_lookup = time.monotonic()
            logger.warning("LSL stream %s: connection lost (%s); looking for it again", item.spec.name, exc)

    def _check_streams(self) -> None:
        """Report streams silent for ``stall_s``; look up lost streams and those silent for ``reconnect_s``.

        Looking up (liblsl answers a query after about half a second at best) and opening a new
        inlet run in background threads, so the streams that still deliver are pulled without
        delay meanwhile; a ready inlet replaces the old one here, in the pulling thread, which
        owns the inlets.
        """
        now = time.monotonic()
        items = [*self._inlets.values(), *([self._markers] if self._markers is not None else [])]
        for item in self._inlets.values():
            silent = now - item.last_data
            if silent > self.stall_s and not item.stalled:
                item.stalled = True
                if not item.lost:
                    item.next_lookup = item.last_data + self.reconnect_s
                logger.warning("LSL stream %s stalled: no samples for %.1f s", item.spec.name, silent)
        for item in items:
            if item.replacement is not None and item.replacement.done():
                self._replace_inlet(item)
        if self._lookup is not None and self._lookup.done():
            try:
                found = self._lookup.result()
            except Exception as exc:  # noqa: BLE001 - retried at the next look-up
                logger.warning("LSL look-up failed: %s", exc)
                found = []
            self._lookup = None
            for item in items:
                # the marker stream too: a device that restarted unnoticed publishes new markers
                if item.replacement is None and (item.lost or item.stalled or item is self._markers):
                    info = self._new_instance(item, found)
                    if info is not None:
                        item.replacement = self._background().submit(
                            lambda info=info: (self._open_inlet(_lsl(), info), info)
                        )
        due = [
            item
            for item in items
            if (item.lost or item.stalled) and item.replacement is None and now >= item.next_lookup
        ]
        if due and self._lookup is None:
            for item in due:
                item.next_lookup = now + self.reconnect_s
            self._lookup = self._background().submit(_lsl().resolve_streams, timeout=_LOOKUP_S)

    def _background(self) -> ThreadPoolExecutor:
        if self._workers is None:
            # one look-up and one inlet per stream of a device at a time
            self._workers = ThreadPoolExecutor(max_workers=len(MODALITIES) + 2, thread_name_prefix="lsl-reconnect")
        return self._workers

    @staticmethod
    def _new_instance(item: _Inlet, found: list):
        """The stream info in ``found`` that ``item``'s inlet should move to, or None.

        An inlet that is not lost keeps its stream instance (same ``uid``): only a new instance
        (the device or player restarted) replaces it.
        """
        candidates = [
            info
            for info in found
            if info.name == item.spec.name
            and info.sfreq == item.spec.sfreq
            and info.n_channels == item.info.n_channels
            and info.source_id == item.info.source_id
        ]
        if not candidates or (not item.lost and any(info.uid == item.info.uid for info in candidates)):
            return None
        return candidates[0]

    def _replace_inlet(self, item: _Inlet) -> None:
        """Swap in the inlet opened in the background. The old inlet is drained first and the new
        one skips samples up to the last stamp pulled, so nothing accepted is lost or delivered twice."""
        future, item.replacement = item.replacement, None
        try:
            inlet, info = future.result()
        except Exception as exc:  # noqa: BLE001 - retried at the next look-up
            logger.warning("LSL stream %s: reconnecting failed: %s", item.spec.name, exc)
            return
        if item.spec.sfreq > 0:
            self._pull(item)
        else:
            self._pull_markers()
        try:
            item.inlet.close_stream()
        except Exception:  # noqa: BLE001 - the old inlet's stream is gone anyway
            logger.debug("closing the old inlet of %s failed", item.spec.name, exc_info=True)
        item.inlet, item.info, item.lost = inlet, info, False
        item.after_stamp = item.last_stamp
        logger.warning("LSL stream %s: reconnected (stream instance %s)", item.spec.name, item.info.uid)

    # ------------------------------------------------------------------ alignment
    def _start_segment(self) -> bool:
        """Start a segment once every stream has samples; drop samples before its start."""
        if any(not item.pending for item in self._inlets.values()):
            return False
        start = max(item.pending[0][1][0] for item in self._inlets.values())
        for item in self._inlets.values():
            half = 0.5 / item.spec.sfreq
            kept = []
            for data, ts in item.pending:
                i = int(np.searchsorted(ts, start - half))
                if i < len(ts):
                    kept.append((data[:, i:], ts[i:]))
            item.pending = kept
            item.n_emitted = 0
        if any(not item.pending for item in self._inlets.values()):
            return False
        self._segment_start = start
        if self._session_start is None:
            self._session_start = start
            pending_bad = getattr(self, "_pending_bad", None)
            if pending_bad is not None:
                self.bad_spans.open(max(pending_bad - start, 0.0))
        return True

    def _deviation(self, item: _Inlet) -> float:
        """Seconds by which the next pending sample is later (> 0) or earlier than its expected time."""
        expected = self._segment_start + item.n_emitted / item.spec.sfreq
        return float(item.pending[0][1][0]) - expected

    def _emit(self) -> Iterator[Chunk | Gap]:
        session = self._session_start
        if self._pending_gap is not None:  # the segment after a gap has started: report the gap first
            stream, missing = self._pending_gap
            self._pending_gap = None
            yield Gap(stream, self._segment_start - session, missing)
        for modality in MODALITIES:
            item = self._inlets.get(modality)
            if item is None:
                continue
            while item.pending:
                deviation = self._deviation(item)
                if abs(deviation) > self.gap_tolerance_s:
                    self.gaps += 1
                    logger.warning(
                        "LSL stream %s: %s of %.3f s at session t=%.2f s; starting a new segment",
                        item.spec.name,
                        "gap" if deviation > 0 else "clock jump back",
                        abs(deviation),
                        self._segment_start - session + item.n_emitted / item.spec.sfreq,
                    )
                    self._segment_start = None
                    missing = max(deviation, 0.0)
                    if self._pending_gap is not None:  # a second gap before the first could be reported
                        missing = max(missing, self._pending_gap[1])
                    self._pending_gap = (item.spec.name, missing)
                    if self._start_segment():  # else chunks() starts it once every stream has samples
                        yield from self._emit()
                    return
                data, ts = item.pending.pop(0)
                yield from self._labelled_chunks(item, data)
                item.n_emitted += data.shape[1]

    def _labelled_chunks(self, item: _Inlet, data: np.ndarray) -> Iterator[Chunk]:
        fs = item.spec.sfreq
        first = self._segment_start + item.n_emitted / fs
        n = data.shape[1]
        cuts = [0]
        if self._marker_times:
            lo = bisect.bisect_right(self._marker_times, first)
            hi = bisect.bisect_right(self._marker_times, first + (n - 1) / fs)
            cuts += [min(max(math.ceil((self._marker_times[i] - first) * fs - 1e-7), 1), n) for i in range(lo, hi)]
        cuts.append(n)
        session = self._session_start
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b > a:
                t = first + a / fs
                yield Chunk(
                    source=self.source,
                    modality=item.spec.modality,
                    t0=t - session,
                    data=data[:, a:b],
                    label=self._label_at(t),
                )

    def chunks(self, stop: threading.Event | None = None, *, seconds: float | None = None) -> Iterator[Chunk | Gap]:
        """Pull the streams until ``stop`` is set (or ``seconds`` of session time have been emitted).

        Yields :class:`~biofed.datasets.Chunk` objects (``t0`` in session seconds, per modality in
        time order, split where a marker changes the label) and :class:`Gap` events. Opens the
        streams first if :meth:`open` was not called.
        """
        if not self._inlets:
            self.open()
        limit = None if seconds is None else float(seconds)
        finished: set[str] = set()  # modalities that reached the limit
        while stop is None or not stop.is_set():
            self._pull_markers()
            got = False
            for item in self._inlets.values():
                got = self._pull(item) or got
            self._check_streams()  # also while other streams deliver: a stalled one must not wait on them
            if self._segment_start is None and not self._start_segment():
                if not got:
                    time.sleep(self.poll_s)
                continue
            emitted = False
            for event in self._emit():
                emitted = True
                if limit is not None and isinstance(event, Chunk):
                    fs = self._inlets[event.modality].spec.sfreq
                    keep = math.ceil((limit - event.t0) * fs - 1e-7)  # samples before the limit
                    if keep < event.data.shape[1]:
                        finished.add(event.modality)
                        if keep <= 0:
                            if len(finished) == len(self._inlets):
                                return
                            continue
                        event = Chunk(event.source, event.modality, event.t0, event.data[:, :keep], event.label)
                yield event
                if len(finished) == len(self._inlets):
                    return
            if self._session_start is not None and self._segment_start is not None:
                reference = min(
                    self._segment_start + item.n_emitted / item.spec.sfreq for item in self._inlets.values()
                )
                self._forget_markers_before(reference)
                self.bad_spans.forget_before(reference - self._session_start - 3600.0)
            if not got and not emitted:
                time.sleep(self.poll_s)

    def lsl_time(self, session_t: float) -> float:
        """The local LSL clock time of session second ``session_t`` (for latency measurements)."""
        if self._session_start is None:
            raise LslError("the session has not started yet")
        return self._session_start + session_t


class LslPlayer:
    """Serve recordings as live LSL streams in real time (``biofed play``).

    Every modality becomes one stream named ``{name}-{modality}`` (type ``EEG``, ``Audio`` or
    ``Biosensor``, channel names, types and units in its description, ``source_id = name``),
    plus a string marker stream ``{name}-markers`` carrying the label in force whenever it
    changes (``BAD*`` annotations open a bad span, the following label marker closes it).
    Samples are stamped with their acquisition time on the local LSL clock.

    Parameters
    ----------
    recordings : Recording or iterable of Recording
        Played together on one clock, as :func:`biofed.datasets.replay` does; recordings of one
        modality must share channels and rate (one stream per modality).
    name : str
        Stream name prefix and source id.
    chunk_s : float
        How often samples are pushed (a device's transfer block).
    speed : float
        1 = real time.
    repeat : int
        How many times to play the recordings (the clock keeps running between passes).
    marker_every_s : float
        The label in force is sent again this often (recording seconds), so a consumer that
        connects mid-way learns it.
    """

    def __init__(
        self,
        recordings: Recording | Iterable[Recording],
        name: str,
        *,
        chunk_s: float = 0.01,
        speed: float = 1.0,
        repeat: int = 1,
        marker_every_s: float = 1.0,
    ) -> None:
        if isinstance(recordings, Recording):
            recordings = [recordings]
        self.recordings = list(recordings)
        if not self.recordings:
            raise ValueError("LslPlayer needs at least one Recording.")
        if not (isinstance(name, str) and name):
            raise ValueError(f"name must be a non-empty str, got {name!r}.")
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be finite and > 0 (1 = real time), got {speed}.")
        if not (isinstance(repeat, int) and repeat >= 1):
            raise ValueError(f"repeat must be an int >= 1, got {repeat!r}.")
        self.name = name
        self.chunk_s = float(chunk_s)
        self.speed = float(speed)
        self.repeat = repeat
        self.marker_every_s = float(marker_every_s)
        self.signals = {}
        for rec in self.recordings:
            for modality, sig in rec.signals.items():
                have = self.signals.get(modality)
                if have is not None and (have.ch_names != sig.ch_names or have.sfreq != sig.sfreq):
                    raise ValueError(
                        f"{rec.source}: its {modality} channels or rate differ from another recording's; "
                        "play recordings of one device layout together."
                    )
                self.signals[modality] = sig
        self._spans = {rec.source: bad_spans(rec) for rec in self.recordings}
        self._outlets: dict = {}
        self._markers = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.samples_pushed = 0

    def _create_outlets(self) -> None:
        lsl = _lsl()
        for modality, sig in self.signals.items():
            info = lsl.StreamInfo(
                f"{self.name}-{modality}",
                _STYPES[modality],
                sig.n_channels,
                sig.sfreq,
                "float32" if modality == "audio" else "float64",
                self.name,
            )
            info.set_channel_names(list(sig.ch_names))
            info.set_channel_types(list(sig.ch_types))
            info.set_channel_units(list(sig.units))
            self._outlets[modality] = lsl.StreamOutlet(info, chunk_size=1, max_buffered=60)
        info = lsl.StreamInfo(f"{self.name}-{_MARKER_SUFFIX}", "Markers", 1, 0.0, "string", self.name)
        self._markers = lsl.StreamOutlet(info, chunk_size=1, max_buffered=60)

    def start(self) -> LslPlayer:
        """Create the outlets and play in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the player is already running")
        self._create_outlets()
        self._stop.clear()
        self._thread = threading.Thread(target=self._play, name=f"lsl-player-{self.name}", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the playback to end; True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop playing and destroy the outlets (consumers see the streams disappear)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        self._outlets.clear()
        self._markers = None

    def _play(self) -> None:
        lsl = _lsl()
        clock_start = lsl.local_clock()
        duration = max(rec.duration for rec in self.recordings)
        state, announced = None, -math.inf  # (label, bad) last announced on the marker stream, and when
        try:
            for lap in range(self.repeat):
                lap_start = clock_start + lap * duration / self.speed
                for chunk in replay(self.recordings, speed=self.speed, chunk_s=self.chunk_s):
                    if self._stop.is_set():
                        return
                    fs = self.signals[chunk.modality].sfreq
                    t_first = lap_start + chunk.t0 / self.speed
                    bad = any(onset <= chunk.t0 < end for onset, end in self._spans[chunk.source])
                    # on every change, and again every marker_every_s for consumers that connect later
                    if (chunk.label, bad) != state or t_first - announced >= self.marker_every_s / self.speed:
                        text = "BAD_span" if bad else (chunk.label or "")
                        self._markers.push_sample([text], timestamp=t_first)
                        state, announced = (chunk.label, bad), t_first
                    n = chunk.data.shape[1]
                    stamps = t_first + np.arange(n) / (fs * self.speed)
                    outlet = self._outlets[chunk.modality]
                    outlet.push_chunk(np.array(chunk.data.T, dtype=outlet.dtype, order="C"), timestamp=stamps)
                    self.samples_pushed += n
        except Exception:  # noqa: BLE001 - a demo player logs and ends
            logger.exception("LSL player %s failed", self.name)
