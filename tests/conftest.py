"""Shared fixtures: the conformance data, and real servers started as processes on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance import ROOT, reason
from tests.servers import Process, predictor_process
from tests.services import NoidaServer, external


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


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A Kafka-protocol broker: $KAFKA_BOOTSTRAP if set, else noida-db on a free port."""
    if given := external("KAFKA_BOOTSTRAP"):
        yield given
        return
    server = NoidaServer("kafka").start()
    yield server.address
    server.stop()


@pytest.fixture(scope="session")
def es_url() -> Iterator[str]:
    """An Elasticsearch 8 REST API: $ES_URL if set, else noida-db on a free port."""
    if given := external("ES_URL"):
        yield given
        return
    server = NoidaServer("elasticsearch").start()
    yield server.address
    server.stop()
