"""Shared fixtures: the conformance data, and real servers started as processes on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance import ROOT, reason
from tests.servers import Process, predictor_process



@pytest.fixture(scope="session")
def conformance() -> Path:
    if not ROOT.is_dir():
        pytest.skip(reason(""))
    return ROOT


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
