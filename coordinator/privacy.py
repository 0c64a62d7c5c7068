"""The coordinator's name for the shared privacy accounting core.

The ledger and the accounting helpers live in the shared base,
:mod:`biofed.privacy_ledger`, because the device keeps a ledger too (local and distributed
trust modes, record-level DP-SGD); this module re-exports them for code written against
the coordinator package.
"""

from biofed.privacy_ledger import (  # noqa: F401  (re-export)
    ACCOUNTANTS,
    LedgerEntry,
    LedgerGroup,
    PrivacyLedger,
    calibrate_noise_multiplier,
    check_delta,
    check_noise_multiplier,
    check_rounds,
    check_sampling_rate,
    distributed_noise_multiplier,
    make_accountant,
    plan_epsilon,
    round_event,
)
