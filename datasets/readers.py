"""Read physiological recordings from disk into :class:`~biofed.datasets.recording.Recording`.

One public entry point, :func:`read_recording`, dispatches on the file extension to one
private reader per format (MNE-Python style):

=====================================  ======================================================
extension                              reader
=====================================  ======================================================
``.edf`` ``.bdf`` ``.fif`` ``.vhdr``   MNE-Python (``mne.io.read_raw_*``, ``preload=True``)
``.set``
``.hea`` ``.dat`` ``.mat``             ``wfdb.rdrecord`` (+ beat annotations from ``.atr``)
``.wav``                               ``scipy.io.wavfile``
``.txt`` ``.csv``                      NumPy, sampling rate from a ``# Sampling Rate (Hz):=``
                                       header line (BioSPPy "Simple Text Format") or ``sfreq=``;
                                       BrainFlow's CSV with ``board=`` (:mod:`biofed.datasets.brainflow`)
``.xdf`` ``.xdfz``                     ``pyxdf`` (LSL recordings: streams and markers,
                                       :mod:`biofed.datasets.xdf`)
=====================================  ======================================================

Conventions
-----------
* Channel types come from the labels (:func:`infer_channel_type`): ``"EEG Fp1"`` and
  eegbci-style ``"Fc5."`` are EEG; ``"ECG ECG"``, ``"II"``, ``"MLII"``, ``"V5"`` are ECG;
  ``"PLETH"`` is PPG; ``"RESP"`` respiration; a reference electrode or a derivation between
  reference electrodes (``"EEG A2-A1"``; electrodes A1, A2, M1, M2) is ``"ref"``; EOG, EMG,
  stimulus and blood-pressure channels are ``"misc"``. ``ref``/``misc`` channels are not
  features: they go to :attr:`Recording.excluded_channels`.
* Electrophysiology is in volts: MNE already gives volts; WFDB and text channels in mV/µV
  are scaled to V. Other units are kept (``"NU"`` = not calibrated).
* WFDB gaps: clinical records contain NaN dropouts (PhysioNet/CinC 2015 ``v102s``). They are
  linearly interpolated per channel (edges hold the nearest valid sample) and every gap
  (union over channels) is recorded as an ``Annotation(onset, duration, "BAD_gap")`` so
  nothing is silently invented; downstream code should drop windows overlapping ``BAD_*``
  annotations. An all-NaN channel is excluded. Text, WAV and MNE formats have no gap
  convention: a non-finite sample there is an error.
* Annotation onsets are seconds from the first sample.
* Dataset-specific naming rules live in :func:`eegmat_subject_and_label` (eegmat
  ``SubjectNN_1`` rest / ``SubjectNN_2`` arithmetic) and :func:`_dataset_naming_rules`
  (eegmmidb subject ``S001`` from ``S001R04``; BioSPPy ``eeg_ec``/``eeg_eo`` eyes
  closed/open). WFDB records: subject = record name; PhysioNet/CinC 2015 ``#True alarm`` /
  ``#False alarm`` header comments become the label ``true_alarm`` / ``false_alarm``; beat
  annotations (``.atr``) become zero-duration annotations labelled with the beat symbol
  (rhythm changes ``+`` with their rhythm, e.g. ``"(N"``). Everything else is format-generic.

Every failure raises :class:`~biofed.datasets.recording.RecordingError` naming the file.
"""

from __future__ import annotations

import io
import logging
import math
import re
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np

from biofed.datasets.recording import BIO_TYPES, MODALITIES, Annotation, Recording, RecordingError, Signal, modality_of
from biofed.kernels._validation import first_nonfinite

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "eegmat_subject_and_label",
    "infer_channel_type",
    "read_recording",
    "recordings_in",
    "stream_channel_types",
]

logger = logging.getLogger(__name__)

_MNE_EXTENSIONS = (".edf", ".bdf", ".fif", ".vhdr", ".set")
_WFDB_EXTENSIONS = (".hea", ".dat", ".mat")
_TEXT_EXTENSIONS = (".txt", ".csv")
_XDF_EXTENSIONS = (".xdf", ".xdfz")
#: Extensions :func:`read_recording` understands.
SUPPORTED_EXTENSIONS = _MNE_EXTENSIONS + _WFDB_EXTENSIONS + (".wav",) + _TEXT_EXTENSIONS + _XDF_EXTENSIONS


