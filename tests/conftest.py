"""Shared fixtures: the real recordings beside the project, skipped cleanly where absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("BIOFED_DATASETS", PROJECT_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """``../shared/datasets`` (or ``$BIOFED_DATASETS``); skips the test where it is absent."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real recordings not found at {SHARED_DATASETS}")
    return SHARED_DATASETS
