"""The applications built on the edge and coordinator packages: the ``biofed`` command line,
the demo, provisioning, the embedded and external brokers, the fleet simulator, the
evaluation, the privacy audit, status and the benchmark runner.

Nothing below this package imports it; the shared base (:mod:`biofed.protocol`,
:mod:`biofed.config`, :mod:`biofed.mqtt`, the privacy mechanism, ...) sits at the top of
:mod:`biofed`, under :mod:`biofed.edge` and :mod:`biofed.coordinator`.
"""
