"""biofed.coordinator

Modules (imported directly; this package imports nothing so that loading one module does
not pull in dp_accounting):

- ``biofed.coordinator.server``: the ``Coordinator``, a thin loop over the modules below.
- ``biofed.coordinator.ingest``: the inbound path (decode, allow list, dedupe, routing).
- ``biofed.coordinator.phases``: the round phases as pure functions of (state, replies).
- ``biofed.coordinator.central_dp``: central DP composed once around a strategy (``DPAggregator``).
- ``biofed.coordinator.clipping``: the ``AdaptiveClipping`` rule (its clipped-count query is
  released by :mod:`biofed.privacy_mechanism`).
- ``biofed.coordinator.strategies``: ``Strategy`` objects.
- ``biofed.coordinator.privacy_cli``: the ``biofed privacy`` command.
"""
