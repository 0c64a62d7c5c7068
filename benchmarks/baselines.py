"""The computations biofed replaces, written the way a user would without biofed.

Each function takes the same inputs as its biofed counterpart and returns the same array,
built from MNE, SciPy, scikit-learn or plain NumPy calls with their usual parameters. They
are the "before" column of the benchmark table and the reference for output equality.
"""

from __future__ import annotations

import numpy as np
import scipy.signal
from numpy.lib.stride_tricks import sliding_window_view

from biofed.benchmarks import stream as profile

#: The EEG bands in Hz, (name, lo, hi) with lo <= f < hi.
EEG_BANDS_HZ = (
    ("delta", 1.0, 4.0),
    ("theta", 4.0, 8.0),
    ("alpha", 8.0, 13.0),
    ("beta", 13.0, 30.0),
    ("gamma", 30.0, 45.0),
)


# --- windowing ----------------------------------------------------------------------------
def sliding_windows_numpy(x, window: int, hop: int):
    """(n_channels, n_samples) -> (n_windows, n_channels, window) with NumPy's window view."""
    view = sliding_window_view(x, window, axis=-1)[:, ::hop, :]  # (n_channels, n_windows, window)
    return view.transpose(1, 0, 2)


# --- spectral: EEG band powers ------------------------------------------------------------
def _band_sums(freqs, psd, bands, log: bool, tiny: float):
    df = freqs[1] - freqs[0]
    out = np.stack([psd[..., (freqs >= lo) & (freqs < hi)].sum(axis=-1) * df for _, lo, hi in bands], axis=-1)
    return np.log10(out + tiny) if log else out


def _welch(windows, fs: float, nperseg: int):
    """``scipy.signal.welch`` with the kernels' settings (Hann, 50 % overlap, constant detrend, density)."""
    return scipy.signal.welch(
        windows,
        fs,
        window="hann",
        nperseg=nperseg,
        noverlap=nperseg // 2,
        detrend="constant",
        scaling="density",
        average="mean",
        axis=-1,
    )


def band_powers_scipy(windows, fs: float, bands, *, nperseg: int, log: bool = False, tiny: float = 0.0):
    """``scipy.signal.welch`` (Hann, 50 % overlap, constant detrend, density) then band sums."""
    freqs, psd = _welch(windows, fs, nperseg)
    return _band_sums(freqs, psd, bands, log, tiny)


def band_powers_mne(windows, fs: float, bands, *, nperseg: int, log: bool = False, tiny: float = 0.0):
    """``mne.time_frequency.psd_array_welch`` with matching parameters, then band sums."""
    from mne.time_frequency import psd_array_welch

    psd, freqs = psd_array_welch(
        windows,
        fs,
        fmin=0.0,
        fmax=np.inf,
        n_fft=nperseg,
        n_per_seg=nperseg,
        n_overlap=nperseg // 2,
        window="hann",
        average="mean",
        remove_dc=True,
        verbose=False,
    )
    return _band_sums(freqs, psd, bands, log, tiny)


# --- biosensor statistics -----------------------------------------------------------------
def window_statistics_numpy(windows, fs: float):
    """mean, std (ddof=0), least-squares slope (units/s), min, max per window and channel."""
    n = windows.shape[-1]
    t = np.arange(n) / fs
    tc = t - t.mean()
    slope = (windows - windows.mean(axis=-1, keepdims=True)) @ tc / (tc @ tc)
    return np.stack(
        [windows.mean(axis=-1), windows.std(axis=-1), slope, windows.min(axis=-1), windows.max(axis=-1)], axis=-1
    )


# --- transform / statistics / projection --------------------------------------------------
_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
}


def transform_numpy(features, weights, bias, mean, scale, activation: str = "identity"):
    """``activation(((features - mean) / scale) @ weights + bias)`` in NumPy."""
    return _ACTIVATIONS[activation](((features - mean) / scale) @ weights + bias)


def moments_numpy(X):
    """Column count, mean and sum of squared deviations (what ``Moments`` holds) in NumPy."""
    mean = X.mean(axis=0)
    return float(X.shape[0]), mean, ((X - mean) ** 2).sum(axis=0)


def standard_scale_numpy(X):
    """Column std (ddof=0) with zeros replaced by 1, as a user standardizes features."""
    std = X.std(axis=0)
    std[std == 0] = 1.0
    return std