# --------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------
def recordings_in(folder) -> list[Path]:
    """The recording files of ``folder`` that :func:`read_recording` reads, sorted by name.

    A WFDB record counts once, by its ``.hea`` header (its ``.dat``/``.mat`` signal file is
    read with it).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
    headers = {p.with_suffix("") for p in files if p.suffix.lower() == ".hea"}
    return [p for p in files if not (p.suffix.lower() in (".dat", ".mat") and p.with_suffix("") in headers)]


def read_recording(path, *, sfreq: float | None = None, modality: str | None = None, board=None) -> Recording:
    """Read one recording file.

    Parameters
    ----------
    path : str or os.PathLike
        The file. WFDB records may be named by their ``.hea``, ``.dat`` or ``.mat`` file.
    sfreq : float or None
        Sampling rate in Hz for text files without a ``# Sampling Rate (Hz):=`` header.
        For every other format the file states its rate; passing a different one is an error.
    modality : {"eeg", "audio", "bio"} or None
        Text files: put every column in this modality (default: per column from its label,
        e.g. ``PCG`` -> audio and ``ECG`` -> bio in one file, then from the file name:
        ``eeg*`` -> eeg, ``pcg*`` -> audio, else bio).
        Multimodal formats (EDF, WFDB, ...): keep only this modality. EEG formats (EDF,
        BDF, FIF, BrainVision, EEGLAB) must hold EEG channels unless ``modality`` selects
        another one, e.g. ``modality="bio"`` for an ECG-only EDF.
        WAV files are always audio.
    board : int, str or None
        A BrainFlow board id or name (``"SYNTHETIC"``, ``"CYTON"``): read the file as written by
        BrainFlow's ``DataFilter.write_file`` for that board (needs ``biofed[brainflow]``).

    Returns
    -------
    Recording
        Signals grouped by modality, annotations, and the whole-recording label and subject
        where the dataset's naming rules give them.

    Raises
    ------
    RecordingError
        Missing, empty, truncated or corrupt file, unknown extension, no usable channels,
        non-finite samples, missing or contradictory sampling rate. The message names the file.
    """
    path = Path(path)
    if modality is not None and modality not in MODALITIES:
        raise RecordingError(path, f"modality must be one of {MODALITIES} or None, got {modality!r}.")
    if sfreq is not None:
        try:
            sfreq = float(sfreq)
        except (TypeError, ValueError):
            raise RecordingError(path, f"sfreq must be a number in Hz, got {sfreq!r}.") from None
        if not (math.isfinite(sfreq) and sfreq > 0):
            raise RecordingError(path, f"sfreq must be finite and > 0 Hz, got {sfreq!r}.")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise RecordingError(
            path,
            f"unknown file extension {path.suffix!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}. "
            "Rename the file if it has the wrong extension.",
        )
    if not path.is_file():
        raise RecordingError(path, "no such file (check the path and that the dataset is downloaded).")
    if path.stat().st_size == 0:
        raise RecordingError(path, "the file is empty (0 bytes); re-download or re-export it.")
    if board is not None:
        from biofed.datasets.brainflow import read_brainflow_csv

        try:
            return read_brainflow_csv(path, board)
        except ImportError as exc:
            raise RecordingError(path, str(exc)) from None
    if ext in _MNE_EXTENSIONS:
        reader = _read_mne
    elif ext in _WFDB_EXTENSIONS:
        reader = _read_wfdb
    elif ext == ".wav":
        reader = _read_wav
    elif ext in _XDF_EXTENSIONS:
        from biofed.datasets.xdf import read_xdf as reader
    else:
        reader = _read_text
    try:
        return reader(path, sfreq=sfreq, modality=modality)
    except RecordingError:
        raise
    except Exception as exc:  # third-party readers raise anything on corrupt input
        raise RecordingError(
            path,
            f"could not read the file as {ext[1:].upper()}: {type(exc).__name__}: {exc}. "
            "The file may be truncated or corrupt.",
        ) from exc


# --------------------------------------------------------------------------------------
# channel types and dataset naming rules
# --------------------------------------------------------------------------------------
_REFERENCE_ELECTRODES = frozenset({"a1", "a2", "m1", "m2"})
_ELECTRODE_PREFIXES = (
    "nfp", "fp", "aff", "af", "ffc", "fft", "ff", "ftt", "ft", "fcc", "fc", "ccp", "cpp", "cp",
    "ttp", "tpp", "tp", "t", "ppo", "poo", "po", "p", "oi", "o", "i", "n", "f", "c",
)  # fmt: skip
# 10-20 / 10-10 / 10-05 electrode names: prefix + (z | 1..10) + optional "h".
_ELECTRODE_RE = re.compile(rf"(?:{'|'.join(_ELECTRODE_PREFIXES)})(?:z|10|[1-9])h?", re.IGNORECASE)
_PREFIX_TYPES = {
    "eeg": "eeg", "ecg": "ecg", "ekg": "ecg", "eog": "misc", "emg": "misc", "ppg": "ppg",
    "pleth": "ppg", "resp": "resp", "eda": "eda", "gsr": "eda", "acc": "acc", "pcg": "audio",
}  # fmt: skip
_ECG_LEADS = frozenset(
    {"i", "ii", "iii", "avr", "avl", "avf", "v", "mli", "mlii", "mliii", "ecg", "ekg"}
    | {f"v{i}" for i in range(1, 7)}
    | {f"mlv{i}" for i in range(1, 7)}
)
_EXACT_TYPES = {
    "eeg": "eeg", "pleth": "ppg", "ppg": "ppg", "bvp": "ppg",
    "resp": "resp", "respiration": "resp", "thor": "resp", "abdo": "resp",
    "eda": "eda", "gsr": "eda",
    "pcg": "audio",
    # never features: blood pressures, saturation, stimulus/trigger channels
    "abp": "misc", "art": "misc", "pap": "misc", "cvp": "misc", "icp": "misc", "spo2": "misc",
    "status": "misc", "trigger": "misc", "stim": "misc", "sti 014": "misc",
}  # fmt: skip


def _is_reference(label: str) -> bool:
    """``A1``, ``M2`` or a derivation made only of reference electrodes (``A2-A1``)."""
    parts = [p.strip() for p in label.lower().split("-")]
    return all(p in _REFERENCE_ELECTRODES for p in parts)


def _is_electrode(label: str) -> bool:
    """A 10-05 electrode name or a bipolar derivation of them (``Fp1-F7``, ``Cz-A1``)."""
    parts = [p.strip() for p in label.split("-")]
    return all(_ELECTRODE_RE.fullmatch(p) or p.lower() in _REFERENCE_ELECTRODES for p in parts)


def infer_channel_type(label: str, default: str | None = "misc") -> str | None:
    """Channel type from a channel label.

    Parameters
    ----------
    label : str
        E.g. ``"EEG Fp1"``, ``"ECG ECG"``, ``"EEG A2-A1"``, ``"Fc5."`` (eegbci pads names
        with dots), ``"MLII"``, ``"PLETH"``, ``"acc_x"``.
    default : str or None
        Returned when the label says nothing recognisable.

    Returns
    -------
    str or None
        One of ``eeg, ecg, ppg, resp, eda, acc, audio, ref, misc`` (or ``default``).

    Notes
    -----
    Rules, first match wins: an EDF+ type prefix (``"EEG "``, ``"ECG "``, ``"EOG "``,
    ``"EMG "``, ...), where an EEG-prefixed reference electrode or derivation of reference
    electrodes (A1, A2, M1, M2) is ``"ref"``; then the bare label: reference electrodes ->
    ref, 10-05 electrode names and their bipolar derivations -> eeg, ECG lead names
    (I, II, III, aVR, aVL, aVF, V, V1-V6, MLII, ...) -> ecg, PLETH/PPG -> ppg,
    RESP -> resp, EDA/GSR -> eda, ``acc*`` -> acc, PCG -> audio, EOG*/EMG*, blood
    pressures and stimulus channels -> misc. Biosemi-style ``A1``/``A2`` electrode names
    are read as reference electrodes.
    """
    text = label.strip().rstrip(".").strip()
    lowered = text.lower()
    head, _, body = lowered.partition(" ")
    if body and head in _PREFIX_TYPES:
        kind = _PREFIX_TYPES[head]
        if kind == "eeg" and _is_reference(body.strip()):
            return "ref"
        return kind
    if lowered in _EXACT_TYPES:
        return _EXACT_TYPES[lowered]
    if _is_reference(lowered):
        return "ref"
    if _is_electrode(text):
        return "eeg"
    if lowered in _ECG_LEADS:
        return "ecg"
    if lowered.startswith(("eog", "emg", "heog", "veog")):
        return "misc"
    for prefix, kind in (("acc", "acc"), ("ecg", "ecg"), ("ekg", "ecg"), ("resp", "resp"), ("ppg", "ppg")):
        if lowered.startswith(prefix):
            return kind
    return default


def eegmat_subject_and_label(stem: str) -> tuple[str, str] | None:
    """PhysioNet eegmat naming: ``SubjectNN_1`` is rest, ``SubjectNN_2`` mental arithmetic.

    Returns
    -------
    (subject, label) or None
        ``("Subject02", "rest")`` for ``"Subject02_1"``; None for any other name.
    """
    match = re.fullmatch(r"(Subject\d+)_([12])", stem)
    if match is None:
        return None
    return match[1], {"1": "rest", "2": "arithmetic"}[match[2]]


def _dataset_naming_rules(stem: str) -> tuple[str | None, str | None]:
    """(subject, label) implied by the file names of the datasets in ``shared/datasets``."""
    eegmat = eegmat_subject_and_label(stem)
    if eegmat is not None:
        return eegmat
    eegbci = re.fullmatch(r"(S\d{3})R\d{2}", stem)  # eegmmidb: SxxxRyy, labels are annotations
    if eegbci is not None:
        return eegbci[1], None
    biosppy = {"eeg_ec": "eyes_closed", "eeg_eo": "eyes_open"}  # BioSPPy example EEG
    return None, biosppy.get(stem)


_STREAM_TYPES = {
    "eeg": "eeg",
    "audio": "audio",
    "microphone": "audio",
    "ecg": "ecg",
    "ekg": "ecg",
    "ppg": "ppg",
    "resp": "resp",
    "eda": "eda",
    "gsr": "eda",
    "acc": "acc",
}


def stream_channel_types(names, declared, stream_type: str | None) -> list[str]:
    """Channel types of an LSL (or XDF) stream's channels, one of :data:`CH_TYPES` each.

    A declared type biofed knows wins (``"EEG"``, ``"ECG"``...); otherwise the label decides
    (:func:`infer_channel_type`); otherwise, for a channel without a declared type, the
    stream's type (``EEG``, ``Audio``, ``ECG``, ``GSR``...); otherwise ``"misc"``.
    """
    from_stream = _STREAM_TYPES.get((stream_type or "").strip().lower())
    types = []
    for name, kind in zip(names, declared):
        kind = (kind or "").strip().lower()
        # a declared type biofed does not know (TRG, STIM, EXG...) is no vote for the stream's type
        fallback = from_stream if not kind else None
        types.append(_STREAM_TYPES.get(kind) or infer_channel_type(name, default=None) or fallback or "misc")
    return types


_UNIT_SCALES = {
    "v": ("V", 1.0),
    "volt": ("V", 1.0),
    "volts": ("V", 1.0),
    "mv": ("V", 1e-3),
    "uv": ("V", 1e-6),
    "µv": ("V", 1e-6),
    "μv": ("V", 1e-6),
    "millivolts": ("V", 1e-3),
    "microvolts": ("V", 1e-6),
}  # fmt: skip  (the last two: XDF/LSL spelling)


def _normalise_unit(unit: str | None) -> tuple[str, float]:
    """(unit, scale to apply): voltages become volts, anything else is kept (empty -> NU)."""
    if not unit or not unit.strip():
        return "NU", 1.0
    return _UNIT_SCALES.get(unit.strip().lower(), (unit.strip(), 1.0))


def _make_signal(path, data, sfreq, ch_names, ch_types, units) -> Signal:
    try:
        return Signal(data=data, sfreq=sfreq, ch_names=tuple(ch_names), ch_types=tuple(ch_types), units=tuple(units))
    except ValueError as exc:
        raise RecordingError(path, str(exc)) from exc


def _group_signals(path, data, sfreq, names, types, units, modality):
    """Split channels into modality signals; returns (signals, excluded_channels)."""
    groups: dict[str, list[int]] = {}
    excluded = []
    for i, (name, kind) in enumerate(zip(names, types)):
        target = modality_of(kind)
        if target is None or (modality is not None and target != modality):
            excluded.append((name, kind))
        else:
            groups.setdefault(target, []).append(i)
    signals = {
        m: _make_signal(
            path, data[idx], sfreq, [names[i] for i in idx], [types[i] for i in idx], [units[i] for i in idx]
        )
        for m in MODALITIES
        if (idx := groups.get(m))
    }
    if not signals:
        wanted = f"{modality!r} channels" if modality else "EEG, audio or biosensor channels"
        raise RecordingError(path, f"no usable channels: found no {wanted} among {list(zip(names, types))}.")
    return signals, tuple(excluded)


def _check_sfreq(path, declared: float, given: float | None) -> None:
    if given is not None and not math.isclose(declared, given, rel_tol=1e-9):
        raise RecordingError(
            path,
            f"the file declares a sampling rate of {declared:g} Hz but sfreq={given:g} was passed; "
            "drop the sfreq argument (it is only for text files without a header).",
        )


# --------------------------------------------------------------------------------------
# EEG formats through MNE
# --------------------------------------------------------------------------------------
def _header_field(path, header: bytes, start: int, stop: int, name: str, kind):
    raw = header[start:stop].decode("ascii", errors="replace").strip()
    try:
        return kind(raw)
    except ValueError:
        raise RecordingError(
            path, f"truncated or corrupt EDF/BDF header: field {name!r} (bytes {start}-{stop}) is {raw!r}."
        ) from None


def _check_edf_header(path: Path, bdf: bool) -> None:
    """Validate the fixed EDF/BDF header and the file size it implies.

    MNE silently reads fewer data records from a truncated file; this check turns that into
    a clear error before MNE runs.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.read(256)
        if len(header) < 256:
            raise RecordingError(path, f"truncated EDF/BDF header: {len(header)} bytes, the fixed header has 256.")
        version = header[:8]
        if version != (b"\xffBIOSEMI" if bdf else b"0       "):
            raise RecordingError(path, f"not an {'BDF' if bdf else 'EDF'} file: version field is {version!r}.")
        header_bytes = _header_field(path, header, 184, 192, "header bytes", int)
        n_records = _header_field(path, header, 236, 244, "number of data records", int)
        record_s = _header_field(path, header, 244, 252, "record duration", float)
        if not (math.isfinite(record_s) and record_s > 0):
            raise RecordingError(
                path,
                f"corrupt EDF/BDF header: record duration (bytes 244-252) is {record_s:g} s; it must be a "
                "positive number of seconds (the sampling rates are samples per record / record duration).",
            )
        n_signals = _header_field(path, header, 252, 256, "number of signals", int)
        if n_signals < 1 or header_bytes != 256 * (n_signals + 1):
            raise RecordingError(
                path,
                f"corrupt EDF/BDF header: {n_signals} signal(s) need {256 * (n_signals + 1)} header "
                f"bytes, the header says {header_bytes}.",
            )
        if size < header_bytes:
            raise RecordingError(
                path, f"truncated EDF/BDF header: the file has {size} bytes, the header {header_bytes}."
            )
        fh.seek(256 + 216 * n_signals)
        spr_field = fh.read(8 * n_signals)
    samples = [
        _header_field(path, spr_field, 8 * i, 8 * i + 8, f"samples per record [{i}]", int) for i in range(n_signals)
    ]
    record_bytes = sum(samples) * (3 if bdf else 2)
    if record_bytes <= 0:
        raise RecordingError(path, "corrupt EDF/BDF header: data records hold no samples.")
    data_bytes = size - header_bytes
    if n_records == -1:  # allowed while recording; the size must still be whole records
        if data_bytes % record_bytes:
            raise RecordingError(path, f"truncated EDF/BDF data: {data_bytes} bytes is not a whole number of records.")
    elif n_records < 0 or data_bytes < n_records * record_bytes:
        raise RecordingError(
            path,
            f"truncated EDF/BDF data: the header declares {n_records} data records "
            f"({n_records * record_bytes} bytes) but the file holds {data_bytes} bytes of data.",
        )


