"""The device stream profile and the biofed fusion chain, runnable as a fresh process.

Profile: 19-channel EEG at 500 Hz, one audio channel at 16 kHz and 4 biosensors at 250 Hz
(ECG, PPG, EDA, respiration), 2 s windows with a 1 s hop. Chain per window: EEG log band
powers, audio log-mel energies, biosensor window statistics and ECG/PPG heart-rate
features -> one feature row -> fused standardize-and-project transform onto a k=32 basis.
The chain is configured once (:class:`Chain`: the spectral plans of the device's feature layout,
transform plan, precision) and then applied either to all windows of a recorded stream at once
(each shared Welch segment transformed once) or window by window as a device does
(:class:`ChainStream`: the device's streaming pipeline, one push per modality and 1 s hop,
reusing the previous window's segments).

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
    SpectralPlan,
    apply_transform,
    heart_rate_features,
    moments_init,
    moments_scale,
    moments_update,
    sliding_spectral_features,
    sliding_windows,
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


FS = {"eeg": EEG_FS, "audio": AUDIO_FS, "bio": BIO_FS}
WINDOW = {m: int(WINDOW_S * fs) for m, fs in FS.items()}
HOP = {m: int(HOP_S * fs) for m, fs in FS.items()}


def windows_of(stream: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Window every modality with biofed's zero-copy ``sliding_windows`` (2 s window, 1 s hop)."""
    return {m: sliding_windows(x, WINDOW[m], HOP[m]) for m, x in stream.items()}


def profile_layout(config=None):
    """The device's :class:`biofed.model.FeatureLayout` of the profile (``PipelineConfig()`` settings)."""
    from biofed.edge.pipeline import PipelineConfig
    from biofed.model import FeatureLayout

    eeg = tuple(f"E{i:02d}" for i in range(EEG_CHANNELS))
    bio = (("ECG", "ecg"), ("PPG", "ppg"), ("EDA", "eda"), ("RESP", "resp"))
    return FeatureLayout.from_channels({
        "eeg": (EEG_FS, eeg, ("eeg",) * EEG_CHANNELS), "audio": (AUDIO_FS, ("PCG",), ("audio",)),
        "bio": (BIO_FS, tuple(n for n, _ in bio), tuple(t for _, t in bio)),
    }, PipelineConfig() if config is None else config)  # fmt: skip


def layout_columns(layout) -> np.ndarray:
    """The column of the device's feature row (``layout``'s order) of each feature of
    :meth:`Chain.features` (and of the baselines): the same except for the biosensors, whose
    heart-rate features follow their channel's statistics in the device's row."""
    bio = layout.modality("bio")
    statistics, heart_rate = bio.bio_columns()
    before = layout.n_features - bio.n_features
    return np.concatenate([np.arange(before), before + np.array(statistics + heart_rate)])


#: The per-window stages a device computes, each in one jitted call per push of its modality.
STAGE_MODALITIES = {
    "eeg band powers": "eeg",
    "audio log-mel": "audio",
    "biosensor statistics + heart rate": "bio",
}


