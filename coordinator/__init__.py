"""biofed.coordinator

Modules (imported directly; this package imports nothing so that loading one module does
not pull in dp_accounting):

- ``biofed.coordinator.privacy``: client-level privacy ledger over dp_accounting (RDP, PLD),
  ``round_event``, ``plan_epsilon``, ``calibrate_noise_multiplier``, ``distributed_noise_multiplier``.
- ``biofed.coordinator.clipping``: ``clip_update``, Gaussian noise, ``AdaptiveClipping``.
- ``biofed.coordinator.strategies``: ``Strategy`` objects and the central-DP ``DPAggregator``.
- ``biofed.coordinator.privacy_cli``: the ``biofed privacy`` command.
"""
