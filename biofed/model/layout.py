"""The feature layout: which channels a device records and which column each feature fills.

One type, :class:`FeatureLayout`, serves every side: the edge pipeline builds it from the
channels of a recording or a live stream and keys its feature store with :attr:`FeatureLayout.hash`;
devices report it (JSON) in their status; models carry it in their metadata; the ONNX
exporter reads its columns; a device compares a model's layout with its own through
:meth:`FeatureLayout.mismatch` before running it.

Columns
-------
A raw feature row is the concatenation of the modalities in ``("eeg", "audio", "bio")`` order,
each channel-major, named ``"<modality>:<channel>:<feature>"``:

- ``eeg``: one log10 band power per band of ``bands``;
- ``audio``: ``n_mels`` natural-log mel energies (``mel00``, ``mel01``, ...);
- ``bio``: the window statistics :data:`BIO_STATISTICS` of every channel, followed, for a
  heart-rate channel (type in :data:`HR_TYPES`), by :data:`HR_FEATURES`.

>>> layout = FeatureLayout.from_channels(
...     {"bio": (100.0, ["ECG", "EDA"], ["ecg", "eda"])},
...     window_s=2.0, hop_s=1.0, bands=(("alpha", 8.0, 13.0),), n_mels=4, modalities=("bio",))
>>> layout.feature_names[4:7]
('bio:ECG:max', 'bio:ECG:heart_rate', 'bio:ECG:rmssd')
>>> layout.modalities[0].bio_columns()
((0, 1, 2, 3, 4, 7, 8, 9, 10, 11), (5, 6))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from biofed.datasets.recording import MODALITIES, stream_channels
from biofed.kernels import BIOSENSOR_FEATURES, SpectralPlan, band_power_plan, log_band_energy_plan, shared_nperseg
from biofed.model._json import ModelFormatError, load_bounded_json, names, number

if TYPE_CHECKING:
    from biofed.datasets import Recording

__all__ = [
    "BIO_STATISTICS",
    "HR_FEATURES",
    "HR_TYPES",
    "FeatureLayout",
    "LayoutError",
    "ModalityLayout",
]

HR_TYPES = ("ecg", "ppg")
"""Bio channel types with heart-rate features."""
BIO_STATISTICS = BIOSENSOR_FEATURES[:5]
"""Window statistics of every bio channel (:func:`biofed.kernels.window_statistics`)."""
HR_FEATURES = BIOSENSOR_FEATURES[5:]
"""Heart-rate features of an ECG/PPG channel (:func:`biofed.kernels.heart_rate_features`)."""


class LayoutError(ValueError):
    """A layout cannot be built from these channels and settings (the message says how to fix it)."""


@dataclasses.dataclass(frozen=True)
class ModalityLayout:
    """Channels and feature columns of one modality.

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
    nperseg : int or None
        Welch segment length of an EEG / audio modality, chosen by
        :func:`biofed.kernels.shared_nperseg` when the layout is built (consecutive windows then
        share half their segments). ``None`` for bio, and for layouts recorded before the
        length was part of the layout: their features used the kernels' default length.
    """

    modality: str
    sfreq: float
    ch_names: tuple[str, ...]
    ch_types: tuple[str, ...]
    feature_names: tuple[str, ...]
    nperseg: int | None = None

    @property
    def n_channels(self) -> int:
        """Channels per chunk."""
        return len(self.ch_names)

    @property
    def n_features(self) -> int:
        """Feature columns of this modality."""
        return len(self.feature_names)

    @property
    def hr_channels(self) -> tuple[int, ...]:
        """Indices of the heart-rate channels (bio ECG/PPG), empty for other modalities."""
        if self.modality != "bio":
            return ()
        return tuple(i for i, t in enumerate(self.ch_types) if t in HR_TYPES)

    def bio_columns(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Columns of this bio modality's row that hold the statistics and the heart-rate features.

        Returns
        -------
        statistics : tuple of int, length ``len(BIO_STATISTICS) * n_channels``
            Where ``window_statistics`` of channel ``c`` lands, channel-major.
        heart_rate : tuple of int, length ``len(HR_FEATURES) * len(hr_channels)``
            Where ``heart_rate_features`` of the heart-rate channels land, in their order.
        """
        statistics: list[int] = []
        heart_rate: list[int] = []
        column = 0
        for ch_type in self.ch_types:
            statistics.extend(range(column, column + len(BIO_STATISTICS)))
            column += len(BIO_STATISTICS)
            if ch_type in HR_TYPES:
                heart_rate.extend(range(column, column + len(HR_FEATURES)))
                column += len(HR_FEATURES)
        return tuple(statistics), tuple(heart_rate)