def project_numpy(X, basis, mean, scale):
    """PCA-style projection ``((X - mean) / scale) @ basis.T``."""
    return ((X - mean) / scale) @ basis.T


# --- truncated SVD ------------------------------------------------------------------------
def randomized_svd_sklearn(X, k: int, random_state: int = 0):
    """``sklearn.utils.extmath.randomized_svd`` with its default settings."""
    from sklearn.utils.extmath import randomized_svd

    return randomized_svd(X, k, random_state=random_state)


def truncated_svd_sklearn(X, k: int, random_state: int = 0):
    """``sklearn.decomposition.TruncatedSVD`` (defaults) fitted, returning U*S, S and Vt."""
    from sklearn.decomposition import TruncatedSVD

    model = TruncatedSVD(n_components=k, random_state=random_state)
    US = model.fit_transform(X)
    return US, model.singular_values_, model.components_


# --- spectral: audio log-mel energies ------------------------------------------------------
def mel_filterbank(freqs, n_bands: int, fmin: float, fmax: float):
    """HTK mel triangles (height 1, not area-normalised) on ``freqs``: (n_freqs, n_bands)."""
    mel = np.linspace(2595.0 * np.log10(1.0 + fmin / 700.0), 2595.0 * np.log10(1.0 + fmax / 700.0), n_bands + 2)
    edges = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    edges[0], edges[-1] = fmin, fmax
    bank = np.zeros((freqs.size, n_bands))
    for b in range(n_bands):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        bank[:, b] = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return bank


def log_mel_scipy(windows, fs: float, *, n_bands: int = 32, fmin: float = 20.0, nperseg: int = 512):
    """``scipy.signal.welch`` frames (Hann, 50 % overlap) -> mel filterbank -> ``ln(E + 1e-10)``."""
    freqs, psd = _welch(windows, fs, nperseg)
    energies = psd @ mel_filterbank(freqs, n_bands, fmin, fs / 2.0) * (freqs[1] - freqs[0])
    return np.log(energies + 1e-10)


# --- biosensor: heart rate ------------------------------------------------------------------
def _centred_mean(x, half: int):
    """Mean over the samples of ``[i - half, i + half]`` that exist (two ``np.convolve`` calls)."""
    kernel = np.ones(2 * half + 1)
    return np.convolve(x, kernel, mode="same") / np.convolve(np.ones_like(x), kernel, mode="same")


def heart_rate_scipy(windows, fs: float, *, min_distance_s: float = 0.3):
    """Beats by NumPy envelopes + ``scipy.signal.find_peaks``, the detector of :mod:`biofed.kernels.biosensor`.

    Squared rising slope of the 10 ms-smoothed signal, boxed over +-50 ms; ``find_peaks(box,
    distance=ceil(0.3 fs), prominence=0, wlen=2 round(fs) + 1)``; a peak is kept when its
    prominence is >= 0.2 x the largest prominence within +-1.5 s; each kept peak moves to the
    maximum of the triangular (+-25 ms twice) envelope within +-50 ms. HR = 60 / mean(IBI), RMSSD in ms.
    """
    distance = max(1, int(np.ceil(min_distance_s * fs)))
    wlen = 2 * max(1, round(fs)) + 1
    reach = max(1, round(1.5 * fs))
    half = max(1, round(0.05 * fs))
    fine = max(1, round(0.025 * fs))
    out = np.zeros(windows.shape[:2] + (2,))
    for i in range(windows.shape[0]):
        for c in range(windows.shape[1]):
            smoothed = _centred_mean(windows[i, c], round(0.01 * fs))
            d2 = np.maximum(np.gradient(smoothed, 1.0 / fs), 0.0) ** 2
            box = _centred_mean(d2, half)
            tri = _centred_mean(_centred_mean(d2, fine), fine)
            peaks, props = scipy.signal.find_peaks(box, distance=distance, prominence=0, wlen=wlen)
            prom = props["prominences"]
            reference = np.array([prom[np.abs(peaks - p) <= reach].max() for p in peaks])
            beats: list[int] = []
            for p in peaks[prom >= 0.2 * reference]:
                lo = max(p - half, 0)
                best = lo + int(np.argmax(tri[lo : p + half + 1]))
                if not beats or best > beats[-1]:
                    beats.append(best)
            ibi = np.diff(beats) / fs
            if ibi.size >= 1:
                out[i, c, 0] = 60.0 / ibi.mean()
            if ibi.size >= 2:
                out[i, c, 1] = 1000.0 * np.sqrt(np.mean(np.diff(ibi) ** 2))
    return out


