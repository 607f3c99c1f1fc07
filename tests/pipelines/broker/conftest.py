"""Fixtures of the broker tests: real subscribers on loopback ports, brokers started in the test's loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.broker import Broker

from .helpers import Subscriber, settings

MakeBroker = Callable[..., Awaitable[Broker]]


@pytest.fixture
def subscriber() -> Iterator[Subscriber]:
    with Subscriber() as sub:
        yield sub


@pytest.fixture
def other_subscriber() -> Iterator[Subscriber]:
    with Subscriber() as sub:
        yield sub


@pytest.fixture
async def make_broker(tmp_path: Path) -> AsyncIterator[MakeBroker]:
    """Builds and starts brokers (`await make_broker(triggers_yaml, **settings)`); stops them after."""
    started: list[Broker] = []

    async def make(triggers: Any = None, **overrides: Any) -> Broker:
        broker = Broker(settings(tmp_path, **overrides), triggers=triggers)
        await broker.startup()
        started.append(broker)
        return broker

    yield make
    for broker in reversed(started):
        if broker.started:
            await broker.shutdown()
