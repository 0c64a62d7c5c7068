"""Spectral features of windowed streams: EEG band powers (Welch) and audio log band energies.

Both features share one jitted kernel, ``_welch_weighted``: every window of every channel is cut
into Hann-tapered segments of ``nperseg`` samples with 50 % overlap (mean removed per segment),
the one-sided power spectral density is averaged over the segments exactly as
``scipy.signal.welch(x, fs, window="hann", nperseg=nperseg, noverlap=nperseg // 2,
detrend="constant", scaling="density", average="mean")`` computes it (trailing samples that do not
fill a segment are ignored, as scipy does), and the PSD is reduced by a fixed weight matrix
``(n_bins, n_bands)`` times the bin width ``df = fs / nperseg``: 0/1 rectangles for
``band_powers``, triangles for ``log_band_energies``. Accumulation is in float64; float32 input
gives float32 output.

FFT route (SPECTRAL_BACKEND)
----------------------------
Three routes compute the same spectra: rocket-fft (``np.fft.rfft`` inside ``@njit``), a
DFT-as-matrix product (BLAS gemm of the segments with a cos/sin basis restricted to the
needed bins) and NumPy's ``rfft`` outside the jitted code. The DFT matrix costs
``2 * nperseg * n_bins`` flops per segment against ~``5 nperseg log2 nperseg`` for an FFT, so
it only competes when very few bins are needed, and EEG and audio features need nearly all of
them; NumPy outside ``@njit`` pays a copy of every segment. The kernels therefore use
**rocket-fft**. The comparison behind this choice is in ``docs/kernel-design.md``;
``biofed bench --only band_powers,log_band_energies`` measures the kernels against SciPy.

Plans
-----
The precomputed part of a feature (Hann taper, the bins a band uses, the weight matrix with the
Welch scaling folded in) is a :class:`SpectralPlan`, built once per (fs, window, nperseg, bands)
by :func:`band_power_plan` or per (fs, window, frame, n_mels) by :func:`log_band_energy_plan`,
which validate every parameter. A stream builds its plans when it is configured and applies them
to every window (:func:`spectral_features`) without validating or planning again; the one-call
functions :func:`band_powers` and :func:`log_band_energies` plan on every call. No cache and no
global state: a plan is a value the caller keeps.

Shared segments
---------------
Welch is split into :func:`segment_powers` (detrend, taper, rfft, ``|X|^2`` of single segments)
and :func:`reduce_segments` (sum a window's ``n_seg`` segment powers, apply the weights). When
consecutive windows start a multiple of ``step = nperseg - nperseg // 2`` samples apart their
segments coincide, and a stream computes each segment once: :class:`WelchStream` keeps the
powers of the segments later windows reuse (the state of
:class:`biofed.edge.pipeline.StreamingPipeline`), and :func:`sliding_spectral_features` does
the same for all windows of a recorded signal. The arithmetic per segment and the summation
order are those of the batch kernel, so every path gives the same bits. Every path sums a
window's segment powers in two halves (the first ``(n_seg + 1) // 2`` segments, then the
rest): a window half a window after another starts where the other's second half does, so a
stream continues that sum instead of adding the kept powers again. The band weights are summed
over each band's nonzero bins only, and each path applies the output transform (``log10`` or
``ln``) in the same jitted loop, so a stream's window is one jitted call. The default segment
lengths are powers of two, which rarely divide a hop of whole seconds (500 samples at 500 Hz,
16000 at 16 kHz); :func:`shared_nperseg` picks the nearby length whose step divides the hop,
so that consecutive windows share all their segments but those of the last hop.

Precision
---------
float64 samples are computed in float64 and match ``scipy.signal.welch`` to ~1e-14 relative.
float32 samples are tapered and transformed in float32 (rocket-fft's float32 rfft), summed and
weighted in float64; the band powers then stay within ``FLOAT32_RTOL`` = 1e-5 relative of the
float64 result (after ``log10`` or ``ln`` an absolute error below ``FLOAT32_RTOL``, plus the
float32 rounding of the logged value itself), except for bands whose power is at the float32 noise floor of the window
(~1e-7 of its total power).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import rocket_fft  # noqa: F401  -- registers np.fft for Numba (see module docstring)
from numba import njit

from biofed.kernels._validation import (
    check_float_array,
    check_positive_float,
    check_positive_int,
    raise_if_nonfinite,
)
from biofed.kernels.windowing import _append_samples, _check_windows

__all__ = [
    "EEG_BANDS",
    "FLOAT32_RTOL",
    "SPECTRAL_BACKEND",
    "SpectralPlan",
    "WelchStream",
    "band_power_plan",
    "band_powers",
    "log_band_energies",
    "log_band_energy_plan",
    "reduce_segments",
    "segment_powers",
    "shared_nperseg",
    "sliding_spectral_features",
    "spectral_features",
]

#: FFT route of the jitted kernel (see "FFT route" above); recorded by benchmarks and reports.
SPECTRAL_BACKEND = "rocket-fft"

EEG_BANDS: tuple[tuple[str, float, float], ...] = (
    ("delta", 1.0, 4.0),
    ("theta", 4.0, 8.0),
    ("alpha", 8.0, 13.0),
    ("beta", 13.0, 30.0),
    ("gamma", 30.0, 45.0),
)

#: Relative tolerance of float32 band powers against float64 (see "Precision" above).
FLOAT32_RTOL = 1e-5

_SCALES = ("mel", "linear")
_AUDIO_FRAME_S = 0.032  # default audio frame: ~32 ms (512 samples at 16 kHz)
_LOG_FLOOR = 1e-10  # log_band_energies: ln(energy + 1e-10)
_LOG10_E = math.log10(math.e)  # log10(p) = ln(p) * log10(e)
# the kernels' code of a plan's output transform (SpectralPlan.log)
_NO_LOG, _LOG10, _LN = 0, 1, 2
_LOG_CODES = {"none": _NO_LOG, "log10": _LOG10, "ln": _LN}
_BLOCK_ROWS = 256  # segments transformed per rfft call (bounds memory on small devices)
# rocket-fft's FFT library transforms rows in SIMD groups (8 float32 rows with AVX2) and the
# rows left over one at a time, several times slower each: the kernels pad their segment block
# with zero rows to a whole number of groups (8 covers the 4- and 2-row groups of NEON too)
_FFT_ROW_GROUP = 8
# segment powers held at once by sliding_spectral_features (1 MiB in float64): a block small
# enough to be reused from the allocator and the cache between calls; consecutive blocks share
# one ring, so a block's size costs no segment transformed twice (see docs/kernel-design.md)
_SHARED_BLOCK_VALUES = 1 << 17


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _sum(x, start, length):
    """float64 sum of ``x[start : start + length]``.

    ``reassoc`` lets the compiler split the sum into SIMD partial sums (a single running sum is
    latency-bound and costs as much as the FFT). The order it picks depends only on ``length``,
    so a half segment sums to the same bits wherever it lies and in every kernel that calls
    this one (batch and streaming paths stay identical); the mean it yields differs from a
    left-to-right sum by rounding (~1e-16 relative). The loop indexes a slice from 0, so the
    compiler drops the negative-index wraparound of every load.
    """
    v = x[start : start + length]
    total = 0.0
    for j in range(length):
        total += v[j]
    return total


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _sum_as(x, start, length, like):
    """``_sum`` of ``x[start : start + length]`` rounded to the dtype of ``like`` sample by sample:
    the sum of the samples a cast to that dtype would hold, without the cast's copy (float64
    samples computed in float32). With ``x`` of that dtype it is ``_sum``."""
    cast = like.dtype.type
    v = x[start : start + length]
    total = 0.0
    for j in range(length):
        total += cast(v[j])
    return total


@njit(cache=True, nogil=True, inline="always")
def _padded_rows(rows):
    """``rows`` rounded up to a whole number of the FFT's row groups."""
    return -(-rows // _FFT_ROW_GROUP) * _FFT_ROW_GROUP


@njit(cache=True, nogil=True, inline="always")
def _rfft_rows(seg, r):
    """rfft of the first ``r`` rows of ``seg``, zero-padded to a whole number of row groups
    (``seg`` has room for them); the result's rows from ``r`` on are the spectra of those zeros."""
    padded = _padded_rows(r)
    seg[r:padded] = 0.0
    return np.fft.rfft(seg[:padded])


@njit(cache=True, nogil=True, inline="always")
def _detrend_taper(x, start, total, taper, dst):
    """``dst[:] = (x[start : start + nperseg] - total / nperseg) * taper``.

    ``total`` is the segment's float64 sum, ``_sum`` of its first ``nperseg // 2`` samples plus
    ``_sum`` of the rest. With an even ``nperseg`` the second half of a segment is the first half
    of the next one (50 % overlap), so the callers sum every half once and pass it on. The mean
    is rounded to the samples' dtype so that the taper loop runs in that precision (float32 SIMD
    lanes for float32 samples).
    """
    nperseg = taper.shape[0]
    cast = taper.dtype.type
    mean = cast(total / nperseg)
    v = x[start : start + nperseg]
    for j in range(nperseg):
        dst[j] = (cast(v[j]) - mean) * taper[j]


@njit(cache=True, nogil=True, inline="always")
def _add_power(parts, power):
    """``power[k] += re_k ** 2 + im_k ** 2`` of bins stored as ``parts = [re_0, im_0, re_1, ...]``,
    the squares taken in the precision of the bins.

    The spectrum's float view (``.view()`` of the complex rfft output) lets the compiler load
    real and imaginary parts as plain floats, which vectorizes where complex element reads do not.
    """
    for k in range(power.shape[0]):
        re = parts[2 * k]
        im = parts[2 * k + 1]
        power[k] += re * re + im * im


@njit(cache=True, nogil=True, inline="always")
def _set_power(parts, power):
    """``power[k] = re_k ** 2 + im_k ** 2``: ``_add_power`` into zeros, with the same bits
    (the squares are >= 0, so adding them to 0.0 changes nothing) and without the zeroing pass."""
    for k in range(power.shape[0]):
        re = parts[2 * k]
        im = parts[2 * k + 1]
        power[k] = re * re + im * im


@njit(cache=True, nogil=True, inline="always")
def _finished(total, log_code, out, b):
    """``out[b]`` = the output transform (``_LOG_CODES``) of a band's float64 ``total``, in the
    precision of ``out``: ``total`` rounded to it, plus the floor, then the logarithm. Every path
    (batch, sliding, streaming) finishes its bands here, so they agree bit for bit."""
    cast = out.dtype.type
    value = cast(total)
    if log_code == _LOG10:  # through ln (libm's logf is cheaper than log10f): within 2 ulp of log10
        value = math.log(value + np.finfo(out.dtype).tiny) * cast(_LOG10_E)
    elif log_code == _LN:
        value = math.log(value + cast(_LOG_FLOOR))
    out[b] = value


@njit(cache=True, nogil=True, inline="always")
def _weigh(power, band_bins, band_weights, log_code, out):
    """``out[b]`` = the finished ``sum_k power[k] * weights[k, b]``, summed in order of ``k`` in float64.

    Only the bins of a band's nonzero range ``band_bins[b] = [lo, hi)`` are summed, with their
    weights packed band after band in ``band_weights``. The dense sum would add ``power[k] * 0.0
    = 0.0`` for the other bins, which changes no bit of a finite sum of non-negative terms, so
    this is the dense product's result at a fraction of its cost (an EEG bin belongs to one band,
    a mel bin to at most two triangles).
    """
    j = 0
    for b in range(band_bins.shape[0]):
        lo, hi = band_bins[b, 0], band_bins[b, 1]
        p = power[lo:hi]
        w = band_weights[j : j + hi - lo]
        total = 0.0
        for k in range(hi - lo):
            total += p[k] * w[k]
        j += hi - lo
        _finished(total, log_code, out, b)


# flat arguments (noqa PLR0913): Numba would type a settings tuple on every call
@njit(cache=True, nogil=True)
def _welch_weighted(x, starts, row_step, n_seg, nperseg, tail, taper, kmin, band_bins, band_weights, log_code, out):  # noqa: PLR0913
    """Welch PSD of every window and channel reduced by a weight matrix and finished, into
    ``out``; False if a sample is NaN or inf (or a float64 sum overflowed).

    Parameters
    ----------
    x : ndarray, shape (n_rows, n_samples)
        C-contiguous float32 or float64 samples. Channel ``c`` of window ``i`` is
        ``x[i * row_step + c, starts[i] : starts[i] + window]``: a stack of windows reshaped to
        ``(n_windows * n_channels, window)`` with ``row_step = n_channels`` and zero starts, or a
        stream buffer ``(n_channels, n_samples)`` with ``row_step = 0`` and the windows' offsets.
    starts : ndarray of int64, shape (n_windows,)
    row_step : int
    n_seg : int
        Segments per window; segments start every ``nperseg - nperseg // 2`` samples.
    nperseg : int
        Segment length.
    tail : int
        Samples after a window's last segment that belong to the window (Welch ignores them):
        they are only tested for NaN/inf, so that the kernel's pass over the samples replaces a
        separate finiteness scan. 0 where the samples were tested before (a stream buffer).
    taper : ndarray, shape (nperseg,)
        Segment window (periodic Hann), same dtype as ``x``.
    kmin : int
        Index of the first frequency bin the weights cover.
    band_bins, band_weights : ndarray
        A plan's weight matrix ``weights`` (n_bins, n_bands) by band (``SpectralPlan.band_bins``
        and ``band_weights``): ``sum_k |X_{kmin + k}|^2 * weights[k, b]`` summed over segments,
        where ``X`` is the rfft of a detrended, tapered segment, is band ``b``'s power; every
        scale factor (density scaling, one-sided doubling, segment averaging, ``df``) is folded
        into the weights.
    log_code : int
        Output transform of the powers (``_LOG_CODES`` of ``SpectralPlan.log``).
    out : ndarray, shape (n_windows, n_channels, n_bands)
        Output, written in place.

    The per-segment arithmetic (``_detrend_taper``, the rfft, ``|X|^2`` in the FFT's precision,
    summed over segments in order in float64) is the same as ``_segment_powers`` followed by
    ``_reduce_segments``, so the streaming path reproduces this one bit for bit. The segment
    means need the sum of every sample a segment covers; the sum of those sums (plus the tail's)
    is finite exactly when every sample is, barring an overflow of finite float64 samples.
    """
    n_windows, n_channels, _ = out.shape
    step = nperseg - nperseg // 2
    rows_per_window = n_channels * n_seg
    block = max(1, _BLOCK_ROWS // rows_per_window)
    n_bins = band_bins[:, 1].max()
    half = nperseg // 2
    shared_half = half == step  # even nperseg: a segment's second half is the next one's first
    seg = np.empty((_padded_rows(min(block, n_windows) * rows_per_window), nperseg), dtype=x.dtype)
    power = np.empty(n_bins, dtype=np.float64)
    second_half = np.empty(n_bins, dtype=np.float64)
    first_half_segments = (n_seg + 1) // 2  # see _reduce_segments
    check = 0.0
    covered = (n_seg - 1) * step + nperseg
    for w0 in range(0, n_windows, block):
        w1 = min(n_windows, w0 + block)
        r = 0
        for i in range(w0, w1):
            for c in range(n_channels):
                row = x[i * row_step + c]
                second = 0.0
                for s in range(n_seg):
                    start = starts[i] + s * step
                    first = second if shared_half and s > 0 else _sum(row, start, half)
                    second = _sum(row, start + half, nperseg - half)
                    check += first + second
                    _detrend_taper(row, start, first + second, taper, seg[r])
                    r += 1
                if tail > 0:
                    check += _sum(row, starts[i] + covered, tail)
        parts = _rfft_rows(seg, r).view(x.dtype)  # (>= r, 2 * (nperseg // 2 + 1)): re, im, re, ...
        r = 0
        for i in range(w0, w1):
            for c in range(n_channels):
                power[:] = 0.0
                second_half[:] = 0.0
                for s in range(n_seg):
                    _add_power(
                        parts[r, 2 * kmin : 2 * (kmin + n_bins)], power if s < first_half_segments else second_half
                    )
                    r += 1
                _add(second_half, power)
                _weigh(power, band_bins, band_weights, log_code, out[i, c])
    return math.isfinite(check)


@njit(cache=True, nogil=True)
def _segment_powers(x, starts, slot0, taper, kmin, out, second, held):
    """Power spectra ``|X_{kmin + k}|^2`` of the segments of a multichannel stream, into ``out``.

    Parameters
    ----------
    x : ndarray, shape (n_channels, n_samples)
        float32 or float64 samples (rows may be a slice of a larger buffer).
    starts : ndarray of int64, shape (n_segments,)
        First sample of each segment in ``x``; segment ``g`` is ``x[:, starts[g] : starts[g] + nperseg]``.
    slot0 : int
        Row of ``out`` that receives segment 0: segment ``g`` goes to row ``(slot0 + g) % n_slots``
        (a ring of kept segments; 0 for a plain array of ``n_segments`` rows).
    taper : ndarray, shape (nperseg,)
        Same dtype as ``x``.
    kmin : int
        First frequency bin kept.
    out : ndarray, shape (n_slots, n_channels, n_bins), float64 or the dtype of ``x``
        ``out[slot of g, c, k]`` = squared magnitude of bin ``kmin + k`` of the rfft of the
        detrended, tapered segment, computed in the precision of ``x``: stored in that dtype it
        is exact, and the streams keep float32 powers for float32 samples (half the memory
        their sums read, the same sums).
    second : ndarray, shape (n_channels,), float64
        In: the sums (``_sum_as``) of the samples ``x[:, held : held + nperseg // 2]``, if
        ``held >= 0``. Out: those of the last segment's second half. A segment's first half is
        the previous one's second (even ``nperseg``), so each half is summed once, also across
        the calls of a stream.
    held : int
        Column of ``x`` where the half summed in ``second`` starts (negative: none).

    Returns False if a sample of a segment is NaN or inf (or a float64 sum overflowed), as
    ``_welch_weighted`` does.
    """
    n_channels = x.shape[0]
    nperseg = taper.shape[0]
    n_segments = starts.shape[0]
    n_slots, _, n_bins = out.shape
    block = max(1, _BLOCK_ROWS // n_channels)
    half = nperseg // 2
    shared_half = half == nperseg - half
    seg = np.empty((_padded_rows(min(block, n_segments) * n_channels), nperseg), dtype=taper.dtype)
    check = 0.0
    for g0 in range(0, n_segments, block):
        g1 = min(n_segments, g0 + block)
        r = 0
        for g in range(g0, g1):
            start = starts[g]
            # the half summed last is this segment's first half (same samples, same bits)
            reuse = shared_half and start == held
            for c in range(n_channels):
                first = second[c] if reuse else _sum_as(x[c], start, half, taper)
                second[c] = _sum_as(x[c], start + half, nperseg - half, taper)
                check += first + second[c]
                _detrend_taper(x[c], start, first + second[c], taper, seg[r])
                r += 1
            held = start + half
        parts = _rfft_rows(seg, r).view(taper.dtype)  # as in _welch_weighted
        r = 0
        for g in range(g0, g1):
            slot = (slot0 + g) % n_slots
            for c in range(n_channels):
                _set_power(parts[r, 2 * kmin : 2 * (kmin + n_bins)], out[slot, c])
                r += 1
    return math.isfinite(check)


@njit(cache=True, nogil=True, inline="always")
def _add(values, total):
    """``total[k] += values[k]``, widened to float64 (``total``'s dtype)."""
    for k in range(total.shape[0]):
        total[k] += values[k]


@njit(cache=True, nogil=True, inline="always")
def _add_segment(powers, slot, total):
    """``total[c, k] += powers[slot, c, k]``, widened to float64: indexed element by element, as
    a view per segment would cost more than the sum of a short row."""
    for c in range(total.shape[0]):
        for k in range(total.shape[1]):
            total[c, k] += powers[slot, c, k]


@njit(cache=True, nogil=True, inline="always")
def _add_segments(powers, first, s_lo, s_hi, total):
    """``_add_segment`` of the segments ``first + s`` for ``s`` in ``[s_lo, s_hi)``, in that order.

    Eight segments are added per pass over ``total``: ``(((t + p0) + p1) + ...) + p7`` element
    by element is the order of eight single additions (the same bits), and it loads and stores
    the float64 sums an eighth as often, which bounds a long sum (audio's 64 segments a half).
    """
    n_slots = powers.shape[0]
    grouped = s_lo + max(0, s_hi - s_lo) // 8 * 8  # the segments summed eight at a time end here
    for s in range(s_lo, grouped, 8):
        slot = first + s
        for c in range(total.shape[0]):
            p0, p1 = powers[slot % n_slots, c], powers[(slot + 1) % n_slots, c]
            p2, p3 = powers[(slot + 2) % n_slots, c], powers[(slot + 3) % n_slots, c]
            p4, p5 = powers[(slot + 4) % n_slots, c], powers[(slot + 5) % n_slots, c]
            p6, p7 = powers[(slot + 6) % n_slots, c], powers[(slot + 7) % n_slots, c]
            t = total[c]
            for k in range(t.shape[0]):
                t[k] = (((((((t[k] + p0[k]) + p1[k]) + p2[k]) + p3[k]) + p4[k]) + p5[k]) + p6[k]) + p7[k]
    for s in range(grouped, s_hi):
        _add_segment(powers, (first + s) % n_slots, total)


@njit(cache=True, nogil=True)
def _reduce_segments(powers, firsts, n_seg, carry, carried, band_bins, band_weights, log_code, out):
    """Welch reduction of precomputed segment powers: ``out[i]`` = the finished
    ``(sum_s powers[firsts[i] + s]) @ weights``.

    Every path sums a window's segment powers in two halves, each in order in float64 from 0:
    the first ``h = (n_seg + 1) // 2`` segments, then the others, and adds the two. A window
    ``h`` segments after another (a hop of half a window) starts with the other's second half,
    so its first half continues that sum (``carry``) instead of summing those segments again.

    Parameters
    ----------
    powers : ndarray, shape (n_slots, n_channels, n_bins), float64 or float32 (summed in float64)
        From ``_segment_powers``; indices wrap around (``% n_slots``), as in a ring of kept segments.
    firsts : ndarray of int64, shape (n_windows,)
        Index in ``powers`` of each window's first segment; a window uses ``n_seg`` consecutive ones.
    carry : ndarray, shape (n_channels, n_bins), float64
        Sums of the second half of the window whose first segment is ``carried[0]``; the caller
        guarantees that they are those of ``powers`` (-1: no window). Both are left describing
        the last window.
    carried : ndarray of int64, shape (1,)
    band_bins, band_weights, log_code
        As in ``_welch_weighted``.
    out : ndarray, shape (n_windows, n_channels, n_bands)
    """
    n_slots, n_channels, n_bins = powers.shape
    first_half_segments = (n_seg + 1) // 2
    power = np.empty((n_channels, n_bins), dtype=np.float64)
    for i in range(firsts.shape[0]):
        first = firsts[i]
        continued = carried[0] >= 0 and first == carried[0] + first_half_segments
        # the first segment the first half has not summed yet (relative to ``first``)
        s0 = carried[0] + n_seg - first if continued else 0
        for c in range(n_channels):
            for k in range(n_bins):
                power[c, k] = carry[c, k] if continued else 0.0
        _add_segments(powers, first, s0, first_half_segments, power)
        carry[:] = 0.0
        _add_segments(powers, first, first_half_segments, n_seg, carry)
        for c in range(n_channels):
            _add(carry[c], power[c])
            _weigh(power[c], band_bins, band_weights, log_code, out[i, c])
        carried[0] = first


@njit(cache=True, nogil=True)
def _held_after(held, new, hi, nperseg):
    """Where the half segment whose sums ``_segment_powers`` leaves in its ``second`` starts, after
    it transformed segments ``new .. hi - 1`` (segment ``g`` starts at ``g * step``): the second
    half of segment ``hi - 1``, or ``held`` unchanged if there were none."""
    if hi <= new:
        return held
    return (hi - 1) * (nperseg - nperseg // 2) + nperseg // 2


# flat arguments (noqa PLR0913): Numba would type a settings tuple on every call
@njit(cache=True, nogil=True)
def _welch_stream(  # noqa: PLR0913
    x,
    offset,
    new,
    held,
    taper,
    kmin,
    ring,
    half_sums,
    firsts,
    n_seg,
    carry,
    carried,
    band_bins,
    band_weights,
    log_code,
    out,
):
    """One step of a :class:`WelchStream`: ``_segment_powers`` of the stream's segments from
    ``new`` to the last window's last one (segment ``g`` starts at stream sample ``g * step``,
    ``x[:, 0]`` is sample ``offset``) into their ring rows, then ``_reduce_segments`` of the
    windows whose first segments are ``firsts``. Returns the finiteness flag.

    ``half_sums`` are the sums of the half segment that starts at stream sample ``held`` (see
    ``_segment_powers``; negative: none), and afterwards those of the last new segment's
    second half.

    The ring's segments before ``new`` are kept from earlier steps, the others are computed
    afresh; ``carry`` (the sums of a window's second half) is used only if all its segments are
    kept ones, so it always sums what the ring holds."""
    nperseg = taper.shape[0]
    step = nperseg - nperseg // 2
    hi = firsts[-1] + n_seg
    finite = True
    if carried[0] + n_seg > new:
        carried[0] = -1
    if hi > new:
        starts = np.arange(new, hi) * step - offset
        finite = _segment_powers(x, starts, new % ring.shape[0], taper, kmin, ring, half_sums, held - offset)
    _reduce_segments(ring, firsts, n_seg, carry, carried, band_bins, band_weights, log_code, out)
    return finite


# flat arguments (noqa PLR0913): Numba would type a settings tuple on every call
@njit(cache=True, nogil=True)
def _append_welch_stream(  # noqa: PLR0913
    chunk, x, where, taper, kmin, ring, half_sums, n_seg, carry, carried, band_bins, band_weights, log_code, out
):
    """A stream buffer's append and the Welch step of the window it completes, in one call.

    ``where`` (int64) holds ``[first, new, offset, fill, held]``: ``_append_samples(chunk, x,
    fill)``, then, only if that sum is finite, ``_welch_stream`` of the one window whose first
    segment is ``first`` (``where[:1]`` is its ``firsts``), after which ``held`` is the stream
    sample where the half summed in ``half_sums`` starts. Returns the chunk's float64 sum
    (non-finite: nothing but the copy behind ``fill`` was done).
    """
    total = _append_samples(chunk, x, where[3])
    if math.isfinite(total):
        _welch_stream(
            x,
            where[2],
            where[1],
            where[4],
            taper,
            kmin,
            ring,
            half_sums,
            where[:1],
            n_seg,
            carry,
            carried,
            band_bins,
            band_weights,
            log_code,
            out,
        )
        where[4] = _held_after(where[4], where[1], where[0] + n_seg, taper.shape[0])
    return total


def _next_pow2(value: float) -> int:
    """Smallest power of two >= ``value`` (at least 2)."""
    n = 2
    while n < value:
        n *= 2
    return n


def _hann(nperseg: int) -> np.ndarray:
    """Periodic Hann window, identical to ``scipy.signal.get_window("hann", nperseg)``."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(nperseg) / nperseg)


def _check_nperseg(nperseg, window: int, default: int) -> int:
    """Validate a user ``nperseg`` against the window length (``default`` when None)."""
    if nperseg is None:
        return default
    nperseg = check_positive_int(nperseg, "nperseg", minimum=2)
    if nperseg > window:
        raise ValueError(
            f"nperseg ({nperseg}) exceeds the window length ({window} samples); "
            f"pass nperseg <= {window} or use longer windows."
        )
    return nperseg


def shared_nperseg(hop: int | None, window: int, default: int) -> int:
    """Segment length close to ``default`` that lets windows ``hop`` samples apart share segments.

    Welch segments start every ``step = nperseg - nperseg // 2`` samples, so two windows share
    segments exactly when the hop between them is a multiple of the step. A stream that keeps
    its segment powers (:func:`segment_powers`) then transforms only ``hop / step`` new segments
    per window: with a 2 s window and a 1 s hop, half of them. The rule takes ``s``, the largest
    divisor of ``hop`` that is at most ``default // 2``, and returns ``2 * s`` when ``s`` is at
    least 3/4 of the default step (a resolution at most 4/3 as coarse as the default's);
    otherwise, or when the hop is not a whole number of samples (``None``) or not shorter than
    the window, it returns ``default``. For 500 Hz EEG and 16 kHz audio with a 1 s hop it turns
    the default 512 into 500. The caller checks that its bands still contain a bin at
    ``fs / nperseg`` (the plan builders refuse otherwise).

    Parameters
    ----------
    hop : int or None
        Samples between window starts (``None``: not an integer number of samples).
    window : int
        Samples per window.
    default : int
        The feature's default segment length (``band_power_plan(...).nperseg`` without ``nperseg``).

    Returns
    -------
    nperseg : int
        Between ``default * 3 / 4`` and ``default``, and at most ``window``.

    Examples
    --------
    >>> shared_nperseg(500, 1000, 512), shared_nperseg(16000, 32000, 512), shared_nperseg(250, 500, 256)
    (500, 500, 250)
    >>> shared_nperseg(509, 1018, 512)  # a prime hop: no divisor near 256
    512
    """
    default = check_positive_int(default, "default", minimum=2)
    window = check_positive_int(window, "window", minimum=2)
    if hop is None or not 0 < hop < window:
        return default
    step = default // 2  # the default's step (one less for an odd default: 2 * s stays <= default)
    smallest = -(-3 * step // 4)
    for s in range(min(step, hop), smallest - 1, -1):
        if hop % s == 0:
            return 2 * s
    return default


class SpectralPlan(NamedTuple):
    """Everything a Welch band feature needs besides the samples, computed once per stream.

    Build it with :func:`band_power_plan` or :func:`log_band_energy_plan` (which validate every
    parameter) and apply it with :func:`spectral_features`, or segment by segment with
    :func:`segment_powers` and :func:`reduce_segments`; a plan is immutable and can be shared.

    Attributes
    ----------
    fs : float
        Sampling rate in Hz.
    window : int
        Samples per window the plan was built for (it fixes ``n_seg``).
    nperseg : int
        Segment (frame) length; segments start every ``step = nperseg - nperseg // 2`` samples.
    taper : ndarray, shape (nperseg,), float64
        Periodic Hann window.
    kmin : int
        First frequency bin any band uses.
    weights : ndarray, shape (n_bins, n_bands), float64
        Band weights of bins ``kmin .. kmin + n_bins - 1`` with every Welch scale factor folded
        in (density scaling, one-sided doubling, averaging over ``n_seg`` segments, ``df``).
    log : {"none", "log10", "ln"}
        Output transform: ``log10(p + tiny)`` (``tiny`` of the output dtype) or ``ln(p + 1e-10)``.
    taper32 : ndarray, shape (nperseg,), float32
        ``taper`` rounded to float32, for float32 samples (see :meth:`taper_for`).
    band_bins : ndarray, shape (n_bands, 2), int64
        ``[lo, hi)``: the range of bins (as rows of ``weights``) from a band's first to its last
        nonzero weight.
    band_weights : ndarray, float64
        ``weights[lo:hi, b]`` of every band ``b`` in turn: the kernels sum only these terms (the
        others are exact zeros, see ``_weigh``).
    """

    fs: float
    window: int
    nperseg: int
    taper: np.ndarray
    kmin: int
    weights: np.ndarray
    log: str
    taper32: np.ndarray
    band_bins: np.ndarray
    band_weights: np.ndarray

    @property
    def step(self) -> int:
        """Samples between consecutive segment starts (50 % overlap)."""
        return self.nperseg - self.nperseg // 2

    @property
    def n_seg(self) -> int:
        """Segments per window."""
        return (self.window - self.nperseg) // self.step + 1

    @property
    def n_bands(self) -> int:
        """Output features per channel."""
        return self.weights.shape[1]

    def taper_for(self, dtype) -> np.ndarray:
        """The taper in the dtype of the samples (the kernels compute in that precision)."""
        return self.taper if np.dtype(dtype) == np.float64 else self.taper32

    def log_floor(self, dtype) -> float:
        """What the output transform adds before its logarithm for features of ``dtype``:
        ``tiny`` of the dtype for ``log10``, ``1e-10`` for ``ln`` (0 without a logarithm)."""
        if self.log == "log10":
            return float(np.finfo(dtype).tiny)
        return _LOG_FLOOR if self.log == "ln" else 0.0


def _make_plan(weights_per_freq: np.ndarray, fs: float, window: int, nperseg: int, log: str) -> SpectralPlan:
    """Fold Welch scaling into per-frequency weights ``(nperseg // 2 + 1, n_bands)`` and keep the bins any band uses."""
    taper = _hann(nperseg)
    step = nperseg - nperseg // 2
    n_seg = (window - nperseg) // step + 1
    onesided = np.full(nperseg // 2 + 1, 2.0)
    onesided[0] = 1.0
    if nperseg % 2 == 0:
        onesided[-1] = 1.0
    df = fs / nperseg
    scale = onesided * df / (fs * float(np.sum(taper**2)) * n_seg)
    used = np.flatnonzero(np.any(weights_per_freq != 0.0, axis=1))
    kmin, kmax = int(used[0]), int(used[-1])
    weights = np.ascontiguousarray(weights_per_freq[kmin : kmax + 1] * scale[kmin : kmax + 1, None], dtype=np.float64)
    taper32 = taper.astype(np.float32)
    band_bins = np.empty((weights.shape[1], 2), dtype=np.int64)
    for b in range(weights.shape[1]):
        nonzero = np.flatnonzero(weights[:, b])
        band_bins[b] = nonzero[0], nonzero[-1] + 1
    band_weights = np.concatenate([weights[lo:hi, b] for b, (lo, hi) in enumerate(band_bins)])
    for array in (taper, taper32, weights, band_bins, band_weights):
        array.flags.writeable = False
    return SpectralPlan(fs, window, nperseg, taper, kmin, weights, log, taper32, band_bins, band_weights)


def _apply_plan(windows: np.ndarray, plan: SpectralPlan) -> np.ndarray:
    """:func:`spectral_features` after the checks of shape and dtype (C-contiguous float32/float64
    windows of ``plan.window``); raises the usual ValueError on NaN/inf samples, which the
    kernel finds in its pass over the samples."""
    n_windows, n_channels, _ = windows.shape
    out = np.empty((n_windows, n_channels, plan.n_bands), dtype=windows.dtype)
    if n_windows:
        finite = _welch_weighted(
            windows.reshape(n_windows * n_channels, -1),
            np.zeros(n_windows, dtype=np.int64),
            n_channels,
            plan.n_seg,
            plan.nperseg,
            plan.window - (plan.n_seg - 1) * plan.step - plan.nperseg,
            plan.taper_for(windows.dtype),
            plan.kmin,
            plan.band_bins,
            plan.band_weights,
            _LOG_CODES[plan.log],
            out,
        )
        if not finite:
            raise_if_nonfinite(windows, "windows")
    return out


def _check_plan(plan) -> SpectralPlan:
    if not isinstance(plan, SpectralPlan):
        raise TypeError(
            f"plan must be a SpectralPlan (from band_power_plan or log_band_energy_plan), got {type(plan).__name__}."
        )
    return plan


def spectral_features(windows, plan: SpectralPlan) -> np.ndarray:
    """Apply a spectral plan to a stack of windows (what :func:`band_powers` computes after planning).

    Parameters
    ----------
    windows : array-like, shape (n_windows, n_channels, plan.window)
        Finite values; ``n_windows`` may be 0.
    plan : SpectralPlan

    Returns
    -------
    features : ndarray, shape (n_windows, n_channels, plan.n_bands)
        float32 for float32 input, float64 otherwise.

    Raises
    ------
    TypeError
        When ``plan`` is not a SpectralPlan or the windows are not numeric.
    ValueError
        On non-3-D or non-finite windows, or windows of another length than the plan's.
    """
    plan = _check_plan(plan)
    windows = _check_windows(windows, min_window=2, check_finite=False)
    if windows.shape[2] != plan.window:
        raise ValueError(
            f"windows hold {windows.shape[2]} samples but the plan was built for {plan.window}; "
            "build the plan with the window length of the data."
        )
    return _apply_plan(windows, plan)


def segment_powers(x, starts, plan: SpectralPlan) -> np.ndarray:
    """Power spectra of individual Welch segments of a stream (the reusable part of Welch).

    A window's features are the plan's weights applied to the sum of its ``n_seg`` segment
    powers (:func:`reduce_segments`). Windows that overlap by a multiple of ``plan.step``
    share segments, so a stream keeps the powers of the segments its next window reuses and
    computes only the new ones.

    Parameters
    ----------
    x : array-like, shape (n_channels, n_samples)
        Finite samples; float32 stays float32 (the FFT runs in that precision).
    starts : array-like of int, shape (n_segments,)
        First sample of each segment, ``0 <= start <= n_samples - plan.nperseg``.
    plan : SpectralPlan

    Returns
    -------
    powers : ndarray, shape (n_segments, n_channels, n_bins), float64
        ``|rfft((seg - mean(seg)) * taper)[plan.kmin + k]|^2``.

    Raises
    ------
    TypeError, ValueError
        On a bad plan, non-finite or non-2-D ``x``, or a start outside the stream.
    """
    plan = _check_plan(plan)
    x = check_float_array(x, "x", ndim=2, check_finite=False)  # the kernel's sums find NaN/inf
    starts = np.asarray(starts)
    if starts.ndim != 1 or (starts.size and starts.dtype.kind not in "iu"):
        raise TypeError(f"starts must be a 1-D array of integers, got dtype {starts.dtype} and shape {starts.shape}.")
    starts = starts.astype(np.int64)
    last = x.shape[1] - plan.nperseg
    if starts.size and (starts.min() < 0 or starts.max() > last):
        raise ValueError(f"segment starts must lie in [0, {last}] for {x.shape[1]} samples and nperseg={plan.nperseg}.")
    out = np.empty((starts.size, x.shape[0], plan.weights.shape[0]), dtype=np.float64)
    half_sums = np.empty(x.shape[0], dtype=np.float64)
    if starts.size and not _segment_powers(x, starts, 0, plan.taper_for(x.dtype), plan.kmin, out, half_sums, -1):
        raise_if_nonfinite(x, "x")
    return out


def reduce_segments(powers, firsts, plan: SpectralPlan, dtype=np.float64) -> np.ndarray:
    """Welch band features of windows from their segment powers.

    Parameters
    ----------
    powers : array-like, shape (n_segments, n_channels, n_bins)
        From :func:`segment_powers`.
    firsts : array-like of int, shape (n_windows,)
        Index in ``powers`` of each window's first segment; window ``i`` uses
        ``powers[firsts[i] : firsts[i] + plan.n_seg]``.
    plan : SpectralPlan
    dtype : {numpy.float64, numpy.float32}
        Output dtype (that of the samples).

    Returns
    -------
    features : ndarray, shape (n_windows, n_channels, plan.n_bands)
        Identical, bit for bit, to :func:`spectral_features` of the same windows.
    """
    plan = _check_plan(plan)
    powers = np.ascontiguousarray(powers, dtype=np.float64)
    if powers.ndim != 3 or powers.shape[2] != plan.weights.shape[0]:
        raise ValueError(
            f"powers must have shape (n_segments, n_channels, {plan.weights.shape[0]}), got {powers.shape}."
        )
    firsts = np.asarray(firsts)
    if firsts.ndim != 1 or (firsts.size and firsts.dtype.kind not in "iu"):
        raise TypeError(f"firsts must be a 1-D array of integers, got dtype {firsts.dtype} and shape {firsts.shape}.")
    firsts = firsts.astype(np.int64)
    if firsts.size and (firsts.min() < 0 or firsts.max() + plan.n_seg > powers.shape[0]):
        raise ValueError(f"every window needs {plan.n_seg} segments from its first; powers has {powers.shape[0]}.")
    out = np.empty(
        (firsts.size, powers.shape[1], plan.n_bands), dtype=np.float32 if np.dtype(dtype) == np.float32 else np.float64
    )
    carry = np.empty((powers.shape[1], powers.shape[2]), dtype=np.float64)
    _reduce_segments(
        powers, firsts, plan.n_seg, carry, np.full(1, -1), plan.band_bins, plan.band_weights, _LOG_CODES[plan.log], out
    )
    return out


def sliding_spectral_features(x, hop: int, plan: SpectralPlan, *, dtype=None) -> np.ndarray:
    """Features of every window of a continuous signal, windows ``hop`` samples apart.

    Window ``i`` is ``x[:, i * hop : i * hop + plan.window]``, as ``sliding_windows(x,
    plan.window, hop)`` cuts it. When ``hop`` is a multiple of ``plan.step`` (and shorter than
    the window) consecutive windows share segments, and each distinct segment is transformed
    once (:func:`segment_powers` of blocks of windows into a ring of at most about
    ``_SHARED_BLOCK_VALUES`` powers, which keeps the segments consecutive blocks share);
    otherwise the windows are read in place by the Welch kernel.

    Parameters
    ----------
    x : array-like, shape (n_channels, n_samples)
        Finite samples; float32 stays float32.
    hop : int
        Samples between window starts (>= 1).
    plan : SpectralPlan
    dtype : {None, numpy.float32, numpy.float64}, default None
        Precision of the computation and of the features; None = that of ``x`` (float32 stays
        float32, other dtypes become float64). The result equals that of ``x.astype(dtype)``
        bit for bit; where windows share segments the samples are rounded as the kernel reads
        them, so float64 recordings are computed in float32 without a float32 copy of the signal.

    Returns
    -------
    features : ndarray, shape (n_windows, n_channels, plan.n_bands)
        ``n_windows = (n_samples - plan.window) // hop + 1`` (0 for a signal shorter than a
        window); identical, bit for bit, to :func:`spectral_features` of the sliding windows.

    Raises
    ------
    TypeError, ValueError
        On a bad plan or hop, or non-finite or non-2-D ``x``.
    """
    plan = _check_plan(plan)
    x = check_float_array(x, "x", ndim=2, check_finite=False)  # the kernels' sums find NaN/inf
    hop = check_positive_int(hop, "hop")
    dtype = x.dtype if dtype is None else np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be None, float32 or float64, got {dtype}.")
    n_channels, n_samples = x.shape
    n_windows = max(0, (n_samples - plan.window) // hop + 1)
    out = np.empty((n_windows, n_channels, plan.n_bands), dtype=dtype)
    if n_windows == 0:
        return out
    taper, step, n_seg = plan.taper_for(dtype), plan.step, plan.n_seg
    band_bins, band_weights, log_code = plan.band_bins, plan.band_weights, _LOG_CODES[plan.log]
    tail = plan.window - (n_seg - 1) * step - plan.nperseg  # samples after a window's last segment
    shared = hop % step == 0 and hop < plan.window
    if not shared and x.dtype != dtype:  # the Welch kernel reads windows in the precision of its samples
        with np.errstate(over="ignore"):  # samples beyond float32's range become inf: refused below
            x = x.astype(dtype)
    if shared:  # _segment_powers rounds the samples to the taper's dtype as it reads them
        per_window = hop // step  # new segments per window
        n_bins = plan.weights.shape[0]
        block = max(1, _SHARED_BLOCK_VALUES // (per_window * n_channels * n_bins))  # windows per block
        # a ring: segment g in row g % n_slots, so a block keeps the segments it shares with the
        # previous one (written before its own, never overwritten while a window needs them)
        n_slots = min(n_windows, block) * per_window + n_seg
        powers = np.empty((n_slots, n_channels, n_bins), dtype=dtype)  # |X|^2 in the FFT precision
        # the last window's second-half sums, which the next window's first half continues
        carry, carried = np.empty((n_channels, n_bins), dtype=np.float64), np.full(1, -1)
        # the sums of the last segment's second half, which the next block's first segment begins with
        half_sums, held = np.empty(n_channels, dtype=np.float64), -1
        finite = True
        done = 0  # segments 0 .. done - 1 are transformed
        for w0 in range(0, n_windows, block):
            w1 = min(n_windows, w0 + block)
            new, hi = max(done, w0 * per_window), (w1 - 1) * per_window + n_seg
            starts = np.arange(new, hi, dtype=np.int64) * step
            finite &= _segment_powers(x, starts, new % n_slots, taper, plan.kmin, powers, half_sums, held)
            held = _held_after(held, new, hi, plan.nperseg)
            done = hi
            firsts = np.arange(w0, w1, dtype=np.int64) * per_window
            _reduce_segments(powers, firsts, n_seg, carry, carried, band_bins, band_weights, log_code, out[w0:w1])
        # a window's samples after its last segment (fewer than a step) are in the next window's
        # segments, except for the last window's
        end = (n_windows - 1) * hop + plan.window
        if tail:
            with np.errstate(over="ignore"):
                finite = finite and math.isfinite(np.add.reduce(x[:, end - tail : end].astype(dtype), axis=None))
    else:
        starts = np.arange(n_windows, dtype=np.int64) * hop
        finite = _welch_weighted(
            x, starts, 0, n_seg, plan.nperseg, tail, taper, plan.kmin, band_bins, band_weights, log_code, out
        )
    if not finite:  # the samples in the computation's dtype (a float64 beyond float32's range is inf there)
        with np.errstate(over="ignore"):
            samples = x[:, : (n_windows - 1) * hop + plan.window].astype(dtype, copy=False)
        raise_if_nonfinite(samples, "x")
    return out


class WelchStream:
    """Welch features of the windows of one stream, computed in order, each shared segment once.

    A device computes the windows of a stream one hop at a time from a buffer of its latest
    samples. Windows that start a multiple of ``plan.step`` samples apart (and overlap) share
    segments: the stream keeps the powers of the segments that later windows reuse and
    transforms only the new ones (the arithmetic of :func:`segment_powers` and
    :func:`reduce_segments`, so the features have the bits of :func:`spectral_features` of the
    same windows). Windows at other offsets are computed whole by the Welch kernel, read in
    place from the buffer.

    Parameters
    ----------
    plan : SpectralPlan
    n_channels : int
        Channels of the stream (rows of the buffer).
    dtype : {numpy.float32, numpy.float64}
        Precision of the samples (and of the features).

    Notes
    -----
    The checks per call are O(1) in the samples (shapes, bounds); NaN/inf samples raise the usual
    ValueError, found by the kernels' own sums. Not thread-safe: one per stream.
    """

    def __init__(self, plan: SpectralPlan, n_channels: int, dtype=np.float64) -> None:
        self.plan = _check_plan(plan)
        self.n_channels = check_positive_int(n_channels, "n_channels")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}.")
        self._taper = plan.taper_for(self.dtype)
        # the plan's derived values, read on every call
        self._step, self._n_seg, self._window, self._n_bands = plan.step, plan.n_seg, plan.window, plan.n_bands
        self._log_code = _LOG_CODES[plan.log]
        # a ring: segment g lives in row g % n_slots, so keeping a window's segments moves nothing
        self._ring = np.empty((2 * plan.n_seg, self.n_channels, plan.weights.shape[0]), dtype=self.dtype)
        # the second-half sums of the window whose first segment is _carried[0] (see _reduce_segments)
        self._carried = np.empty(1, dtype=np.int64)
        carry = np.empty((self.n_channels, plan.weights.shape[0]), dtype=np.float64)
        # the stream kernels' arguments from carry to log_code: the stream's sums, the plan's bands
        self._reduction = (carry, self._carried, plan.band_bins, plan.band_weights, self._log_code)
        self._one_first = np.empty(1, dtype=np.int64)  # the first segment of a single window
        # the sums of the last transformed segment's second half, which the next segment begins with
        self._half_sums = np.empty(self.n_channels, dtype=np.float64)
        # append_features' positions (see _append_welch_stream); _where[4], the stream sample where
        # the half summed in _half_sums starts (-1: none), is kept between calls
        self._where = np.empty(5, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Forget the kept segments (a new stream, or a jump back in time)."""
        self._first = 0  # the ring holds segments _first .. _first + _count - 1 (g starts at sample g * step)
        self._count = 0
        self._carried[0] = -1
        self._where[4] = -1

    def _first_new(self, lo: int) -> int:
        """The first segment to transform for windows whose first segment is ``lo``: the one after
        the kept segments when they reach ``lo``, else ``lo`` (nothing kept is reused)."""
        end = self._first + self._count
        return end if self._first <= lo < end else lo

    @property
    def kept_segments(self) -> range:
        """Absolute indices of the segments whose powers are kept (segment ``g`` starts at sample ``g * plan.step``)."""
        return range(self._first, self._first + self._count)

    def append_features(self, chunk: np.ndarray, x: np.ndarray, fill: int, offset: int, start: int):
        """Copy ``chunk`` into ``x[:, fill : fill + n]`` and return the features of the one window
        it completes, which starts at stream sample ``start``, in one jitted call.

        The live step of a buffered stream: equal to writing the chunk into the buffer, testing its
        samples and calling :meth:`features` with ``starts=[start]``. The caller guarantees what
        :meth:`features` checks: ``x`` is the stream's C-contiguous buffer, the samples before
        ``fill`` are finite, the window ``[start, start + plan.window)`` ends in the chunk's
        samples (``offset`` is the stream index of ``x[:, 0]``), and ``start`` is a multiple of
        ``plan.step``. The samples before ``fill`` are the stream's, those earlier steps read:
        a step takes the sums of the half segment the previous step summed last instead of
        reading those samples again.

        Returns
        -------
        features : ndarray, shape (1, n_channels, plan.n_bands), or None
            None when a sample of the chunk is NaN or inf (or its float64 sum overflows): then
            only the free space behind ``fill`` was written and the kept segments are unchanged.
        """
        out = np.empty((1, self.n_channels, self._n_bands), dtype=self.dtype)
        plan = self.plan
        first = start // self._step
        where = self._where
        where[0] = first
        where[1] = self._first_new(first)
        where[2] = offset
        where[3] = fill
        total = _append_welch_stream(
            chunk,
            x,
            where,
            self._taper,
            plan.kmin,
            self._ring,
            self._half_sums,
            self._n_seg,
            *self._reduction,
            out,
        )
        if not math.isfinite(total):
            return None
        self._first, self._count = first, self._n_seg
        return out

    def features(self, x: np.ndarray, offset: int, starts) -> np.ndarray:
        """Features of the windows that start at stream samples ``starts``.

        Parameters
        ----------
        x : ndarray, shape (n_channels, n)
            C-contiguous buffer of the stream's dtype; ``x[:, 0]`` is stream sample ``offset``.
        offset : int
            Stream index of the buffer's first sample.
        starts : sequence of int
            Ascending stream indices of the windows' first samples; every window lies in ``x``.

        Returns
        -------
        features : ndarray, shape (len(starts), n_channels, plan.n_bands)
            Identical, bit for bit, to :func:`spectral_features` of the windows.

        Raises
        ------
        TypeError, ValueError
            On a buffer of the wrong type, dtype or shape, windows outside it or out of order,
            or NaN/inf samples (the kept segments are then forgotten).
        """
        if type(x) is not np.ndarray or x.dtype != self.dtype or x.ndim != 2 or not x.flags.c_contiguous:
            raise TypeError(f"x must be a C-contiguous 2-D {self.dtype} ndarray (the stream's buffer).")
        if x.shape[0] != self.n_channels:
            raise ValueError(f"x has {x.shape[0]} channel(s) but the stream has {self.n_channels}.")
        n_windows = len(starts)
        out = np.empty((n_windows, self.n_channels, self._n_bands), dtype=self.dtype)
        if n_windows == 0:
            return out
        first, last, window, step = starts[0], starts[-1], self._window, self._step
        if first < offset or last + window - offset > x.shape[1]:
            raise ValueError(
                f"windows [{first}, {last + window}) reach outside the buffer [{offset}, {offset + x.shape[1]})."
            )
        shared = first % step == 0
        if n_windows == 1:  # the live case: one window per hop
            firsts = self._one_first
            firsts[0] = first // step
        else:
            for a, b in zip(starts, starts[1:]):
                if b <= a:
                    raise ValueError(f"window starts must be ascending, got {a} then {b}.")
                shared = shared and b % step == 0 and b - a < window
            firsts = np.array(starts, dtype=np.int64) // step
        plan = self.plan
        if shared:  # transform the segments not kept, reduce the windows from the ring
            lo, hi = first // step, last // step + self._n_seg
            new = self._first_new(lo)
            if hi - lo > self._ring.shape[0]:  # more segments at once than ever before: a larger ring
                grown = np.empty((hi - lo,) + self._ring.shape[1:], dtype=self.dtype)
                for g in range(lo, min(new, hi)):
                    grown[g % grown.shape[0]] = self._ring[g % self._ring.shape[0]]
                self._ring = grown
            self._first, self._count = lo, hi - lo
            # every sample of the new segments is summed (held -1), so that a buffer whose samples
            # are not those the kept sums were taken from is still tested for NaN/inf
            finite = _welch_stream(
                x,
                offset,
                new,
                -1,
                self._taper,
                plan.kmin,
                self._ring,
                self._half_sums,
                firsts,
                self._n_seg,
                *self._reduction,
                out,
            )
            self._where[4] = _held_after(self._where[4], new, hi, plan.nperseg)
        else:
            offsets = np.array(starts, dtype=np.int64) - offset
            finite = _welch_weighted(
                x,
                offsets,
                0,
                self._n_seg,
                plan.nperseg,
                0,
                self._taper,
                plan.kmin,
                plan.band_bins,
                plan.band_weights,
                self._log_code,
                out,
            )
        if not finite:
            self.reset()
            raise_if_nonfinite(x[:, first - offset : last + window - offset], "x")
        return out


def _check_bands(bands, fs: float) -> tuple[tuple[str, float, float], ...]:
    """Validate ``(name, lo, hi)`` bands against the Nyquist frequency."""
    try:
        bands = tuple(tuple(band) for band in bands)
    except TypeError:
        raise TypeError(f"bands must be a sequence of (name, lo_hz, hi_hz) tuples, got {bands!r}.") from None
    if not bands:
        raise ValueError("bands is empty; pass at least one (name, lo_hz, hi_hz) band, e.g. EEG_BANDS.")
    nyquist = fs / 2.0
    checked = []
    for band in bands:
        if len(band) != 3:
            raise ValueError(f"each band must be (name, lo_hz, hi_hz), got {band!r}.")
        name, lo, hi = str(band[0]), band[1], band[2]
        try:
            lo, hi = float(lo), float(hi)
        except (TypeError, ValueError):
            raise TypeError(f"band {name!r}: edges must be numbers, got {band!r}.") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0:
            raise ValueError(f"band {name!r}: edges must be finite and >= 0 Hz, got lo={lo}, hi={hi}.")
        if lo >= hi:
            raise ValueError(f"band {name!r}: lo ({lo} Hz) must be < hi ({hi} Hz).")
        if hi > nyquist:
            raise ValueError(
                f"band {name!r}: upper edge {hi} Hz is above the Nyquist frequency {nyquist} Hz "
                f"(fs={fs} Hz). Drop or narrow the band, or record at a higher sampling rate."
            )
        checked.append((name, lo, hi))
    return tuple(checked)


def band_powers(windows, fs: float, bands=EEG_BANDS, *, nperseg: int | None = None, log: bool = False) -> np.ndarray:
    """Welch band powers of every window and channel.

    Parameters
    ----------
    windows : array-like, shape (n_windows, n_channels, window)
        Windows (e.g. from ``sliding_windows``); finite values. ``n_windows`` may be 0.
    fs : float
        Sampling rate in Hz (> 0).
    bands : sequence of (str, float, float), default EEG_BANDS
        ``(name, lo_hz, hi_hz)`` with ``0 <= lo < hi <= fs / 2``. A band covers the PSD bins
        with ``lo <= f < hi`` and must contain at least one bin.
    nperseg : int or None, default None
        Welch segment length (2 <= nperseg <= window). None picks
        ``min(window, smallest power of two >= fs)``: segments of about one second, i.e. a
        resolution of about 1 Hz (512 at 500 Hz, 256 at 250 or 160 Hz), with at least two
        50 %-overlapping segments in a 2 s window. Larger values sharpen the resolution and
        average fewer segments (noisier estimate).
    log : bool, default False
        Return ``log10(power + tiny)`` (``tiny`` = smallest normal number of the dtype).

    Returns
    -------
    powers : ndarray, shape (n_windows, n_channels, n_bands)
        ``sum(psd[lo <= f < hi]) * df`` in squared signal units, where ``psd`` is
        ``scipy.signal.welch(x, fs, window="hann", nperseg=nperseg, noverlap=nperseg // 2,
        detrend="constant", scaling="density", average="mean")`` and ``df = fs / nperseg``.
        float32 for float32 input, float64 otherwise.

    Raises
    ------
    TypeError
        On non-numeric windows, fs, bands or nperseg.
    ValueError
        On non-3-D or non-finite windows, windows shorter than 2 samples, ``fs <= 0``,
        ``nperseg`` outside ``[2, window]``, an empty band list, a band with ``lo >= hi``, a
        negative edge, an edge above Nyquist, or a band narrower than the frequency resolution.

    Examples
    --------
    >>> t = np.arange(1000) / 500.0
    >>> x = np.sin(2 * np.pi * 10.0 * t)[None, None]          # one window, one channel
    >>> p = band_powers(x, 500.0)
    >>> [name for name, _, _ in EEG_BANDS][int(np.argmax(p[0, 0]))]
    'alpha'
    """
    windows = _check_windows(windows, min_window=2, check_finite=False)
    return _apply_plan(windows, band_power_plan(fs, windows.shape[2], bands, nperseg=nperseg, log=log))


def band_power_plan(
    fs: float, window: int, bands=EEG_BANDS, *, nperseg: int | None = None, log: bool = False
) -> SpectralPlan:
    """Validate the parameters of :func:`band_powers` once and precompute its taper and band weights.

    Parameters
    ----------
    fs, bands, nperseg, log
        As in :func:`band_powers`.
    window : int
        Samples per window (>= 2).

    Returns
    -------
    plan : SpectralPlan
        ``spectral_features(windows, plan)`` equals ``band_powers(windows, fs, bands, nperseg=nperseg, log=log)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`band_powers` for its parameters; on a window shorter than 2 samples.
    """
    fs = check_positive_float(fs, "fs")
    window = check_positive_int(window, "window", minimum=2)
    bands = _check_bands(bands, fs)
    nperseg = _check_nperseg(nperseg, window, min(window, _next_pow2(fs)))
    freqs = np.fft.rfftfreq(nperseg, d=1.0 / fs)
    masks = np.empty((freqs.size, len(bands)))
    for b, (name, lo, hi) in enumerate(bands):
        masks[:, b] = (freqs >= lo) & (freqs < hi)
        if not masks[:, b].any():
            raise ValueError(
                f"band {name!r} ({lo}-{hi} Hz) contains no frequency bin at the resolution "
                f"df={fs / nperseg:.4g} Hz (fs={fs} Hz, nperseg={nperseg}). Widen the band or "
                "increase nperseg (longer windows)."
            )
    return _make_plan(masks, fs, window, nperseg, "log10" if log else "none")


def _hz_to_scale(f, scale: str):
    return (
        2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)
        if scale == "mel"
        else np.asarray(f, dtype=np.float64)
    )


def _scale_to_hz(m, scale: str):
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0) if scale == "mel" else np.asarray(m)


def _filterbank_edges(n_bands: int, fmin: float, fmax: float, scale: str) -> np.ndarray:
    """``n_bands + 2`` filter edges in Hz, equally spaced on the ``scale`` (HTK mel formula)."""
    points = np.linspace(_hz_to_scale(fmin, scale), _hz_to_scale(fmax, scale), n_bands + 2)
    edges = _scale_to_hz(points, scale)
    edges[0], edges[-1] = fmin, fmax  # exact end points despite the round trip
    return edges


def _triangles(freqs: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Triangular filters ``(n_freqs, n_bands)``: 0 at ``edges[b]``, 1 at ``edges[b+1]``, 0 at ``edges[b+2]``."""
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    f = freqs[:, None]
    rising = (f - lo) / (mid - lo)
    falling = (hi - f) / (hi - mid)
    return np.maximum(0.0, np.minimum(rising, falling))


def log_band_energies(
    windows,
    fs: float,
    *,
    n_bands: int = 32,
    fmin: float = 20.0,
    fmax: float | None = None,
    scale: str = "mel",
    nperseg: int | None = None,
) -> np.ndarray:
    """Log energies of triangular (mel) bands, for audio biosignals (heart and lung sounds).

    Each window is cut into Hann-tapered frames of ``nperseg`` samples, 50 % overlap, mean
    removed per frame (a DC offset would otherwise leak into the lowest band); the frame power
    spectra are averaged as Welch density (same estimate as ``band_powers``) and band ``b`` gets
    ``E_b = sum_k T_b(f_k) * psd_k * df`` where ``T_b`` is a triangle of height 1 rising from
    ``edges[b]`` to ``edges[b+1]`` and falling to ``edges[b+2]`` (HTK style, not area
    normalised: a pure tone at a filter centre gives its power ``A**2 / 2``). The
    ``n_bands + 2`` edges are equally spaced between ``fmin`` and ``fmax`` on the mel scale
    ``2595 * log10(1 + f / 700)`` (or in Hz for ``scale="linear"``).

    Parameters
    ----------
    windows : array-like, shape (n_windows, n_channels, window)
        Windows (e.g. from ``sliding_windows``); finite values. ``n_windows`` may be 0.
    fs : float
        Sampling rate in Hz (> 0).
    n_bands : int, default 32
        Number of triangular bands (>= 1).
    fmin : float, default 20.0
        Lower edge of the first band in Hz (>= 0, < fmax).
    fmax : float or None, default None
        Upper edge of the last band in Hz (<= fs / 2); None means fs / 2.
    scale : {"mel", "linear"}, default "mel"
        Spacing of the band edges.
    nperseg : int or None, default None
        Frame length (2 <= nperseg <= window). None picks the smallest power of two that is
        >= 32 ms of samples (512 at 16 kHz, 256 at 8 kHz) and fine enough that every band
        contains a frequency bin (``fs / nperseg`` below the narrowest band's width), capped
        at the window length.

    Returns
    -------
    energies : ndarray, shape (n_windows, n_channels, n_bands)
        ``ln(E_b + 1e-10)``; float32 for float32 input, float64 otherwise.

    Raises
    ------
    TypeError
        On non-numeric windows or parameters.
    ValueError
        On non-3-D or non-finite windows, windows shorter than 2 samples, ``fs <= 0``,
        ``n_bands < 1``, ``fmin < 0``, ``fmin >= fmax``, ``fmax`` above Nyquist, an unknown
        ``scale``, ``nperseg`` outside ``[2, window]``, or a band with no frequency bin.

    Examples
    --------
    >>> fs = 8000.0
    >>> tone = np.sin(2 * np.pi * 1000.0 * np.arange(16000) / fs)[None, None]
    >>> e = log_band_energies(tone, fs, n_bands=16)
    >>> e.shape
    (1, 1, 16)
    """
    windows = _check_windows(windows, min_window=2, check_finite=False)
    plan = log_band_energy_plan(
        fs, windows.shape[2], n_bands=n_bands, fmin=fmin, fmax=fmax, scale=scale, nperseg=nperseg
    )
    return _apply_plan(windows, plan)


def log_band_energy_plan(
    fs: float,
    window: int,
    *,
    n_bands: int = 32,
    fmin: float = 20.0,
    fmax: float | None = None,
    scale: str = "mel",
    nperseg: int | None = None,
) -> SpectralPlan:
    """Validate the parameters of :func:`log_band_energies` once and precompute its taper and filterbank.

    Parameters
    ----------
    fs, n_bands, fmin, fmax, scale, nperseg
        As in :func:`log_band_energies`.
    window : int
        Samples per window (>= 2).

    Returns
    -------
    plan : SpectralPlan
        ``spectral_features(windows, plan)`` equals ``log_band_energies(windows, fs, ...)``.

    Raises
    ------
    TypeError, ValueError
        As :func:`log_band_energies` for its parameters; on a window shorter than 2 samples.
    """
    fs = check_positive_float(fs, "fs")
    window = check_positive_int(window, "window", minimum=2)
    n_bands = check_positive_int(n_bands, "n_bands")
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}.")
    nyquist = fs / 2.0
    try:
        fmin = float(fmin)
        fmax = nyquist if fmax is None else float(fmax)
    except (TypeError, ValueError):
        raise TypeError(f"fmin and fmax must be numbers, got fmin={fmin!r}, fmax={fmax!r}.") from None
    if not math.isfinite(fmin) or fmin < 0:
        raise ValueError(f"fmin must be a finite frequency >= 0 Hz, got {fmin}.")
    if not math.isfinite(fmax) or fmax > nyquist:
        raise ValueError(
            f"fmax ({fmax} Hz) is above the Nyquist frequency {nyquist} Hz (fs={fs} Hz); pass fmax <= fs / 2 or None."
        )
    if fmin >= fmax:
        raise ValueError(f"fmin ({fmin} Hz) must be < fmax ({fmax} Hz).")
    edges = _filterbank_edges(n_bands, fmin, fmax, scale)
    narrowest = float(np.min(edges[2:] - edges[:-2]))
    default = min(window, max(_next_pow2(_AUDIO_FRAME_S * fs), _next_pow2(math.nextafter(fs / narrowest, math.inf))))
    nperseg = _check_nperseg(nperseg, window, default)
    filters = _triangles(np.fft.rfftfreq(nperseg, d=1.0 / fs), edges)
    empty = np.flatnonzero(~np.any(filters > 0.0, axis=0))
    if empty.size:
        b = int(empty[0])
        raise ValueError(
            f"{empty.size} of {n_bands} bands contain no frequency bin at the resolution "
            f"df={fs / nperseg:.4g} Hz (fs={fs} Hz, nperseg={nperseg}); the first is band {b} "
            f"({edges[b]:.4g}-{edges[b + 2]:.4g} Hz). Use fewer bands, a higher fmin, or longer "
            "windows / a larger nperseg."
        )
    return _make_plan(filters, fs, window, nperseg, "ln")
