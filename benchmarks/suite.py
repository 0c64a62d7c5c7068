"""The benchmark cases: shapes, baselines, output checks and the performance targets.

Each case times biofed and its baselines on the same float64 input in the same run
(:func:`biofed.benchmarks.harness.measure_interleaved`: a warm-up call first, reported as the first-call
(compile) time, then ``repeats`` timed calls, interleaved) and records the outputs' difference.
``--quick`` uses fewer repeats and shorter streams but keeps the per-window pipeline shapes
(2 s windows of the stream profile) and the SVD target shapes. Cases run with one BLAS
thread per library (see ``_one_blas_thread``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biofed.benchmarks import baselines, stream
from biofed.benchmarks.coordinator_memory import case_coordinator_memory
from biofed.benchmarks.fleet import case_fleet_privacy
from biofed.benchmarks.harness import (
    CaseResult,
    Comparison,
    Metric,
    Table,
    Target,
    machine_info,
    max_relative_difference,
    measure,
    measure_interleaved,
)
from biofed.benchmarks.privacy import case_privacy_ledger

logger = logging.getLogger(__name__)

__all__ = ["CASES", "Settings", "machine_info", "run_case"]

#: Output-equality tolerance for the kernels against their baselines (float64 in, float64 out).
EQUAL_TOL = 1e-6
#: The float64 fusion chain against MNE + SciPy: identical up to rounding.
CHAIN_TOL = 1e-12


@dataclass(frozen=True)
class Settings:
    """How hard to run: ``quick`` shortens streams; ``repeats`` timed calls per function."""

    quick: bool = False
    repeats: int = 20
    seed: int = 0

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def reps(self, fraction: float = 1.0) -> int:
        """Repeats scaled down for the expensive functions (at least 3)."""
        return max(3, int(round(self.repeats * fraction)))


def _compare(
    result: CaseResult,
    case: str,
    shape: str,
    biofed_fn,
    baselines_: dict[str, Callable],
    *,
    repeats: int,
    tolerance: float = EQUAL_TOL,
    note: str = "",
) -> list[Comparison]:
    """Time ``biofed_fn`` and every baseline on the same input, their repeats interleaved; record
    the outputs' difference."""
    runs = measure_interleaved(
        {"biofed": biofed_fn, **{f"baseline {n}": f for n, f in baselines_.items()}}, repeats=repeats
    )
    timing, out = runs["biofed"]
    rows = []
    for name in baselines_:
        base_timing, expected = runs[f"baseline {name}"]
        rel = max_relative_difference(out, expected)
        rows.append(Comparison(case, shape, timing, name, base_timing, rel, tolerance, note))
    result.comparisons.extend(rows)
    return rows


