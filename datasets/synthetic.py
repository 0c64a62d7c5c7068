"""Seeded multimodal synthetic recordings: a stand-in for eegmat rest vs mental arithmetic.

Each :class:`~biofed.datasets.recording.Recording` carries three modalities on one clock:

``eeg``
    19 scalp channels (10-20 names of eegmat), volts. A 1/f^chi background plus band-limited
    oscillations: *rest* has strong posterior alpha (8-13 Hz) and little theta; *arithmetic*
    has frontal-midline theta (4-8 Hz) and more beta (13-30 Hz) with suppressed alpha. Every
    channel is then scaled to a subject-specific RMS that does **not** depend on the class,
    so the classes differ only in *relative* band power: a classifier must use spectral
    shape, not total amplitude. The class effect is modest and variable, as in real
    recordings: each subject reacts with its own strength (``eeg_reactivity``: the arithmetic
    band powers are ``rest * (arithmetic / rest) ** reactivity``), every rhythm waxes and wanes
    over seconds (a log-normal amplitude envelope, so band power differs between windows of
    one recording) and every recording has its own offset per rhythm (session effect). A
    logistic regression on the pipeline's features separates the classes well but not
    perfectly: the features carry the class only statistically (``docs/measurements.md``).
``audio``
    a phonocardiogram-like signal (full scale [-1, 1]): S1 and S2 heart-sound bursts (decaying
    low-frequency tones) following each heart beat, plus noise.
``bio``
    ECG (sum-of-Gaussians P-QRS-T complex per beat, volts) and PPG (systolic + dicrotic pulse
    after each beat, NU). Heart rate is class-dependent: arithmetic raises it by a few bpm
    (mild mental stress) and slightly lowers beat-to-beat variability, on top of a slow heart
    rate drift within each recording.

Subject variation: amplitude, channel gains, background exponent, alpha/theta/beta peak
frequencies, alpha strength, EEG reactivity, resting heart rate and stress reactivity are drawn from a
generator seeded by the subject name (CRC-32), so one subject keeps its traits across
recordings and calls, while the noise of each recording comes from ``random_state``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from biofed.datasets.recording import Recording, Signal
from biofed.kernels.random_state import check_random_state

__all__ = ["CLASSES", "EEG_CHANNELS", "make_federation", "make_recording"]

#: Class labels, in label-index order.
CLASSES = ("rest", "arithmetic")
#: The 19 scalp electrodes of eegmat, in its channel order.
EEG_CHANNELS = ("Fp1", "Fp2", "F3", "F4", "F7", "F8", "T3", "T4", "C3", "C4",
                "T5", "T6", "P3", "P4", "O1", "O2", "Fz", "Cz", "Pz")  # fmt: skip

# Oscillation variance relative to a unit-variance 1/f background, per class, before the
# class-independent total-power normalisation. The arithmetic effect is applied as a power of
# the rest -> arithmetic ratio scaled by the subject's EEG reactivity (see _band_power).
_BAND_POWER = {
    "rest": {"theta": 0.3, "alpha": 1.0, "beta": 0.2},
    "arithmetic": {"theta": 0.6, "alpha": 0.28, "beta": 0.34},
}
_HEART = {  # heart-rate increase (bpm, scaled by subject reactivity) and RR jitter (fraction)
    "rest": (0.0, 0.03),
    "arithmetic": (4.0, 0.025),
}
_ENVELOPE_SIGMA = 0.3
"""Log-amplitude std of the slow waxing and waning of each rhythm (alpha bursts etc.)."""
_ENVELOPE_TAU_S = 1.5
"""Time constant of that envelope: band power changes over seconds, i.e. between windows."""
_SESSION_SIGMA = 0.15
"""Log-power std of a recording's (session's) own offset per rhythm: state, electrode contact."""
_HR_DRIFT_BPM = 3.0
"""Std of the slow heart-rate drift within a recording."""


def _subject_traits(subject: str, n_channels: int) -> dict:
    """Per-subject physiology, deterministic in the subject name."""
    rng = np.random.default_rng(zlib.crc32(subject.encode("utf-8")))
    return {
        "rms": 15e-6 * float(rng.lognormal(0.0, 0.3)),
        "gains": rng.uniform(0.8, 1.2, n_channels),
        "chi": float(rng.uniform(0.8, 1.4)),
        "theta_f": float(np.clip(rng.normal(6.0, 0.5), 4.8, 7.2)),
        "alpha_f": float(np.clip(rng.normal(10.0, 0.8), 8.8, 12.0)),
        "beta_f": float(np.clip(rng.normal(20.0, 2.0), 16.0, 26.0)),
        "alpha_gain": float(rng.lognormal(0.0, 0.2)),
        "hr": float(np.clip(rng.normal(66.0, 6.0), 50.0, 85.0)),
        "reactivity": float(rng.uniform(0.7, 1.3)),
        "ecg_mv": float(rng.lognormal(0.0, 0.25)),
        "eeg_reactivity": float(rng.uniform(0.4, 1.3)),
    }


def _band_power(label: str, band: str, traits: dict) -> float:
    """Class power of one rhythm for this subject: rest * (arithmetic / rest) ** eeg_reactivity."""
    rest = _BAND_POWER["rest"][band]
    if label == "rest":
        return rest
    return rest * (_BAND_POWER["arithmetic"][band] / rest) ** traits["eeg_reactivity"]


def _slow_envelope(rng, n: int, fs: float, sigma: float) -> np.ndarray:
    """Log-normal amplitude envelope ``exp(sigma x - sigma^2)`` (expected square 1), x a
    stationary unit-variance Ornstein-Uhlenbeck process with time constant
    :data:`_ENVELOPE_TAU_S`, drawn every 0.1 s and interpolated to the n samples."""
    step = 0.1
    m = int(math.ceil(n / fs / step)) + 2
    a = math.exp(-step / _ENVELOPE_TAU_S)
    x = np.empty(m)
    x[0] = rng.standard_normal()
    innovations = math.sqrt(1.0 - a * a) * rng.standard_normal(m - 1)
    for i in range(1, m):
        x[i] = a * x[i - 1] + innovations[i - 1]
    x = np.interp(np.arange(n) / fs, np.arange(m) * step, x)
    return np.exp(sigma * x - sigma**2)


def _spatial_weights(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, theta) weights per channel: alpha posterior, theta frontal-midline."""
    alpha = np.array([1.6 if n[0] in "OP" else 1.0 if n[0] in "TC" else 0.6 for n in names])
    theta = np.array([1.5 if n in ("Fz", "Cz") else 1.2 if n[0] == "F" else 0.9 for n in names])
    return alpha, theta