def _mne_channel_type(name: str, mne_type: str) -> str:
    if mne_type == "eeg":  # MNE's default for unlabelled channels of EEG formats
        return infer_channel_type(name, default="eeg")
    if mne_type in ("ecg", "resp"):
        return mne_type
    if mne_type in ("misc", "bio"):
        return infer_channel_type(name, default="misc")
    return "misc"  # eog, emg, stim, ...: never features


def _read_mne(path: Path, *, sfreq, modality) -> Recording:
    import mne

    ext = path.suffix.lower()
    if ext in (".edf", ".bdf"):
        _check_edf_header(path, bdf=ext == ".bdf")
    read = {
        ".edf": mne.io.read_raw_edf,
        ".bdf": mne.io.read_raw_bdf,
        ".fif": mne.io.read_raw_fif,
        ".vhdr": mne.io.read_raw_brainvision,
        ".set": mne.io.read_raw_eeglab,
    }[ext]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # naming-convention and montage notices
        raw = read(path, preload=True, verbose="error")
    _check_sfreq(path, raw.info["sfreq"], sfreq)
    names = list(raw.ch_names)
    types = [_mne_channel_type(n, t) for n, t in zip(names, raw.get_channel_types())]
    fiff_volt = mne.io.constants.FIFF.FIFF_UNIT_V
    units = ["V" if ch["unit"] == fiff_volt else "NU" for ch in raw.info["chs"]]
    if not any(t == "eeg" for t in types) and modality in (None, "eeg"):
        raise RecordingError(path, f"no usable channels: no EEG channels among {list(zip(names, types))}.")
    signals, excluded = _group_signals(path, raw.get_data(), raw.info["sfreq"], names, types, units, modality)
    ann = raw.annotations
    shift = raw.first_time if ann.orig_time is not None else 0.0
    annotations = tuple(
        Annotation(float(o) - shift, float(d), str(desc))
        for o, d, desc in zip(ann.onset, ann.duration, ann.description)
    )
    subject, label = _dataset_naming_rules(path.stem)
    if subject is None:
        his_id = (raw.info.get("subject_info") or {}).get("his_id")
        subject = str(his_id) if his_id not in (None, "", "X") else None
    return Recording(
        source=str(path), signals=signals, start_time=raw.info["meas_date"], annotations=annotations,
        label=label, subject=subject, excluded_channels=excluded,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# WFDB (PhysioNet)
# --------------------------------------------------------------------------------------
def _challenge2015_label(comments) -> str | None:
    """PhysioNet/CinC Challenge 2015 headers end with ``#True alarm`` or ``#False alarm``."""
    for comment in comments:
        text = comment.strip().lower()
        if text in ("true alarm", "false alarm"):
            return text.replace(" ", "_")
    return None


def _nan_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop)] of the True runs of a 1-D boolean mask."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _interpolate_gaps(x: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN samples of one channel (edges hold the nearest sample)."""
    bad = np.isnan(x)
    good = np.flatnonzero(~bad)
    out = x.copy()
    out[bad] = np.interp(np.flatnonzero(bad), good, x[good])
    return out