# --- kernels ------------------------------------------------------------------------------
def case_windowing(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import sliding_windows

    x = stream.make_stream(s.seconds(600, 120), s.seed)["eeg"]
    window, hop = int(stream.WINDOW_S * stream.EEG_FS), int(stream.HOP_S * stream.EEG_FS)
    _compare(
        result,
        "sliding_windows",
        f"{x.shape} w={window} h={hop}",
        lambda: sliding_windows(x, window, hop),
        {"numpy sliding_window_view": lambda: baselines.sliding_windows_numpy(x, window, hop)},
        repeats=s.repeats,
        tolerance=0.0,
        note="both are zero-copy views",
    )


def case_band_powers(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import band_powers, sliding_windows

    x = stream.make_stream(s.seconds(600, 60), s.seed)["eeg"]
    w = np.ascontiguousarray(
        sliding_windows(x, int(stream.WINDOW_S * stream.EEG_FS), int(stream.HOP_S * stream.EEG_FS))
    )
    fs, nperseg = stream.EEG_FS, 512  # the documented default: min(window, next power of two >= fs)
    _compare(
        result,
        "band_powers",
        f"{w.shape} fs={fs:g}",
        lambda: band_powers(w, fs),
        {
            "scipy welch + band sums": lambda: baselines.band_powers_scipy(
                w, fs, baselines.EEG_BANDS_HZ, nperseg=nperseg
            ),
            "mne psd_array_welch + sums": lambda: baselines.band_powers_mne(
                w, fs, baselines.EEG_BANDS_HZ, nperseg=nperseg
            ),
        },
        repeats=s.reps(0.5),
    )


def case_log_band_energies(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import log_band_energies, sliding_windows

    x = stream.make_stream(s.seconds(300, 30), s.seed)["audio"]
    fs = stream.AUDIO_FS
    w = np.ascontiguousarray(sliding_windows(x, int(stream.WINDOW_S * fs), int(stream.HOP_S * fs)))
    _compare(
        result,
        "log_band_energies",
        f"{w.shape} fs={fs:g}",
        lambda: log_band_energies(w, fs, n_bands=stream.N_MELS),
        {"scipy welch frames + mel bank": lambda: baselines.log_mel_scipy(w, fs, n_bands=stream.N_MELS, nperseg=512)},
        repeats=s.reps(0.5),
    )


def case_heart_rate(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import heart_rate_features, sliding_windows

    x = stream.make_stream(s.seconds(600, 120), s.seed)["bio"][: stream.HEART_CHANNELS]
    fs = stream.BIO_FS
    w = np.ascontiguousarray(sliding_windows(x, int(stream.WINDOW_S * fs), int(stream.HOP_S * fs)))
    _compare(
        result,
        "heart_rate_features",
        f"{w.shape} fs={fs:g}",
        lambda: heart_rate_features(w, fs),
        {"scipy find_peaks + numpy": lambda: baselines.heart_rate_scipy(w, fs)},
        repeats=s.reps(0.5),
    )


def case_window_statistics(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import sliding_windows, window_statistics

    x = stream.make_stream(s.seconds(1200, 300), s.seed)["bio"]
    w = np.ascontiguousarray(
        sliding_windows(x, int(stream.WINDOW_S * stream.BIO_FS), int(stream.HOP_S * stream.BIO_FS))
    )
    _compare(
        result,
        "window_statistics",
        f"{w.shape} fs={stream.BIO_FS:g}",
        lambda: window_statistics(w, stream.BIO_FS),
        {"numpy mean/std/lstsq/min/max": lambda: baselines.window_statistics_numpy(w, stream.BIO_FS)},
        repeats=s.repeats,
    )


def _sizes(s: Settings) -> tuple[int, ...]:
    """Row counts of the transform / project sweep: one window, a few, a replayed recording, a training set."""
    return (1, 16, 256, 5000) if s.quick else (1, 16, 256, 5000, 20000)


def case_transform(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import apply_transform, transform, transform_plan

    rng = np.random.default_rng(s.seed)
    d, m = 151, 32
    W, b = rng.standard_normal((d, m)) / np.sqrt(d), rng.standard_normal(m)
    ratios = []
    for n in _sizes(s):
        X = rng.standard_normal((n, d)) * 3.0 + 1.0
        mean, scale = X.mean(axis=0), X.std(axis=0) + 0.1
        plan = transform_plan(W, b, mean=mean, scale=scale, activation="relu")
        reps = 4 * s.repeats if n >= 256 else 50 * s.repeats  # 4x: a load burst spans several long calls
        rows = _compare(
            result,
            "transform[relu] (plan)",
            f"({n}, {d}) @ ({d}, {m})",
            lambda: apply_transform(X, plan),
            {"numpy ((X-mean)/scale)@W+b": lambda: baselines.transform_numpy(X, W, b, mean, scale, "relu")},
            repeats=reps,
            note="parameters validated once (transform_plan); features validated per call",
        )
        ratios.append(rows[0].ratio)
        if n == 5000:
            for activation in ("identity", "relu"):
                _compare(
                    result,
                    f"transform[{activation}]",
                    f"({n}, {d}) @ ({d}, {m})",
                    lambda a=activation: transform(X, W, b, mean=mean, scale=scale, activation=a),
                    {
                        "numpy ((X-mean)/scale)@W+b": lambda a=activation: baselines.transform_numpy(
                            X, W, b, mean, scale, a
                        )
                    },
                    repeats=s.repeats,
                    note="one call: every argument validated",
                )
    result.targets.append(
        Target(f"transform (plan) >= 1x NumPy at every size {_sizes(s)}", min(ratios), ">=", 1.0, "x")
    )


def case_stats(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import moments_init, moments_merge, moments_scale, moments_update

    rng = np.random.default_rng(s.seed)
    n, d = (50000 if not s.quick else 10000), 151
    X = rng.standard_normal((n, d)) * 2.0 + 5.0

    def biofed_fn():
        m = moments_update(moments_init(d), X)
        return np.concatenate([[m.count], m.mean, m.m2])

    def numpy_fn():
        count, mean, m2 = baselines.moments_numpy(X)
        return np.concatenate([[count], mean, m2])

    _compare(
        result,
        "moments_update",
        f"({n}, {d})",
        biofed_fn,
        {"numpy mean / squared deviations": numpy_fn},
        repeats=s.repeats,
    )

    half = n // 2

    def merged():
        a = moments_update(moments_init(d), X[:half])
        b = moments_update(moments_init(d), X[half:])
        return moments_scale(moments_merge(a, b))

    _compare(
        result,
        "moments merge+scale",
        f"2 x ({half}, {d})",
        merged,
        {"numpy std over all rows": lambda: baselines.standard_scale_numpy(X)},
        repeats=s.repeats,
        note="two devices' statistics merged (Chan et al.) vs one pass over the pooled rows",
    )


def case_project(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import apply_transform, project, transform_plan

    rng = np.random.default_rng(s.seed)
    d, k = 151, 32
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0].T
    ratios = []
    for n in _sizes(s):
        X = rng.standard_normal((n, d)) * 3.0 + 1.0
        mean, scale = X.mean(axis=0), X.std(axis=0) + 0.1
        plan = transform_plan(basis.T, mean=mean, scale=scale)  # what StreamingPipeline.set_basis prepares
        reps = 4 * s.repeats if n >= 256 else 50 * s.repeats  # 4x: a load burst spans several long calls
        rows = _compare(
            result,
            "project (plan)",
            f"({n}, {d}) -> k={k}",
            lambda: apply_transform(X, plan),
            {"numpy ((X-mean)/scale)@basis.T": lambda: baselines.project_numpy(X, basis, mean, scale)},
            repeats=reps,
            note="basis validated once, as the pipeline does",
        )
        ratios.append(rows[0].ratio)
        if n == 5000:
            _compare(
                result,
                "project",
                f"({n}, {d}) -> k={k}",
                lambda: project(X, basis, mean=mean, scale=scale),
                {"numpy ((X-mean)/scale)@basis.T": lambda: baselines.project_numpy(X, basis, mean, scale)},
                repeats=s.repeats,
                note="one call: every argument validated",
            )
    result.targets.append(Target(f"project (plan) >= 1x NumPy at every size {_sizes(s)}", min(ratios), ">=", 1.0, "x"))


def _svd_test_matrix(n: int, d: int, rng) -> np.ndarray:
    """Feature-like matrix: a decaying rank-64 signal plus a noise floor."""
    r = 64
    decay = np.exp(-np.arange(r) / 8.0)
    return (rng.standard_normal((n, r)) * decay) @ rng.standard_normal((r, d)) + 0.05 * rng.standard_normal((n, d))


def case_svd(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import truncated_svd

    k = 32
    rng = np.random.default_rng(s.seed)
    for n, d in ((1024, 256), (20000, 512)):
        X = _svd_test_matrix(n, d, rng)
        optimal = float(np.sqrt(np.sum(np.linalg.svd(X, compute_uv=False)[k:] ** 2)))  # Eckart-Young
        shape = f"({n}, {d}) k={k}"
        reps = s.reps(1.0 if n < 5000 else 0.25)
        runs = {
            "biofed truncated_svd": lambda: truncated_svd(X, k, random_state=s.seed),
            "sklearn randomized_svd": lambda: baselines.randomized_svd_sklearn(X, k, s.seed),
            "sklearn TruncatedSVD": lambda: baselines.truncated_svd_sklearn(X, k, s.seed),
        }
        timings, errors, values = {}, {}, {}
        for name, fn in runs.items():
            timings[name], (U, S, Vt) = measure(fn, repeats=reps)
            # TruncatedSVD returns U * S already; the randomized ones return U.
            approx = (U if name == "sklearn TruncatedSVD" else U * S) @ Vt
            errors[name] = float(np.linalg.norm(X - approx)) / optimal
            values[name] = S
        ours = "biofed truncated_svd"
        rows = [
            Comparison(
                "truncated_svd",
                shape,
                timings[ours],
                name,
                timings[name],
                max_relative_difference(values[ours], values[name]),
                None,
                "max rel diff compares the k singular values",
            )
            for name in runs
            if name != ours
        ]
        result.comparisons.extend(rows)
        for name, err in errors.items():
            result.metrics.append(Metric("truncated_svd", f"{name} error / optimal {shape}", err, "x"))
        result.targets.append(Target(f"truncated_svd error <= 1.01x optimal {shape}", errors[ours], "<=", 1.01, "x"))
        result.targets.append(
            Target(f"truncated_svd >= 2x faster than randomized_svd {shape}", rows[0].ratio, ">=", 2.0, "x")
        )


def case_fd_sketch(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import fd_basis, fd_init, fd_update

    k, ell, chunk = 32, 64, 256
    n, d = (20000 if not s.quick else 5000), 151
    X = _svd_test_matrix(n, d, np.random.default_rng(s.seed))
    X -= X.mean(axis=0)  # centred, so the uncentred sketch and IncrementalPCA target the same subspace
    chunks = [X[i : i + chunk] for i in range(0, n, chunk)]
    optimal = float(np.sqrt(np.sum(np.linalg.svd(X, compute_uv=False)[k:] ** 2)))

    def sketch():
        b = fd_init(d, ell)
        for c in chunks:
            b = fd_update(b, c)
        return fd_basis(b, k)

    runs = {
        f"biofed fd_update (ell={ell}) + fd_basis": sketch,
        "sklearn IncrementalPCA.partial_fit": lambda: baselines.incremental_pca_sklearn(chunks, k),
        "numpy svd of all rows": lambda: baselines.exact_basis_numpy(X, k),
    }
    timings = {}
    for name, fn in runs.items():
        timings[name], basis = measure(fn, repeats=s.reps(0.25))
        error = float(np.linalg.norm(X - (X @ basis.T) @ basis)) / optimal
        result.metrics.append(Metric("fd_sketch", f"{name} basis error / optimal", error, "x"))
    ours, *others = runs
    shape = f"({n}, {d}) in {len(chunks)} chunks, k={k}"
    result.comparisons.extend(
        Comparison("fd_sketch", shape, timings[ours], name, timings[name], note="bases differ; see error / optimal")
        for name in others
    )


def case_training(s: Settings, result: CaseResult) -> None:
    from biofed.kernels import init_params, loss_and_grad

    rng = np.random.default_rng(s.seed)
    n, d, c = (8192 if not s.quick else 2048), stream.K, 2
    X = rng.standard_normal((n, d))
    y = (X[:, 0] + 0.5 * rng.standard_normal(n) > 0).astype(np.int64)
    for hidden in (0, 32):
        params = init_params(d, c, hidden, random_state=s.seed)
        label = "logistic" if hidden == 0 else f"mlp h={hidden}"

        def biofed_fn(p=params, h=hidden):
            loss, grad = loss_and_grad(p, X, y, c, h, l2=1e-3)
            return np.concatenate([[loss], grad])

        def numpy_fn(p=params, h=hidden):
            loss, grad = baselines.loss_and_grad_numpy(p, X, y, c, h, l2=1e-3)
            return np.concatenate([[loss], grad])

        _compare(
            result,
            f"loss_and_grad[{label}]",
            f"({n}, {d}) c={c}",
            biofed_fn,
            {"numpy forward/backward": numpy_fn},
            repeats=s.repeats,
        )


# --- the fusion chain ---------------------------------------------------------------------
def _float32_chain_tolerance(features: np.ndarray, scale: np.ndarray, basis: np.ndarray, expected: np.ndarray) -> float:
    """Bound on the float32 chain's scale-relative output difference implied by ``FLOAT32_RTOL``.

    Every spectral feature (all are logs) may move by ``FLOAT32_RTOL * max(1, |f|)``; the
    projection carries that through ``basis / scale``. Biosensor features are float64 in both.
    """
    from biofed.kernels import FLOAT32_RTOL

    n_spectral = stream.EEG_CHANNELS * 5 + stream.N_MELS
    slack = np.zeros(features.shape[1])
    slack[:n_spectral] = FLOAT32_RTOL * np.maximum(1.0, np.abs(features[:, :n_spectral]).max(axis=0))
    return float(np.max(np.abs(basis) @ (slack / scale)) / np.max(np.abs(expected)))


def case_chain(s: Settings, result: CaseResult) -> None:
    """The fusion chain on the device's features against MNE + SciPy with the same segment length.

    batch: all windows of a recorded stream at once; biofed transforms each shared Welch segment
    once, the baselines compute every window on its own (their batch API). per window: one call
    per 1 s hop; biofed keeps the previous window's segment powers as a device does
    (:class:`biofed.benchmarks.stream.ChainStream`), the baselines compute each window afresh.
    """
    seconds = s.seconds(300, 30)
    x = stream.make_stream(seconds, s.seed)
    w = stream.windows_of(x)
    singles = stream.single_windows(w)
    n = len(singles)
    # The basis is fitted once, outside timing, and both sides project with it.
    features = stream.Chain("float64").features(x)
    mean, scale, basis = stream.fit_projection(features, random_state=s.seed)
    chains = {dtype: stream.Chain(dtype, mean, scale, basis) for dtype in ("float32", "float64")}
    nperseg = {m: plan.nperseg for m, plan in chains["float64"].plans.items()}

    def theirs(eeg):
        return lambda w: baselines.chain(w, mean, scale, basis, eeg=eeg, nperseg=nperseg)

    def ours(dtype, mode):
        if mode == "batch":
            return lambda: chains[dtype](x)
        live, chunks = chains[dtype].streaming(), stream.live_chunks(singles)
        return lambda: live.run(chunks)

    def wrap(mode, f):
        return (lambda: f(w)) if mode == "batch" else (lambda: np.concatenate([f(one) for one in singles]))

    tolerance32 = _float32_chain_tolerance(features, scale, basis, theirs("mne")(w))
    segments = ", ".join(f"{m} nperseg {v}" for m, v in nperseg.items())
    for mode in ("batch", "per window"):
        rows = _compare(
            result,
            f"fusion chain ({mode})",
            f"{seconds:g} s stream, {n} windows, {segments}",
            ours("float32", mode),
            {"mne+scipy+numpy": wrap(mode, theirs("mne")), "scipy+numpy": wrap(mode, theirs("scipy"))},
            repeats=2 * s.repeats,  # the targets: more repeats steady the medians
            tolerance=tolerance32,
            note="device default: float32 spectral stages, shared Welch segments computed once; tolerance = "
            "FLOAT32_RTOL carried through the projection",
        )
        goal = 20.0 if mode == "per window" else 10.0
        result.targets.append(
            Target(f"fusion chain >= {goal:g}x faster than MNE/SciPy version ({mode})", rows[0].ratio, ">=", goal, "x")
        )
        result.targets.append(
            Target(
                f"fusion chain float32 max rel diff <= {tolerance32:.1e} ({mode})",
                max(r.rel_diff for r in rows),
                "<=",
                tolerance32,
            )
        )
        rows64 = _compare(
            result,
            f"fusion chain float64 ({mode})",
            f"{seconds:g} s stream, {n} windows, {segments}",
            ours("float64", mode),
            {"mne+scipy+numpy": wrap(mode, theirs("mne"))},
            repeats=s.reps(0.5),
            tolerance=CHAIN_TOL,
        )
        result.targets.append(
            Target(f"fusion chain float64 max rel diff <= {CHAIN_TOL:g} ({mode})", rows64[0].rel_diff, "<=", CHAIN_TOL)
        )


# --- trust: signed envelopes --------------------------------------------------------------
def _default_update(rng):
    """An update of the default model: logistic regression on k=32 features, 2 classes."""
    from biofed.kernels import n_params
    from biofed.protocol import Update, UpdateMetrics

    delta = rng.standard_normal(n_params(stream.K, 2, 0)) * 0.01
    metrics = UpdateMetrics(loss=0.6, n_windows=200, rss_bytes=80_000_000, cpu_time_s=0.2)
    return Update(round=7, basis_version=1, delta=delta, n_examples=200, clipped=False, metrics=metrics)


def case_signing(s: Settings, result: CaseResult) -> None:
    from biofed.protocol import Topics, decode_topic_message, encode_message
    from biofed.signing import KeyRing, Signer, Verifier

    update = _default_update(np.random.default_rng(s.seed))
    topics, device = Topics("bench"), "pi-01"
    topic = topics.update(device)
    signer = Signer.generate(device)
    verifier = Verifier(KeyRing({device: signer.public_key}), capacity=1_000_000)
    batch = 200  # messages per timed call: one update takes tens of microseconds

    def signed():
        for _ in range(batch):
            data = encode_message(update, fleet="bench", sender=device, signer=signer)
            message = decode_topic_message(topics, topic, data, verifier=verifier)
        return message.payload.delta

    def plain():
        for _ in range(batch):
            data = encode_message(update, fleet="bench", sender=device)
            message = decode_topic_message(topics, topic, data)
        return message.payload.delta

    shape = f"{batch} updates of {update.delta.size} float64 (k={stream.K} logreg, 2 classes)"
    timing_signed, out = measure(signed, repeats=s.reps(0.5))
    timing_plain, expected = measure(plain, repeats=s.reps(0.5))
    result.comparisons.append(
        Comparison(
            "signed envelope encode+decode",
            shape,
            timing_signed,
            "unsigned encode+decode",
            timing_plain,
            max_relative_difference(out, expected),
            0.0,
            "signed = Ed25519 sign + verify + replay checks; ratio < 1 is the overhead",
        )
    )
    per_signed, per_plain = timing_signed.median / batch, timing_plain.median / batch
    result.metrics.append(Metric("signing", "signed encode+decode per update", per_signed * 1e6, "us"))
    result.metrics.append(Metric("signing", "unsigned encode+decode per update", per_plain * 1e6, "us"))
    result.metrics.append(Metric("signing", "signature overhead per update", (per_signed - per_plain) * 1e6, "us"))
    sizes = (
        len(encode_message(update, fleet="bench", sender=device, signer=signer)),
        len(encode_message(update, fleet="bench", sender=device)),
    )
    result.metrics.append(
        Metric(
            "signing",
            "signed - unsigned message size",
            sizes[0] - sizes[1],
            "bytes",
            {"signed_bytes": sizes[0], "unsigned_bytes": sizes[1]},
        )
    )


# --- ONNX inference on the device ---------------------------------------------------------
def _onnx_profile_model(s: Settings, hidden: int):
    """A model file for the stream profile: layout, basis fitted on its features, trained weights."""
    from biofed.kernels import init_params, train
    from biofed.model import Basis, ModelFile, PrivacySpec

    layout = stream.profile_layout()
    w = stream.windows_of(stream.make_stream(s.seconds(120, 70), s.seed))
    X = _profile_features(w, layout)
    mean, scale, basis = stream.fit_projection(X, random_state=s.seed)
    Z = (X - mean) / scale @ basis.T
    y = (Z[:, 0] > np.median(Z[:, 0])).astype(np.int64)
    params, _ = train(
        init_params(Z.shape[1], 2, hidden, random_state=s.seed), Z, y, 2, hidden, epochs=5, random_state=s.seed
    )
    model = ModelFile(
        params,
        ("rest", "arithmetic"),
        hidden,
        Basis(basis, mean, scale),
        1,
        "bench",
        1,
        1,
        layout,
        PrivacySpec(None, None, ""),
    )
    return model, w, X


def _profile_features(w: dict[str, np.ndarray], layout, hr=None) -> np.ndarray:
    """Raw feature rows of the stream-profile windows in the pipeline's column order (Numba kernels);
    ``hr`` (n, n_hr, 2): precomputed heart-rate features (computed here when None)."""
    from biofed.kernels import band_powers, heart_rate_features, log_band_energies, window_statistics

    n = w["eeg"].shape[0]
    bio = layout.modality("bio")
    nperseg = {m.modality: m.nperseg for m in layout.modalities}  # the layout's segment lengths
    if hr is None:
        hr = heart_rate_features(np.ascontiguousarray(w["bio"][:, list(bio.hr_channels)]), stream.BIO_FS)
    stat_cols, hr_cols = bio.bio_columns()
    bio_rows = np.empty((n, bio.n_features))
    bio_rows[:, list(stat_cols)] = window_statistics(w["bio"], stream.BIO_FS).reshape(n, -1)
    bio_rows[:, list(hr_cols)] = np.asarray(hr).reshape(n, -1)
    return np.concatenate(
        [
            band_powers(w["eeg"], stream.EEG_FS, layout.bands, log=True, nperseg=nperseg["eeg"]).reshape(n, -1),
            log_band_energies(w["audio"], stream.AUDIO_FS, n_bands=layout.n_mels, nperseg=nperseg["audio"]).reshape(
                n, -1
            ),
            bio_rows,
        ],
        axis=1,
    )


def case_onnx_inference(s: Settings, result: CaseResult) -> None:
    """Per-window latency of the exported ONNX model (onnxruntime, 1 thread) vs the Numba path.

    features graph: standardize + project + classifier + softmax on raw feature rows, against
    ``kernels.project`` + ``kernels.predict_proba``. window graph: the same plus EEG band powers,
    audio log-mel energies and bio statistics in ONNX (heart rate still by the Numba kernel, it
    is an input), against the Numba feature kernels + project + predict_proba. Batch 1 = one
    window per call (a device every hop); batch 64 = 64 windows per call, time per window.
    """
    from biofed.coordinator.onnx_export import build_model
    from biofed.edge.inference import OnnxModel
    from biofed.kernels import heart_rate_features, predict_proba, project

    for hidden in (0, 32):
        model, w, X = _onnx_profile_model(s, hidden)
        label = "logreg" if hidden == 0 else f"mlp h={hidden}"
        bio = model.layout.modality("bio")
        hr_all = heart_rate_features(np.ascontiguousarray(w["bio"][:, list(bio.hr_channels)]), stream.BIO_FS)
        for dtype in ("float32", "float64"):
            features = OnnxModel(build_model(model, dtype=dtype).SerializeToString())
            window = OnnxModel(build_model(model, input_kind="window", dtype=dtype).SerializeToString())
            for batch in (1, 64):
                xb = np.ascontiguousarray(X[:batch])
                wb = {m: np.ascontiguousarray(v[:batch]) for m, v in w.items()}
                hb = hr_all[:batch]

                def numba_features(xb=xb):
                    z = project(xb, model.basis.components, mean=model.basis.mean, scale=model.basis.scale)
                    return predict_proba(model.params, z, 2, hidden)

                def numba_window(wb=wb, hb=hb):
                    z = project(
                        _profile_features(wb, model.layout, hb),
                        model.basis.components,
                        mean=model.basis.mean,
                        scale=model.basis.scale,
                    )
                    return predict_proba(model.params, z, 2, hidden)

                shape = f"batch {batch}, F={X.shape[1]}, k={model.k}, {dtype}"
                reps = s.reps(5.0 if batch == 1 else 1.0)
                rows = _compare(
                    result,
                    f"onnx features graph [{label}]",
                    shape,
                    lambda xb=xb: features.predict_features(xb),
                    {"numba project+predict_proba": numba_features},
                    repeats=reps,
                    tolerance=1e-5 if dtype == "float32" else 1e-9,
                )
                result.metrics.append(
                    Metric(
                        "onnx_inference",
                        f"features graph per window [{label}, {shape}]",
                        rows[0].biofed.median / batch * 1e6,
                        "us",
                    )
                )
                rows = _compare(
                    result,
                    f"onnx window graph [{label}]",
                    shape,
                    lambda wb=wb, hb=hb: window.predict_windows(wb, hb),
                    {"numba features+project+predict_proba": numba_window},
                    repeats=s.reps(0.5),
                    tolerance=1e-4 if dtype == "float32" else 1e-9,
                    note="heart rate (peak detection) computed outside both timings",
                )
                result.metrics.append(
                    Metric(
                        "onnx_inference",
                        f"window graph per window [{label}, {shape}]",
                        rows[0].biofed.median / batch * 1e3,
                        "ms",
                    )
                )


def _secagg_round(inputs, fleet, round_, drop_before_masking=()):
    """One in-process SecAgg round, timing the devices' and the coordinator's work apart."""
    from biofed.coordinator.secure_aggregation import SecAggServer
    from biofed.edge.secure_aggregation import SecAggClient

    clock = time.perf_counter
    devices = sorted(inputs)
    spent = {"devices": 0.0, "coordinator": 0.0}
    traffic = {"device_sent_bytes": 0}

    def run(role, fn, *args):
        start = clock()
        out = fn(*args)
        spent[role] += clock() - start
        return out

    server = SecAggServer(fleet, round_, vector_size=len(inputs[devices[0]]))
    clients = {d: run("devices", SecAggClient, d, fleet, round_) for d in devices}
    for d, c in clients.items():
        run("coordinator", server.receive, d, run("devices", c.advertise))
    keys = run("coordinator", server.key_list)
    for d, c in clients.items():
        shares = run("devices", c.share_keys, keys)
        traffic["device_sent_bytes"] += 64 + 32 + sum(ct.size for ct in shares.ciphertexts.values())
        run("coordinator", server.receive, d, shares)
    forwarded = run("coordinator", server.forward)
    for d in forwarded.ciphertexts:
        if d not in drop_before_masking:
            masked = run("devices", clients[d].masked_input, forwarded, inputs[d])
            traffic["device_sent_bytes"] += masked.masked.nbytes
            run("coordinator", server.receive, d, masked)
    request = run("coordinator", server.unmask_request)
    for d in request.survivors:
        response = run("devices", clients[d].unmask, request)
        shares = (*response.b_shares.values(), *response.key_shares.values())
        traffic["device_sent_bytes"] += sum(v.size for v in shares)
        run("coordinator", server.receive, d, response)
    result = run("coordinator", server.aggregate)
    return result, spent, traffic


def case_secagg(s: Settings, result: CaseResult) -> None:
    from biofed.secure_aggregation import FixedPoint, default_threshold

    rng = np.random.default_rng(s.seed)
    fp = FixedPoint()
    m = _default_update(rng).delta.size
    for n in (10, 50, 100):
        updates = {f"pi-{i:03d}": rng.standard_normal(m) * 0.01 for i in range(n)}
        inputs = {d: fp.encode(u) for d, u in updates.items()}
        stacked = np.stack(list(updates.values()))
        dropped = sorted(updates)[: n - default_threshold(n)] if n > 10 else sorted(updates)[:1]
        for label, drop in (("no dropout", ()), (f"{len(dropped)} dropped after sharing", dropped)):
            survivors = [d for d in updates if d not in drop]
            rows = []

            def secure(drop=drop):
                out, spent, traffic = _secagg_round(inputs, "bench", 1, drop)
                rows.append((spent, traffic))
                return fp.decode(out.total)

            def plain(survivors=survivors):
                return stacked[[list(updates).index(d) for d in survivors]].sum(axis=0)

            shape = f"n={n}, m={m}, {label}"
            timing, out = measure(secure, repeats=s.reps(0.25) if n >= 50 else s.reps(0.5))
            base_timing, expected = measure(plain, repeats=s.reps(0.5))
            # fixed-point rounding: at most 2^-(scale_bits+1) per device and coordinate
            tolerance = len(survivors) * fp.resolution / 2 / float(np.max(np.abs(expected)))
            result.comparisons.append(
                Comparison(
                    "secagg round (all devices + coordinator, one process)",
                    shape,
                    timing,
                    "plain float64 sum",
                    base_timing,
                    max_relative_difference(out, expected),
                    tolerance,
                    "ratio << 1 is the SecAgg cost; tolerance = fixed-point rounding bound",
                )
            )
            device_s = float(np.median([spent["devices"] for spent, _ in rows])) / n
            coordinator_s = float(np.median([spent["coordinator"] for spent, _ in rows]))
            sent = float(np.median([traffic["device_sent_bytes"] for _, traffic in rows])) / n
            result.metrics.append(Metric("secagg", f"device CPU per round, {shape}", device_s * 1e3, "ms"))
            result.metrics.append(Metric("secagg", f"coordinator CPU per round, {shape}", coordinator_s * 1e3, "ms"))
            result.metrics.append(
                Metric(
                    "secagg", f"bytes sent per device per round, {shape}", sent, "bytes", {"plain_update_bytes": m * 8}
                )
            )


# --- fresh-process measurements -----------------------------------------------------------
def _one_core_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


def case_realtime(s: Settings, result: CaseResult) -> None:
    seconds = s.seconds(600, 120)
    cmd = [sys.executable, "-m", stream.__name__, "rtf", "--seconds", str(seconds), "--repeats", str(s.repeats)]
    proc = subprocess.run(cmd, env=_one_core_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"stream profile subprocess failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    n = out["n_windows"]
    detail = {"limits": out["limits"], "n_windows": n, "stream_seconds": out["stream_seconds"]}
    runs = (
        ("batch", "kernel chain, all windows per call", None),
        ("per_window", "kernel chain, one window per 1 s hop", None),
        ("per_window_float64", "kernel chain float64, one window per 1 s hop", None),
        ("replay", "StreamingPipeline replay in 1 s chunks", 5000.0),
    )
    for mode, label, goal in runs:
        m = out[mode]
        result.metrics.append(Metric("realtime", f"real-time factor, {label}", m["rtf"], "x", {**detail, **m}))
        result.metrics.append(
            Metric("realtime", f"compute s for {out['stream_seconds']:g} s stream, {label}", m["median_s"], "s")
        )
        if goal is not None:
            result.targets.append(
                Target(f"replay real-time factor >= {goal:g}x on one core ({label})", m["rtf"], ">=", goal, "x")
            )
    # Per-stage profile of one window against the FFT limit measured in the same process. The
    # limit is the best rfft rate, so the stages are compared by their best repeat too (the
    # medians, which include the load of a shared machine, are listed beside them).
    fft = out["fft"]
    chain = out["per_window"]
    chain_best, chain_median = 1e6 * chain["min_s"] / n, 1e6 * chain["median_s"] / n
    rows, limit_us = [], 0.0
    for stage, st in out["stages"].items():
        best, median, lim = 1e3 * st["best_ms_per_window"], 1e3 * st["ms_per_window"], 1e3 * st["fft_limit_ms"]
        limit_us += lim
        ffts = f"{st['rffts_per_window']} x {st['nperseg']}" if st["rffts_per_window"] else 0
        rows.append((stage, best, median, 100.0 * best / chain_best, ffts, lim, lim / best if lim else "-"))
    rffts = sum(st["rffts_per_window"] for st in out["stages"].values())
    rows.append(
        ("whole chain (one window per call)", chain_best, chain_median, 100.0, rffts, limit_us, limit_us / chain_best)
    )
    # the same chain with no Python between windows: what the kernels alone make of the limit
    batch = out["batch"]
    batch_limit = 1e6 * batch["fft_limit_s"] / n
    batch_best = 1e6 * batch["min_s"] / n
    rows.append(
        (
            "whole chain (all windows per call)",
            batch_best,
            1e6 * batch["median_s"] / n,
            "-",
            round(batch["rffts"] / n, 1),
            batch_limit,
            batch_limit / batch_best,
        )
    )
    rates = "; ".join(
        f"{size} points {f['gflops']['float32']:.3g} GFLOP/s float32, {f['gflops']['float64']:.3g} float64"
        for size, f in fft.items()
    )
    result.tables.append(
        Table(
            f"Per-window stage profile on one core vs the FFT flop limit (rfft measured here: {rates})",
            ("stage", "us/window best", "median", "% of chain", "rffts/window", "FFT limit us", "fraction of limit"),
            tuple(rows),
            note="per window as a device runs it: each window transforms only the Welch segments the previous one "
            "did not (rffts/window = new segments x their length); FFT limit = those rffts x 2.5 n log2 n flops / "
            "best float32 rate of rfft at that length; each modality's stage is the device pipeline of that modality "
            "alone (buffering and its row included), the whole chain joins the three and projects the row; "
            "all windows per call = the batch chain, each distinct segment transformed once, per window",
        )
    )
    for size, f in fft.items():
        for dtype in ("float32", "float64"):
            result.metrics.append(Metric("realtime", f"rfft {size} points, {dtype}", f["gflops"][dtype], "GFLOP/s"))
    result.targets.append(
        Target("whole chain per window <= 2x its FFT flop limit (best repeats)", chain_best / limit_us, "<=", 2.0, "x")
    )


def _time_first_window(env: dict[str, str]) -> float:
    """Seconds from launching a fresh interpreter to it printing its first computed window."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", stream.__name__, "warm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"warm-start subprocess failed ({proc.returncode}): {err.strip()[-2000:]}")
    report = json.loads(line)
    if not report["finite"]:
        raise RuntimeError(f"warm-start subprocess computed a non-finite window: {report}")
    return elapsed


def case_warm_start(s: Settings, result: CaseResult) -> None:
    # A private, empty Numba cache: the 1st process compiles and fills it, the 2nd loads it.
    with tempfile.TemporaryDirectory(prefix="biofed-bench-numba-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        cold = _time_first_window(env)
        warm = _time_first_window(env)
    result.metrics.append(Metric("warm_start", "fresh process to first window, empty cache (compiles)", cold, "s"))
    result.metrics.append(Metric("warm_start", "fresh process to first window, cache present", warm, "s"))
    result.targets.append(Target("warm start to first window <= 2 s (Numba cache present)", warm, "<=", 2.0, " s"))


def case_agent_memory(s: Settings, result: CaseResult) -> None:
    """RSS of a whole agent process ingesting, storing (at its cap) and training over a long stream,
    beside the floor: a fresh process that only loads NumPy, Numba, rocket-fft and one of the
    agent's kernels from the same Numba cache. The 150 MB target is shown against both."""
    hours = s.seconds(24.0, 3.0)
    cmd = [
        sys.executable,
        "-m",
        "biofed.benchmarks.agent_memory",
        "--hours",
        str(hours),
        "--store-rows",
        "2000" if s.quick else "20000",
    ]
    proc = subprocess.run(cmd, env=_one_core_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"agent memory subprocess failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    detail = {
        k: out[k]
        for k in ("hours", "windows_stored", "rows_in_store", "store_max_rows", "training_rounds", "wall_s", "samples")
    }
    result.metrics.append(
        Metric("agent_memory", f"agent peak RSS over {hours:g} h of stream", out["peak_rss_mb"], "MB", detail)
    )
    floor = out["floor"]
    result.metrics.append(
        Metric(
            "agent_memory",
            "floor: peak RSS of NumPy+Numba+rocket-fft+1 cached kernel",
            out["floor_peak_rss_mb"],
            "MB",
            {k: floor[k] for k in ("rss_after_imports_mb", "biofed_modules", "scipy_modules")},
        )
    )
    result.metrics.append(
        Metric(
            "agent_memory", "agent surplus over the floor (agent peak - floor peak)", out["surplus_over_floor_mb"], "MB"
        )
    )
    result.metrics.append(Metric("agent_memory", "agent RSS after its imports", out["rss_after_imports_mb"], "MB"))
    result.metrics.append(
        Metric(
            "agent_memory",
            "agent RSS after start-up (imports, agent, warm-up child)",
            out["rss_after_start_mb"],
            "MB",
        )
    )
    result.metrics.append(
        Metric(
            "agent_memory",
            "agent RSS after its first stored windows (pipeline kernels loaded)",
            out["rss_after_first_windows_mb"],
            "MB",
            {"end RSS by mapping (MB)": out["rss_by_mapping_mb"]},
        )
    )
    result.metrics.append(
        Metric(
            "agent_memory",
            "RSS growth while the store is at its cap (eviction running)",
            out["rss_growth_at_store_cap_mb"],
            "MB",
        )
    )
    result.targets.append(
        Target("agent peak RSS <= 150 MB (ingesting, training, whole process)", out["peak_rss_mb"], "<=", 150.0, " MB")
    )
    result.targets.append(
        Target(
            "floor peak RSS <= 150 MB (NumPy+Numba+rocket-fft, 1 cached kernel)",
            floor["peak_rss_mb"],
            "<=",
            150.0,
            " MB",
        )
    )
    result.targets.append(
        Target(
            "flat memory: RSS growth with the store at its cap <= 5 MB",
            out["rss_growth_at_store_cap_mb"],
            "<=",
            5.0,
            " MB",
        )
    )


EEGMAT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "eegmat"


def case_evaluation(s: Settings, result: CaseResult) -> None:
    """``biofed evaluate``: every method and baseline, both views, and the utility targets at
    epsilon 8 for the default method (:data:`biofed.apps.evaluation.DEFAULT_METHOD`). The full run
    uses eegmat (the subjects in ../shared/datasets/eegmat; a synthetic fleet where it is absent),
    every epsilon, 3 noise draws and the projection variants; ``--quick`` a small synthetic fleet
    at epsilon 8 and inf."""
    from biofed.apps.demo import eegmat_devices
    from biofed.apps.evaluation import (
        DEFAULT_METHOD,
        EPSILONS,
        load_devices,
        plain_pipeline_rows,
        run_evaluation,
        targets,
    )
    from biofed.apps.federation import write_synthetic_devices

    with tempfile.TemporaryDirectory(prefix="biofed-bench-eval-") as tmp:
        files = eegmat_devices(EEGMAT) if EEGMAT.is_dir() and not s.quick else {}
        source = f"eegmat ({len(files)} subjects)"
        if len(files) < 2:
            n = 4 if s.quick else 8
            files = write_synthetic_devices(Path(tmp), n, duration_s=s.seconds(60.0, 20.0), random_state=s.seed)
            source = f"synthetic ({n} devices)"
        devices = load_devices(files)
        plain = load_devices(files, rows=plain_pipeline_rows)
    if s.quick:
        evaluation = run_evaluation(
            devices,
            plain_devices=plain,
            epsilons=(8.0, float("inf")),
            repeats=1,
            methods=("dp-ftrl", "one-shot"),
            seed=s.seed,
        )
    else:
        evaluation = run_evaluation(
            devices,
            plain_devices=plain,
            epsilons=EPSILONS,
            repeats=3,
            variants=(("none", 0), ("pca", 32), ("class", 32), ("pca", 64)),
            seed=s.seed,
        )
    for row in evaluation.summaries():
        eps = row["epsilon_target"]
        name = f"{row['view']} / {row['method']} / proj {row['variant']} / eps {eps:g}"
        detail = {k: row[k] for k in ("worst", "ci95", "epsilon_spent", "repeats", "spread_mean_sd", "per_device")}
        result.metrics.append(Metric("evaluation", name, row["mean"], "balanced accuracy", {"data": source, **detail}))
    for name, measured, op, threshold in targets(evaluation, DEFAULT_METHOD, 8.0):
        result.targets.append(Target(f"{source}: {name}", measured, op, threshold))


CASES: dict[str, Callable[[Settings, CaseResult], None]] = {
    "windowing": case_windowing,
    "band_powers": case_band_powers,
    "log_band_energies": case_log_band_energies,
    "window_statistics": case_window_statistics,
    "heart_rate": case_heart_rate,
    "transform": case_transform,
    "stats": case_stats,
    "project": case_project,
    "svd": case_svd,
    "fd_sketch": case_fd_sketch,
    "training": case_training,
    "chain": case_chain,
    "signing": case_signing,
    "secagg": case_secagg,
    "onnx_inference": case_onnx_inference,
    "realtime": case_realtime,
    "warm_start": case_warm_start,
    "agent_memory": case_agent_memory,
    "privacy_ledger": case_privacy_ledger,
    "coordinator_memory": case_coordinator_memory,
    "evaluation": case_evaluation,
    "fleet_privacy": case_fleet_privacy,
}


@contextlib.contextmanager
def _one_blas_thread():
    """One thread per BLAS library while a case runs in this process.

    NumPy and SciPy (whose BLAS Numba's ``np.dot`` calls) ship separate OpenBLAS builds, and
    idle OpenBLAS threads spin: with a kernel and its baseline interleaved, the two pools spin
    against each other and a 256-row product takes milliseconds. One thread each is also what
    the one-core measurements (``realtime``) use.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # no limit to set: the timings then include the pools' contention
        yield
        return
    with threadpool_limits(limits=1):
        yield


def run_case(name: str, settings: Settings) -> CaseResult:
    """Run one case (one BLAS thread); an exception becomes the case's ``error`` so the other cases still run."""
    result = CaseResult(name)
    start = time.perf_counter()
    try:
        with _one_blas_thread():
            CASES[name](settings, result)
    except Exception as exc:  # a benchmark run reports every case, even when one fails
        logger.debug("case %s failed", name, exc_info=True)
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result
