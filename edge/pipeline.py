"""Streaming feature pipeline: sensor chunks in, aligned and labelled feature rows out.

Data flow on a device::

    push(modality, chunk (n_ch, n))            chunks of any size, per modality
      -> fixed-capacity buffer per modality     window + one chunk slice of samples per channel
      -> aligned windows                        window j = [j*hop_s, j*hop_s + window_s) everywhere
      -> features per modality (biofed.kernels) eeg: log10 band powers; audio: log-mel energies;
                                                bio: statistics (+ heart rate, RMSSD for ecg/ppg)
      -> raw row (F,) named by FeatureLayout    e.g. "eeg:Fp1:alpha", "bio:ECG:heart_rate"
                                                (biofed.model.FeatureLayout)
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
    window then only computes. The layout picks each spectral modality's Welch segment length
    so that its step divides the hop (:func:`biofed.kernels.shared_nperseg`: 500 samples for
    500 Hz EEG and 16 kHz audio with a 1 s hop); consecutive windows then share segments, and
    the stream (:class:`biofed.kernels.WelchStream`) keeps the power spectra of the segments
    the next window reuses and transforms only the new ones, with the same bits as the batch
    kernel. Spectral features are computed in ``PipelineConfig.dtype`` (float32 by default,
    within ``FLOAT32_RTOL`` of float64).

Memory
    Each modality keeps one buffer of ``round(window_s*fs) + round(max_chunk_s*fs)`` samples per
    channel, allocated once. Larger pushes are consumed in slices of ``max_chunk_s``; the samples
    still needed by the next window are moved to the front when the buffer is full, or after a
    push that leaves less room than its own chunk, so that the next chunk of that size is copied
    in one piece (each window stays contiguous, so the kernels read it without gathering).
    Per-modality features that wait for a lagging modality are capped at ``max_pending_windows``
    windows (oldest dropped with a warning), so memory is bounded for any stream length.

Labels
    A window's label is the label passed with the chunk of the *reference modality* (the layout's
    first modality, in ``("eeg", "audio", "bio")`` order) that contains the window's **last**
    sample ("label at window end"): causal and cheap, and equal to the majority label except for
    windows whose label changes in their second half (at most ``window_s / hop_s / 2`` windows per
    change). Labels passed with chunks of the other modalities are ignored.

Basis
    Without a basis the rows are the raw feature vectors. With a :class:`biofed.model.Basis`,
    rows are the k projected coordinates ``((raw - mean) / scale) @ components.T``.

Errors
    Bad chunks raise :class:`ChunkError` *before* any state changes, so a long-running agent logs
    the error, drops the chunk and keeps going; the next chunk of that modality is treated as
    contiguous with the last accepted one.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import logging
import math
from collections import deque
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from biofed.datasets.recording import MODALITIES
from biofed.datasets.replay import label_segments
from biofed.kernels import (
    EEG_BANDS,
    WelchStream,
    transform_plan,
    windowing,
)
from biofed.kernels._validation import first_nonfinite
from biofed.kernels.transform import _apply_transform
from biofed.model import DTYPES, Basis, BasisError, FeatureLayout, LayoutError, ModalityLayout

if TYPE_CHECKING:
    from collections.abc import Sequence

    from biofed.datasets import Recording

__all__ = [
    "ChunkError",
    "FeatureRow",
    "PipelineConfig",
    "PipelineError",
    "StreamingPipeline",
    "extract_features",
    "label_pieces",
]

logger = logging.getLogger(__name__)


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
    max_pending_windows : int or None, default 600
        Most windows one modality may run ahead of the slowest one before the oldest are
        dropped; ``None`` = unbounded (offline extraction of whole recordings).
    dtype : {"float32", "float64"}, default "float32"
        Precision of the spectral features (EEG band powers, audio log-mel energies): their
        buffers, tapers and FFTs. float32 runs the FFTs faster (``biofed bench`` measures the
        rfft rate of both) and halves the buffers; every band power stays within
        :data:`biofed.kernels.FLOAT32_RTOL` (1e-5) relative of float64, i.e. the logged
        features within 1e-5 absolute. Biosensor features are always computed in float64
        (the beat detector's decisions are not continuous in the samples). Rows are float64
        either way; the setting is not part of the layout hash.
    """

    window_s: float = 2.0
    hop_s: float = 1.0
    bands: tuple[tuple[str, float, float], ...] = EEG_BANDS
    n_mels: int = 32
    k: int = 32
    modalities: tuple[str, ...] = MODALITIES
    max_chunk_s: float = 4.0
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
        for name, minimum in (("n_mels", 1), ("k", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise PipelineError(f"PipelineConfig.{name} must be an integer >= {minimum}, got {value!r}.")
            object.__setattr__(self, name, int(value))
        pending = self.max_pending_windows
        if pending is not None and (
            isinstance(pending, bool) or not isinstance(pending, (int, np.integer)) or pending < 1
        ):
            raise PipelineError(f"PipelineConfig.max_pending_windows must be None or an integer >= 1, got {pending!r}.")
        try:
            bands = tuple((str(name), float(lo), float(hi)) for name, lo, hi in self.bands)
        except (TypeError, ValueError):
            raise PipelineError(
                f"PipelineConfig.bands must be (name, lo_hz, hi_hz) triples, got {self.bands!r}."
            ) from None
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
        if self.dtype not in DTYPES:
            raise PipelineError(f"PipelineConfig.dtype must be one of {DTYPES}, got {self.dtype!r}.")

    @classmethod
    def from_layout(cls, layout: FeatureLayout, **settings) -> PipelineConfig:
        """The config that reproduces the features of ``layout`` (a model's, or a device's report);
        ``settings`` sets the fields the layout does not fix (``k``, ``dtype``, ...)."""
        return cls(
            window_s=layout.window_s,
            hop_s=layout.hop_s,
            bands=layout.bands,
            n_mels=layout.n_mels,
            modalities=layout.modality_names,
            **settings,
        )


# --------------------------------------------------------------------------- streaming
#: Sample dtypes (``dtype.char``) the stream buffers copy as they are; others become float64 first.
_BUFFERED_DTYPES = "fdbhilqBHILQ"
#: The native-endian dtypes of those: a chunk of one of them is buffered as it is.
_NATIVE_BUFFERED = frozenset(np.dtype(char) for char in _BUFFERED_DTYPES)


def _nonfinite_chunk_error(part: ModalityLayout, chunk: np.ndarray) -> ChunkError:
    """The error for a chunk whose samples do not sum to a finite float64."""
    found = first_nonfinite(chunk)
    if found is not None:
        count, (ch, i) = found
        return ChunkError(
            f"{part.modality} chunk holds {count} NaN/inf sample(s), the first in channel "
            f"{part.ch_names[ch]!r} at sample {i}; chunk dropped (interpolate gaps before pushing)."
        )
    return ChunkError(f"{part.modality} chunk overflows float64 when summed; rescale the samples.")


class FeatureRow(NamedTuple):
    """One feature window: ``t`` (s, window start since stream start), ``label``, ``vector`` (F,) or (k,)."""

    t: float
    label: str | None
    vector: np.ndarray


class _ModalityStream:
    """Fixed-capacity sample buffer and feature extraction of one modality."""

    def __init__(self, part: ModalityLayout, layout: FeatureLayout, config: PipelineConfig, track_labels: bool) -> None:
        self.part = part
        self.config = config
        self.fs = part.sfreq
        self.n_channels = part.n_channels
        self.window = layout.window_samples(part)
        self.hop = layout.hop_samples(part)
        self.hop_exact = layout.hop_s * self.fs
        self.slice = max(1, int(round(config.max_chunk_s * self.fs)))
        self.capacity = self.window + self.slice
        try:
            self.plan = layout.spectral_plan(part)
        except LayoutError as exc:
            raise PipelineError(str(exc)) from None
        dtype = np.float64 if self.plan is None else np.dtype(config.dtype)
        self.buf = np.empty((part.n_channels, self.capacity), dtype=dtype)
        self.track_labels = track_labels
        # The jitted workers behind the kernels' public functions: every chunk is validated once
        # at push, so windows cut from the buffer skip the kernels' own checks.
        from biofed.kernels import biosensor

        self._biosensor_rows = biosensor._biosensor_rows
        if self.plan is not None:
            # Windows a multiple of the segment step apart share segments: it keeps their powers.
            self.welch = WelchStream(self.plan, part.n_channels, dtype)
        # a push that completes one window appends its samples and computes the window's features
        # in one jitted call: a spectral stream whose windows start a multiple of the segment step
        # apart (WelchStream.append_features), or a biosensor stream with a whole-sample hop
        if self.plan is None:
            self.one_call = self.hop is not None
        else:
            self.one_call = self.hop is not None and self.hop % self.plan.step == 0 and self.hop < self.window
        if part.modality == "bio":
            self.hr_channels = np.array(part.hr_channels, dtype=np.intp)
            stat_cols, hr_cols = part.bio_columns()
            self.stat_cols = np.array(stat_cols, dtype=np.intp)
            self.hr_cols = np.array(hr_cols, dtype=np.intp)
            self.hr_args = biosensor._heart_rate_args(self.fs)
            self._append_row = biosensor._append_biosensor_row
            self._where = np.array([0, 0, self.window], dtype=np.int64)  # see _append_biosensor_row
        self.reset()

    def reset(self) -> None:
        self.fill = 0  # valid samples in buf
        self.buf_start = 0  # absolute index of buf[:, 0]
        self.n_seen = 0  # samples accepted since the stream started
        self.next_window = 0  # index of the next window to compute
        # reference only: label_values[i] holds from absolute sample label_starts[i] on
        self.label_starts: list[int] = []
        self.label_values: list[str | None] = []
        # features (and reference labels) of windows [next_window - len(pending), next_window)
        self.pending: deque[tuple[np.ndarray, str | None]] = deque()
        if self.plan is not None:
            self.welch.reset()

    def discard_before(self, j: int) -> None:
        """Forget pending windows with index < j (already emitted or dropped)."""
        while self.pending and self.next_window - len(self.pending) < j:
            self.pending.popleft()

    def start(self, j: int) -> int:
        return j * self.hop if self.hop is not None else int(math.floor(j * self.hop_exact + 0.5))

    def _label_at(self, sample: int) -> str | None:
        i = bisect.bisect_right(self.label_starts, sample) - 1
        return self.label_values[i] if i >= 0 else None

    def _compact(self) -> None:
        keep_from = min(self.start(self.next_window), self.buf_start + self.fill)
        drop = keep_from - self.buf_start
        if drop <= 0:
            return
        kept = self.fill - drop
        self.buf[:, :kept] = self.buf[:, drop : self.fill]
        self.buf_start, self.fill = keep_from, kept
        if self.label_starts:  # segments ending before the kept region are no longer needed
            i = bisect.bisect_right(self.label_starts, keep_from) - 1
            if i > 0:
                del self.label_starts[:i], self.label_values[:i]

    def push(self, chunk: np.ndarray, label: str | None) -> int:
        """Buffer ``chunk`` and compute the windows it completes; returns how many.

        Raises :class:`ChunkError` before any state changes if a sample is NaN or inf: a chunk
        that fits the buffer's free space is copied behind the valid samples and tested in the
        same pass (what lies behind ``fill`` is not state); a larger one is tested first.
        """
        before = self.next_window
        n = chunk.shape[1]
        fits = self.fill + n <= self.capacity
        if fits and self.one_call and (self.n_seen + n - self.window) // self.hop == before:
            # the live case: the chunk completes exactly one window; append and compute in one call
            start = before * self.hop
            features = self._append_features(chunk, start)
            if features is None:
                raise _nonfinite_chunk_error(self.part, chunk)
            self._track_label(label)
            self.fill += n
            self.n_seen += n
            self._keep((start,), features.reshape(1, -1), before + 1)
            if self.capacity - self.fill < n:
                self._compact()
            return 1
        total = windowing._append_samples(chunk, self.buf, self.fill) if fits else np.add.reduce(chunk, axis=None)
        if not math.isfinite(total):
            raise _nonfinite_chunk_error(self.part, chunk)
        self._track_label(label)
        if fits:
            self.fill += n
            self.n_seen += n
            self._extract()
            if self.capacity - self.fill < n:  # make room now, so that the next such chunk fits
                self._compact()
            return self.next_window - before
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

    def _track_label(self, label: str | None) -> None:
        """Record that ``label`` holds from the next accepted sample on (reference stream only)."""
        if self.track_labels and (not self.label_values or self.label_values[-1] != label):
            self.label_starts.append(self.n_seen)
            self.label_values.append(label)

    def _extract(self) -> None:
        j = self.next_window
        if self.hop is not None:
            stop = (self.n_seen - self.window) // self.hop + 1  # windows complete so far
            if stop <= j:
                return
            starts = [j * self.hop] if stop == j + 1 else list(range(j * self.hop, stop * self.hop, self.hop))
            j = stop
        else:
            starts = []
            while self.start(j) + self.window <= self.n_seen:
                starts.append(self.start(j))
                j += 1
            if not starts:
                return
        if self.plan is not None:
            # equal bit for bit to spectral_features(windows, plan) of the windows cut from the buffer
            features = self.welch.features(self.buf, self.buf_start, starts).reshape(len(starts), -1)
        elif len(starts) == 1:  # the usual live case: the window is a view of the buffer
            offset = starts[0] - self.buf_start
            features = self._features(self.buf[None, :, offset : offset + self.window])
        else:
            features = self._features(
                np.stack([self.buf[:, s - self.buf_start : s - self.buf_start + self.window] for s in starts])
            )
        self._keep(starts, features, j)

    def _append_features(self, chunk: np.ndarray, start: int) -> np.ndarray | None:
        """Copy ``chunk`` behind the buffered samples and return the features of the one window
        it completes, which starts at stream sample ``start``, in one jitted call; None (and only
        the free space behind ``fill`` written) if a sample of the chunk is NaN or inf."""
        if self.plan is not None:
            return self.welch.append_features(chunk, self.buf, self.fill, self.buf_start, start)
        where = self._where
        where[0] = self.fill
        where[1] = start - self.buf_start
        out = np.empty((1, self.part.n_features), dtype=np.float64)
        total = self._append_row(
            chunk, self.buf, where, self.hr_channels, *self.hr_args, self.stat_cols, self.hr_cols, out
        )
        return out if math.isfinite(total) else None

    def _keep(self, starts: Sequence[int], features: np.ndarray, next_window: int) -> None:
        """Queue the feature rows (n, F) of the windows starting at ``starts``, each with its label
        (the reference stream's label at the window's last sample); ``next_window`` follows them."""
        if len(starts) == 1:  # the live case
            label = self._label_at(starts[0] + self.window - 1) if self.track_labels else None
            self.pending.append((features[0], label))
        elif self.track_labels:
            last = self.window - 1
            self.pending.extend(zip(features, [self._label_at(s + last) for s in starts]))
        else:
            self.pending.extend(zip(features, [None] * len(starts)))
        self.next_window = next_window

    def _features(self, windows: np.ndarray) -> np.ndarray:
        """Biosensor features of stacked windows (n_windows, n_channels, window)."""
        out = np.empty((windows.shape[0], self.part.n_features), dtype=np.float64)
        self._biosensor_rows(windows, self.hr_channels, *self.hr_args, self.stat_cols, self.hr_cols, out)
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
    >>> config = PipelineConfig(modalities=("eeg",))
    >>> layout = FeatureLayout.from_channels({"eeg": (100.0, ["Cz", "Pz"], ["eeg", "eeg"])}, config)
    >>> pipe = StreamingPipeline(config, layout)
    >>> pipe.push("eeg", np.zeros((2, 150)), label="rest")   # 1.5 s: no window complete yet
    []
    >>> rows = pipe.push("eeg", np.ones((2, 100)), label="rest")
    >>> [(row.t, row.label, row.vector.shape) for row in rows]
    [(0.0, 'rest', (10,))]
    """

    def __init__(self, config: PipelineConfig, layout: FeatureLayout, basis: Basis | None = None) -> None:
        if not isinstance(config, PipelineConfig):
            raise PipelineError(f"config must be a PipelineConfig, got {type(config).__name__}.")
        if not isinstance(layout, FeatureLayout):
            raise PipelineError(f"layout must be a FeatureLayout, got {type(layout).__name__}.")
        built_for = (layout.window_s, layout.hop_s, layout.bands, layout.n_mels)
        expected = (config.window_s, config.hop_s, config.bands, config.n_mels)
        if built_for != expected:
            raise PipelineError(
                f"layout was built for feature settings (window_s, hop_s, bands, n_mels) = {built_for} but the config "
                f"has {expected}; rebuild it with FeatureLayout.from_recording(recording, config)."
            )
        self.config = config
        self.layout = layout
        self._streams = {
            part.modality: _ModalityStream(part, layout, config, track_labels=(i == 0))
            for i, part in enumerate(layout.modalities)
        }
        self._reference = layout.modalities[0].modality
        self._stream_list = list(self._streams.values())  # the reference first
        self._n_features = layout.n_features
        bounds = np.cumsum([0] + [part.n_features for part in layout.modalities])
        self._stream_columns = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self._next_emit = 0
        self._basis: Basis | None = None
        self._basis_hash: str | None = None  # the projected rows' hash, computed on first use
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
            return
        try:
            self._basis = Basis.checked(basis, self.layout.n_features)
        except BasisError as exc:
            raise PipelineError(str(exc)) from None
        # validated once here; every emitted block is then only multiplied
        self._projection = transform_plan(self._basis.components.T, mean=self._basis.mean, scale=self._basis.scale)
        self._basis_hash = None

    @property
    def row_layout_hash(self) -> str:
        """Layout hash of the rows currently emitted (raw layout, or layout + basis when projecting)."""
        if self._basis is None:
            return self.layout.hash
        if self._basis_hash is None:
            digest = hashlib.sha256(self.layout.hash.encode())
            for array in self._basis:
                digest.update(array.tobytes())
            self._basis_hash = f"k{self._basis.components.shape[0]}-{digest.hexdigest()[:16]}"
        return self._basis_hash

    @property
    def row_width(self) -> int:
        """Length of emitted row vectors: F raw, or k projected."""
        return self.layout.n_features if self._basis is None else self._basis.k

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

    def _check_chunk(self, modality: str, chunk) -> tuple[_ModalityStream, np.ndarray]:
        """The stream of ``modality`` and ``chunk`` as it buffers it (a float64 copy if its dtype
        is not one it copies as it is), or the ChunkError that says what is wrong."""
        stream = self._streams.get(modality) if isinstance(modality, str) else None
        if stream is None:
            raise ChunkError(f"unknown modality {modality!r}: this pipeline's layout has {self.layout.modality_names}.")
        if (
            type(chunk) is np.ndarray
            and chunk.ndim == 2
            and chunk.shape[0] == stream.n_channels
            and chunk.dtype in _NATIVE_BUFFERED
        ):
            return stream, chunk  # what a source delivers
        part = stream.part
        arr = chunk if type(chunk) is np.ndarray else np.asarray(chunk)
        dtype = arr.dtype
        if dtype.kind not in "fiu":
            raise ChunkError(f"{modality} chunk must hold real numbers, got dtype {dtype}.")
        if arr.ndim != 2:
            raise ChunkError(
                f"{modality} chunk must be 2-D (n_channels={part.n_channels}, n_samples), got shape {arr.shape}."
            )
        if arr.shape[0] != stream.n_channels:
            raise ChunkError(
                f"{modality} chunk has {arr.shape[0]} channel(s) but the layout has {part.n_channels} "
                f"({', '.join(part.ch_names)}); send channels in that order."
            )
        if dtype not in _NATIVE_BUFFERED:  # float16, big-endian, ...
            arr = arr.astype(np.float64)
        return stream, arr  # its samples' finiteness is tested by the stream as it buffers them

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
        stream, arr = self._check_chunk(modality, chunk)
        if label is not None and not isinstance(label, str):
            raise ChunkError(f"label must be a str or None, got {type(label).__name__} {label!r}.")
        if arr.shape[1] == 0 or not stream.push(arr, label):
            return []  # no new window: nothing can be emitted or dropped
        next_emit, cap = self._next_emit, self.config.max_pending_windows
        if cap is None or stream.next_window - next_emit <= cap:  # within the cap: wait for the others
            for s in self._stream_list:
                if s.next_window <= next_emit:  # some modality still lacks window next_emit
                    if stream.next_window - len(stream.pending) < next_emit:  # it lagged through a drop
                        stream.discard_before(next_emit)
                    return []
        return self._emit()

    def _emit(self) -> list[FeatureRow]:
        streams = self._stream_list
        next_emit = self._next_emit
        if all([s.next_window == next_emit + 1 and len(s.pending) == 1 for s in streams]):
            # the live case: each stream holds window next_emit only; its parts joined in one call
            entries = [s.pending.popleft() for s in streams]
            raw = np.concatenate([entry[0] for entry in entries], dtype=np.float64)[None]
            vector = raw[0] if self._projection is None else _apply_transform(raw, self._projection)[0]
            self._next_emit += 1
            self.windows_emitted += 1
            return [FeatureRow(next_emit * self.config.hop_s, entries[0][1], vector)]
        for s in streams:
            if s.next_window - len(s.pending) < next_emit:  # windows dropped while it lagged
                s.discard_before(next_emit)
        ready = min([s.next_window for s in streams]) - next_emit
        rows: list[FeatureRow] = []
        if ready > 0:
            # each stream holds windows [next_emit, next_window) now; the reference (first)
            # stream carries the labels
            raw = np.empty((ready, self._n_features), dtype=np.float64)
            labels = [entry[1] for entry in itertools.islice(streams[0].pending, ready)]
            for s, columns in zip(streams, self._stream_columns):
                pending = s.pending
                for i in range(ready):
                    raw[i, columns] = pending.popleft()[0]
            # raw is a C-contiguous float64 block of the basis' width: straight to the kernel
            vectors = raw if self._projection is None else _apply_transform(raw, self._projection)
            hop = self.config.hop_s
            rows = [FeatureRow((next_emit + i) * hop, labels[i], vectors[i]) for i in range(ready)]
            self._next_emit += ready
            self.windows_emitted += ready
        cap = self.config.max_pending_windows
        if cap is not None:
            ahead = max([s.next_window for s in streams]) - self._next_emit
            if ahead > cap:
                drop = ahead - cap
                lagging = [s.part.modality for s in streams if s.next_window <= self._next_emit]
                logger.warning(
                    "dropping %d feature window(s) at t=%.1f s: %s is %d window(s) behind (max_pending_windows=%d)",
                    drop,
                    self._next_emit * self.config.hop_s,
                    "/".join(lagging),
                    ahead,
                    cap,
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
        window). The basis is kept.

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
def label_pieces(recording: Recording, modality: str) -> list[tuple[int, int, str | None]]:
    """``(first, stop, label)`` sample ranges of one modality of a recording, one per labelled piece.

    The recording is cut where its labelled annotations start or end, each piece labelled by
    :func:`biofed.datasets.replay.label_segments` (the rule :func:`biofed.datasets.replay`
    labels its chunks with); a piece starts at the first sample at or after its start time. The
    pieces cover ``[0, n_samples)`` in order.
    """
    signal = recording.signals[modality]
    segments = label_segments(recording)
    cuts = [min(max(math.ceil(start * signal.sfreq - 1e-7), 0), signal.n_samples) for start, _ in segments]
    cuts.append(signal.n_samples)
    return [(a, b, label) for (_, label), a, b in zip(segments, cuts[:-1], cuts[1:])]


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
    rows: list[FeatureRow] = []
    for modality in layout.modality_names:
        data = recording.signals[modality].data
        for a, b, label in label_pieces(recording, modality):
            rows += pipe.push(modality, data[:, a:b], label=label)
    pipe.flush()
    X = np.stack([r.vector for r in rows]) if rows else np.empty((0, pipe.row_width))
    labels = np.array(["" if r.label is None else r.label for r in rows], dtype=str)
    t = np.array([r.t for r in rows], dtype=np.float64)
    return X, labels, t
