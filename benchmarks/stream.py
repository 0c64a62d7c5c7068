"""The device stream profile and the biofed fusion chain, runnable as a fresh process.

Profile: 19-channel EEG at 500 Hz, one audio channel at 16 kHz and 4 biosensors at 250 Hz
(ECG, PPG, EDA, respiration), 2 s windows with a 1 s hop. Chain per window: EEG log band
powers, audio log-mel energies, biosensor window statistics and ECG/PPG heart-rate
features -> one feature row -> fused standardize-and-project transform onto a k=32 basis.
The chain is configured once (:class:`Chain`: spectral plans, transform plan, precision) and
then applied to every window, as a device does.

Imported by :mod:`biofed.benchmarks.suite` for the in-process comparison, and run as a script
(``python -m biofed.benchmarks.stream rtf|warm``) by the real-time-factor and warm-start measurements, which
need a fresh interpreter. It imports NumPy, Numba (for the FFT-rate probe) and biofed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import rocket_fft  # noqa: F401  -- np.fft inside @njit, the FFT the spectral kernels use
from numba import njit

from biofed.kernels import (
    apply_transform,
    band_power_plan,
    heart_rate_features,
    log_band_energy_plan,
    moments_init,
    moments_scale,
    moments_update,
    sliding_windows,
    spectral_features,
    transform_plan,
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
    audio = (
        0.3 * np.sin(2 * np.pi * 220.0 * ta) * (1 + np.sin(2 * np.pi * 0.5 * ta)) + 0.05 * rng.standard_normal(ta.size)
    )[None]
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


class Chain:
    """The fusion chain configured once: spectral plans, precision and (optionally) the projection.

    Parameters
    ----------
    dtype : {"float32", "float64"}
        Precision of the spectral stages (the device default is float32); biosensor features
        and the projection run in float64, as in :class:`biofed.edge.pipeline.StreamingPipeline`.
    mean, scale, basis : ndarray or None
        Standardization (d,) and k=32 basis (k, d) of the projection; ``None`` = features only.
    """

    def __init__(self, dtype: str = "float32", mean=None, scale=None, basis=None) -> None:
        self.dtype = np.dtype(dtype)
        self.eeg_plan = band_power_plan(EEG_FS, int(WINDOW_S * EEG_FS), log=True)
        self.audio_plan = log_band_energy_plan(AUDIO_FS, int(WINDOW_S * AUDIO_FS), n_bands=N_MELS)
        self.projection = None if basis is None else transform_plan(np.asarray(basis).T, mean=mean, scale=scale)
        #: The feature stages in feature-row order: name -> f(windows dict) -> (n, ch, f).
        self.stages = {
            "eeg band powers": lambda w: spectral_features(
                np.ascontiguousarray(w["eeg"], dtype=self.dtype), self.eeg_plan
            ),
            "audio log-mel": lambda w: spectral_features(
                np.ascontiguousarray(w["audio"], dtype=self.dtype), self.audio_plan
            ),
            "bio window statistics": lambda w: window_statistics(w["bio"], BIO_FS),
            "ecg/ppg heart rate": lambda w: heart_rate_features(w["bio"][:, :HEART_CHANNELS], BIO_FS),
        }

    def features(self, w: dict[str, np.ndarray]) -> np.ndarray:
        """One float64 feature row per window, (n_windows, n_features); ``w`` maps modality -> windows."""
        n = w["eeg"].shape[0]
        return np.concatenate([stage(w).reshape(n, -1) for stage in self.stages.values()], axis=1, dtype=np.float64)

    def __call__(self, w: dict[str, np.ndarray]) -> np.ndarray:
        """features -> fused standardize-and-project transform: (n_windows, k)."""
        return apply_transform(self.features(w), self.projection)

    def ffts_per_window(self) -> dict[str, int]:
        """rffts of ``nperseg`` points per window for each spectral stage (no segment is shared
        between windows of this profile: its hop is not a multiple of the segment step)."""
        return {"eeg band powers": EEG_CHANNELS * self.eeg_plan.n_seg, "audio log-mel": self.audio_plan.n_seg}


def fit_projection(features: np.ndarray, k: int = K, random_state=0):
    """Standardization (mergeable moments) and the k=32 basis of the standardized features.

    Returns ``mean (d,)``, ``scale (d,)`` and ``basis (k, d)``; fitted once, outside timing.
    """
    moments = moments_update(moments_init(features.shape[1]), features)
    scale = moments_scale(moments)
    _, _, basis = truncated_svd((features - moments.mean) / scale, k, random_state=random_state)
    return moments.mean, scale, basis


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


@njit(cache=True)
def _rfft_rows(x):
    return np.fft.rfft(x)


def rfft_flops(n: int) -> float:
    """Conventional flop count of a real FFT of ``n`` points: half of the complex ``5 n log2 n``."""
    return 2.5 * n * math.log2(n)


def measure_fft_rate(nperseg: int, dtype, repeats: int, rows: int = 256) -> float:
    """GFLOP/s of rocket-fft's rfft on ``rows`` contiguous rows of ``nperseg`` points (best of ``repeats``).

    The best repeat, not the median: this is the machine's limit for the FFTs the chain needs.
    """
    x = np.random.default_rng(0).standard_normal((rows, nperseg)).astype(dtype)
    best = min(_times(lambda: _rfft_rows(x), max(repeats, 20)))
    return rows * rfft_flops(nperseg) / best / 1e9


def _pipeline_replay(stream: dict[str, np.ndarray], mean, scale, basis):
    """A StreamingPipeline (device defaults) with the basis, and a function replaying ``stream`` in 1 s chunks."""
    from biofed.edge.pipeline import PipelineConfig, StreamingPipeline
    from biofed.model import Basis, FeatureLayout

    config = PipelineConfig(max_pending_windows=None)
    eeg = tuple(f"E{i:02d}" for i in range(EEG_CHANNELS))
    bio = (("ECG", "ecg"), ("PPG", "ppg"), ("EDA", "eda"), ("RESP", "resp"))
    layout = FeatureLayout.from_channels({
        "eeg": (EEG_FS, eeg, ("eeg",) * EEG_CHANNELS), "audio": (AUDIO_FS, ("PCG",), ("audio",)),
        "bio": (BIO_FS, tuple(n for n, _ in bio), tuple(t for _, t in bio)),
    }, config)  # fmt: skip
    rates = {"eeg": EEG_FS, "audio": AUDIO_FS, "bio": BIO_FS}
    seconds = stream["eeg"].shape[1] / EEG_FS

    def replay() -> int:
        pipe = StreamingPipeline(config, layout, Basis(np.asarray(basis), np.asarray(mean), np.asarray(scale)))
        rows = 0
        for t in range(int(seconds)):
            for m, x in stream.items():
                rows += len(pipe.push(m, x[:, int(t * rates[m]) : int((t + 1) * rates[m])], label="rest"))
        return rows

    return replay


def measure_rtf(seconds: float, repeats: int) -> dict:
    """Real-time factor (stream seconds / compute seconds) of the chain on one core, and where it spends its time.

    ``batch``: all windows of the stream in one call per kernel. ``per_window``: one call
    per 1 s hop with a single window, as a device processes its stream live. ``replay``: the
    stream pushed in 1 s chunks through :class:`biofed.edge.pipeline.StreamingPipeline`
    (buffers, plans, labels, sketch and projection included). ``stages``: each stage called
    once per window, its median and best time per window and its FFT limit: the rffts it
    needs divided by the best rfft rate measured in this process.
    """
    limits = _limit_to_one_core()
    stream = make_stream(seconds, random_state=1)
    mean, scale, basis = fit_projection(Chain("float64").features(windows_of(make_stream(60.0, random_state=2))))
    w = windows_of(stream)
    n = w["eeg"].shape[0]
    stream_seconds = (n - 1) * HOP_S + WINDOW_S
    singles = [{m: x[i : i + 1] for m, x in w.items()} for i in range(n)]
    chains = {dtype: Chain(dtype, mean, scale, basis) for dtype in ("float32", "float64")}
    replay = _pipeline_replay(stream, mean, scale, basis)
    out = {"stream_seconds": stream_seconds, "n_windows": n, "limits": limits}
    runs = {
        "batch": lambda: chains["float32"](w),
        "per_window": lambda: [chains["float32"](one) for one in singles],
        "per_window_float64": lambda: [chains["float64"](one) for one in singles],
        "replay": replay,
    }
    for name, fn in runs.items():
        times = _times(fn, repeats)
        med = float(np.median(times))
        out[name] = {"median_s": med, "min_s": min(times), "max_s": max(times), "rtf": stream_seconds / med}
    chain = chains["float32"]
    nperseg = chain.eeg_plan.nperseg
    assert chain.audio_plan.nperseg == nperseg  # one FFT size: one measured rate
    rate = {dtype: measure_fft_rate(nperseg, dtype, repeats) for dtype in ("float32", "float64")}
    out["fft"] = {"nperseg": nperseg, "gflops": rate, "flops_per_rfft": rfft_flops(nperseg)}
    rows = [chain.features(one) for one in singles]
    stage_fns = {name: (lambda stage=stage: [stage(one) for one in singles]) for name, stage in chain.stages.items()}
    stage_fns["transform (k=32)"] = lambda: [apply_transform(row, chain.projection) for row in rows]
    ffts = chain.ffts_per_window()
    stages = {}
    for name, fn in stage_fns.items():
        times = _times(fn, repeats)
        stages[name] = {
            "ms_per_window": 1e3 * float(np.median(times)) / n,
            "best_ms_per_window": 1e3 * min(times) / n,
            "rffts_per_window": ffts.get(name, 0),
            "fft_limit_ms": 1e3 * ffts.get(name, 0) * rfft_flops(nperseg) / (rate["float32"] * 1e9),
        }
    out["stages"] = stages
    return out


def _times(fn, repeats: int) -> list[float]:
    """CPU seconds of ``repeats`` calls of ``fn`` after one warm-up call (cache load).

    CPU time of this thread (:func:`time.thread_time`), not wall time: the process is pinned to
    one core with one BLAS and Numba thread, so this is the core's work for the stream, and
    the time the core spends on other processes of a shared machine (a timed run of a whole
    stream spans several of the scheduler's slices) is not counted.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return times


def first_window() -> dict:
    """Compute the first window of a fresh stream with a given basis (what a device does at boot)."""
    w = windows_of(make_stream(WINDOW_S, random_state=3))
    d = Chain("float32").features(w).shape[1]
    basis = np.linalg.qr(np.random.default_rng(4).standard_normal((d, K)))[0].T
    out = Chain("float32", np.zeros(d), np.ones(d), basis)(w)
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