def _shaped_noise(rng, n_channels: int, n: int, fs: float, gain: np.ndarray, rho: float = 0.3) -> np.ndarray:
    """Unit-variance noise with amplitude spectrum ``gain`` (length n//2+1), partly shared across channels."""
    white = rng.standard_normal((n_channels, n))
    white = math.sqrt(1.0 - rho) * white + math.sqrt(rho) * rng.standard_normal(n)
    x = np.fft.irfft(np.fft.rfft(white, axis=1) * gain, n=n, axis=1)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(x.std(axis=1, keepdims=True), 1e-300)


def _make_eeg(label, traits, n_channels, fs, duration_s, rng) -> Signal:
    n = max(int(round(duration_s * fs)), 1)
    names = (
        EEG_CHANNELS[:n_channels] if n_channels <= len(EEG_CHANNELS) else tuple(f"E{i + 1}" for i in range(n_channels))
    )
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    background = np.where(freqs > 0, np.maximum(freqs, 0.5) ** (-traits["chi"] / 2.0), 0.0)
    background[freqs > 0.45 * fs] *= 0.1
    data = _shaped_noise(rng, n_channels, n, fs, background)
    alpha_w, theta_w = _spatial_weights(names) if n_channels <= len(EEG_CHANNELS) else (np.ones(n_channels),) * 2
    weights = {"theta": theta_w, "alpha": alpha_w * traits["alpha_gain"], "beta": np.ones(n_channels)}
    for band, width in (("theta", 0.8), ("alpha", 1.0), ("beta", 3.0)):
        bump = np.exp(-0.5 * ((freqs - traits[f"{band}_f"]) / width) ** 2)
        session = float(rng.lognormal(0.0, _SESSION_SIGMA))
        power = _band_power(label, band, traits) * session * weights[band]
        envelope = _slow_envelope(rng, n, fs, _ENVELOPE_SIGMA)
        data += np.sqrt(power)[:, None] * _shaped_noise(rng, n_channels, n, fs, bump) * envelope
    data -= data.mean(axis=1, keepdims=True)
    # Class-independent total power: every channel gets the subject's RMS times its gain.
    data *= (traits["rms"] * traits["gains"] / np.maximum(data.std(axis=1), 1e-300))[:, None]
    return Signal(data=data, sfreq=fs, ch_names=names, ch_types=("eeg",) * n_channels, units=("V",) * n_channels)


