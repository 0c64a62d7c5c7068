"""Shared fixtures: the real recordings beside the project, skipped cleanly where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LSL_CONFIG = Path(__file__).resolve().with_name("lsl_api.cfg")
# Every LSL test stays on this machine (ResolveScope = machine, KnownPeers = 127.0.0.1, no
# IPv6; see biofed.datasets.live). liblsl reads it at its first call, so set it before any.
os.environ["LSLAPICFG"] = str(LSL_CONFIG)
SHARED_DATASETS = Path(os.environ.get("BIOFED_DATASETS", PROJECT_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` (or ``$BIOFED_DATASETS``); skips the test where it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real recordings not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


def starts_a_broker(fixture_name: str) -> bool:
    """A fixture that starts a real broker: ``broker``, ``*_broker`` (tests/brokers.py) or ``rabbitmq_cluster``."""
    return fixture_name == "broker" or fixture_name.endswith("_broker") or fixture_name == "rabbitmq_cluster"


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that starts a broker, so the fast lane (``-m "not slow"``) leaves it out."""
    for item in items:
        if any(starts_a_broker(name) for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
