"""biofed.coordinator

Modules (imported directly; this package imports nothing so that loading one module does
not pull in dp_accounting):

- ``biofed.coordinator.clipping``: ``clip_update``, the noise std ``z C``, ``AdaptiveClipping``
  (its clipped-count query is released by :mod:`biofed.privacy_mechanism`).
- ``biofed.coordinator.strategies``: ``Strategy`` objects and the central-DP ``DPAggregator``.
- ``biofed.coordinator.privacy_cli``: the ``biofed privacy`` command.
"""