def _beat_times(label, traits, duration_s, rng) -> np.ndarray:
    """R-peak times (s) over [0, duration_s + 1): sinus-arrhythmia-modulated RR intervals."""
    rise, jitter = _HEART[label]
    rr_mean = 60.0 / (traits["hr"] + rise * traits["reactivity"])
    n = int(math.ceil((duration_s + 2.0) / (0.7 * rr_mean))) + 2
    rr = rr_mean * (1.0 + jitter * rng.standard_normal(n))
    drift = np.cumsum(rng.standard_normal(n)) * math.sqrt(0.02)  # slow random walk of the heart rate
    drift = _HR_DRIFT_BPM * (drift - drift.mean()) / max(float(drift.std()), 1e-12) if n > 1 else np.zeros(n)
    rr = rr * (60.0 / rr_mean) / (60.0 / rr_mean + drift)
    times = np.cumsum(rr) - rng.uniform(0.0, rr_mean)
    times += 0.05 * rr_mean * np.sin(2 * np.pi * 0.25 * times)  # respiratory sinus arrhythmia
    times = np.sort(times)
    return times[times < duration_s + 1.0]


def _add_template(out: np.ndarray, template: np.ndarray, offset: int, centres: np.ndarray) -> None:
    """Add ``template`` (whose sample ``offset`` is the event) at every centre index, clipped to ``out``."""
    n, m = out.shape[-1], template.shape[-1]
    for c in centres:
        start = c - offset
        lo, hi = max(start, 0), min(start + m, n)
        if lo < hi:
            out[..., lo:hi] += template[..., lo - start : hi - start]


def _gaussians(t: np.ndarray, spec) -> np.ndarray:
    return sum(a * np.exp(-0.5 * ((t - mu) / w) ** 2) for mu, a, w in spec)


def _make_bio(traits, beats, fs, duration_s, rng) -> Signal:
    n = max(int(round(duration_s * fs)), 1)
    t = np.arange(n) / fs
    lead = np.arange(-int(0.35 * fs), int(0.6 * fs) + 1) / fs
    ecg_wave = _gaussians(lead, ((-0.2, 0.12, 0.025), (-0.03, -0.12, 0.01), (0.0, 1.0, 0.012),
                                 (0.03, -0.25, 0.012), (0.26, 0.3, 0.045)))  # fmt: skip
    ppg_wave = _gaussians(lead, ((0.25, 1.0, 0.07), (0.48, 0.35, 0.08)))
    data = np.zeros((2, n))
    _add_template(data, np.stack([ecg_wave, ppg_wave]), int(0.35 * fs), np.round(beats * fs).astype(np.int64))
    phase = rng.uniform(0, 2 * np.pi, 2)
    data[0] += 0.05 * np.sin(2 * np.pi * 0.3 * t + phase[0]) + 0.02 * rng.standard_normal(n)
    data[0] *= 1e-3 * traits["ecg_mv"]  # mV -> V
    data[1] += 0.1 * np.sin(2 * np.pi * 0.25 * t + phase[1]) + 0.02 * rng.standard_normal(n)
    return Signal(data=data, sfreq=fs, ch_names=("ECG", "PPG"), ch_types=("ecg", "ppg"), units=("V", "NU"))


def _make_audio(traits, beats, fs, duration_s, rng) -> Signal:
    n = max(int(round(duration_s * fs)), 1)
    tb = np.arange(int(0.12 * fs)) / fs
    s1 = np.exp(-tb / 0.025) * (np.sin(2 * np.pi * 55.0 * tb) + 0.5 * np.sin(2 * np.pi * 110.0 * tb))
    s2 = 0.6 * np.exp(-tb / 0.018) * np.sin(2 * np.pi * 90.0 * tb)
    rr = np.diff(beats)
    rr = np.append(rr, rr[-1] if len(rr) else 1.0)  # the last beat keeps the previous interval
    systole = 0.1 + 0.3 * np.sqrt(np.clip(rr, 0.3, 2.0))  # S1-S2 interval shortens with heart rate
    out = rng.standard_normal(n) * 0.02
    _add_template(out, s1, 0, np.round((beats + 0.04) * fs).astype(np.int64))
    _add_template(out, s2, 0, np.round((beats + 0.04 + systole) * fs).astype(np.int64))
    out *= 0.5 / max(np.abs(out).max(), 1e-12)
    return Signal(data=out[None, :], sfreq=fs, ch_names=("PCG",), ch_types=("audio",), units=("NU",))


