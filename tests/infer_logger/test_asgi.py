"""Plain-ASGI pieces: the body reader's limit and read deadline (driven by a `receive` that paces
its chunks, as uvicorn's does; the servers' own tests drive them over sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infer_logger.asgi import READ_RATE_ALLOWANCE, BodyTimeoutError, read_body


def paced(chunks: int, size: int, every: float) -> Any:
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        await asyncio.sleep(every)
        sent += 1
        return {"type": "http.request", "body": b"x" * size, "more_body": sent < chunks}

    return receive


async def test_a_body_arriving_steadily_gets_a_second_per_mib() -> None:
    """16 chunks of 1/8 MiB at 0.05 s each: 0.8 s in all, past a 0.3 s deadline but within the
    allowance the 2 MiB bought (a plain total deadline cut big uploads on slow links)."""
    body = await read_body(paced(16, int(READ_RATE_ALLOWANCE) // 8, 0.05), timeout=0.3)
    assert len(body) == 2 * int(READ_RATE_ALLOWANCE)


async def test_a_dribbled_body_is_cut_at_the_deadline() -> None:
    with pytest.raises(BodyTimeoutError):
        await read_body(paced(1000, 1, 0.05), timeout=0.3)
