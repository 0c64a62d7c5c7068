"""The device stream profile and the biofed fusion chain, runnable as a fresh process.

Profile: 19-channel EEG at 500 Hz, one audio channel at 16 kHz and 4 biosensors at 250 Hz
(ECG, PPG, EDA, respiration), 2 s windows with a 1 s hop. Chain per window: EEG log band
powers, audio log-mel energies, biosensor window statistics and ECG/PPG heart-rate
features -> one feature row -> fused standardize-and-project ``transform`` onto a k=32 basis.

Imported by :mod:`benchmarks.suite` for the in-process comparison, and run as a script
(``python stream.py rtf|warm``) by the real-time-factor and warm-start measurements, which
need a fresh interpreter. This file imports nothing but NumPy and :mod:`biofed.kernels`, so
it runs on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from biofed.kernels import (
    band_powers,
    heart_rate_features,
    log_band_energies,
    moments_init,
    moments_scale,
    moments_update,
    sliding_windows,
    transform,
    truncated_svd,
    window_statistics,
)

EEG_CHANNELS, EEG_FS = 19, 500.0
AUDIO_FS = 16000.0  # one channel
BIO_FS = 250.0  # ECG, PPG, EDA, respiration
HEART_CHANNELS = 2  # ECG and PPG carry beats; EDA and respiration do not
WINDOW_S, HOP_S = 2.0, 1.0
K = 32
N_MELS = 32


def make_stream(seconds: float, random_state=0) -> dict[str, np.ndarray]:
    """Synthetic float64 recording of the profile: {"eeg", "audio", "bio"} -> (n_channels, n_samples)."""
    rng = np.random.default_rng(random_state)

    def clock(fs):
        return np.arange(int(round(seconds * fs))) / fs

    t = clock(EEG_FS)
    phases = rng.uniform(0, 2 * np.pi, (EEG_CHANNELS, 3))
    eeg = (
        20.0 * np.sin(2 * np.pi * 10.0 * t + phases[:, :1])
        + 10.0 * np.sin(2 * np.pi * 6.0 * t + phases[:, 1:2])
        + 5.0 * np.sin(2 * np.pi * 21.0 * t + phases[:, 2:3])
        + 8.0 * rng.standard_normal((EEG_CHANNELS, t.size))
    )
    ta = clock(AUDIO_FS)
    audio = (0.3 * np.sin(2 * np.pi * 220.0 * ta) * (1 + np.sin(2 * np.pi * 0.5 * ta)) + 0.05 * rng.standard_normal(ta.size))[None]
    tb = clock(BIO_FS)
    beat_phase = 2 * np.pi * 1.2 * tb + 0.3 * np.sin(2 * np.pi * 0.1 * tb)  # ~72 bpm with variability
    ecg = np.exp(-((np.mod(beat_phase, 2 * np.pi) - np.pi) ** 2) / 0.02) + 0.02 * rng.standard_normal(tb.size)
    ppg = 0.5 * (1 + np.sin(beat_phase - 1.0)) + 0.02 * rng.standard_normal(tb.size)
    eda = 2.0 + np.cumsum(rng.standard_normal(tb.size)) * 1e-3
    resp = np.sin(2 * np.pi * 0.25 * tb) + 0.05 * rng.standard_normal(tb.size)
    return {"eeg": eeg, "audio": audio, "bio": np.stack([ecg, ppg, eda, resp])}


def windows_of(stream: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Window every modality with biofed's zero-copy ``sliding_windows`` (2 s window, 1 s hop)."""
    fs = {"eeg": EEG_FS, "audio": AUDIO_FS, "bio": BIO_FS}
    return {m: sliding_windows(x, int(WINDOW_S * fs[m]), int(HOP_S * fs[m])) for m, x in stream.items()}


#: The feature stages of the chain, in feature-row order: name -> f(windows dict) -> (n, ch, f).
FEATURE_STAGES = {
    "eeg band_powers": lambda w: band_powers(w["eeg"], EEG_FS, log=True),
    "audio log_band_energies": lambda w: log_band_energies(w["audio"], AUDIO_FS, n_bands=N_MELS),
    "bio window_statistics": lambda w: window_statistics(w["bio"], BIO_FS),
    "ecg/ppg heart_rate_features": lambda w: heart_rate_features(w["bio"][:, :HEART_CHANNELS], BIO_FS),
}


