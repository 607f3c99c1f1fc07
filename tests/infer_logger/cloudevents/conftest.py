"""Fixtures for the CloudEvents tests; the conformance data lives outside the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conformance import CE, MISSING_REASON


@pytest.fixture
def conformance_dir() -> Path:
    """cloudevents-conformance/ of the shared data; skips the test when it is absent."""
    if not CE.is_dir():
        pytest.skip(MISSING_REASON)
    return CE
