"""biofed.coordinator

Modules (imported directly; this package imports nothing so that loading one module does
not pull in dp_accounting):

- ``biofed.coordinator.privacy``: the shared accounting core of :mod:`biofed.privacy_ledger`
  (ledger over dp_accounting, ``round_event``, ``plan_epsilon``, ``calibrate_noise_multiplier``,
  ``distributed_noise_multiplier``) under the coordinator's name.
- ``biofed.coordinator.clipping``: ``clip_update``, the noise std ``z C``, ``AdaptiveClipping``
  (its clipped-count query is released by :mod:`biofed.privacy_mechanism`).
- ``biofed.coordinator.strategies``: ``Strategy`` objects and the central-DP ``DPAggregator``.
- ``biofed.coordinator.privacy_cli``: the ``biofed privacy`` command.
"""
