"""In-memory recordings: validated, immutable containers shared by readers, synthesis and replay.

A :class:`Recording` is what every reader returns and what :func:`biofed.datasets.replay`
streams. Its signals are grouped by *modality*:

``"eeg"``
    scalp EEG channels (``ch_types`` all ``"eeg"``), volts.
``"audio"``
    acoustic biosignals such as phonocardiograms (``ch_types`` all ``"audio"``).
``"bio"``
    other physiological sensors: ``"ecg"``, ``"ppg"``, ``"resp"``, ``"eda"``, ``"acc"``.

Reference electrodes (``"ref"``) and unrecognised or non-feature channels (``"misc"``: EOG,
EMG, stimulus, blood pressure, ...) are not features: readers keep them out of the three
modalities and list them in :attr:`Recording.excluded_channels` instead.

Every array is float64, C-contiguous and read-only, so a :class:`Signal` can be handed to
several consumers (replay chunks are views of it) without defensive copies.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from biofed.kernels._validation import first_nonfinite

__all__ = [
    "BIO_TYPES",
    "CH_TYPES",
    "MODALITIES",
    "Annotation",
    "Recording",
    "RecordingError",
    "Signal",
    "modality_of",
    "stream_channels",
]

#: Every channel type a :class:`Signal` may carry.
CH_TYPES = ("eeg", "ecg", "ppg", "resp", "eda", "acc", "audio", "ref", "misc")
#: The feature modalities, i.e. the keys of :attr:`Recording.signals`.
MODALITIES = ("eeg", "audio", "bio")
#: Channel types allowed in the ``"bio"`` modality.
BIO_TYPES = ("ecg", "ppg", "resp", "eda", "acc")
_MODALITY_TYPES = {"eeg": ("eeg",), "audio": ("audio",), "bio": BIO_TYPES}


def modality_of(ch_type: str) -> str | None:
    """The modality a channel of type ``ch_type`` feeds (one of :data:`MODALITIES`), or None.

    Examples
    --------
    >>> modality_of("ecg"), modality_of("eeg"), modality_of("misc")
    ('bio', 'eeg', None)
    """
    return next((m for m, types in _MODALITY_TYPES.items() if ch_type in types), None)


class RecordingError(ValueError):
    """A recording could not be read or is inconsistent; the message always names the file.

    Parameters
    ----------
    source : str
        The file (or synthetic source name) the problem belongs to.
    reason : str
        What is wrong and, where possible, how to fix it.
    """

    def __init__(self, source, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    def __reduce__(self):  # keep the two-argument constructor picklable (multiprocessing)
        return (type(self), (self.source, self.reason))


@dataclass(frozen=True, eq=False)
class Signal:
    """Equally sampled channels of one modality.

    Parameters
    ----------
    data : array-like, shape (n_channels, n_samples)
        Samples; stored as a read-only float64 copy. Must be finite (readers interpolate
        documented gaps and annotate them as ``"BAD_gap"`` before building a Signal).
    sfreq : float
        Sampling rate in Hz, finite and > 0.
    ch_names : tuple of str, length n_channels
        Unique channel names.
    ch_types : tuple of str, length n_channels
        Each one of :data:`CH_TYPES`.
    units : tuple of str, length n_channels
        Physical unit per channel (``"V"`` for electrophysiology, ``"NU"`` for uncalibrated
        or normalised values).

    Raises
    ------
    ValueError
        On any inconsistency; readers re-raise it as :class:`RecordingError` naming the file.
    """

    data: np.ndarray
    sfreq: float
    ch_names: tuple[str, ...]
    ch_types: tuple[str, ...]
    units: tuple[str, ...]

    def __post_init__(self):
        raw = np.asarray(self.data)
        if raw.dtype.kind not in "fiu":
            raise ValueError(f"Signal data must be real numbers, got dtype {raw.dtype}.")
        if raw.ndim != 2:
            raise ValueError(
                f"Signal data must be 2-D (n_channels, n_samples), got shape {raw.shape}; "
                "reshape a single channel with x[np.newaxis, :]."
            )
        n_channels, n_samples = raw.shape
        if n_channels == 0 or n_samples == 0:
            raise ValueError(f"Signal data is empty (shape {raw.shape}); at least one channel and sample required.")
        data = np.array(raw, dtype=np.float64, order="C", copy=True)
        if not np.isfinite(data.sum()):
            found = first_nonfinite(data)
            if found is not None:
                count, (ch, i) = found
                raise ValueError(
                    f"Signal data holds {count} non-finite sample(s), the first in channel {ch} at "
                    f"sample {i}; interpolate or drop the gap and annotate it (e.g. 'BAD_gap')."
                )
            raise ValueError("Signal data overflows float64 when summed; rescale the samples.")
        data.flags.writeable = False
        object.__setattr__(self, "data", data)
        try:
            sfreq = float(self.sfreq)
        except (TypeError, ValueError):
            raise ValueError(f"sfreq must be a number in Hz, got {self.sfreq!r}.") from None
        if not (math.isfinite(sfreq) and sfreq > 0):
            raise ValueError(f"sfreq must be finite and > 0 Hz, got {self.sfreq!r}.")
        object.__setattr__(self, "sfreq", sfreq)
        for name in ("ch_names", "ch_types", "units"):
            values = getattr(self, name)
            if isinstance(values, str):
                raise ValueError(f"{name} must be a sequence of strings, got the single string {values!r}.")
            values = tuple(values)
            if len(values) != n_channels:
                raise ValueError(f"{name} has {len(values)} entries but data has {n_channels} channel(s).")
            if not all(isinstance(v, str) for v in values):
                raise ValueError(f"{name} must hold strings only, got {values!r}.")
            object.__setattr__(self, name, values)
        if len(set(self.ch_names)) != n_channels:
            dupes = sorted({n for n in self.ch_names if self.ch_names.count(n) > 1})
            raise ValueError(f"channel names must be unique, duplicated: {dupes}.")
        unknown = sorted(set(self.ch_types) - set(CH_TYPES))
        if unknown:
            raise ValueError(f"unknown channel type(s) {unknown}; allowed: {CH_TYPES}.")

    @property
    def n_channels(self) -> int:
        """Number of channels."""
        return self.data.shape[0]

    @property
    def n_samples(self) -> int:
        """Number of samples per channel."""
        return self.data.shape[1]

    @property
    def duration(self) -> float:
        """Length in seconds (``n_samples / sfreq``)."""
        return self.data.shape[1] / self.sfreq


@dataclass(frozen=True)
class Annotation:
    """A labelled time span of a recording.

    Parameters
    ----------
    onset : float
        Seconds from the first sample of the recording.
    duration : float
        Seconds, >= 0 (0 marks an instant, e.g. a heart beat).
    label : str
        Description. Labels starting with ``"BAD"`` mark unusable spans (MNE convention),
        e.g. ``"BAD_gap"`` for interpolated sensor dropouts; they are never class labels.
    """

    onset: float
    duration: float
    label: str

    def __post_init__(self):
        for name in ("onset", "duration"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"Annotation {name} must be finite, got {value!r}.")
            object.__setattr__(self, name, value)
        if self.duration < 0:
            raise ValueError(f"Annotation duration must be >= 0 s, got {self.duration}.")
        if not isinstance(self.label, str):
            raise ValueError(f"Annotation label must be a string, got {type(self.label).__name__}.")


@dataclass(frozen=True, eq=False)
class Recording:
    """One recorded (or synthesised) session, possibly multimodal.

    Parameters
    ----------
    source : str
        Where it came from: the file path for real data, a ``synthetic/...`` name otherwise.
        Every :class:`RecordingError` about this recording names it.
    signals : Mapping[str, Signal]
        Keyed by modality (:data:`MODALITIES`), at least one. Stored read-only.
    start_time : datetime or None
        Wall-clock time of the first sample when the file states one.
    annotations : tuple of Annotation
        Events and labelled spans, onsets relative to the first sample.
    label : str or None
        Whole-recording class label (e.g. ``"rest"`` / ``"arithmetic"`` for eegmat).
    subject : str or None
        Subject identifier, the natural federated split.
    excluded_channels : tuple of (name, ch_type)
        Channels present in the file but kept out of the feature modalities (reference
        electrodes, EOG, EMG, stimulus, ...), with their inferred type.
    """

    source: str
    signals: Mapping[str, Signal]
    start_time: datetime | None = None
    annotations: tuple[Annotation, ...] = ()
    label: str | None = None
    subject: str | None = None
    excluded_channels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"Recording source must be a non-empty string, got {self.source!r}.")
        if not isinstance(self.signals, Mapping) or not self.signals:
            raise RecordingError(self.source, "no usable channels: a Recording needs at least one signal.")
        signals = {}
        for modality, signal in self.signals.items():
            if modality not in MODALITIES:
                raise RecordingError(self.source, f"unknown modality {modality!r}; use one of {MODALITIES}.")
            if not isinstance(signal, Signal):
                raise RecordingError(
                    self.source, f"signals[{modality!r}] must be a Signal, got {type(signal).__name__}."
                )
            wrong = [(n, t) for n, t in zip(signal.ch_names, signal.ch_types) if t not in _MODALITY_TYPES[modality]]
            if wrong:
                raise RecordingError(
                    self.source,
                    f"modality {modality!r} accepts channel types {_MODALITY_TYPES[modality]}, got {wrong}; "
                    "reference and misc channels belong in excluded_channels.",
                )
            signals[modality] = signal
        object.__setattr__(self, "signals", types.MappingProxyType(signals))
        annotations = tuple(self.annotations)
        if not all(isinstance(a, Annotation) for a in annotations):
            raise RecordingError(self.source, "annotations must be Annotation instances.")
        object.__setattr__(self, "annotations", annotations)
        if self.start_time is not None and not isinstance(self.start_time, datetime):
            raise RecordingError(self.source, f"start_time must be a datetime or None, got {self.start_time!r}.")
        for name in ("label", "subject"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RecordingError(self.source, f"{name} must be a string or None, got {value!r}.")
        excluded = tuple((str(n), str(t)) for n, t in self.excluded_channels)
        object.__setattr__(self, "excluded_channels", excluded)

    @property
    def duration(self) -> float:
        """Length in seconds: the longest of the modalities."""
        return max(signal.duration for signal in self.signals.values())

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities present, in :data:`MODALITIES` order."""
        return tuple(m for m in MODALITIES if m in self.signals)


def stream_channels(recordings: Iterable[Recording]) -> dict[str, tuple[float, tuple[str, ...], tuple[str, ...]]]:
    """The channels of a stream: ``{modality: (sfreq, ch_names, ch_types)}`` over its recordings.

    A stream's recordings hold different modalities (see :func:`biofed.datasets.replay.group_streams`);
    where two hold the same one, the later wins. This is what a feature layout is built from.

    Examples
    --------
    >>> from biofed.datasets import make_recording
    >>> channels = stream_channels([make_recording("rest", duration_s=2.0, eeg_channels=2, random_state=0)])
    >>> channels["eeg"]
    (250.0, ('Fp1', 'Fp2'), ('eeg', 'eeg'))
    >>> sorted(channels)
    ['audio', 'bio', 'eeg']
    """
    return {m: (s.sfreq, s.ch_names, s.ch_types) for rec in recordings for m, s in rec.signals.items()}
