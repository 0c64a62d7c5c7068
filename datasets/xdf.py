"""XDF, the recording format of LSL (LabRecorder), read with ``pyxdf``.

An XDF file holds every LSL stream recorded in a session, each with its own timestamps:

* **Data streams** (regular rate): each channel gets its type from the stream description
  (:func:`biofed.datasets.readers.stream_channel_types`: declared type, else label, else the
  stream's type) and goes to its modality; non-feature channels are excluded. Two streams
  feeding one modality are an error (a recording has one signal per modality).
* **Marker streams** (irregular rate, strings) become annotations: a marker labels the time
  from its timestamp until the next marker (or the end); a ``BAD*`` marker makes that span a
  ``BAD`` annotation, as :class:`biofed.datasets.live.LslSource` treats live markers.
  Numeric and other irregular streams are ignored (logged).

Clocks are synchronised and regular streams dejittered by ``pyxdf`` (clock offsets recorded by
LabRecorder). The streams are then aligned as a live source aligns them: the recording starts
at the latest first timestamp and ends at the earliest last one; sample ``i`` of a stream of
rate ``f`` is at ``start + i / f``. Voltages in µV or mV are scaled to volts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from biofed.datasets.readers import (
    _check_sfreq,
    _group_signals,
    _normalise_unit,
    stream_channel_types,
)
from biofed.datasets.recording import Annotation, Recording, RecordingError

__all__ = ["read_xdf"]

logger = logging.getLogger(__name__)


def _first(info: dict, key: str, default=None):
    value = info.get(key)
    return value[0] if isinstance(value, list) and value else default


def _channels(info: dict, n_channels: int) -> tuple[list[str], list[str | None], list[str | None]]:
    """Labels, declared types and units from an XDF stream description (defaults when absent)."""
    desc = _first(info, "desc") or {}
    channels = (_first(desc, "channels") or {}).get("channel", []) if isinstance(desc, dict) else []
    names, types, units = [], [], []
    for i in range(n_channels):
        entry = channels[i] if i < len(channels) and isinstance(channels[i], dict) else {}
        names.append(_first(entry, "label") or f"ch{i + 1}")
        types.append(_first(entry, "type"))
        units.append(_first(entry, "unit"))
    return names, types, units


def read_xdf(path: Path, *, sfreq, modality) -> Recording:
    """Read an XDF file into one :class:`Recording` (see the module docstring)."""
    import pyxdf

    streams, _ = pyxdf.load_xdf(str(path), synchronize_clocks=True, dejitter_timestamps=True, verbose=False)
    regular, markers = [], []
    for stream in streams:
        info = stream["info"]
        name = _first(info, "name", "?")
        rate = float(_first(info, "nominal_srate", "0"))
        n = len(stream["time_stamps"])
        if rate > 0:
            if n:
                regular.append((name, rate, stream))
            else:
                logger.info("%s: XDF stream %s has no samples, ignored", path, name)
        elif _first(info, "channel_format") == "string":
            markers.append(stream)
        else:
            logger.info("%s: irregular non-string XDF stream %s ignored", path, name)
    if not regular:
        raise RecordingError(path, "the XDF file holds no regularly sampled stream with samples (only markers?).")
    start = max(float(s["time_stamps"][0]) for _, _, s in regular)
    end = min(float(s["time_stamps"][-1]) + 1.0 / rate for _, rate, s in regular)
    if end <= start:
        raise RecordingError(path, "the XDF streams do not overlap in time; record them in one session.")
    signals: dict = {}
    excluded: list = []
    for name, rate, stream in regular:
        _check_sfreq(path, rate, sfreq)
        info = stream["info"]
        series = np.asarray(stream["time_series"], dtype=np.float64)
        ts = np.asarray(stream["time_stamps"], dtype=np.float64)
        first = int(np.searchsorted(ts, start - 0.5 / rate))
        count = min(int(math.floor((end - start) * rate + 1e-9)), series.shape[0] - first)
        data = series[first : first + count].T
        names, declared, units = _channels(info, data.shape[0])
        types = stream_channel_types(names, declared, _first(info, "type"))
        scaled = [_normalise_unit(u) for u in units]
        data = data * np.array([scale for _, scale in scaled])[:, None]
        try:
            parts, dropped = _group_signals(path, data, rate, names, types, [u for u, _ in scaled], modality)
        except RecordingError:
            logger.info("%s: XDF stream %s has no %s channels, ignored", path, name, modality or "feature")
            excluded += [(n, t) for n, t in zip(names, types)]
            continue
        excluded += list(dropped)
        for key, signal in parts.items():
            if key in signals:
                raise RecordingError(
                    path,
                    f"two XDF streams hold {key} channels ({name} and another); a recording "
                    "has one signal per modality: re-record or split the file.",
                )
            signals[key] = signal
    if not signals:
        raise RecordingError(path, f"no XDF stream holds {modality or 'EEG, audio or biosensor'} channels.")
    return Recording(
        source=str(path),
        signals=signals,
        annotations=_marker_annotations(markers, start, end),
        excluded_channels=tuple(excluded),
    )


def _marker_annotations(markers: list[dict], start: float, end: float) -> tuple[Annotation, ...]:
    events = sorted(
        (float(t), str(row[0]) if len(row) else "")
        for stream in markers
        for t, row in zip(stream["time_stamps"], stream["time_series"])
    )
    annotations = []
    for i, (t, text) in enumerate(events):
        stop = events[i + 1][0] if i + 1 < len(events) else end
        onset, until = max(t, start) - start, min(stop, end) - start
        if not text or until <= onset:
            continue
        annotations.append(Annotation(onset, until - onset, text))
    return tuple(annotations)
