"""Timing harness, output comparison, targets and machine information.

Timing rule: the first call of a function is a warm-up (it includes Numba compilation or
cache loading) and is reported on its own as ``first_call_s``; then the function runs
``repeats`` times, each call timed with :func:`time.perf_counter`, and the summary is the
median, min and max of those repeats. A kernel and its baselines run their repeats
interleaved (:func:`measure_interleaved`), so load on a shared machine hits both sides of a
ratio alike. The clock is injectable so the statistics can be
tested without timing anything.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Wall-clock times of one function.

    Attributes
    ----------
    times : tuple of float
        Seconds per timed repeat (the warm-up call excluded).
    first_call : float
        Seconds taken by the warm-up call (compilation or cache load included).
    """

    times: tuple[float, ...]
    first_call: float

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.min,
            "max_s": self.max,
            "repeats": len(self.times),
            "first_call_s": self.first_call,
            "times_s": list(self.times),
        }


def measure(
    fn: Callable[[], Any], *, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[Timing, Any]:
    """Time ``fn()``: one warm-up call, then ``repeats`` timed calls.

    Parameters
    ----------
    fn : callable
        Called without arguments.
    repeats : int
        Number of timed calls after the warm-up (>= 1).
    clock : callable
        Returns the current time in seconds; :func:`time.perf_counter` unless a test injects one.

    Returns
    -------
    timing : Timing
    result : object
        What the warm-up call returned (used for output comparison).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    start = clock()
    result = fn()
    first_call = clock() - start
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return Timing(tuple(times), first_call), result


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], *, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, tuple[Timing, Any]]:
    """Time several functions on the same inputs, their repeats interleaved.

    Each function gets its warm-up call first (in order), then round ``r`` times one call of
    every function in turn, so that a change in the machine's load during the run falls on
    all of them alike and their ratio stays meaningful on a shared machine.

    Parameters
    ----------
    fns : dict of str to callable
        Called without arguments.
    repeats : int
        Timed calls per function after its warm-up (>= 1).
    clock : callable
        As in :func:`measure`.

    Returns
    -------
    dict of str to (Timing, object)
        Per name, its timing and what its warm-up call returned.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    first: dict[str, tuple[float, Any]] = {}
    for name, fn in fns.items():
        start = clock()
        result = fn()
        first[name] = (clock() - start, result)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: (Timing(tuple(times[name]), first[name][0]), first[name][1]) for name in fns}


def max_relative_difference(actual, expected) -> float:
    """Largest absolute difference relative to the scale of ``expected``.

    ``max |actual - expected| / max |expected|`` over all elements (0 when both are all
    zero). Scale-relative rather than element-wise, so entries that are near zero after
    centring do not turn rounding noise into a large ratio.
    """
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare outputs of shapes {a.shape} and {b.shape}.")
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


@dataclass(frozen=True)
class Comparison:
    """biofed against one baseline on the same input.

    ``ratio`` is baseline median / biofed median (> 1 means biofed is faster).
    ``rel_diff`` is :func:`max_relative_difference` of the outputs (None when the two do
    not compute comparable outputs); it is flagged when above ``tolerance``.
    """

    case: str
    shape: str
    biofed: Timing
    baseline_name: str
    baseline: Timing
    rel_diff: float | None = None
    tolerance: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.baseline.median / self.biofed.median if self.biofed.median > 0 else math.inf

    @property
    def flagged(self) -> bool:
        return self.rel_diff is not None and self.tolerance is not None and not self.rel_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "shape": self.shape,
            "baseline_name": self.baseline_name,
            "biofed": self.biofed.to_dict(),
            "baseline": self.baseline.to_dict(),
            "ratio": self.ratio,
            "max_rel_diff": self.rel_diff,
            "tolerance": self.tolerance,
            "flagged": self.flagged,
            "note": self.note,
        }


@dataclass(frozen=True)
class Metric:
    """A measured number that is not a timing comparison (error ratio, real-time factor...)."""

    case: str
    name: str
    value: float
    unit: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "name": self.name, "value": self.value, "unit": self.unit, "detail": self.detail}


@dataclass(frozen=True)
class Target:
    """A performance goal, reported (never asserted): ``measured <op> threshold``."""

    name: str
    measured: float
    op: str  # ">=" or "<="
    threshold: float
    unit: str = ""

    @property
    def passed(self) -> bool:
        if self.op == ">=":
            return self.measured >= self.threshold
        if self.op == "<=":
            return self.measured <= self.threshold
        raise ValueError(f"unknown target operator {self.op!r}; use '>=' or '<='.")

    @property
    def goal(self) -> str:
        return f"{self.op} {self.threshold:g}{self.unit}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": self.measured,
            "op": self.op,
            "threshold": self.threshold,
            "unit": self.unit,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class Table:
    """A small table a case prints as is (e.g. the per-stage profile against the FFT limit)."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": list(self.columns),
            "rows": [list(r) for r in self.rows],
            "note": self.note,
        }

    def format(self) -> str:
        """Fixed-width text: numbers with 4 significant digits."""
        cells = [list(self.columns)] + [[c if isinstance(c, str) else f"{c:.4g}" for c in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = [self.title]
        for r, row in enumerate(cells):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if r == 0:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


@dataclass
class CaseResult:
    """Everything one benchmark case produced, or the error that stopped it."""

    name: str
    comparisons: list[Comparison] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "comparisons": [c.to_dict() for c in self.comparisons],
            "metrics": [m.to_dict() for m in self.metrics],
            "targets": [t.to_dict() for t in self.targets],
            "tables": [t.to_dict() for t in self.tables],
            "error": self.error,
            "seconds": self.seconds,
        }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                # x86: "model name"; Raspberry Pi / ARM: "Model" or "Hardware".
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # threadpoolctl arrives with scikit-learn; fall back to NumPy's build config
        config = np.show_config(mode="dicts")
        return [{"numpy_build": config.get("Build Dependencies", {}).get("blas", {})}]
    return [
        {
            k: info.get(k)
            for k in ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")
        }
        for info in threadpool_info()
    ]


def machine_info() -> dict[str, Any]:
    """Platform, CPU, Python, library versions and BLAS, for comparing machines."""
    import numba

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": affinity,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "versions": {
            name: _version(name)
            for name in (
                "biofed",
                "numpy",
                "numba",
                "llvmlite",
                "rocket-fft",
                "scipy",
                "mne",
                "scikit-learn",
                "threadpoolctl",
            )
        },
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "numba_threading_layer": numba.config.THREADING_LAYER,
        "blas": _blas_info(),
    }
