"""A bounded wait for tests: poll a condition until it holds (a bound, never a timing assertion)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition",
                every: float = 0.02) -> None:
    """Poll `check` every `every` s until it holds; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:g}s")
        await asyncio.sleep(every)