def new_segments(plan: SpectralPlan, hop: int) -> int:
    """Segments a window transforms when the previous window's are kept: ``hop / step`` when
    consecutive windows share segments, else all ``n_seg``."""
    return min(plan.n_seg, hop // plan.step) if hop % plan.step == 0 else plan.n_seg


class Chain:
    """The fusion chain configured once: spectral plans, precision and (optionally) the projection.

    The spectral plans are those of the device's feature layout (:func:`profile_layout`), whose
    Welch segment length lets consecutive windows share segments. Called on a recorded stream
    (``{modality: (n_channels, n_samples)}``) it computes the rows of all its windows, each
    distinct segment once (:func:`biofed.kernels.sliding_spectral_features`).

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
        layout = profile_layout()
        self.plans: dict[str, SpectralPlan] = {m: layout.spectral_plan(layout.modality(m)) for m in ("eeg", "audio")}
        self.channels = {m: layout.modality(m).n_channels for m in self.plans}
        self.basis, self.mean, self.scale = basis, mean, scale
        self.projection = None if basis is None else transform_plan(np.asarray(basis).T, mean=mean, scale=scale)
        #: The feature stages in feature-row order: name -> f(stream dict) -> (n_windows, ch, f).
        self.stages = {
            "eeg band powers": lambda x: self._spectral("eeg", x),
            "audio log-mel": lambda x: self._spectral("audio", x),
            "bio window statistics": lambda x: window_statistics(windows_of({"bio": x["bio"]})["bio"], BIO_FS),
            "ecg/ppg heart rate": lambda x: heart_rate_features(
                windows_of({"bio": x["bio"][:HEART_CHANNELS]})["bio"], BIO_FS
            ),
        }

    def _spectral(self, modality: str, x: dict[str, np.ndarray]) -> np.ndarray:
        return sliding_spectral_features(x[modality], HOP[modality], self.plans[modality], dtype=self.dtype)

    def features(self, x: dict[str, np.ndarray]) -> np.ndarray:
        """One float64 feature row per window of the stream ``x``, (n_windows, n_features)."""
        parts = [stage(x) for stage in self.stages.values()]
        return np.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1, dtype=np.float64)

    def __call__(self, x: dict[str, np.ndarray]) -> np.ndarray:
        """features -> fused standardize-and-project transform: (n_windows, k)."""
        return apply_transform(self.features(x), self.projection)

    def rffts_per_window(self) -> dict[str, dict]:
        """Per spectral stage (named as in :data:`STAGE_MODALITIES`): the rffts one window needs
        when the previous window's segments are kept (``rffts``), and their length (``nperseg``)."""
        return self._rffts(new_segments)

    def rffts_in_batch(self, n_windows: int) -> dict[str, dict]:
        """Per spectral stage, as :meth:`rffts_per_window`: the rffts of the batch chain on a stream
        of ``n_windows`` windows, which transforms each distinct segment once (the first window's
        ``n_seg``, then each later window's new ones)."""
        return self._rffts(lambda plan, hop: plan.n_seg + (n_windows - 1) * new_segments(plan, hop))

    def _rffts(self, segments) -> dict[str, dict]:
        """``{stage: {"rffts": channels x segments(plan, hop), "nperseg": ...}}`` of the spectral stages."""
        return {
            name: {"rffts": self.channels[m] * segments(self.plans[m], HOP[m]), "nperseg": self.plans[m].nperseg}
            for name, m in STAGE_MODALITIES.items()
            if m in self.plans
        }

    def streaming(self, modalities: tuple[str, ...] = tuple(FS)) -> ChainStream:
        """A window-by-window chain (:class:`ChainStream`) with this configuration, of ``modalities``."""
        return ChainStream(self, modalities)


class ChainStream:
    """The chain applied one window per 1 s hop, as a device runs it on its live stream.

    A :class:`biofed.edge.pipeline.StreamingPipeline` of the profile's layout, in the chain's
    precision and with its projection, fed each window's new samples (:func:`live_chunks`):
    its streams buffer them, keep the previous window's Welch segments and compute each
    modality's features in one jitted call per push, and the last push of a window joins and
    projects the row. ``modalities`` restricts it to some modalities (the per-stage profile);
    without a projection the raw feature row is returned. :meth:`run` starts a new stream, so
    windows come in order from 0.
    """

    def __init__(self, chain: Chain, modalities: tuple[str, ...] = tuple(FS)) -> None:
        from biofed.edge.pipeline import PipelineConfig, StreamingPipeline

        self.modalities = modalities
        config = PipelineConfig(modalities=modalities, dtype=chain.dtype.name, max_pending_windows=None)
        layout = profile_layout(config)
        basis = None
        if chain.basis is not None and modalities == tuple(FS):
            # the chain's columns in the device row's order, so that both project the same features
            columns = layout_columns(layout)
            basis = (np.empty_like(chain.basis), np.empty_like(chain.mean), np.empty_like(chain.scale))
            basis[0][:, columns], basis[1][columns], basis[2][columns] = chain.basis, chain.mean, chain.scale
        self.pipeline = StreamingPipeline(config, layout, basis)

    def __call__(self, chunks: dict[str, np.ndarray]) -> np.ndarray:
        """The row of the window that ``chunks`` (modality -> its new samples) completes:
        projected (k,), or raw features (n_features,)."""
        rows = []
        for m in self.modalities:
            rows = self.pipeline.push(m, chunks[m])
        return rows[0].vector

    def run(self, chunks: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Every window of a stream in order (:func:`live_chunks`), one call each, on a new
        stream: (n_windows, k)."""
        self.pipeline.flush()
        return np.stack([self(new) for new in chunks])


def stage_streams(chain: Chain) -> dict[str, ChainStream]:
    """One window-by-window chain per stage: a device pipeline of that stage's modality alone."""
    return {name: chain.streaming((m,)) for name, m in STAGE_MODALITIES.items()}


def single_windows(w: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Window ``i`` of every modality as ``{modality: (1, n_channels, window)}``, for i in order."""
    return [{m: x[i : i + 1] for m, x in w.items()} for i in range(w["eeg"].shape[0])]


def live_chunks(singles: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The samples each window of :func:`single_windows` adds to the stream, as a source delivers
    them (C-contiguous ``(n_channels, n)``): the whole first window, then each window's last hop."""
    return [
        {m: np.ascontiguousarray(x[0] if i == 0 else x[0, :, x.shape[2] - HOP[m] :]) for m, x in one.items()}
        for i, one in enumerate(singles)
    ]


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


def fft_probe(nperseg: int, dtype, total_rows: int, rows: int = 256):
    """A function that runs rocket-fft's rfft on ``total_rows`` rows of ``nperseg`` points, in
    calls of ``rows`` contiguous rows; its ``flops`` attribute counts them. The rate of its best
    run is the machine's limit for those FFTs (:func:`measure_rtf` gives it the rffts the
    per-window chain performs on a stream, and times it between the chain's runs)."""
    x = np.random.default_rng(0).standard_normal((rows, nperseg)).astype(dtype)
    calls = max(1, -(-total_rows // rows))

    def probe() -> None:
        for _ in range(calls):
            _rfft_rows(x)

    probe.flops = calls * rows * rfft_flops(nperseg)
    return probe


def _pipeline_replay(stream: dict[str, np.ndarray], pipe):
    """A function replaying ``stream`` in 1 s chunks through the device pipeline ``pipe``
    (a :class:`ChainStream`'s, configured once as a device configures it when it starts).

    Each replay starts a new stream on it (:meth:`~biofed.edge.pipeline.StreamingPipeline.flush`:
    empty buffers, no kept segments, time 0), so it times the streaming, not the set-up.
    """
    seconds = stream["eeg"].shape[1] / EEG_FS

    def replay() -> int:
        pipe.flush()
        rows = 0
        for t in range(int(seconds)):
            for m, x in stream.items():
                rows += len(pipe.push(m, x[:, int(t * FS[m]) : int((t + 1) * FS[m])], label="rest"))
        return rows

    return replay


def measure_rtf(seconds: float, repeats: int) -> dict:
    """Real-time factor (stream seconds / compute seconds) of the chain on one core, and where it spends its time.

    ``batch``: all windows of the stream at once, each shared segment transformed once (with its
    ``rffts`` and their FFT limit for the whole stream, ``fft_limit_s``).
    ``per_window``: one call per 1 s hop with a single window, reusing the previous window's
    segments, as a device processes its stream live (:class:`ChainStream`: the device's
    pipeline fed each window's new samples). ``replay``: the stream pushed in 1 s chunks
    through :class:`biofed.edge.pipeline.StreamingPipeline` (buffers, labels and projection
    included; configured once, a new stream per replay). ``stages``: each stage of the
    per-window chain (:func:`stage_streams`, and the projection of its rows), its median and
    best time per window and its FFT limit: the rffts it performs per window (only the new
    segments) divided by the best rate of rocket-fft's rfft of that length (``fft``).

    Every repeat times each of these once, in turn, with the FFT probes (:func:`fft_probe`: as
    many rffts as the per-window chain performs on the stream) among them, so that the chain
    and the limit it is compared with are measured under the same load of a shared machine.
    """
    limits = _limit_to_one_core()
    stream = make_stream(seconds, random_state=1)
    mean, scale, basis = fit_projection(Chain("float64").features(make_stream(60.0, random_state=2)))
    w = windows_of(stream)
    n = w["eeg"].shape[0]
    stream_seconds = (n - 1) * HOP_S + WINDOW_S
    chunks = live_chunks(single_windows(w))
    chains = {dtype: Chain(dtype, mean, scale, basis) for dtype in ("float32", "float64")}
    streams = {dtype: chain.streaming() for dtype, chain in chains.items()}
    replay = _pipeline_replay(stream, streams["float32"].pipeline)
    out = {"stream_seconds": stream_seconds, "n_windows": n, "limits": limits}
    runs = {
        "batch": lambda: chains["float32"](stream),
        "per_window": lambda: streams["float32"].run(chunks),
        "per_window_float64": lambda: streams["float64"].run(chunks),
        "replay": replay,
    }
    chain = chains["float32"]
    ffts = chain.rffts_per_window()
    sizes = sorted({f["nperseg"] for f in ffts.values()})
    probes = {
        (size, dtype): fft_probe(size, dtype, n * sum(f["rffts"] for f in ffts.values() if f["nperseg"] == size))
        for size in sizes
        for dtype in ("float32", "float64")
    }
    rows = chain.features(stream)
    stage_fns = {name: (lambda live=live: live.run(chunks)) for name, live in stage_streams(chain).items()}
    stage_fns["transform (k=32)"] = lambda: [apply_transform(rows[i : i + 1], chain.projection) for i in range(n)]
    times = _interleaved_times({**runs, **probes, **stage_fns}, repeats)
    for name in runs:
        med = float(np.median(times[name]))
        out[name] = {"median_s": med, "min_s": min(times[name]), "max_s": max(times[name]), "rtf": stream_seconds / med}
    rate = {
        size: {dtype: probes[size, dtype].flops / min(times[size, dtype]) / 1e9 for dtype in ("float32", "float64")}
        for size in sizes
    }
    out["fft"] = {str(size): {"gflops": rate[size], "flops_per_rfft": rfft_flops(size)} for size in sizes}

    def limit_s(fft: dict) -> float:
        """Seconds of ``fft["rffts"]`` rffts of ``fft["nperseg"]`` points at the best float32 rate."""
        return fft["rffts"] * rfft_flops(fft["nperseg"]) / (rate[fft["nperseg"]]["float32"] * 1e9)

    batch_ffts = chain.rffts_in_batch(n).values()
    out["batch"]["rffts"] = sum(f["rffts"] for f in batch_ffts)
    out["batch"]["fft_limit_s"] = sum(limit_s(f) for f in batch_ffts)
    stages = {}
    for name in stage_fns:
        fft = ffts.get(name, {"rffts": 0, "nperseg": sizes[0]})
        stages[name] = {
            "ms_per_window": 1e3 * float(np.median(times[name])) / n,
            "best_ms_per_window": 1e3 * min(times[name]) / n,
            "rffts_per_window": fft["rffts"],
            "nperseg": fft["nperseg"],
            "fft_limit_ms": 1e3 * limit_s(fft),
        }
    out["stages"] = stages
    return out


def _interleaved_times(fns: dict, repeats: int) -> dict:
    """CPU seconds of ``repeats`` calls of each of ``fns`` (name -> function), after one warm-up
    call each (cache load); each repeat calls every function once, in turn, so that all are
    timed under the same load of a shared machine.

    CPU time of this thread (:func:`time.thread_time`), not wall time: the process is pinned to
    one core with one BLAS and Numba thread, so this is the core's work for the stream, and
    the time the core spends on other processes of a shared machine (a timed run of a whole
    stream spans several of the scheduler's slices) is not counted.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)
    return times


def first_window() -> dict:
    """Compute the first window of a fresh stream with a given basis (what a device does at boot)."""
    x = make_stream(WINDOW_S, random_state=3)
    d = Chain("float32").features(x).shape[1]
    basis = np.linalg.qr(np.random.default_rng(4).standard_normal((d, K)))[0].T
    out = Chain("float32", np.zeros(d), np.ones(d), basis)(x)
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