def biofed_features(w: dict[str, np.ndarray]) -> np.ndarray:
    """One feature row per window, (n_windows, n_features), from biofed kernels.

    ``w`` maps "eeg", "audio", "bio" to windows (n_windows, n_channels, window).
    """
    n = w["eeg"].shape[0]
    return np.concatenate([stage(w).reshape(n, -1) for stage in FEATURE_STAGES.values()], axis=1)


def fit_projection(features: np.ndarray, k: int = K, random_state=0):
    """Standardization (mergeable moments) and the k=32 basis of the standardized features.

    Returns ``mean (d,)``, ``scale (d,)`` and ``basis (k, d)``; fitted once, outside timing.
    """
    moments = moments_update(moments_init(features.shape[1]), features)
    scale = moments_scale(moments)
    _, _, basis = truncated_svd((features - moments.mean) / scale, k, random_state=random_state)
    return moments.mean, scale, basis


def biofed_chain(w: dict[str, np.ndarray], mean, scale, basis) -> np.ndarray:
    """features -> fused standardize-and-project transform: (n_windows, k)."""
    return transform(biofed_features(w), basis.T, mean=mean, scale=scale)


def _limit_to_one_core() -> dict:
    """Pin this process to one CPU; BLAS/Numba thread counts come from the environment."""
    info = {"affinity": None, "blas_threads": None, "numba_threads": None}
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        info["affinity"] = [cpu]
    try:
        from threadpoolctl import threadpool_info

        info["blas_threads"] = [p["num_threads"] for p in threadpool_info()]
    except ImportError:
        pass
    import numba

    info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    return info


def measure_rtf(seconds: float, repeats: int) -> dict:
    """Real-time factor (stream seconds / compute seconds) of the chain on one core.

    ``batch``: all windows of the stream in one call per kernel. ``per_window``: one call
    per 1 s hop with a single window, as a device processes its stream live.
    """
    limits = _limit_to_one_core()
    stream = make_stream(seconds, random_state=1)
    mean, scale, basis = fit_projection(biofed_features(windows_of(make_stream(60.0, random_state=2))))
    w = windows_of(stream)
    n = w["eeg"].shape[0]
    stream_seconds = (n - 1) * HOP_S + WINDOW_S

    def batch():
        return biofed_chain(w, mean, scale, basis)

    def per_window():
        for i in range(n):
            biofed_chain({m: x[i : i + 1] for m, x in w.items()}, mean, scale, basis)

    out = {"stream_seconds": stream_seconds, "n_windows": n, "limits": limits}
    for name, fn in (("batch", batch), ("per_window", per_window)):
        times = _times(fn, repeats)
        med = float(np.median(times))
        out[name] = {"median_s": med, "min_s": min(times), "max_s": max(times), "rtf": stream_seconds / med}
    # Where a live device spends its time: each stage called once per window.
    singles = [{m: x[i : i + 1] for m, x in w.items()} for i in range(n)]
    rows = [biofed_features(one) for one in singles]
    stages = {
        name: (lambda stage=stage: [stage(one) for one in singles]) for name, stage in FEATURE_STAGES.items()
    }
    stages["transform (k=32)"] = lambda: [transform(row, basis.T, mean=mean, scale=scale) for row in rows]
    out["per_window_stage_ms"] = {name: 1e3 * float(np.median(_times(fn, repeats))) / n for name, fn in stages.items()}
    return out


def _times(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call (cache load)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def first_window() -> dict:
    """Compute the first window of a fresh stream with a given basis (what a device does at boot)."""
    stream = make_stream(WINDOW_S, random_state=3)
    w = windows_of(stream)
    features = biofed_features(w)
    d = features.shape[1]
    basis = np.linalg.qr(np.random.default_rng(4).standard_normal((d, K)))[0].T
    out = transform(features, basis.T, mean=np.zeros(d), scale=np.ones(d))
    return {"shape": list(out.shape), "finite": bool(np.isfinite(out).all())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    rtf = sub.add_parser("rtf", help="real-time factor on one core")
    rtf.add_argument("--seconds", type=float, default=300.0)
    rtf.add_argument("--repeats", type=int, default=5)
    sub.add_parser("warm", help="compute one window and report")
    args = parser.parse_args(argv)
    result = measure_rtf(args.seconds, args.repeats) if args.mode == "rtf" else first_window()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
