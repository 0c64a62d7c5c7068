"""biofed benchmark suite, installed as ``biofed.benchmarks``.

Every biofed kernel and the whole fusion chain is timed against the same computation done
the way a user would without biofed (MNE, SciPy, scikit-learn, plain NumPy) in the same run.

- :mod:`biofed.benchmarks.harness`: timing (warm-up call reported separately, median/min/max of N
  repeats), output comparison, targets and machine information.
- :mod:`biofed.benchmarks.baselines`: the reference computations written the way a user would.
- :mod:`biofed.benchmarks.suite`: the benchmark cases, their shapes and the targets.
- :mod:`biofed.benchmarks.stream`: the stream-profile script run in fresh subprocesses (real-time
  factor on one core, warm start).

Run it with ``biofed bench [--quick] [--json PATH] [--only NAME]``.
"""