def make_recording(
    label: str,
    *,
    duration_s: float = 60.0,
    eeg_channels: int = 19,
    eeg_sfreq: float = 250.0,
    audio_sfreq: float = 8000.0,
    bio_sfreq: float = 250.0,
    subject: str = "synthetic",
    random_state=None,
) -> Recording:
    """One synthetic multimodal recording of class ``label``.

    Parameters
    ----------
    label : {"rest", "arithmetic"}
        The class (:data:`CLASSES`).
    duration_s : float
        Length in seconds (> 0).
    eeg_channels : int
        Number of EEG channels (>= 1); up to 19 use the eegmat 10-20 names, more get ``E1...``.
    eeg_sfreq, audio_sfreq, bio_sfreq : float
        Sampling rates in Hz: EEG >= 64 (beta must fit under Nyquist), audio >= 500
        (heart sounds up to ~150 Hz), bio >= 50.
    subject : str
        Subject name; seeds the subject's traits (see module docstring).
    random_state : int, numpy.random.Generator or None
        Noise source for this recording.

    Returns
    -------
    Recording
        ``source="synthetic/<subject>/<label>"``, signals ``eeg`` (n_ch, duration*eeg_sfreq),
        ``audio`` (1, ...) and ``bio`` (2, ...: ECG, PPG), ``label`` and ``subject`` set.
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}.")
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s!r}.")
    if isinstance(eeg_channels, bool) or not isinstance(eeg_channels, (int, np.integer)) or eeg_channels < 1:
        raise ValueError(f"eeg_channels must be an integer >= 1, got {eeg_channels!r}.")
    for name, value, minimum in (
        ("eeg_sfreq", eeg_sfreq, 64.0),
        ("audio_sfreq", audio_sfreq, 500.0),
        ("bio_sfreq", bio_sfreq, 50.0),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
            raise ValueError(f"{name} must be a finite number >= {minimum:g} Hz, got {value!r}.")
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject must be a non-empty string, got {subject!r}.")
    rng = check_random_state(random_state)
    traits = _subject_traits(subject, int(eeg_channels))
    beats = _beat_times(label, traits, float(duration_s), rng)
    signals = {
        "eeg": _make_eeg(label, traits, int(eeg_channels), float(eeg_sfreq), float(duration_s), rng),
        "audio": _make_audio(traits, beats, float(audio_sfreq), float(duration_s), rng),
        "bio": _make_bio(traits, beats, float(bio_sfreq), float(duration_s), rng),
    }
    return Recording(source=f"synthetic/{subject}/{label}", signals=signals, label=label, subject=subject)


def make_federation(
    n_devices: int, *, recordings_per_class: int = 1, duration_s: float = 60.0, random_state=None
) -> dict[str, list[Recording]]:
    """Synthetic recordings for ``n_devices`` devices, one subject per device.

    Parameters
    ----------
    n_devices : int
        Number of devices (>= 1). Device ``i`` is ``"device{i:02d}"`` with subject
        ``"subject{i:02d}"``.
    recordings_per_class : int
        Recordings of each class per device (>= 1), ordered rest, arithmetic, rest, ...
    duration_s : float
        Length of every recording in seconds.
    random_state : int, numpy.random.Generator or None
        Seeds every recording's noise (independent child streams), so equal seeds give equal
        federations.

    Returns
    -------
    dict[str, list[Recording]]
        Sources are ``"synthetic/<subject>/<label>/<k>"``, unique across the federation.
    """
    for name, value in (("n_devices", n_devices), ("recordings_per_class", recordings_per_class)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    rng = check_random_state(random_state)
    children = iter(rng.spawn(int(n_devices) * int(recordings_per_class) * len(CLASSES)))
    federation = {}
    for i in range(int(n_devices)):
        subject = f"subject{i:02d}"
        recordings = []
        for k in range(int(recordings_per_class)):
            for label in CLASSES:
                rec = make_recording(label, duration_s=duration_s, subject=subject, random_state=next(children))
                recordings.append(dataclasses.replace(rec, source=f"{rec.source}/{k}"))
        federation[f"device{i:02d}"] = recordings
    return federation