def _hop_samples(hop_s: float, sfreq: float) -> int | None:
    hop = hop_s * sfreq
    return int(round(hop)) if abs(hop - round(hop)) < 1e-9 else None


def _plan(modality: str, sfreq: float, window: int, bands, n_mels: int, nperseg: int | None) -> SpectralPlan | None:
    """The kernels' plan of an EEG / audio modality (``nperseg`` None: the kernels' default); may raise ValueError."""
    if modality == "eeg":
        return band_power_plan(sfreq, window, bands, nperseg=nperseg, log=True)
    if modality == "audio":
        return log_band_energy_plan(sfreq, window, n_bands=n_mels, nperseg=nperseg)
    return None


def _segment_length(modality: str, sfreq: float, window: int, hop: int | None, bands, n_mels: int) -> int | None:
    """Welch segment length a new layout records: :func:`shared_nperseg` of the kernels' default,
    kept only if the bands still contain a bin at that resolution; ``None`` for bio or when the
    kernels refuse the settings (:meth:`FeatureLayout.spectral_plan` then reports why)."""
    try:
        default = _plan(modality, sfreq, window, bands, n_mels, None)
    except ValueError:
        return None
    if default is None:
        return None
    nperseg = shared_nperseg(hop, window, default.nperseg)
    if nperseg != default.nperseg:
        try:
            _plan(modality, sfreq, window, bands, n_mels, nperseg)
        except ValueError:
            return default.nperseg
    return nperseg


