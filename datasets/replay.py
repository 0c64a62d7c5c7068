"""Replay recordings as a live multimodal stream, on one clock, optionally in real time.

Timing model
------------
* Every recording starts at stream time 0 (``sequential=False``, the default: several
  devices/sensors recording at once). Their ``start_time`` wall-clock dates are ignored:
  PhysioNet files carry anonymised dates. With ``sequential=True`` the recordings play back
  to back instead (recording ``j`` starts when recording ``j - 1`` ends), as one device
  replaying its sessions.
* The clock is cut into steps ``[k * chunk_s, (k + 1) * chunk_s)``. Chunk ``k`` of a stream
  holds exactly the samples whose timestamps fall in step ``k``, so chunks of different
  modalities and rates cover the same interval and never drift apart; sizes are
  ``floor`` or ``ceil`` of ``chunk_s * sfreq`` and concatenate back to the whole signal.
* A chunk is *available* when its step ends (a sensor delivers a block once it is full).
  With ``speed > 0`` the generator sleeps until ``start + step_end / speed`` on
  :func:`time.monotonic`, computed from the absolute start, so sleeping overhead never
  accumulates into drift. ``speed == 0`` emits as fast as the consumer pulls.
* Order: by step, then by ``t0``, then recording order, then modality (eeg, audio, bio).

Labels
------
``Chunk.label`` is the label in force at the chunk's first sample: the description of the
latest-starting annotation with a positive duration covering it, ignoring ``BAD*`` spans
(gaps, artefacts) and zero-duration events (heart beats); otherwise the recording label.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from biofed.datasets.recording import MODALITIES, Recording

__all__ = ["Chunk", "bad_spans", "group_streams", "is_bad_label", "label_segments", "replay"]

# A sample whose timestamp lies within this many sample periods below a step boundary is
# counted in the next step; it absorbs float error in (k * chunk_s) * sfreq.
_BOUNDARY_TOL = 1e-7

Key = TypeVar("Key")


@dataclass(frozen=True, eq=False)
class Chunk:
    """One block of one modality of one recording.

    Attributes
    ----------
    source : str
        :attr:`Recording.source` of the recording it comes from.
    modality : str
        ``"eeg"``, ``"audio"`` or ``"bio"``.
    t0 : float
        Stream time (s) of the first sample, on the clock shared by all replayed recordings.
    data : ndarray, shape (n_channels, n)
        Read-only view of the recording's samples.
    label : str or None
        Label in force at ``t0`` (see module docstring).
    """

    source: str
    modality: str
    t0: float
    data: np.ndarray
    label: str | None


def is_bad_label(label: str) -> bool:
    """Whether an annotation or marker text marks a ``BAD*`` span (MNE's convention: artefacts,
    gaps), case-insensitively."""
    return label.upper().startswith("BAD")


def _label_spans(rec: Recording) -> list[tuple[float, float, str]]:
    return sorted(
        (a.onset, a.onset + a.duration, a.label)
        for a in rec.annotations
        if a.duration > 0 and not is_bad_label(a.label)
    )


def bad_spans(rec: Recording) -> list[tuple[float, float]]:
    """``(onset, end)`` seconds of the recording's ``BAD*`` annotations (MNE's convention: artefacts,
    gaps), sorted; windows overlapping one are not used. A zero-duration ``BAD`` event marks one instant."""
    return sorted((a.onset, a.onset + a.duration) for a in rec.annotations if is_bad_label(a.label))


def _label_at(spans, default: str | None, t: float) -> str | None:
    label = default
    for onset, end, text in spans:  # sorted by onset: the last covering span wins
        if onset > t:
            break
        if t < end:
            label = text
    return label


def label_segments(recording: Recording) -> list[tuple[float, str | None]]:
    """``(start_s, label)`` pieces of a recording, cut where its labelled annotations start or end.

    The label of each piece follows the rule :func:`replay` labels its chunks with (see the
    module docstring), so a whole recording pushed piece by piece is labelled as its replay is.

    Examples
    --------
    >>> import dataclasses
    >>> from biofed.datasets import Annotation, make_recording
    >>> rec = make_recording("rest", duration_s=10.0, random_state=0)
    >>> marks = (Annotation(2.0, 3.0, "arithmetic"), Annotation(3.0, 1.0, "BAD_gap"))
    >>> label_segments(dataclasses.replace(rec, annotations=marks))
    [(0.0, 'rest'), (2.0, 'arithmetic'), (5.0, 'rest')]
    """
    spans = _label_spans(recording)
    cuts = sorted({0.0} | {t for onset, end, _ in spans for t in (onset, end) if 0.0 < t < recording.duration})
    return [(cut, _label_at(spans, recording.label, cut)) for cut in cuts]


def group_streams(
    recordings: Iterable[tuple[Key, Recording]], modalities: Collection[str] = MODALITIES
) -> Iterator[list[tuple[Key, Recording]]]:
    """Group recordings, in order, into the streams one device records at once.

    A recording joins the stream of the recording before it when it adds only modalities (of
    ``modalities``) that stream lacks and the subjects agree (equal, or one unknown, e.g. a WAV
    without subject information). So an EDF with EEG + ECG followed by the WAV recorded with it
    form one multimodal stream. Any other recording (another subject, or a second one with the
    same modalities, such as ``Subject02_1.edf`` then ``Subject02_2.edf``) starts a new stream.
    Lazy: a stream is yielded as soon as the recording after it is known to start another, so
    only one stream's recordings need to be in memory.

    Parameters
    ----------
    recordings : iterable of (key, Recording)
        ``key`` (e.g. the file path) travels with its recording.
    modalities : collection of str
        The modalities that count (e.g. the pipeline's); others never split a stream.

    Yields
    ------
    list of (key, Recording)
        The recordings of one stream, in input order.

    Examples
    --------
    >>> from biofed.datasets import make_recording
    >>> rest = make_recording("rest", duration_s=2.0, subject="S1", random_state=0)
    >>> task = make_recording("arithmetic", duration_s=2.0, subject="S1", random_state=1)
    >>> [[key for key, _ in stream] for stream in group_streams([("rest", rest), ("task", task)])]
    [['rest'], ['task']]
    """
    stream: list[tuple[Key, Recording]] = []
    present: set[str] = set()
    subject = None
    for key, rec in recordings:
        rec_modalities = {m for m in rec.modalities if m in modalities}
        conflict = rec.subject is not None and subject is not None and rec.subject != subject
        if stream and (conflict or rec_modalities & present):
            yield stream
            stream, present, subject = [], set(), None
        stream.append((key, rec))
        present |= rec_modalities
        subject = subject or rec.subject
    if stream:
        yield stream


def _boundary(time_s: float, offset: float, sfreq: float, n: int) -> int:
    """Index of the first sample at or after ``time_s`` (clipped to [0, n])."""
    return min(max(math.ceil((time_s - offset) * sfreq - _BOUNDARY_TOL), 0), n)


def replay(
    recordings: Recording | Iterable[Recording],
    *,
    speed: float = 0.0,
    chunk_s: float = 0.25,
    sequential: bool = False,
) -> Iterator[Chunk]:
    """Stream recordings chunk by chunk on one clock.

    Parameters
    ----------
    recordings : Recording or iterable of Recording
        What to play; ``Chunk.source`` tells them apart.
    speed : float
        0 = as fast as possible, 1 = real time, 10 = ten times faster than real time.
    chunk_s : float
        Step length in seconds (> 0).
    sequential : bool
        False: every recording starts at t = 0. True: they play one after another.

    Yields
    ------
    Chunk
        In time order (see module docstring).

    Raises
    ------
    ValueError
        For a non-finite or negative ``speed``, a non-positive ``chunk_s`` or no recordings.
    """
    if isinstance(recordings, Recording):
        recordings = [recordings]
    recordings = list(recordings)
    if not recordings:
        raise ValueError("replay needs at least one Recording, got none.")
    if not all(isinstance(r, Recording) for r in recordings):
        bad = next(type(r).__name__ for r in recordings if not isinstance(r, Recording))
        raise TypeError(f"replay expects Recording objects, got {bad}.")
    try:
        speed, chunk_s = float(speed), float(chunk_s)
    except (TypeError, ValueError):
        raise ValueError(f"speed and chunk_s must be numbers, got speed={speed!r}, chunk_s={chunk_s!r}.") from None
    if not (math.isfinite(speed) and speed >= 0):
        raise ValueError(f"speed must be finite and >= 0 (0 = as fast as possible), got {speed}.")
    if not (math.isfinite(chunk_s) and chunk_s > 0):
        raise ValueError(f"chunk_s must be finite and > 0 seconds, got {chunk_s}.")
    return _replay(recordings, speed, chunk_s, sequential)


def _replay(recordings: list[Recording], speed: float, chunk_s: float, sequential: bool) -> Iterator[Chunk]:
    streams = []  # (recording index, modality rank, recording, modality, signal, offset, label spans)
    offset = 0.0
    for j, rec in enumerate(recordings):
        spans = _label_spans(rec)
        for rank, modality in enumerate(MODALITIES):
            if modality in rec.signals:
                streams.append((j, rank, rec, modality, rec.signals[modality], offset, spans))
        if sequential:
            offset += rec.duration
    end = max(off + sig.duration for _, _, _, _, sig, off, _ in streams)
    n_steps = max(math.ceil(end / chunk_s - _BOUNDARY_TOL), 1)
    start = time.monotonic()
    for k in range(n_steps):
        lo, hi = k * chunk_s, (k + 1) * chunk_s
        step = []
        for j, rank, rec, modality, sig, off, spans in streams:
            a = _boundary(lo, off, sig.sfreq, sig.n_samples)
            b = _boundary(hi, off, sig.sfreq, sig.n_samples)
            if b > a:
                t_rec = a / sig.sfreq
                step.append(
                    (off + t_rec, j, rank, rec.source, modality, sig.data[:, a:b], _label_at(spans, rec.label, t_rec))
                )
        if not step:
            continue
        if speed > 0:
            delay = start + min(hi, end) / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        step.sort(key=lambda item: item[:3])
        for t0, _, _, source, modality, data, label in step:
            yield Chunk(source=source, modality=modality, t0=t0, data=data, label=label)