def _read_wfdb(path: Path, *, sfreq, modality) -> Recording:
    record = path.with_suffix("")
    if not record.with_suffix(".hea").is_file():
        raise RecordingError(path, f"WFDB header {record.name}.hea not found beside the signal file.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # wfdb's pandas usage, not ours
        warnings.simplefilter("ignore", FutureWarning)
        import wfdb

        rec = wfdb.rdrecord(str(record))
        ann = wfdb.rdann(str(record), "atr") if record.with_suffix(".atr").is_file() else None
    if rec.p_signal is None or rec.p_signal.size == 0:
        raise RecordingError(path, "the WFDB record holds no samples.")
    fs = float(rec.fs)
    _check_sfreq(path, fs, sfreq)
    if rec.p_signal.shape[0] != rec.sig_len:
        raise RecordingError(
            path, f"the header declares {rec.sig_len} samples, the signal file gave {rec.p_signal.shape[0]}."
        )
    signal = np.asarray(rec.p_signal, dtype=np.float64).T.copy()
    if np.isinf(signal).any():
        raise RecordingError(path, "the WFDB record holds infinite samples.")
    names, types, units, keep = [], [], [], []
    excluded_empty = []
    for i, (name, unit) in enumerate(zip(rec.sig_name, rec.units)):
        kind = infer_channel_type(name, default="misc")
        if np.isnan(signal[i]).all():
            logger.warning("%s: channel %s holds no valid sample; excluded", path, name)
            excluded_empty.append((name, kind))
            continue
        unit, scale = _normalise_unit(unit)
        signal[i] *= scale
        names.append(name)
        types.append(kind)
        units.append(unit)
        keep.append(i)
    if not keep:
        raise RecordingError(path, "no usable channels: every channel of the WFDB record is NaN.")
    signal = signal[keep]
    gaps = np.isnan(signal)
    annotations = []
    if gaps.any():
        for i in np.flatnonzero(gaps.any(axis=1)):
            signal[i] = _interpolate_gaps(signal[i])
        runs = _nan_runs(gaps.any(axis=0))
        logger.info("%s: interpolated %d NaN gap(s) (%d samples)", path, len(runs), int(gaps.any(axis=0).sum()))
        annotations += [Annotation(a / fs, (b - a) / fs, "BAD_gap") for a, b in runs]
    if ann is not None:
        for sample, symbol, aux in zip(ann.sample, ann.symbol, ann.aux_note):
            aux = (aux or "").strip("\x00 ")
            label = aux if symbol == "+" and aux else symbol  # '+' marks a rhythm change, e.g. "(N"
            annotations.append(Annotation(int(sample) / fs, 0.0, label))
    annotations.sort(key=lambda a: a.onset)
    signals, excluded = _group_signals(path, signal, fs, names, types, units, modality)
    return Recording(
        source=str(path), signals=signals, start_time=rec.base_datetime, annotations=tuple(annotations),
        label=_challenge2015_label(rec.comments or ()), subject=rec.record_name,
        excluded_channels=tuple(excluded_empty) + excluded,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------
def _read_wav(path: Path, *, sfreq, modality) -> Recording:
    from scipy.io import wavfile

    if modality not in (None, "audio"):
        raise RecordingError(path, f"WAV files are audio; modality={modality!r} is not possible.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wavfile.WavFileWarning)  # unknown chunks are skipped
        rate, data = wavfile.read(path)
    _check_sfreq(path, float(rate), sfreq)
    if data.dtype.kind == "f":
        values = data.astype(np.float64)
    elif data.dtype == np.uint8:
        values = (data.astype(np.float64) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        values = data.astype(np.float64) / float(2 ** (8 * data.dtype.itemsize - 1))
    else:
        raise RecordingError(path, f"unsupported WAV sample type {data.dtype}.")
    if values.size == 0:
        raise RecordingError(path, "the WAV file holds no samples.")
    values = values.reshape(len(values), -1).T
    n = values.shape[0]
    names = ["audio"] if n == 1 else [f"audio_{i + 1}" for i in range(n)]
    signal = _make_signal(path, values, float(rate), names, ["audio"] * n, ["NU"] * n)
    subject, label = _dataset_naming_rules(path.stem)
    return Recording(source=str(path), signals={"audio": signal}, label=label, subject=subject)


# --------------------------------------------------------------------------------------
# text (BioSPPy "Simple Text Format", CSV)
# --------------------------------------------------------------------------------------
def _parse_header(lines: list[str]) -> dict[str, str]:
    header = {}
    for line in lines:
        body = line.lstrip("#").strip()
        key, sep, value = body.partition(":=")
        if not sep:
            key, sep, value = body.partition(":")
        if sep:
            header[key.strip().lower()] = value.strip()
    return header


def _read_text(path: Path, *, sfreq, modality) -> Recording:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordingError(
            path,
            f"not a text file: undecodable byte 0x{raw[exc.start]:02x} at offset {exc.start} "
            "(garbage bytes or a binary file with a text extension).",
        ) from None
    if "\x00" in text:
        raise RecordingError(path, "not a text file: it contains NUL bytes (garbage or binary data).")
    lines = text.splitlines()
    comments = [ln for ln in lines if ln.lstrip().startswith("#")]
    body = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    header = _parse_header(comments)
    delimiter = "," if path.suffix.lower() == ".csv" else None
    labels = None
    if "labels" in header:
        labels = header["labels"].split(delimiter) if delimiter else header["labels"].split()
    if body:
        try:  # a non-numeric first row holds the column names (CSV convention)
            [float(v) for v in body[0].split(delimiter)]
        except ValueError:
            labels = [v.strip() for v in body[0].split(delimiter)]
            body = body[1:]
    if not body:
        raise RecordingError(path, "no samples: the file holds a header but no data rows.")
    declared = header.get("sampling rate (hz)")
    if declared is not None:
        try:
            file_sfreq = float(declared)
        except ValueError:
            raise RecordingError(path, f"corrupt header: 'Sampling Rate (Hz)' is {declared!r}, not a number.") from None
        if not (math.isfinite(file_sfreq) and file_sfreq > 0):
            raise RecordingError(path, f"corrupt header: sampling rate {file_sfreq!r} Hz must be finite and > 0.")
        _check_sfreq(path, file_sfreq, sfreq)
    elif sfreq is None:
        raise RecordingError(
            path, "missing sampling rate: add a '# Sampling Rate (Hz):= <rate>' header line or pass sfreq=."
        )
    else:
        file_sfreq = sfreq
    try:
        data = np.loadtxt(io.StringIO("\n".join(body)), delimiter=delimiter, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise RecordingError(
            path, f"malformed data rows (mismatched column counts or non-numeric values): {exc}"
        ) from None
    data = data.T.copy()
    n_channels = data.shape[0]
    found = first_nonfinite(data)
    if found is not None:
        _, (ch, row) = found
        raise RecordingError(
            path, f"non-finite sample in column {ch} at data row {row}; text files have no gap convention."
        )
    if labels is None:
        labels = [path.stem] if n_channels == 1 else [f"{path.stem}_{i + 1}" for i in range(n_channels)]
    if len(labels) != n_channels:
        raise RecordingError(
            path, f"the header names {len(labels)} channel(s) {labels} but rows hold {n_channels} column(s)."
        )
    unit_values = header.get("units", "").split(delimiter) if header.get("units") else [""]
    if len(unit_values) not in (1, n_channels):
        raise RecordingError(path, f"'Units' lists {len(unit_values)} unit(s) for {n_channels} column(s).")
    units = []
    for i in range(n_channels):
        unit, scale = _normalise_unit(unit_values[0] if len(unit_values) == 1 else unit_values[i])
        data[i] *= scale
        units.append(unit)
    types = [_text_channel_type(path.stem, label, modality) for label in labels]
    signals, excluded = _group_signals(path, data, file_sfreq, labels, types, units, modality)
    start_time = None
    if "date" in header:
        try:
            start_time = datetime.fromisoformat(header["date"])
        except ValueError:
            logger.warning("%s: ignoring unparseable Date header %r", path, header["date"])
    subject, label = _dataset_naming_rules(path.stem)
    return Recording(
        source=str(path), signals=signals, start_time=start_time, label=label, subject=subject,
        excluded_channels=excluded,
    )  # fmt: skip


def _text_channel_type(stem: str, label: str, modality: str | None) -> str:
    """Type of one text column: modality argument > column label > file name."""
    if modality == "eeg":
        return "eeg"
    if modality == "audio":
        return "audio"
    from_label = infer_channel_type(label, default=None)
    if modality == "bio":
        kind = from_label if from_label in BIO_TYPES else infer_channel_type(stem, default=None)
        return kind if kind in BIO_TYPES else "misc"
    if from_label is not None:
        return from_label
    lowered = stem.lower()
    if lowered.startswith("eeg"):
        return "eeg"
    if lowered.startswith("pcg"):
        return "audio"
    kind = infer_channel_type(stem, default=None)
    return kind if kind in BIO_TYPES else "misc"