# --- training -----------------------------------------------------------------------------
def loss_and_grad_numpy(params, X, y, n_classes: int, hidden: int = 0, *, l2: float = 0.0):
    """Mean softmax cross-entropy (+ (l2/2)||W||^2) and its gradient, forward/backward in NumPy.

    Same flat layout as :mod:`biofed.kernels.training`: W (d, c) | b, or W1 | b1 | W2 | b2
    with a ReLU hidden layer.
    """
    n, d = X.shape
    c, h = n_classes, hidden
    onehot = np.eye(c)[y]
    if h == 0:
        W, b = params[: d * c].reshape(d, c), params[d * c :]
        z = X @ W + b
    else:
        W1 = params[: d * h].reshape(d, h)
        b1 = params[d * h : d * h + h]
        W2 = params[d * h + h : d * h + h + h * c].reshape(h, c)
        b2 = params[-c:]
        a = np.maximum(X @ W1 + b1, 0.0)
        z = a @ W2 + b2
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -np.mean(logp[np.arange(n), y])
    dz = (np.exp(logp) - onehot) / n
    if h == 0:
        loss += 0.5 * l2 * np.sum(W**2)
        grads = [X.T @ dz + l2 * W, dz.sum(axis=0)]
    else:
        loss += 0.5 * l2 * (np.sum(W1**2) + np.sum(W2**2))
        da = (dz @ W2.T) * (a > 0)
        grads = [X.T @ da + l2 * W1, da.sum(axis=0), a.T @ dz + l2 * W2, dz.sum(axis=0)]
    return float(loss), np.concatenate([g.ravel() for g in grads])


# --- the fusion chain -----------------------------------------------------------------------
def chain(w: dict, mean, scale, basis, *, eeg: str = "mne", nperseg: dict | None = None):
    """The fusion chain without biofed: same windows, features, order and projection basis.

    EEG log10 band powers by MNE ``psd_array_welch`` (``eeg="mne"``) or ``scipy.signal.welch``
    (``eeg="scipy"``); audio log-mel energies by SciPy Welch frames + a mel filterbank;
    biosensor statistics in NumPy; heart rate by ``scipy.signal.find_peaks``; then
    ``((features - mean) / scale) @ basis.T``. ``nperseg`` maps "eeg" and "audio" to their Welch
    segment lengths (512 each when None), every window computed on its own.
    """
    nperseg = {"eeg": 512, "audio": 512} if nperseg is None else nperseg
    eeg_w, audio_w, bio_w = w["eeg"], w["audio"], w["bio"]
    n = eeg_w.shape[0]
    tiny = np.finfo(np.float64).tiny
    powers = band_powers_mne if eeg == "mne" else band_powers_scipy
    features = np.concatenate(
        [
            powers(eeg_w, profile.EEG_FS, EEG_BANDS_HZ, nperseg=nperseg["eeg"], log=True, tiny=tiny).reshape(n, -1),
            log_mel_scipy(audio_w, profile.AUDIO_FS, n_bands=profile.N_MELS, nperseg=nperseg["audio"]).reshape(n, -1),
            window_statistics_numpy(bio_w, profile.BIO_FS).reshape(n, -1),
            heart_rate_scipy(bio_w[:, : profile.HEART_CHANNELS], profile.BIO_FS).reshape(n, -1),
        ],
        axis=1,
    )
    return project_numpy(features, basis, mean, scale)


# --- streaming basis ------------------------------------------------------------------------
def incremental_pca_sklearn(chunks, k: int):
    """``sklearn.decomposition.IncrementalPCA.partial_fit`` over the chunks; returns components (k, d)."""
    from sklearn.decomposition import IncrementalPCA

    model = IncrementalPCA(n_components=k)
    for chunk in chunks:
        model.partial_fit(chunk)
    return model.components_


def exact_basis_numpy(X, k: int):
    """Top-k right singular vectors of all rows at once (``np.linalg.svd``; needs every row in memory)."""
    return np.linalg.svd(X, full_matrices=False)[2][:k]
