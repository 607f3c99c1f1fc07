"""`SizeLimit`: lowered by 413s, back to the configured size after a while without one."""

from __future__ import annotations

import pytest

from infer_logger.sinks import size_limit
from infer_logger.sinks.size_limit import SizeLimit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(size_limit.time, "monotonic", clock)
    return clock


def test_a_413_halves_it_and_one_item_refused_goes_just_below(clock: Clock) -> None:
    limit = SizeLimit(8000)
    assert limit() == 8000
    assert limit.refused(6000, items=10) == 3000 and limit() == 3000
    assert limit.refused(7000, items=10) is None and limit() == 3000  # not raised again
    assert limit.refused(2000, items=1) == 1999
    assert limit.refused(1, items=1) == 1 and limit() == 1  # never 0


def test_the_configured_size_comes_back_after_a_while_without_413(clock: Clock) -> None:
    """A 413 may be a limit per item (our broker's per event): kept, it shrank every request for good."""
    limit = SizeLimit(8000, forget_after=300)
    limit.refused(4000, items=4)
    clock.now += 200
    limit.refused(1500, items=1)  # lowered again: kept for another while
    clock.now += 200
    assert limit() == 1499
    clock.now += 101
    assert limit() == 8000


def test_a_413_that_lowers_nothing_keeps_nothing_longer(clock: Clock) -> None:
    """One event over a receiver's per-event limit, every few minutes, kept the lowered size for good."""
    limit = SizeLimit(8000, forget_after=300)
    limit.refused(4000, items=4)
    for _ in range(3):
        clock.now += 200
        assert limit.refused(2_000_000, items=1) is None
    assert limit() == 8000
