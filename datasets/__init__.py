"""biofed.datasets: read, synthesise, partition and replay physiological recordings.

Readers return validated, immutable :class:`Recording` objects whose signals are grouped by
modality (``eeg``, ``audio``, ``bio``); :func:`replay` streams them as time-ordered
:class:`Chunk` objects on one clock for the edge devices.
"""

from biofed.datasets.partition import dirichlet_label_partition, partition_by_subject
from biofed.datasets.readers import (
    SUPPORTED_EXTENSIONS,
    eegmat_subject_and_label,
    infer_channel_type,
    read_recording,
    recordings_in,
)
from biofed.datasets.recording import (
    BIO_TYPES,
    CH_TYPES,
    MODALITIES,
    Annotation,
    Recording,
    RecordingError,
    Signal,
)
from biofed.datasets.replay import Chunk, replay
from biofed.datasets.synthetic import CLASSES, EEG_CHANNELS, make_federation, make_recording

__all__ = [
    "BIO_TYPES",
    "CH_TYPES",
    "CLASSES",
    "EEG_CHANNELS",
    "MODALITIES",
    "SUPPORTED_EXTENSIONS",
    "Annotation",
    "Chunk",
    "Recording",
    "RecordingError",
    "Signal",
    "dirichlet_label_partition",
    "eegmat_subject_and_label",
    "infer_channel_type",
    "make_federation",
    "make_recording",
    "partition_by_subject",
    "read_recording",
    "recordings_in",
    "replay",
]
