"""The memory floor of a process that runs biofed's Numba kernels: the least any agent can peak at.

Run as a fresh process (``python -m biofed.benchmarks.numba_floor``) with the interpreter and the
Numba cache (``NUMBA_CACHE_DIR``) of the process it is compared with. It imports NumPy and the
kernels (Numba, llvmlite and rocket-fft, which imports ``scipy.fft``) and nothing else of biofed,
then computes the band powers of one float32 EEG window with one of the agent's kernels
(:meth:`biofed.kernels.WelchStream.features`, which the streaming pipeline calls on its sample
buffer for a push that completes several windows), with the signature the agent uses, loaded
from the cache (loading machine code from Numba's cache still initializes its typing and
lowering registries and maps most of LLVM). Everything an agent holds above this peak is its own: its
other modules, its other kernels, its data.

Prints one JSON line: ``peak_rss_mb`` (the whole process's peak resident set, see
:func:`biofed.peak_memory.peak_rss_mb`), the peak after the imports, the modules of biofed and of SciPy it
imported, and the cache hits and misses of the call. Exits with an error when the call was
not served from the cache (it would measure the compiler): run ``biofed warmup`` with the
same ``NUMBA_CACHE_DIR`` first.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from biofed.peak_memory import peak_rss_mb


def main() -> None:
    from biofed.kernels import EEG_BANDS, WelchStream, band_power_plan, spectral

    rss_after_imports = peak_rss_mb()
    plan = band_power_plan(250.0, 500, EEG_BANDS)
    buffer = np.random.default_rng(0).standard_normal((4, plan.window)).astype(np.float32)
    powers = WelchStream(plan, buffer.shape[0], np.float32).features(buffer, 0, [0])
    kernels = (spectral._welch_stream,)
    report = {
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss_after_imports,
        "biofed_modules": sorted(m for m in sys.modules if m.startswith("biofed")),
        "scipy_modules": sorted({m.split(".")[1] for m in sys.modules if m.startswith("scipy.") and m.count(".") == 1}),
        "cache_hits": sum(sum(kernel.stats.cache_hits.values()) for kernel in kernels),
        "cache_misses": sum(sum(kernel.stats.cache_misses.values()) for kernel in kernels),
        "finite": bool(np.isfinite(powers).all()),
    }
    print(json.dumps(report))
    if report["cache_misses"] or not report["cache_hits"]:
        sys.exit(
            "the kernel was compiled, not loaded from Numba's cache, so the figure measures the compiler: "
            "run `biofed warmup` with the same NUMBA_CACHE_DIR first."
        )


if __name__ == "__main__":
    main()