def _feature_names(modality: str, ch_names, ch_types, bands, n_mels: int) -> tuple[str, ...]:
    columns = []
    for ch, ch_type in zip(ch_names, ch_types):
        if modality == "eeg":
            feats = [band for band, _, _ in bands]
        elif modality == "audio":
            feats = [f"mel{i:02d}" for i in range(n_mels)]
        else:
            feats = list(BIO_STATISTICS) + (list(HR_FEATURES) if ch_type in HR_TYPES else [])
        columns.extend(f"{modality}:{ch}:{feat}" for feat in feats)
    return tuple(columns)


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """Names every column of a raw feature row, the channels each modality carries and the
    feature settings the values depend on.

    Build it with :meth:`from_channels` or :meth:`from_recording`, or parse the JSON of a device
    status or a model with :meth:`from_json`. Two devices with the same channels, rates and
    settings get the same :attr:`hash`, which keys the feature store.

    Attributes
    ----------
    window_s, hop_s : float
        Window length and hop in seconds.
    bands : tuple of (name, lo_hz, hi_hz)
        EEG bands (log10 Welch band powers).
    n_mels : int
        Mel bands per audio channel (natural-log energies).
    modalities : tuple of ModalityLayout
        In ``("eeg", "audio", "bio")`` order; the first is the label reference modality.
    """

    window_s: float
    hop_s: float
    bands: tuple[tuple[str, float, float], ...]
    n_mels: int
    modalities: tuple[ModalityLayout, ...]

    # ---------------------------------------------------------------- building
    @classmethod
    def from_channels(
        cls,
        channels: Mapping[str, tuple[float, Sequence[str], Sequence[str]]],
        settings=None,
        *,
        window_s: float | None = None,
        hop_s: float | None = None,
        bands=None,
        n_mels: int | None = None,
        modalities: Sequence[str] | None = None,
    ) -> FeatureLayout:
        """Layout from ``{modality: (sfreq, ch_names, ch_types)}`` (modalities not selected are skipped).

        The settings come from ``settings`` (anything with ``window_s``, ``hop_s``, ``bands``,
        ``n_mels`` and ``modalities``, such as :class:`biofed.edge.pipeline.PipelineConfig`) or
        from the keyword arguments, which override it.

        Raises
        ------
        LayoutError
            Unknown modality, no selected modality present, inconsistent channel lists, a rate
            too low for two samples per window, or an EEG band above the Nyquist frequency.
        """
        given = {"window_s": window_s, "hop_s": hop_s, "bands": bands, "n_mels": n_mels, "modalities": modalities}
        missing = [name for name, value in given.items() if value is None and not hasattr(settings, name)]
        if missing:
            raise TypeError(f"FeatureLayout.from_channels needs settings (a PipelineConfig) or {', '.join(missing)}")
        window_s = float(settings.window_s if window_s is None else window_s)
        hop_s = float(settings.hop_s if hop_s is None else hop_s)
        bands = tuple((str(b), float(lo), float(hi)) for b, lo, hi in (settings.bands if bands is None else bands))
        n_mels = int(settings.n_mels if n_mels is None else n_mels)
        selected = tuple(settings.modalities if modalities is None else modalities)
        unknown = [m for m in channels if m not in MODALITIES]
        if unknown:
            raise LayoutError(f"unknown modality {unknown[0]!r}; use one of {MODALITIES}.")
        parts = []
        for modality in (m for m in MODALITIES if m in selected):
            if modality not in channels:
                continue
            sfreq, ch_names, ch_types = channels[modality]
            sfreq = float(sfreq)
            ch_names, ch_types = tuple(map(str, ch_names)), tuple(map(str, ch_types))
            if not ch_names or len(ch_names) != len(ch_types) or len(set(ch_names)) != len(ch_names):
                raise LayoutError(
                    f"{modality}: need unique channel names with one type each, got {ch_names} / {ch_types}."
                )
            if not (math.isfinite(sfreq) and sfreq > 0):
                raise LayoutError(f"{modality}: sampling rate must be finite and > 0 Hz, got {sfreq!r}.")
            if round(window_s * sfreq) < 2:
                raise LayoutError(
                    f"{modality}: {sfreq} Hz gives {round(window_s * sfreq)} sample(s) per "
                    f"{window_s} s window; use a longer window_s."
                )
            too_high = [name for name, _, hi in bands if hi > sfreq / 2]
            if modality == "eeg" and too_high:
                raise LayoutError(
                    f"eeg: band(s) {too_high} reach above the Nyquist frequency {sfreq / 2} Hz of {sfreq} Hz EEG; "
                    "drop or narrow them in PipelineConfig.bands."
                )
            columns = _feature_names(modality, ch_names, ch_types, bands, n_mels)
            window = int(round(window_s * sfreq))
            nperseg = _segment_length(modality, sfreq, window, _hop_samples(hop_s, sfreq), bands, n_mels)
            parts.append(ModalityLayout(modality, sfreq, ch_names, ch_types, columns, nperseg))
        if not parts:
            raise LayoutError(f"none of the configured modalities {selected} is present (got {tuple(channels)}).")
        return cls(window_s, hop_s, bands, n_mels, tuple(parts))

    @classmethod
    def from_recording(cls, recording: Recording, settings=None, **overrides) -> FeatureLayout:
        """Layout of a :class:`biofed.datasets.Recording` (its selected modalities), as :meth:`from_channels`."""
        try:
            return cls.from_channels(stream_channels([recording]), settings, **overrides)
        except LayoutError as exc:
            raise LayoutError(f"{recording.source}: {exc}") from None

    # ---------------------------------------------------------------- columns
    @property
    def modality_names(self) -> tuple[str, ...]:
        """Modality names in layout order."""
        return tuple(m.modality for m in self.modalities)

    def modality(self, name: str) -> ModalityLayout | None:
        """The :class:`ModalityLayout` of ``name``, ``None`` when the layout lacks it."""
        return next((m for m in self.modalities if m.modality == name), None)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """All F column names, modality by modality."""
        return tuple(name for part in self.modalities for name in part.feature_names)

    @property
    def n_features(self) -> int:
        """F, the width of a raw feature row."""
        return sum(part.n_features for part in self.modalities)

    def window_samples(self, modality: ModalityLayout) -> int:
        """Samples per window of ``modality``: ``round(window_s * sfreq)``."""
        return int(round(self.window_s * modality.sfreq))

    def hop_samples(self, modality: ModalityLayout) -> int | None:
        """Samples between window starts of ``modality`` when ``hop_s * sfreq`` is an integer
        (to 1e-9, the usual case), else ``None``: window ``j`` then starts at sample
        ``round(j * hop_s * sfreq)``."""
        return _hop_samples(self.hop_s, modality.sfreq)

    def spectral_plan(self, modality: ModalityLayout) -> SpectralPlan | None:
        """The kernels' spectral plan of an EEG or audio modality (``None`` for bio): the one
        definition of its features, shared by the pipeline and the ONNX graph.

        Raises
        ------
        LayoutError
            The kernels refuse the rate, window or bands.
        """
        window = self.window_samples(modality)
        try:
            return _plan(modality.modality, modality.sfreq, window, self.bands, self.n_mels, modality.nperseg)
        except ValueError as exc:
            raise LayoutError(
                f"{modality.modality} at {modality.sfreq} Hz with {window}-sample windows: {exc}"
            ) from None

    @property
    def feature_params(self) -> str:
        """JSON of the settings the feature values depend on (window, hop, bands, mels and, when
        recorded, the Welch segment length per modality)."""
        params = {
            "window_s": self.window_s,
            "hop_s": self.hop_s,
            "bands": [list(b) for b in self.bands],
            "n_mels": self.n_mels,
        }
        nperseg = {m.modality: m.nperseg for m in self.modalities if m.nperseg is not None}
        if nperseg:  # absent from layouts recorded without it: their hash stays what it was
            params["nperseg"] = nperseg
        return json.dumps(params, sort_keys=True)

    @functools.cached_property  # a frozen layout: every pipeline, store and model check reads it
    def hash(self) -> str:
        """16 hex digits identifying channels, rates, feature names and feature settings."""
        channels = [(m.modality, m.sfreq, m.ch_names, m.ch_types, m.feature_names) for m in self.modalities]
        payload = json.dumps({"params": self.feature_params, "modalities": channels}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- JSON
    def to_json(self) -> str:
        """Compact, key-sorted JSON (equal layouts give equal strings)."""
        return json.dumps(
            {
                "window_s": self.window_s,
                "hop_s": self.hop_s,
                "bands": [list(b) for b in self.bands],
                "n_mels": self.n_mels,
                "modalities": [
                    {
                        "modality": m.modality,
                        "sfreq": m.sfreq,
                        "ch_names": list(m.ch_names),
                        "ch_types": list(m.ch_types),
                        "feature_names": list(m.feature_names),
                    }
                    | ({} if m.nperseg is None else {"nperseg": m.nperseg})
                    for m in self.modalities
                ],
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureLayout:
        """Parse :meth:`to_json` output; :class:`biofed.model.ModelFormatError` names what is wrong.

        Total on untrusted text (a device's status carries it): size, nesting and numbers
        are bounded, and any other failure is a :class:`biofed.model.ModelFormatError` too.
        """
        data = load_bounded_json(text, "feature layout")
        try:
            return cls._from_dict(data)
        except ModelFormatError:
            raise
        except (TypeError, ValueError, OverflowError, KeyError, AttributeError) as exc:
            raise ModelFormatError(f"feature layout is malformed: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_dict(cls, data) -> FeatureLayout:
        if not isinstance(data, dict):
            raise ModelFormatError(f"feature layout must be a JSON object, got {type(data).__name__}")
        missing = {"window_s", "hop_s", "bands", "n_mels", "modalities"} - set(data)
        if missing:
            raise ModelFormatError(f"feature layout lacks {sorted(missing)}")
        window_s = number(data["window_s"], "layout window_s")
        hop_s = number(data["hop_s"], "layout hop_s")
        try:
            bands = tuple(
                (str(name), number(lo, "band edge"), number(hi, "band edge")) for name, lo, hi in data["bands"]
            )
        except (TypeError, ValueError, ModelFormatError):
            raise ModelFormatError(
                f"layout bands must be [name, lo_hz, hi_hz] triples, got {data['bands']!r}"
            ) from None
        n_mels = data["n_mels"]
        if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 1:
            raise ModelFormatError(f"layout n_mels must be an integer >= 1, got {n_mels!r}")
        if not isinstance(data["modalities"], list) or not data["modalities"]:
            raise ModelFormatError("layout modalities must be a non-empty list")
        parts = []
        for i, m in enumerate(data["modalities"]):
            if not isinstance(m, dict) or set(m) - {"nperseg"} != {
                "modality",
                "sfreq",
                "ch_names",
                "ch_types",
                "feature_names",
            }:
                raise ModelFormatError(
                    f"layout modality {i} must have modality, sfreq, ch_names, ch_types and feature_names "
                    f"(and nperseg for eeg / audio), got {m!r}"
                )
            if m["modality"] not in MODALITIES:
                raise ModelFormatError(f"layout modality {i} is {m['modality']!r}, not eeg, audio or bio")
            ch_names = names(m["ch_names"], f"layout {m['modality']} ch_names")
            ch_types = names(m["ch_types"], f"layout {m['modality']} ch_types")
            if len(ch_names) != len(ch_types) or not ch_names:
                raise ModelFormatError(
                    f"layout {m['modality']}: {len(ch_names)} channel names but {len(ch_types)} channel types"
                )
            nperseg = m.get("nperseg")  # absent: recorded before it was, the kernels' default
            if nperseg is not None and (
                m["modality"] == "bio" or isinstance(nperseg, bool) or not isinstance(nperseg, int) or nperseg < 2
            ):
                raise ModelFormatError(
                    f"layout {m['modality']} nperseg must be an integer >= 2 (eeg / audio only), got {nperseg!r}"
                )
            parts.append(
                ModalityLayout(
                    m["modality"],
                    number(m["sfreq"], f"layout {m['modality']} sfreq"),
                    ch_names,
                    ch_types,
                    names(m["feature_names"], f"layout {m['modality']} feature_names"),
                    nperseg,
                )
            )
        return cls(window_s, hop_s, bands, n_mels, tuple(parts))

    # ---------------------------------------------------------------- comparison
    def mismatch(self, actual: FeatureLayout) -> str | None:
        """First difference between this (the model's) layout and ``actual`` (a recording's or
        a device's), as a sentence naming it; ``None`` when the layouts are interchangeable."""
        mine = self.modality_names
        theirs = actual.modality_names
        if mine != theirs:
            return f"the model needs modalities {mine} but the data has {theirs}"
        for name in ("window_s", "hop_s", "n_mels"):
            a, b = getattr(self, name), getattr(actual, name)
            if a != b:
                return f"the model was trained with {name} = {a} but the data's pipeline uses {name} = {b}"
        if tuple(self.bands) != tuple(actual.bands):
            return f"the model was trained with EEG bands {list(self.bands)} but the data uses {list(actual.bands)}"
        for a, b in zip(self.modalities, actual.modalities):
            m = a.modality
            if a.sfreq != b.sfreq:
                return f"{m}: the model expects {a.sfreq:g} Hz but the data is sampled at {b.sfreq:g} Hz"
            if len(a.ch_names) != len(b.ch_names):
                return (
                    f"{m}: the model expects {len(a.ch_names)} channels ({', '.join(a.ch_names)}) but the data "
                    f"has {len(b.ch_names)} ({', '.join(b.ch_names)})"
                )
            for i, (x, y) in enumerate(zip(a.ch_names, b.ch_names)):
                if x != y:
                    return f"{m}: channel {i} is {x!r} in the model but {y!r} in the data"
            for i, (x, y) in enumerate(zip(a.ch_types, b.ch_types)):
                if x != y:
                    return f"{m}: channel {a.ch_names[i]!r} has type {x!r} in the model but {y!r} in the data"
            if a.feature_names != b.feature_names:
                first = next(
                    (i for i, (x, y) in enumerate(zip(a.feature_names, b.feature_names)) if x != y),
                    min(len(a.feature_names), len(b.feature_names)),
                )
                return (
                    f"{m}: feature columns differ from column {first} on ({len(a.feature_names)} in the model, "
                    f"{len(b.feature_names)} in the data)"
                )
            mine_seg, theirs_seg = self._nperseg(a), actual._nperseg(b)
            if mine_seg != theirs_seg:
                return (
                    f"{m}: the model was trained on Welch segments of {mine_seg} samples but the data's pipeline "
                    f"uses {theirs_seg}; retrain the model on this pipeline's features"
                )
        return None

    def _nperseg(self, modality: ModalityLayout) -> int | None:
        """The segment length the features of ``modality`` use (the kernels' default where none is recorded)."""
        if modality.nperseg is not None or modality.modality == "bio":
            return modality.nperseg
        try:
            return self.spectral_plan(modality).nperseg
        except LayoutError:
            return None
