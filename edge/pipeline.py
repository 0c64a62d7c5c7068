"""Streaming feature pipeline: sensor chunks in, aligned and labelled feature rows out.

Data flow on a device::

    push(modality, chunk (n_ch, n))            chunks of any size, per modality
      -> fixed-capacity buffer per modality     window + one chunk slice of samples per channel
      -> aligned windows                        window j = [j*hop_s, j*hop_s + window_s) everywhere
      -> features per modality (biofed.kernels) eeg: log10 band powers; audio: log-mel energies;
                                                bio: statistics (+ heart rate, RMSSD for ecg/ppg)
      -> raw row (F,) named by FeatureLayout    e.g. "eeg:Fp1:alpha", "bio:ECG:heart_rate"
      -> optional standardize + project         onto the current k=32 basis (kernels.apply_transform)
      -> FeatureRow(t, label, vector)

Windows and alignment
    For a modality sampled at ``fs``, a window holds ``round(window_s * fs)`` samples and window
    ``j`` starts at sample ``round(j * hop_s * fs)`` (``= j * round(hop_s * fs)`` whenever
    ``hop_s * fs`` is an integer, the usual case). Window ``j`` therefore covers
    ``[j * hop_s, j * hop_s + window_s)`` in every modality, to within half a sample and without
    drift, and its row carries ``t = j * hop_s`` (seconds since the first sample of the stream).
    A row is emitted as soon as every modality of the layout has produced window ``j``.

Plans and shared segments
    The spectral plan of each EEG / audio stream (taper, bins, band weights; see
    :class:`biofed.kernels.SpectralPlan`) and the projection (:class:`biofed.kernels.TransformPlan`)
    are built and validated once, when the pipeline is configured or its basis set; every
    window then only computes. When the hop is a multiple of the Welch segment step
    (``nperseg // 2``), consecutive windows share segments: the stream keeps the power spectra
    of the segments the next window reuses and transforms only the new ones, with the same
    bits as the batch kernel. Spectral features are computed in ``PipelineConfig.dtype``
    (float32 by default, within ``FLOAT32_RTOL`` of float64).

Memory
    Each modality keeps one buffer of ``round(window_s*fs) + round(max_chunk_s*fs)`` samples per
    channel, allocated once. Larger pushes are consumed in slices of ``max_chunk_s``; the samples
    still needed by the next window are moved to the front when the buffer is full (each window
    stays contiguous, so the kernels read it without gathering). Per-modality features that wait
    for a lagging modality are capped at ``max_pending_windows`` windows (oldest dropped with a
    warning), so memory is bounded for any stream length.

Labels
    A window's label is the label passed with the chunk of the *reference modality* (the layout's
    first modality, in ``("eeg", "audio", "bio")`` order) that contains the window's **last**
    sample ("label at window end"): causal and cheap, and equal to the majority label except for
    windows whose label changes in their second half (at most ``window_s / hop_s / 2`` windows per
    change). Labels passed with chunks of the other modalities are ignored.

Basis
    Without a basis the rows are the raw feature vectors, and the pipeline folds every row into a
    mergeable :class:`FeatureSketch` (Frequent Directions over centred rows + Chan moments), from
    which :meth:`StreamingPipeline.fit_local_basis` fits a standardized PCA basis; with a store it
    fits one exactly by truncated SVD of the stored rows. With a basis, rows are the k projected
    coordinates ``((raw - mean) / scale) @ components.T``.

Errors
    Bad chunks raise :class:`ChunkError` *before* any state changes, so a long-running agent logs
    the error, drops the chunk and keeps going; the next chunk of that modality is treated as
    contiguous with the last accepted one.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from biofed.datasets.recording import MODALITIES, stream_channels
from biofed.datasets.replay import label_segments
from biofed.kernels import (
    BIOSENSOR_FEATURES,
    EEG_BANDS,
    Moments,
    SpectralPlan,
    band_power_plan,
    fd_basis,
    fd_init,
    fd_merge,
    fd_update,
    heart_rate_features,
    log_band_energy_plan,
    moments_init,
    moments_merge,
    moments_scale,
    moments_update,
    apply_transform,
    transform_plan,
    truncated_svd,
    window_statistics,
)
from biofed.kernels.spectral import _finish, _reduce_segments, _segment_powers
from biofed.model_format import HR_TYPES, ModalitySpec

if TYPE_CHECKING:
    from biofed.datasets import Recording
    from biofed.edge.store import FeatureStore

__all__ = [
    "MODALITIES",
    "Basis",
    "ChunkError",
    "FeatureLayout",
    "FeatureRow",
    "FeatureSketch",
    "ModalityLayout",
    "PipelineConfig",
    "PipelineError",
    "StreamingPipeline",
    "basis_from_sketch",
    "extract_features",
    "fit_basis",
    "sketch_init",
    "sketch_merge",
    "sketch_update",
]

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "float64")
_STAT_NAMES = BIOSENSOR_FEATURES[:5]
_HR_NAMES = BIOSENSOR_FEATURES[5:]


class PipelineError(ValueError):
    """Invalid pipeline configuration, layout or basis (the message says what and how to fix it)."""


class ChunkError(PipelineError):
    """A pushed chunk was rejected (unknown modality, wrong channel count, NaN/inf, bad shape).

    The pipeline is unchanged when this is raised: log it, drop the chunk, keep streaming.
    """


# --------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Feature-extraction settings shared by every device of a federation.

    Parameters
    ----------
    window_s : float, default 2.0
        Window length in seconds.
    hop_s : float, default 1.0
        Distance between window starts in seconds (one row per ``hop_s``).
    bands : tuple of (name, lo, hi), default ``EEG_BANDS``
        EEG bands in Hz (``lo <= f < hi``); one feature per EEG channel and band.
    n_mels : int, default 32
        Mel bands per audio channel.
    k : int, default 32
        Dimension of the projected feature space.
    modalities : tuple of str, default ("eeg", "audio", "bio")
        Modalities used when present in a recording, a subset of :data:`MODALITIES`.
    max_chunk_s : float, default 4.0
        Largest slice of a push processed at once; each modality's buffer holds
        ``window_s + max_chunk_s`` seconds of samples.
    sketch_rows : int, default 64
        Rows ``ell`` of the Frequent Directions sketch; raw rows are folded in blocks of this
        many (the first block fixes the sketch's units).
    max_pending_windows : int or None, default 600
        Most windows one modality may run ahead of the slowest one before the oldest are
        dropped; ``None`` = unbounded (offline extraction of whole recordings).
    dtype : {"float32", "float64"}, default "float32"
        Precision of the spectral features (EEG band powers, audio log-mel energies): their
        buffers, tapers and FFTs. float32 runs the FFTs faster (``biofed bench`` measures the
        rfft rate of both) and halves the buffers; every band power stays within :data:`biofed.kernels.FLOAT32_RTOL` (1e-5)
        relative of float64, i.e. the logged features within 1e-5 absolute. Biosensor
        features are always computed in float64 (the beat detector's decisions are not
        continuous in the samples). Rows are float64 either way; the setting is not part of
        the layout hash.
    """

    window_s: float = 2.0
    hop_s: float = 1.0
    bands: tuple[tuple[str, float, float], ...] = EEG_BANDS
    n_mels: int = 32
    k: int = 32
    modalities: tuple[str, ...] = MODALITIES
    max_chunk_s: float = 4.0
    sketch_rows: int = 64
    max_pending_windows: int | None = 600
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("window_s", "hop_s", "max_chunk_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise PipelineError(f"PipelineConfig.{name} must be a number of seconds, got {value!r}.")
            if not (math.isfinite(value) and value > 0):
                raise PipelineError(f"PipelineConfig.{name} must be finite and > 0 s, got {value!r}.")
            object.__setattr__(self, name, float(value))
        for name, minimum in (("n_mels", 1), ("k", 1), ("sketch_rows", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise PipelineError(f"PipelineConfig.{name} must be an integer >= {minimum}, got {value!r}.")
            object.__setattr__(self, name, int(value))
        pending = self.max_pending_windows
        if pending is not None and (isinstance(pending, bool) or not isinstance(pending, (int, np.integer)) or pending < 1):
            raise PipelineError(f"PipelineConfig.max_pending_windows must be None or an integer >= 1, got {pending!r}.")
        try:
            bands = tuple((str(name), float(lo), float(hi)) for name, lo, hi in self.bands)
        except (TypeError, ValueError):
            raise PipelineError(f"PipelineConfig.bands must be (name, lo_hz, hi_hz) triples, got {self.bands!r}.") from None
        if not bands or any(not (0 <= lo < hi) for _, lo, hi in bands):
            raise PipelineError(f"PipelineConfig.bands needs at least one band with 0 <= lo < hi, got {bands!r}.")
        if len({name for name, _, _ in bands}) != len(bands):
            raise PipelineError(f"PipelineConfig.bands names must be unique, got {[b[0] for b in bands]}.")
        object.__setattr__(self, "bands", bands)
        modalities = (self.modalities,) if isinstance(self.modalities, str) else tuple(self.modalities)
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities or len(set(modalities)) != len(modalities):
            raise PipelineError(
                f"PipelineConfig.modalities must be distinct names from {MODALITIES}, got {self.modalities!r}."
            )
        object.__setattr__(self, "modalities", tuple(m for m in MODALITIES if m in modalities))
        if self.dtype not in _DTYPES:
            raise PipelineError(f"PipelineConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}.")

    @property
    def feature_params(self) -> dict:
        """The settings that change feature values (part of every layout hash)."""
        return {"window_s": self.window_s, "hop_s": self.hop_s, "bands": [list(b) for b in self.bands], "n_mels": self.n_mels}


# --------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class ModalityLayout(ModalitySpec):
    """Channels and feature columns of one modality (the fields of
    :class:`biofed.model_format.ModalitySpec`, which models carry).

    Attributes
    ----------
    modality : str
        ``"eeg"``, ``"audio"`` or ``"bio"``.
    sfreq : float
        Sampling rate in Hz.
    ch_names, ch_types : tuple of str
        One entry per channel, in the order chunks must have their rows.
    feature_names : tuple of str
        ``"<modality>:<channel>:<feature>"`` per column, channel-major.
    """

    @property
    def n_channels(self) -> int:
        """Channels per chunk."""
        return len(self.ch_names)

    @property
    def n_features(self) -> int:
        """Feature columns of this modality."""
        return len(self.feature_names)


def _modality_feature_names(modality: str, ch_names, ch_types, config: PipelineConfig) -> tuple[str, ...]:
    names = []
    for ch, ch_type in zip(ch_names, ch_types):
        if modality == "eeg":
            feats = [band for band, _, _ in config.bands]
        elif modality == "audio":
            feats = [f"mel{i:02d}" for i in range(config.n_mels)]
        else:
            feats = list(_STAT_NAMES) + (list(_HR_NAMES) if ch_type in HR_TYPES else [])
        names.extend(f"{modality}:{ch}:{feat}" for feat in feats)
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """Names every column of a raw feature row, and the channels each modality's chunks carry.

    Build it with :meth:`from_recording` or :meth:`from_channels`; two devices with the same
    channels, rates and config get the same :attr:`hash`, which keys the feature store.

    Attributes
    ----------
    modalities : tuple of ModalityLayout
        In :data:`MODALITIES` order; the first is the label reference modality.
    feature_params : str
        JSON of the config settings the features depend on (window, hop, bands, mels).
    """

    modalities: tuple[ModalityLayout, ...]
    feature_params: str

    @classmethod
    def from_channels(
        cls, channels: Mapping[str, tuple[float, Sequence[str], Sequence[str]]], config: PipelineConfig
    ) -> FeatureLayout:
        """Layout from ``{modality: (sfreq, ch_names, ch_types)}`` (modalities outside the config are skipped).

        Raises
        ------
        PipelineError
            Unknown modality, no configured modality present, inconsistent channel lists, or a
            rate too low for one sample per window.
        """
        unknown = [m for m in channels if m not in MODALITIES]
        if unknown:
            raise PipelineError(f"unknown modality {unknown[0]!r}; use one of {MODALITIES}.")
        parts = []
        for modality in config.modalities:
            if modality not in channels:
                continue
            sfreq, ch_names, ch_types = channels[modality]
            sfreq = float(sfreq)
            ch_names, ch_types = tuple(map(str, ch_names)), tuple(map(str, ch_types))
            if not ch_names or len(ch_names) != len(ch_types) or len(set(ch_names)) != len(ch_names):
                raise PipelineError(
                    f"{modality}: need unique channel names with one type each, got {ch_names} / {ch_types}."
                )
            if not (math.isfinite(sfreq) and sfreq > 0):
                raise PipelineError(f"{modality}: sampling rate must be finite and > 0 Hz, got {sfreq!r}.")
            if round(config.window_s * sfreq) < 2:
                raise PipelineError(
                    f"{modality}: {sfreq} Hz gives {round(config.window_s * sfreq)} sample(s) per "
                    f"{config.window_s} s window; use a longer window_s."
                )
            too_high = [name for name, _, hi in config.bands if hi > sfreq / 2]
            if modality == "eeg" and too_high:
                raise PipelineError(
                    f"eeg: band(s) {too_high} reach above the Nyquist frequency {sfreq / 2} Hz of {sfreq} Hz EEG; "
                    "drop or narrow them in PipelineConfig.bands."
                )
            names = _modality_feature_names(modality, ch_names, ch_types, config)
            parts.append(ModalityLayout(modality, sfreq, ch_names, ch_types, names))
        if not parts:
            raise PipelineError(
                f"none of the configured modalities {config.modalities} is present (got {tuple(channels)})."
            )
        return cls(tuple(parts), json.dumps(config.feature_params, sort_keys=True))

    @classmethod
    def from_recording(cls, recording: Recording, config: PipelineConfig) -> FeatureLayout:
        """Layout of a :class:`biofed.datasets.Recording` (its configured modalities)."""
        channels = stream_channels([recording])
        try:
            return cls.from_channels(channels, config)
        except PipelineError as exc:
            raise PipelineError(f"{recording.source}: {exc}") from None

    @property
    def modality_names(self) -> tuple[str, ...]:
        """Modality names in layout order."""
        return tuple(m.modality for m in self.modalities)

    def modality(self, name: str) -> ModalityLayout:
        """The :class:`ModalityLayout` of ``name`` (ChunkError when absent)."""
        for part in self.modalities:
            if part.modality == name:
                return part
        raise ChunkError(f"unknown modality {name!r}: this pipeline's layout has {self.modality_names}.")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """All F column names, modality by modality."""
        return tuple(name for part in self.modalities for name in part.feature_names)

    @property
    def n_features(self) -> int:
        """F, the width of a raw feature row."""
        return sum(part.n_features for part in self.modalities)

    @property
    def hash(self) -> str:
        """16 hex digits identifying channels, rates, feature names and feature settings."""
        payload = json.dumps(
            {"params": self.feature_params, "modalities": [dataclasses.astuple(m) for m in self.modalities]},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- basis and sketch
class Basis(NamedTuple):
    """A standardized PCA basis: ``project(X, components, mean=mean, scale=scale)``.

    Attributes
    ----------
    components : ndarray, shape (k, F)
        Orthonormal rows.
    mean, scale : ndarray, shape (F,)
        Standardization applied before projecting (``scale > 0``).
    """

    components: np.ndarray
    mean: np.ndarray
    scale: np.ndarray


class FeatureSketch(NamedTuple):
    """Mergeable, bounded-memory summary of a stream of raw feature rows.

    Attributes
    ----------
    fd : ndarray, shape (ell, F)
        Frequent Directions sketch of the *centred* rows in units of ``unit``:
        ``fd.T @ fd`` approximates ``sum_i ((x_i - mean) / unit)^T ((x_i - mean) / unit)``.
    moments : Moments
        Exact count, mean and sum of squared deviations of the rows.
    unit : ndarray, shape (F,)
        Fixed per-feature scale the sketch is kept in (so features of very different magnitude
        are sketched with equal weight); set from the first rows seen.

    Notes
    -----
    Centring is exact in a stream: with ``n`` rows seen and running mean ``mu``, the scatter
    matrix grows by ``n / (n + 1) * (x - mu)^T (x - mu)`` (Welford), so each row enters the
    sketch as ``sqrt(n / (n + 1)) * (x - mu) / unit``. Merging adds the between-sketch term
    ``sqrt(n_a n_b / n) * (mu_a - mu_b)`` as one more row (Chan et al.).
    """

    fd: np.ndarray
    moments: Moments
    unit: np.ndarray


def sketch_init(unit, ell: int = 64) -> FeatureSketch:
    """Empty sketch of ``len(unit)`` features kept in units of ``unit`` (> 0, shape (F,))."""
    unit = np.asarray(unit, dtype=np.float64)
    if unit.ndim != 1 or unit.size == 0 or not np.all(np.isfinite(unit)) or np.any(unit <= 0):
        raise PipelineError(f"sketch unit must be a 1-D array of finite values > 0, got shape {unit.shape}.")
    return FeatureSketch(fd_init(unit.size, ell), moments_init(unit.size), unit.copy())


def sketch_update(sketch: FeatureSketch, X) -> FeatureSketch:
    """Fold raw feature rows ``X`` (N, F) into ``sketch`` (returns a new sketch)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != sketch.unit.size:
        raise PipelineError(f"rows must have shape (N, {sketch.unit.size}), got {X.shape}.")
    n = X.shape[0]
    if n == 0:
        return sketch
    count0, mean0 = sketch.moments.count, sketch.moments.mean
    seen = count0 + np.arange(n, dtype=np.float64)  # rows seen before row i
    totals = np.cumsum(X, axis=0)
    prev_mean = np.empty_like(X)
    prev_mean[0] = mean0
    if n > 1:
        prev_mean[1:] = (count0 * mean0 + totals[:-1]) / seen[1:, None]
    weight = np.sqrt(seen / (seen + 1.0))  # 0 for the very first row: it has no deviation yet
    centred = (X - prev_mean) * weight[:, None] / sketch.unit
    return FeatureSketch(fd_update(sketch.fd, centred), moments_update(sketch.moments, X), sketch.unit)


def sketch_merge(a: FeatureSketch, b: FeatureSketch) -> FeatureSketch:
    """Sketch of the union of the rows summarised by ``a`` and ``b`` (kept in ``a``'s units)."""
    if a.fd.shape != b.fd.shape:
        raise PipelineError(f"cannot merge sketches of shapes {a.fd.shape} and {b.fd.shape}.")
    fd = fd_merge(a.fd, b.fd * (b.unit / a.unit))
    na, nb = a.moments.count, b.moments.count
    if na > 0 and nb > 0:
        between = math.sqrt(na * nb / (na + nb)) * (a.moments.mean - b.moments.mean) / a.unit
        fd = fd_update(fd, between[None, :])
    return FeatureSketch(fd, moments_merge(a.moments, b.moments), a.unit)


def basis_from_sketch(sketch: FeatureSketch, k: int = 32) -> Basis:
    """Standardized PCA basis (k' = min(k, ell, F) components) from a :class:`FeatureSketch`.

    Raises
    ------
    PipelineError
        Fewer than two rows were sketched.
    """
    if sketch.moments.count < 2:
        raise PipelineError(
            f"a basis needs at least 2 feature windows, the sketch has {int(sketch.moments.count)}; stream longer."
        )
    scale = moments_scale(sketch.moments)
    components = fd_basis(sketch.fd * (sketch.unit / scale), k)
    return Basis(np.ascontiguousarray(components, dtype=np.float64), sketch.moments.mean.copy(), scale)


def fit_basis(X, k: int = 32, *, random_state=0) -> Basis:
    """Exact standardized PCA basis of feature rows ``X`` (N, F) by :func:`biofed.kernels.truncated_svd`.

    Returns ``Basis(components (k', F), mean (F,), scale (F,))`` with ``k' = min(k, N, F)``.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise PipelineError(f"a basis needs a (N >= 2, F) matrix of feature rows, got shape {X.shape}.")
    moments = moments_update(moments_init(X.shape[1]), X)
    scale = moments_scale(moments)
    _, _, vt = truncated_svd((X - moments.mean) / scale, k, random_state=random_state)
    return Basis(np.ascontiguousarray(vt, dtype=np.float64), moments.mean, scale)


def _check_basis(basis, n_features: int) -> Basis:
    if not isinstance(basis, tuple) or len(basis) != 3:
        raise PipelineError(f"basis must be a (components, mean, scale) tuple, got {type(basis).__name__}.")
    components, mean, scale = (np.asarray(a, dtype=np.float64) for a in basis)
    if components.ndim != 2 or components.shape[1] != n_features or components.shape[0] < 1:
        raise PipelineError(
            f"basis components must have shape (k, {n_features}) for this layout, got {components.shape}."
        )
    if mean.shape != (n_features,) or scale.shape != (n_features,):
        raise PipelineError(f"basis mean and scale must have shape ({n_features},), got {mean.shape} and {scale.shape}.")
    if not (np.isfinite(components).all() and np.isfinite(mean).all() and np.isfinite(scale).all()) or np.any(scale <= 0):
        raise PipelineError("basis must be finite with scale > 0 everywhere.")
    return Basis(np.ascontiguousarray(components), np.ascontiguousarray(mean), np.ascontiguousarray(scale))


# --------------------------------------------------------------------------- streaming
class FeatureRow(NamedTuple):
    """One feature window: ``t`` (s, window start since stream start), ``label``, ``vector`` (F,) or (k,)."""

    t: float
    label: str | None
    vector: np.ndarray


def _spectral_plan(part: ModalityLayout, config: PipelineConfig, window: int) -> SpectralPlan | None:
    """The spectral plan of an EEG or audio modality (None for biosensors), validated once per stream."""
    try:
        if part.modality == "eeg":
            return band_power_plan(part.sfreq, window, config.bands, log=True)
        if part.modality == "audio":
            return log_band_energy_plan(part.sfreq, window, n_bands=config.n_mels)
    except ValueError as exc:
        raise PipelineError(f"{part.modality} at {part.sfreq} Hz with {window}-sample windows: {exc}") from None
    return None


class _ModalityStream:
    """Fixed-capacity sample buffer and feature extraction of one modality."""

    def __init__(self, part: ModalityLayout, config: PipelineConfig, track_labels: bool) -> None:
        self.part = part
        self.config = config
        self.fs = part.sfreq
        self.window = int(round(config.window_s * self.fs))
        hop_exact = config.hop_s * self.fs
        self.hop = int(round(hop_exact)) if abs(hop_exact - round(hop_exact)) < 1e-9 else None
        self.hop_exact = hop_exact
        self.slice = max(1, int(round(config.max_chunk_s * self.fs)))
        self.capacity = self.window + self.slice
        self.plan = _spectral_plan(part, config, self.window)
        dtype = np.float64 if self.plan is None else np.dtype(config.dtype)
        self.buf = np.empty((part.n_channels, self.capacity), dtype=dtype)
        self.track_labels = track_labels
        if self.plan is not None:
            self.taper = self.plan.taper_for(dtype)
            step = self.plan.step
            # Windows a multiple of the segment step apart share segments: keep their powers.
            self.share_segments = self.hop is not None and self.hop % step == 0 and self.hop < self.window
            n_slots = self.capacity // step + 2 if self.share_segments else 0
            self.segments = np.empty((n_slots, part.n_channels, self.plan.weights.shape[0]), dtype=np.float64)
        if part.modality == "bio":
            self.hr_channels = np.array(part.hr_channels, dtype=np.intp)
            n_stat = len(_STAT_NAMES)
            stat_cols, hr_cols, col = [], [], 0
            for ch_type in part.ch_types:
                stat_cols.extend(range(col, col + n_stat))
                col += n_stat
                if ch_type in HR_TYPES:
                    hr_cols.extend(range(col, col + len(_HR_NAMES)))
                    col += len(_HR_NAMES)
            self.stat_cols = np.array(stat_cols, dtype=np.intp)
            self.hr_cols = np.array(hr_cols, dtype=np.intp)
        self.reset()

    def reset(self) -> None:
        self.fill = 0  # valid samples in buf
        self.buf_start = 0  # absolute index of buf[:, 0]
        self.n_seen = 0  # samples accepted since the stream started
        self.next_window = 0  # index of the next window to compute
        self.labels: list[tuple[int, str | None]] = []  # (first absolute sample, label), reference only
        # features (and reference labels) of windows [next_window - len(pending), next_window)
        self.pending: deque[tuple[np.ndarray, str | None]] = deque()
        # segments[:n_segments] hold the powers of segments first_segment, first_segment + 1, ...
        # (absolute index g starts at sample g * step) when windows share segments
        self.first_segment = 0
        self.n_segments = 0

    def discard_before(self, j: int) -> None:
        """Forget pending windows with index < j (already emitted or dropped)."""
        while self.pending and self.next_window - len(self.pending) < j:
            self.pending.popleft()

    def start(self, j: int) -> int:
        return j * self.hop if self.hop is not None else int(math.floor(j * self.hop_exact + 0.5))

    def _label_at(self, sample: int) -> str | None:
        i = bisect.bisect_right(self.labels, sample, key=lambda seg: seg[0]) - 1
        return self.labels[i][1] if i >= 0 else None

    def _compact(self) -> None:
        keep_from = min(self.start(self.next_window), self.buf_start + self.fill)
        drop = keep_from - self.buf_start
        if drop <= 0:
            return
        kept = self.fill - drop
        self.buf[:, :kept] = self.buf[:, drop : self.fill]
        self.buf_start, self.fill = keep_from, kept
        if self.labels:  # segments ending before the kept region are no longer needed
            i = bisect.bisect_right(self.labels, keep_from, key=lambda seg: seg[0]) - 1
            if i > 0:
                del self.labels[:i]

    def push(self, chunk: np.ndarray, label: str | None) -> int:
        """Buffer ``chunk`` and compute the windows it completes; returns how many."""
        before = self.next_window
        n = chunk.shape[1]
        if self.track_labels and (not self.labels or self.labels[-1][1] != label):
            self.labels.append((self.n_seen, label))
        pos = 0
        while pos < n:
            if self.fill == self.capacity:
                self._compact()
            take = min(n - pos, self.capacity - self.fill)
            self.buf[:, self.fill : self.fill + take] = chunk[:, pos : pos + take]
            self.fill += take
            self.n_seen += take
            pos += take
            self._extract()
        return self.next_window - before

    def _extract(self) -> None:
        starts = []
        j = self.next_window
        while self.start(j) + self.window <= self.n_seen:
            starts.append(self.start(j))
            j += 1
        if not starts:
            return
        if self.plan is not None:
            features = self._spectral_features(starts)
        else:
            features = self._features(np.stack([self.buf[:, s - self.buf_start : s - self.buf_start + self.window] for s in starts]))
        for row, s in zip(features, starts):
            label = self._label_at(s + self.window - 1) if self.track_labels else None
            self.pending.append((row, label))
        self.next_window = j

    def _spectral_features(self, starts: list[int]) -> np.ndarray:
        """EEG / audio features of the windows starting at absolute samples ``starts`` (plan applied).

        Equal bit for bit to ``spectral_features(windows, plan)``: the same segment kernel and
        summation order; shared segments are only computed once.
        """
        plan = self.plan
        step, n_seg = plan.step, plan.n_seg
        x = self.buf[:, : self.fill]
        if self.share_segments:
            lo, hi = starts[0] // step, starts[-1] // step + n_seg
            reused = max(0, self.first_segment + self.n_segments - lo)
            if reused:  # segments of earlier windows that these windows use: move them to the front
                first = lo - self.first_segment
                self.segments[:reused] = self.segments[first : first + reused]
            new = np.arange(lo + reused, hi, dtype=np.int64) * step - self.buf_start
            _segment_powers(x, new, self.taper, plan.kmin, self.segments[reused : hi - lo])
            self.first_segment, self.n_segments = lo, hi - lo
            powers = self.segments
            firsts = np.array(starts, dtype=np.int64) // step - lo
        else:
            offsets = np.array(starts, dtype=np.int64) - self.buf_start
            seg_starts = (offsets[:, None] + np.arange(n_seg, dtype=np.int64) * step).ravel()
            powers = np.empty((seg_starts.size, self.part.n_channels, plan.weights.shape[0]), dtype=np.float64)
            _segment_powers(x, seg_starts, self.taper, plan.kmin, powers)
            firsts = np.arange(len(starts), dtype=np.int64) * n_seg
        out = np.empty((len(starts), self.part.n_channels, plan.n_bands), dtype=self.buf.dtype)
        _reduce_segments(powers, firsts, n_seg, plan.weights, out)
        return _finish(out, plan.log).reshape(len(starts), -1)

    def _features(self, windows: np.ndarray) -> np.ndarray:
        """Biosensor features of stacked windows (n_windows, n_channels, window)."""
        n_windows = windows.shape[0]
        out = np.empty((n_windows, self.part.n_features), dtype=np.float64)
        out[:, self.stat_cols] = window_statistics(windows, self.fs).reshape(n_windows, -1)
        if self.hr_channels.size:
            hr_windows = np.ascontiguousarray(windows[:, self.hr_channels])
            out[:, self.hr_cols] = heart_rate_features(hr_windows, self.fs).reshape(n_windows, -1)
        return out


class StreamingPipeline:
    """Chunks of any size per modality in, aligned and labelled feature rows out.

    Parameters
    ----------
    config : PipelineConfig
        Window, hop and feature settings.
    layout : FeatureLayout
        Channels per modality (chunks must match it) and the feature columns; built for
        ``config`` (same window, hop, bands and mels).
    basis : Basis or (components (k, F), mean (F,), scale (F,)) or None
        Project rows onto this basis; ``None`` = emit raw rows (F,).

    Notes
    -----
    See the module docstring for windowing, labels, memory bounds and error handling.
    Not thread-safe: one pipeline per stream, pushed from one thread.

    Examples
    --------
    >>> layout = FeatureLayout.from_recording(recording, config)  # doctest: +SKIP
    >>> pipe = StreamingPipeline(config, layout)
    >>> rows = pipe.push("eeg", chunk, label="rest")             # list[FeatureRow]
    """

    def __init__(self, config: PipelineConfig, layout: FeatureLayout, basis: Basis | None = None) -> None:
        if not isinstance(config, PipelineConfig):
            raise PipelineError(f"config must be a PipelineConfig, got {type(config).__name__}.")
        if not isinstance(layout, FeatureLayout):
            raise PipelineError(f"layout must be a FeatureLayout, got {type(layout).__name__}.")
        expected = json.dumps(config.feature_params, sort_keys=True)
        if layout.feature_params != expected:
            raise PipelineError(
                f"layout was built for feature settings {layout.feature_params} but the config has {expected}; "
                "rebuild it with FeatureLayout.from_recording(recording, config)."
            )
        self.config = config
        self.layout = layout
        self._streams = {
            part.modality: _ModalityStream(part, config, track_labels=(i == 0))
            for i, part in enumerate(layout.modalities)
        }
        self._reference = layout.modalities[0].modality
        self._next_emit = 0
        self._sketch_rows: list[np.ndarray] = []  # rows not folded into the sketch yet (< ell)
        self._sketch: FeatureSketch | None = None
        self._basis: Basis | None = None
        self._row_layout_hash = layout.hash
        self.windows_emitted = 0
        self.windows_dropped = 0
        self.set_basis(basis)

    # ------------------------------------------------------------------ basis
    @property
    def basis(self) -> Basis | None:
        """The current projection basis (``None`` = raw rows)."""
        return self._basis

    def set_basis(self, basis: Basis | None) -> None:
        """Project subsequent rows onto ``basis`` (``None`` switches back to raw rows)."""
        if basis is None:
            self._basis = None
            self._projection = None
            self._row_layout_hash = self.layout.hash
            return
        self._basis = _check_basis(basis, self.layout.n_features)
        # validated once here; every emitted block is then only multiplied
        self._projection = transform_plan(self._basis.components.T, mean=self._basis.mean, scale=self._basis.scale)
        digest = hashlib.sha256(self.layout.hash.encode())
        for array in self._basis:
            digest.update(array.tobytes())
        self._row_layout_hash = f"k{self._basis.components.shape[0]}-{digest.hexdigest()[:16]}"

    @property
    def row_layout_hash(self) -> str:
        """Layout hash of the rows currently emitted (raw layout, or layout + basis when projecting)."""
        return self._row_layout_hash

    @property
    def row_width(self) -> int:
        """Length of emitted row vectors: F raw, or k projected."""
        return self.layout.n_features if self._basis is None else self._basis.components.shape[0]

    # ------------------------------------------------------------------ sketch
    @property
    def sketch(self) -> FeatureSketch | None:
        """Sketch of every raw row emitted so far (``None`` before the first row)."""
        if not self._sketch_rows:
            return self._sketch
        return self._sketch_with(np.stack(self._sketch_rows))

    def _sketch_with(self, rows: np.ndarray) -> FeatureSketch:
        if self._sketch is not None:
            return sketch_update(self._sketch, rows)
        unit = moments_scale(moments_update(moments_init(rows.shape[1]), rows))
        return sketch_update(sketch_init(unit, self.config.sketch_rows), rows)

    def _fold_into_sketch(self, rows: np.ndarray) -> None:
        # Rows are folded in blocks of ell: one sketch shrink (an SVD) per block, not per row.
        # The first block also fixes the sketch's units.
        self._sketch_rows.extend(rows)
        if len(self._sketch_rows) >= self.config.sketch_rows:
            self._sketch = self._sketch_with(np.stack(self._sketch_rows))
            self._sketch_rows = []

    def fit_local_basis(self, k: int | None = None, *, store: FeatureStore | None = None, random_state=0) -> Basis:
        """Fit a standardized PCA basis of this device's raw feature rows.

        Parameters
        ----------
        k : int or None
            Components (``None`` = ``config.k``); fewer when there are fewer rows or features.
        store : FeatureStore or None
            Fit exactly with :func:`fit_basis` (truncated SVD) on the raw rows stored there
            (width must equal F); ``None`` uses the streaming sketch (:func:`basis_from_sketch`).
        random_state : int, Generator or None
            For the randomized SVD of the store path.

        Returns
        -------
        basis : Basis
            ``(components (k', F), mean (F,), scale (F,))``; pass it to :meth:`set_basis`.
        """
        k = self.config.k if k is None else k
        if store is not None:
            X, _, _ = store.read()
            if X.shape[0] and X.shape[1] != self.layout.n_features:
                raise PipelineError(
                    f"the store holds {X.shape[1]}-wide rows, this layout has {self.layout.n_features} raw features; "
                    "fit from a store of raw rows of the same layout."
                )
            return fit_basis(X, k, random_state=random_state)
        sketch = self.sketch
        if sketch is None:
            raise PipelineError("no feature window has been produced yet; push at least two windows of every modality.")
        return basis_from_sketch(sketch, k)

    # ------------------------------------------------------------------ streaming
    @property
    def buffer_fill(self) -> dict[str, int]:
        """Samples per channel currently buffered, per modality."""
        return {m: s.fill for m, s in self._streams.items()}

    @property
    def buffer_capacity(self) -> dict[str, int]:
        """Fixed buffer capacity (samples per channel) per modality."""
        return {m: s.capacity for m, s in self._streams.items()}

    @property
    def pending_windows(self) -> int:
        """Windows computed by some modality and waiting for the others."""
        return max(len(s.pending) for s in self._streams.values())

    def _check_chunk(self, modality: str, chunk) -> np.ndarray:
        if not isinstance(modality, str) or modality not in self._streams:
            raise ChunkError(f"unknown modality {modality!r}: this pipeline's layout has {self.layout.modality_names}.")
        part = self._streams[modality].part
        arr = np.asarray(chunk)
        if arr.dtype.kind not in "fiu":
            raise ChunkError(f"{modality} chunk must hold real numbers, got dtype {arr.dtype}.")
        if arr.ndim != 2:
            raise ChunkError(
                f"{modality} chunk must be 2-D (n_channels={part.n_channels}, n_samples), got shape {arr.shape}."
            )
        if arr.shape[0] != part.n_channels:
            raise ChunkError(
                f"{modality} chunk has {arr.shape[0]} channel(s) but the layout has {part.n_channels} "
                f"({', '.join(part.ch_names)}); send channels in that order."
            )
        if arr.shape[1] and not np.isfinite(arr.sum()):
            bad = np.argwhere(~np.isfinite(arr))
            if len(bad):
                ch, i = (int(v) for v in bad[0])
                raise ChunkError(
                    f"{modality} chunk holds {len(bad)} NaN/inf sample(s), the first in channel "
                    f"{part.ch_names[ch]!r} at sample {i}; chunk dropped (interpolate gaps before pushing)."
                )
            raise ChunkError(f"{modality} chunk overflows float64 when summed; rescale the samples.")
        return arr

    def push(self, modality: str, chunk, label: str | None = None) -> list[FeatureRow]:
        """Append a chunk of one modality; return the rows of every window completed by it.

        Parameters
        ----------
        modality : str
            One of :attr:`FeatureLayout.modality_names`.
        chunk : array-like, shape (n_channels, n)
            Consecutive samples of every channel of that modality, in layout channel order;
            any ``n >= 0``.
        label : str or None
            Label of these samples (used for the reference modality, see module docstring).

        Returns
        -------
        rows : list of FeatureRow
            In window order; empty while some modality has not reached the next window.

        Raises
        ------
        ChunkError
            Unknown modality, wrong channel count or shape, non-numeric or non-finite samples,
            or a non-str label. The pipeline is unchanged.
        """
        arr = self._check_chunk(modality, chunk)
        if label is not None and not isinstance(label, str):
            raise ChunkError(f"label must be a str or None, got {type(label).__name__} {label!r}.")
        if arr.shape[1] == 0 or not self._streams[modality].push(arr, label):
            return []  # no new window: nothing can be emitted or dropped
        return self._emit()

    def _emit(self) -> list[FeatureRow]:
        streams = self._streams.values()
        for s in streams:  # a lagging modality's windows that were dropped meanwhile
            s.discard_before(self._next_emit)
        ready = min(s.next_window for s in streams) - self._next_emit
        rows: list[FeatureRow] = []
        if ready > 0:
            blocks = []
            labels: list[str | None] = []
            for s in streams:  # each holds windows [next_emit, next_window) now
                entries = [s.pending.popleft() for _ in range(ready)]
                blocks.append(np.stack([e[0] for e in entries]))
                if s.track_labels:
                    labels = [e[1] for e in entries]
            raw = np.concatenate(blocks, axis=1, dtype=np.float64) if len(blocks) > 1 else blocks[0].astype(np.float64, copy=False)
            self._fold_into_sketch(raw)
            if self._projection is not None:
                vectors = apply_transform(raw, self._projection)
            else:
                vectors = raw
            hop = self.config.hop_s
            rows = [FeatureRow((self._next_emit + i) * hop, labels[i], vectors[i]) for i in range(ready)]
            self._next_emit += ready
            self.windows_emitted += ready
        cap = self.config.max_pending_windows
        if cap is not None:
            ahead = max(s.next_window for s in streams) - self._next_emit
            if ahead > cap:
                drop = ahead - cap
                lagging = [s.part.modality for s in streams if s.next_window <= self._next_emit]
                logger.warning(
                    "dropping %d feature window(s) at t=%.1f s: %s is %d window(s) behind (max_pending_windows=%d)",
                    drop, self._next_emit * self.config.hop_s, "/".join(lagging), ahead, cap,
                )
                self._next_emit += drop
                self.windows_dropped += drop
                for s in streams:
                    s.discard_before(self._next_emit)
        return rows

    def flush(self) -> int:
        """End the stream: discard partial and unmatched windows and restart the time base at 0.

        Every window complete in all modalities has already been returned by :meth:`push`; what
        remains are windows some modality never completed (a shorter stream, a trailing partial
        window). The sketch and the basis are kept.

        Returns
        -------
        n_dropped : int
            Windows computed by some modality but never emitted.
        """
        dropped = max(s.next_window for s in self._streams.values()) - self._next_emit
        if dropped:
            logger.info("flush: %d window(s) lacked data from some modality and were dropped", dropped)
        self.windows_dropped += dropped
        for s in self._streams.values():
            s.reset()
        self._next_emit = 0
        return dropped


# --------------------------------------------------------------------------- offline convenience
def extract_features(
    recording: Recording, config: PipelineConfig | None = None, basis: Basis | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of a whole recording, each modality pushed at once.

    Equal (up to the rounding of the kernels' batching, ~1e-12) to streaming the recording in
    chunks of any size. Each modality is pushed in one chunk per labelled piece: the recording is
    cut where its labelled annotations start or end (as :func:`biofed.datasets.replay` labels its
    chunks), so a window takes the label in force at its last sample; without annotations that is
    ``recording.label``. ``None`` labels become ``""``.

    Parameters
    ----------
    recording : Recording
        Its modalities listed in ``config.modalities`` are used.
    config : PipelineConfig or None
        ``None`` = defaults. ``max_pending_windows`` is lifted: whole modalities are pushed one
        after the other.
    basis : Basis or None
        Project onto it (rows become k wide).

    Returns
    -------
    X : ndarray, shape (N, F) or (N, k)
    labels : ndarray, shape (N,), str
    t : ndarray, shape (N,), window start in seconds
    """
    config = PipelineConfig() if config is None else config
    config = dataclasses.replace(config, max_pending_windows=None)
    layout = FeatureLayout.from_recording(recording, config)
    pipe = StreamingPipeline(config, layout, basis)
    segments = label_segments(recording)
    rows: list[FeatureRow] = []
    for modality in layout.modality_names:
        signal = recording.signals[modality]
        cuts = [min(max(math.ceil(start * signal.sfreq - 1e-7), 0), signal.n_samples) for start, _ in segments]
        cuts.append(signal.n_samples)
        for (_, label), a, b in zip(segments, cuts[:-1], cuts[1:]):
            rows += pipe.push(modality, signal.data[:, a:b], label=label)
    pipe.flush()
    X = np.stack([r.vector for r in rows]) if rows else np.empty((0, pipe.row_width))
    labels = np.array(["" if r.label is None else r.label for r in rows], dtype=str)
    t = np.array([r.t for r in rows], dtype=np.float64)
    return X, labels, t
