"""Shared fixtures: the conformance data, and real servers started as processes on free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Process, predictor_process

REPO = Path(__file__).resolve().parent.parent


def conformance_root() -> Path:
    return Path(os.environ.get("INFER_LOGGER_CONFORMANCE", REPO.parent / "shared" / "conformance"))


@pytest.fixture(scope="session")
def conformance() -> Path:
    root = conformance_root()
    if not root.is_dir():
        pytest.skip(f"conformance data not found at {root} (set INFER_LOGGER_CONFORMANCE)")
    return root


@pytest.fixture(scope="session")
def iris_predictor() -> Iterator[Process]:
    proc = predictor_process("iris").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def echo_predictor() -> Iterator[Process]:
    proc = predictor_process("echo").start()
    yield proc
    proc.stop()
